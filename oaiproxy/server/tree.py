# -*- test-case-name: tests.test_resources -*-
"""
The Resource tree's plumbing: JSON errors for unknown paths and methods,
the health check, and the tree itself.

twisted.web's own answers for these cases are HTML pages, which an SDK
reports as an undecodable body; here every answer is OpenAI-shaped JSON.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping, Optional

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from oaiproxy.daemon.lifecycle import Lifecycle
from oaiproxy.errors import ApiError, method_not_allowed, not_found, route_not_available, route_not_enabled

__all__ = [
    "error_response",
    "send_error",
    "query_of",
    "JSONResource",
    "Directory",
    "Endpoint",
    "NotFound",
    "HealthResource",
    "DisabledRoute",
    "build_root",
    "build_tree",
]


def error_response(request: Request, error: ApiError) -> bytes:
    """
    Set the status and headers for C{error} on C{request} and return the
    body, for a C{render_*} method to return.
    """
    request.setResponseCode(error.status)
    body = error.body()
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    for name, value in error.headers:
        headers.setRawHeaders(name, [value])
    return body


def send_error(request: Request, error: ApiError) -> None:
    """
    Answer a request that was left pending (C{NOT_DONE_YET}) with C{error}.
    """
    request.write(error_response(request, error))
    request.finish()


def query_of(request: Request) -> bytes:
    """
    The query string of the request's URI, without the C{?}: passed on
    upstream as the client sent it.
    """
    return request.uri.partition(b"?")[2]


def _path(request: Request) -> str:
    return request.path.decode("latin-1")


_ALLOWED: dict[type, list[str]] = {}


def _allowed_methods(cls: type) -> list[str]:
    # Twisted's Resource defines render_HEAD ("GET without the body") on
    # every resource, so HEAD is derived from GET, not taken from the class.
    # Cached per class: dir() on every request would be a waste.
    cached = _ALLOWED.get(cls)
    if cached is not None:
        return cached
    methods = {
        name[len("render_") :] for name in dir(cls) if name.startswith("render_") and name[len("render_") :].isupper()
    }
    methods.discard("HEAD")
    if "GET" in methods:
        methods.add("HEAD")
    _ALLOWED[cls] = sorted(methods)
    return _ALLOWED[cls]


class JSONResource(Resource):
    """
    A resource whose unsupported methods get a JSON 405 with C{Allow}, and
    whose unknown children get a JSON 404.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()

    def allowed_methods(self) -> list[str]:
        """
        The methods with a C{render_*} handler, plus HEAD wherever GET is.
        """
        return _allowed_methods(type(self))

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        allowed = self.allowed_methods()
        if method not in allowed:
            return error_response(request, method_not_allowed(method, _path(request), allowed))
        if method == "HEAD":
            method = "GET"  # twisted.web drops the body of a HEAD response
        result: bytes | int = getattr(self, "render_" + method)(request)
        return result


class NotFound(JSONResource):
    """
    Everything at and below an unknown path: a 404 that hints at C{/v1}.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        return error_response(request, not_found(method, _path(request)))


class Directory(JSONResource):
    """
    An inner node of the tree (C{/}, C{/v1}, C{/v1/chat}): it only has
    children, so asking for it directly is a 404, whatever the method.
    """

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class Endpoint(JSONResource):
    """
    A leaf endpoint: any path below it (C{/health/x}) is a 404.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.postpath:
            return NotFound().render(request)
        return super().render(request)


class HealthResource(Endpoint):
    """
    C{GET /health}: the process is up and serving.  It never calls upstream,
    so a load balancer's probes cost no tokens and an upstream outage does
    not take every proxy out of rotation at once.
    """

    _HEALTHY = json.dumps({"status": "healthy"}).encode("ascii")
    _DRAINING = json.dumps({"status": "draining"}).encode("ascii")

    def __init__(self, lifecycle: Optional[Lifecycle] = None) -> None:
        super().__init__()
        self._lifecycle = lifecycle or Lifecycle()

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        if self._lifecycle.draining:
            # A load balancer stops sending traffic to a 503.
            request.setResponseCode(503)
            return self._DRAINING
        return self._HEALTHY


class DisabledRoute(JSONResource):
    """
    A route the operator did not enable: a 404 for every method and any
    path below it, naming the option that enables it, so the client's
    operator knows what to ask for.
    """

    isLeaf = True

    def __init__(self, name: str, error: Optional[ApiError] = None) -> None:
        super().__init__()
        self._name = name
        self._error = error or route_not_enabled(name)

    def render(self, request: Request) -> bytes:
        return error_response(request, self._error)


def build_root(
    chat: Optional[IResource],
    health: Optional[IResource] = None,
    metrics: Optional[IResource] = None,
    models: Optional[IResource] = None,
) -> Resource:
    """
    The tree for chat completions and the model list; see L{build_tree}.
    """
    api: dict[str, IResource] = {}
    if chat is not None:
        api["chat/completions"] = chat
    if models is not None:
        api["models"] = models
    return build_tree(api, health, metrics)


def build_tree(
    api: Mapping[str, IResource],
    health: Optional[IResource] = None,
    metrics: Optional[IResource] = None,
    disabled: Iterable[str] = (),
    unavailable: Iterable[str] = (),
) -> Resource:
    """
    Assemble the tree::

        /health                 health check
        /v1/<route>             each API route (SDK base URL .../v1)
        /<route>                the same (SDK base URL without /v1)
        /metrics                Prometheus metrics, when given

    @param api: the resource for each enabled route, by route name
        (C{chat/completions}, C{audio/speech}...).
    @param disabled: routes that answer a 404 naming C{--routes}.
    @param unavailable: routes the upstream does not serve (Azure has no
        moderations), which answer a 404 saying so.
    """
    root = Directory()
    root.putChild(b"health", health if health is not None else HealthResource())
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    mounted: list[tuple[str, IResource]] = list(api.items())
    mounted += [(name, DisabledRoute(name)) for name in disabled if name not in api]
    mounted += [(name, DisabledRoute(name, route_not_available(name, "Azure OpenAI"))) for name in unavailable]
    for name, resource in mounted:
        *inner, leaf = name.encode("ascii").split(b"/")
        for parent in (root, _child(root, b"v1")):
            for segment in inner:
                parent = _child(parent, segment)
            parent.putChild(leaf, resource)
    return root


def _child(parent: Resource, name: bytes) -> Resource:
    node = parent.children.get(name)
    if node is None:
        node = Directory()
        parent.putChild(name, node)
    return node
