# -*- test-case-name: tests.test_models -*-
"""
C{GET /v1/models} and C{GET /v1/models/{id}}: what Open WebUI, LibreChat
and most SDK-based tools ask for at startup.

Forwarded upstream like chat completions, through the same L{Exchange}.  A
client with a model allow-list sees only its models: the list is read
whole (bounded, see L{oaiproxy.upstream.exchange.BoundedCollector}) and filtered,
and any other model is a 404 for it, decided without asking upstream.

A model id is one path segment (L{oaiproxy.upstream.styles.is_path_segment}): the
path below C{/models} goes upstream with the shared key, so C{../files}
(or C{..%2Ffiles}) would otherwise read the account's files.
"""

from __future__ import annotations

import json
from typing import Optional
from urllib.parse import quote

from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.errors import ApiError, model_not_found, not_an_id, upstream_unreadable
from oaiproxy.routes.forwarding import ForwardingResource
from oaiproxy.routetable import MODELS
from oaiproxy.upstream.exchange import Collect
from oaiproxy.upstream.styles import AzureStyle, is_path_segment
from oaiproxy.web import JSONResource, error_response

__all__ = ["ModelsResource", "model_not_found", "model_id", "filter_listing"]


def model_id(postpath: list[bytes]) -> "Optional[str] | ApiError":
    """
    The model a request below C{/models} asks for: C{None} for the list
    itself, the id, or the 404 for a path that is not one model id.

    @param postpath: the segments below C{/models}, as twisted.web decoded
        them (once; it leaves C{.} and C{..} as they came).
    """
    if not postpath:
        return None
    try:
        segments = [segment.decode("utf-8") for segment in postpath]
    except UnicodeDecodeError:
        return not_an_id("model", b"/".join(postpath).decode("utf-8", "replace"), "model_not_found")
    name = "/".join(segments)
    if len(segments) != 1 or not is_path_segment(name):
        return not_an_id("model", name, "model_not_found")
    return name


def filter_listing(status: int, body: bytes, allowed: frozenset[str]) -> "bytes | ApiError":
    """
    Upstream's model list less the models outside C{allowed}.  Any answer
    but a 200 goes on as it came (an upstream 429 or 5xx, with its
    headers); a 200 that is not a list of models is an error, never passed
    on unfiltered.
    """
    if status != 200:
        return body
    try:
        listing = json.loads(body)
        # An entry that is not a model with a string id is dropped, not
        # looked up (a list as the id would raise, refusing the whole list).
        listing["data"] = [
            m for m in listing["data"] if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"] in allowed
        ]
    except (ValueError, KeyError, TypeError, RecursionError):
        return upstream_unreadable("model list")
    return json.dumps(listing).encode("utf-8")


class ModelsResource(ForwardingResource):
    """
    The models endpoint, C{/models} and everything below it.
    """

    route = MODELS
    # Unlike the other endpoints, the path below it is meaningful: a model.
    render = JSONResource.render

    def render_GET(self, request: Request) -> bytes | int:
        client = self.admission.admit(request, "models")
        if isinstance(client, bytes):
            return client
        name = model_id(request.postpath or [])
        if isinstance(name, ApiError):
            self.log.info("refused a model id that is not one path segment")
            return error_response(request, name)
        self.note(request, model=name)
        allowed = client.models if client is not None else None
        if allowed is not None and name is not None and name not in allowed:
            return error_response(request, model_not_found(name))
        style = self._upstream.style
        if isinstance(style, AzureStyle) and style.deployments:
            return self._deployed(request, name, style, allowed)
        path = "/models" if name is None else "/models/" + quote(name, safe=":@")
        collect = None
        if allowed is not None and name is None:
            collect = self._filter(allowed)
        self.exchange(request, MODELS, collect=collect).start(None, "GET", path)
        return NOT_DONE_YET

    def _filter(self, allowed: frozenset[str]) -> Collect:
        def collect(status: int, body: bytes) -> "bytes | ApiError":
            answer = filter_listing(status, body, allowed)
            if isinstance(answer, ApiError):
                self.log.warn("upstream's model list is not a JSON list of models: not passed on")
            return answer

        return collect

    def _deployed(
        self, request: Request, name: Optional[str], style: AzureStyle, allowed: Optional[frozenset[str]]
    ) -> bytes:
        """
        Azure lists the base models a resource could deploy, not the
        deployments; with a deployment map, the models a client can use are
        the map's, so they are the list.
        """
        models = [
            {"id": model, "object": "model", "created": 0, "owned_by": "azure"}
            for model in sorted(style.deployments)
            if allowed is None or model in allowed
        ]
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        if name is None:
            return json.dumps({"object": "list", "data": models}).encode("utf-8")
        for model in models:
            if model["id"] == name:
                return json.dumps(model).encode("utf-8")
        return error_response(request, model_not_found(name))
