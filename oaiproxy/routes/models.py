# -*- test-case-name: tests.test_models -*-
"""
C{GET /v1/models} and C{GET /v1/models/{id}}: what Open WebUI, LibreChat
and most SDK-based tools ask for at startup.

Forwarded upstream like chat completions, through the same L{Exchange}.  A
client with a model allow-list sees only its models: the list is read
whole (bounded, see L{oaiproxy.upstream.exchange.BoundedCollector}) and filtered,
and any other model is a 404 for it, decided without asking upstream.

With several upstreams (an upstreams file) the list is the union of what
the pool serves (L{PoolListing}): the names in the entries' C{models}
lists (globs cannot be listed: a model only a glob covers is served but
not shown) and the deployments of Azure entries with a C{model_map},
answered by the proxy itself; and, when some entry has no C{models} list,
that upstream's own list, asked of one such entry that is healthy (the
exchange picks it and fails over as for any request) and merged with the
configured names.  The client's allow-list filters the union as it does
the single upstream's list.  A single upstream is the case of one entry:
its list is forwarded, or an Azure deployment map answered locally, as
before.

A model id is one path segment (L{oaiproxy.upstream.styles.is_path_segment}): the
path below C{/models} goes upstream with the shared key, so C{../files}
(or C{..%2Ffiles}) would otherwise read the account's files.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any, Optional
from urllib.parse import quote

from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.errors import ApiError, model_not_found, not_an_id, upstream_unreadable
from oaiproxy.routes.forwarding import ForwardingResource
from oaiproxy.routetable import MODELS
from oaiproxy.upstream.exchange import Collect
from oaiproxy.upstream.styles import AzureStyle, is_path_segment
from oaiproxy.upstream.upstreams import Upstreams
from oaiproxy.web import JSONResource, error_response

__all__ = ["ModelsResource", "model_not_found", "model_id", "filter_listing", "PoolListing"]


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


def filter_listing(
    status: int, body: bytes, allowed: Optional[frozenset[str]], extra: "tuple[dict[str, Any], ...]" = ()
) -> "bytes | ApiError":
    """
    Upstream's model list with the models of C{extra} it lacks added after
    its own, less the models outside C{allowed} (none: every model).  Any
    answer but a 200 goes on as it came (an upstream 429 or 5xx, with its
    headers); a 200 that is not a list of models is an error, never passed
    on unfiltered.
    """
    if status != 200:
        return body
    try:
        listing = json.loads(body)
        # An entry that is not a model with a string id is dropped, not
        # looked up (a list as the id would raise, refusing the whole list).
        data = [m for m in listing["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        seen = {m["id"] for m in data}
        data += [m for m in extra if m["id"] not in seen]
        listing["data"] = [m for m in data if allowed is None or m["id"] in allowed]
    except (ValueError, KeyError, TypeError, RecursionError):
        return upstream_unreadable("model list")
    return json.dumps(listing).encode("utf-8")


_GLOB = frozenset("*?[")


class PoolListing:
    """
    What the pool's configuration says it serves, for C{/v1/models}.

    @ivar models: the models the proxy lists itself, sorted: every
        entry's C{models} names (not its globs), and the deployments of an
        Azure entry with a C{model_map} and no C{models} list.
    @ivar ask: whether some entry has neither, so only its upstream knows
        what it serves: the list is then asked of it (one such entry, a
        healthy one: the exchange chooses).
    @ivar globs: the glob patterns of the C{models} lists, which serve
        models the list cannot name.
    """

    def __init__(self, upstreams: Upstreams) -> None:
        names: dict[str, str] = {}
        self.globs: list[str] = []
        self.ask = False
        for member in upstreams.pool.members:
            style = upstreams.client(member.name).style
            owner = "azure" if isinstance(style, AzureStyle) else "oaiproxy"
            served = member.upstream.models
            if served is None and isinstance(style, AzureStyle) and style.deployments:
                # Azure lists the base models a resource could deploy, not
                # its deployments: the map is what a client can use.
                served = tuple(style.deployments)
            if served is None:
                self.ask = True
                continue
            for name in served:
                if _GLOB.isdisjoint(name):
                    names.setdefault(name, owner)
                else:
                    self.globs.append(name)
        self.models = tuple(
            {"id": name, "object": "model", "created": 0, "owned_by": names[name]} for name in sorted(names)
        )

    def find(self, name: str) -> Optional[dict[str, Any]]:
        """
        The listed model C{name}, if the proxy lists it itself.
        """
        for model in self.models:
            if model["id"] == name:
                return model
        return None

    def covers(self, name: str) -> bool:
        """
        Whether some upstream could know C{name}: one that is asked, or one
        whose glob matches it.
        """
        return self.ask or any(fnmatchcase(name, glob) for glob in self.globs)


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
        listing = PoolListing(self._upstream)
        if name is None:
            if not listing.ask:
                models = [m for m in listing.models if allowed is None or m["id"] in allowed]
                return self._local(request, {"object": "list", "data": models})
            collect = None
            if allowed is not None or listing.models:
                collect = self._merge(allowed, listing.models)
            self.exchange(request, MODELS, collect=collect).start(None, "GET", "/models")
            return NOT_DONE_YET
        model = listing.find(name)
        if model is not None:
            return self._local(request, model)
        if not listing.covers(name):
            return error_response(request, model_not_found(name))
        # Asked of an upstream that serves it (one whose glob matches, or
        # one without a models list).
        self.exchange(request, MODELS).start(None, "GET", "/models/" + quote(name, safe=":@"), name)
        return NOT_DONE_YET

    def _merge(self, allowed: Optional[frozenset[str]], extra: "tuple[dict[str, Any], ...]") -> Collect:
        def collect(status: int, body: bytes) -> "bytes | ApiError":
            answer = filter_listing(status, body, allowed, extra)
            if isinstance(answer, ApiError):
                self.log.warn("upstream's model list is not a JSON list of models: not passed on")
            return answer

        return collect

    @staticmethod
    def _local(request: Request, document: dict[str, Any]) -> bytes:
        """
        An answer the proxy knows from its configuration, without asking
        upstream.
        """
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return json.dumps(document).encode("utf-8")
