# -*- test-case-name: tests.test_models -*-
"""
C{GET /v1/models} and C{GET /v1/models/{id}}: what Open WebUI, LibreChat
and most SDK-based tools ask for at startup.

Forwarded upstream like chat completions.  A client with a model
allow-list sees only its models: the list is filtered (it is small, so it
is read whole for that), and any other model is a 404 for it, decided
without asking upstream.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote

import treq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.errors import ApiError
from oaiproxy.forward import ForwardingResource, classify_upstream_failure
from oaiproxy.records import record_of
from oaiproxy.resources import JSONResource, error_response, send_error
from oaiproxy.routes import MODELS
from oaiproxy.styles import AzureStyle

__all__ = ["ModelsResource", "model_not_found"]


def model_not_found(model: str) -> ApiError:
    """
    OpenAI's own answer for a model a key may not see.
    """
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    )


class ModelsResource(ForwardingResource):
    """
    The models endpoint, C{/models} and everything below it.
    """

    route = MODELS
    # Unlike the other endpoints, the path below it is meaningful: a model.
    render = JSONResource.render

    def render_GET(self, request: Request) -> bytes | int:
        client = self.admit(request, "models")
        if isinstance(client, bytes):
            return client
        record = record_of(request)
        name = "/".join(segment.decode("utf-8", "replace") for segment in (request.postpath or []) if segment)
        record.model = name or None
        path = "/models" + ("/" + quote(name, safe="/:@") if name else "")
        allowed = client.models if client is not None else None
        if allowed is not None and name and name not in allowed:
            return error_response(request, model_not_found(name))
        style = self._upstream.style
        if isinstance(style, AzureStyle) and style.deployments:
            return self._deployed(request, name, style, allowed)
        if allowed is not None and not name:
            self._filtered_list(request, allowed)
            return NOT_DONE_YET
        self.exchange(request, MODELS).start(None, "GET", path)
        return NOT_DONE_YET

    def _deployed(self, request: Request, name: str, style: AzureStyle, allowed: Optional[frozenset[str]]) -> bytes:
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
        if not name:
            return json.dumps({"object": "list", "data": models}).encode("utf-8")
        for model in models:
            if model["id"] == name:
                return json.dumps(model).encode("utf-8")
        return error_response(request, model_not_found(name))

    def _filtered_list(self, request: Request, allowed: frozenset[str]) -> None:
        """
        The upstream's model list, less what the client may not use.
        """
        record = record_of(request)
        record.upstream_sent = self._clock.seconds()
        pending = self._upstream.request("GET", "/models", None, request.requestHeaders)
        finished: list[bool] = []

        def client_done(result: Optional[Failure]) -> None:
            finished.append(True)
            if isinstance(result, Failure):
                pending.cancel()

        request.notifyFinish().addBoth(client_done)

        def got(response: IResponse) -> "Deferred[Any]":
            record.upstream_head = self._clock.seconds()
            record.upstream_status = response.code
            return treq.content(response).addCallback(lambda body: (response, body))

        def answer(result: tuple[IResponse, bytes]) -> None:
            response, body = result
            if finished:
                return
            if response.code == 200:
                try:
                    listing = json.loads(body)
                    listing["data"] = [m for m in listing["data"] if isinstance(m, dict) and m.get("id") in allowed]
                    body = json.dumps(listing).encode("utf-8")
                except (ValueError, KeyError, TypeError):
                    pass  # not a list we understand: pass it on as it came
            request.setResponseCode(response.code)
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            if finished:
                return
            error = classify_upstream_failure(failure, self._connect_timeout)
            self.log.warn("upstream gave no model list: {status} {code}", status=error.status, code=error.code)
            send_error(request, error)

        pending.addCallback(got).addCallbacks(answer, failed)
