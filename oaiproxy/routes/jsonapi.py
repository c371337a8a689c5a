# -*- test-case-name: tests.routes.test_chat,tests.test_routetable -*-
"""
The JSON API routes: chat completions, and the others an operator enables
with C{--routes} (completions, embeddings, responses, moderations, image
generation, speech).

Each is one L{JsonRouteResource} configured by its L{Route}: the body is
checked for the route's required members, the client's allow-list and
limits apply to the model it names, and the body goes upstream byte for
byte (but for the C{include_usage} flag on streams, see
L{oaiproxy.observe.usage}).  The Responses API also has stored responses to read,
cancel and delete, forwarded by L{ResponsesResource}.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oaiproxy.access.clients import Credentials, Limits
from oaiproxy.access.limits import Held, Limiter, LimitStore, LocalLimitStore, estimate_tokens
from oaiproxy.drain import Lifecycle
from oaiproxy.errors import ApiError, bad_request, method_not_allowed, model_not_found, not_an_id
from oaiproxy.observe.usage import inject_include_usage
from oaiproxy.routes.forwarding import ForwardingResource
from oaiproxy.routes.models import ModelsResource
from oaiproxy.routes.uploads import UploadResource
from oaiproxy.routes.validation import JsonRequest, parse_json_request
from oaiproxy.routetable import MODELS, RESPONSES, Route
from oaiproxy.upstream.client import UpstreamClient
from oaiproxy.upstream.exchange import BodyFor
from oaiproxy.upstream.styles import UpstreamStyle, is_path_segment
from oaiproxy.upstream.upstreams import Upstreams
from oaiproxy.web import JSONResource, NotFound, error_response, query_of, read_body

__all__ = [
    "JsonRouteResource",
    "ResponsesResource",
    "api_resources",
    "resource_class",
    "streamed_paths",
]


class JsonRouteResource(ForwardingResource):
    """
    A JSON route (L{ForwardingResource.route}).  Before anything goes
    upstream a request passes, in order: the client key check, body
    validation, the client's model allow-list, and the client's limits.
    Each refusal is an OpenAI-shaped error.
    """

    def render_POST(self, request: Request) -> bytes | int:
        route = self.route
        client = self.admission.admit(request, route.label)
        if isinstance(client, bytes):
            return client
        body = read_body(request)
        parsed = parse_json_request(body, route)
        if isinstance(parsed, ApiError):
            return error_response(request, parsed)
        if parsed.model is None and self._upstream.style.needs_model(route):
            return error_response(
                request,
                bad_request(
                    "you must provide a model parameter: the upstream is Azure OpenAI, where it names the deployment.",
                    "model",
                    "missing_required_parameter",
                ),
            )
        if not self._upstream.style.addressable(route.path, parsed.model):
            # Azure puts the model's deployment in the path: "../x" would
            # address another endpoint with the shared key.
            return error_response(request, model_not_found(parsed.model or ""))
        self.note(request, model=parsed.model, stream=parsed.stream)
        limits = client.limits if client is not None else Limits()
        prompt_estimate, estimate = estimate_tokens(body, parsed.document, limits, route.generates)
        admitted = self.admission.answer(request, client, parsed.model, estimate, prompt_estimate=prompt_estimate)

        def forward(held: Held) -> None:
            ask_usage = bool(route.stream_usage and parsed.stream and self._stream_usage)
            body_for, strip_usage = _body_for(body, parsed, route, ask_usage)
            exchange = self.exchange(request, route, held, prompt_estimate, strip_usage, body_for=body_for)
            exchange.start(body, "POST", route.path, parsed.model, query_of(request))

        return self.when_admitted(request, admitted, forward)


def _body_for(body: bytes, parsed: JsonRequest, route: Route, ask_usage: bool) -> tuple[BodyFor, bool]:
    """
    The body each upstream gets: the client's bytes unchanged, but for the
    model where the upstream's style renames it (a C{model_map} entry, an
    Azure deployment on a resource-wide route), and C{stream_options} added
    when the proxy asks for usage (then the second value is true: the
    usage is removed on the way back).  Each variant is made once.
    """
    injected = inject_include_usage(body, parsed.document) if ask_usage else None
    with_usage = injected is not None
    made: dict[Optional[str], bytes] = {None: injected if injected is not None else body}

    def body_for(style: UpstreamStyle) -> bytes:
        renamed = style.body_model(route, parsed.model)
        if renamed not in made:
            out = json.dumps(dict(parsed.document, model=renamed)).encode("utf-8")
            if with_usage:
                out = inject_include_usage(out, parsed.document) or out
            made[renamed] = out
        return made[renamed]

    return body_for, with_usage


#: What can be done to a stored response, by the path below its id.
_STORED = {
    (): ("GET", "DELETE"),
    ("input_items",): ("GET",),
    ("cancel",): ("POST",),
}


class ResponsesResource(JsonRouteResource):
    """
    C{POST /v1/responses} creates a response (streamed or not), like any
    JSON route.  Below it, a stored response: C{GET} or C{DELETE
    /v1/responses/{id}}, C{GET .../{id}/input_items}, C{POST
    .../{id}/cancel}, forwarded as they are, query string included
    (C{?stream=true} replays a stream).

    A response id is as good as a key to that response for anyone holding
    it: every client of the proxy shares the upstream key, so an id is a
    secret between its client and OpenAI.  See the README.

    An id is one path segment (L{oaiproxy.upstream.styles.is_path_segment}), so
    C{../files/cancel} or C{..%2Ffiles} cannot reach another endpoint.
    """

    route = RESPONSES

    def render(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        if not postpath or postpath == [b""]:
            return JSONResource.render(self, request)
        rest = tuple(s.decode("utf-8", "replace") for s in postpath[1:])
        allowed = _STORED.get(rest)
        if allowed is None:
            return NotFound().render(request)
        try:
            response_id: Optional[str] = postpath[0].decode("utf-8")
        except UnicodeDecodeError:
            response_id = None
        if response_id is None or not is_path_segment(response_id):
            shown = postpath[0].decode("utf-8", "replace")
            return error_response(request, not_an_id("response", shown, "not_found"))
        method = request.method.decode("ascii", "replace")
        if method not in allowed:
            return error_response(request, method_not_allowed(method, request.path.decode("latin-1"), list(allowed)))
        client = self.admission.admit(request, self.route.label)
        if isinstance(client, bytes):
            return client
        admitted = self.admission.answer(request, client, None, 0, names_model=False)

        def forward(held: Held) -> None:
            body = read_body(request) if method == "POST" else None
            path = "/".join(("/responses", quote(response_id, safe=""), *rest))
            exchange = self.exchange(request, self.route, held, metered=False)
            exchange.start(body, method, path, None, query_of(request))

        return self.when_admitted(request, admitted, forward)


def resource_class(route: Route) -> type[ForwardingResource]:
    """
    The resource class that serves C{route}.
    """
    if route is MODELS:
        return ModelsResource
    if route is RESPONSES:
        return ResponsesResource
    if route.body == "multipart":
        return UploadResource
    return JsonRouteResource


def api_resources(
    routes: Iterable[Route],
    upstream: "Upstreams | UpstreamClient",
    clock: IReactorTime,
    credentials: Credentials,
    lifecycle: Optional[Lifecycle] = None,
    connect_timeout: float = 10.0,
    store: Optional[LimitStore] = None,
    stream_usage: bool = True,
    sse_keepalive: float = 15.0,
) -> dict[str, ForwardingResource]:
    """
    A resource for each of C{routes}, by route name, all sharing the same
    collaborators (see L{ForwardingResource}): one lifecycle drains them
    all, and one limit store counts a client's requests on every route.
    """
    lifecycle = lifecycle or Lifecycle()
    store = store if store is not None else LocalLimitStore(Limiter(clock))
    return {
        route.name: resource_class(route)(
            upstream,
            clock,
            credentials,
            lifecycle,
            connect_timeout,
            store,
            stream_usage=stream_usage,
            sse_keepalive=sse_keepalive,
            route=route,
        )
        for route in routes
    }


def streamed_paths(routes: Iterable[Route]) -> frozenset[bytes]:
    """
    The paths whose bodies the site streams (see
    L{oaiproxy.server.site.ProxySite.streams_body}): the upload routes', with and
    without C{/v1}.
    """
    paths = [route.path.encode("ascii") for route in routes if route.body == "multipart"]
    return frozenset(paths + [b"/v1" + path for path in paths])
