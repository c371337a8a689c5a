# -*- test-case-name: tests.server.test_tree -*-
"""
The Resource tree: its inner nodes, the health check, routes turned off,
and the tree itself.  The resources every endpoint is built on (JSON 404s
and 405s) are in L{oaiproxy.web}, below every layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Iterable, Mapping, Optional

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from oaiproxy.drain import Lifecycle
from oaiproxy.errors import ApiError, route_not_available, route_not_enabled
from oaiproxy.observe.metrics import GuardedEndpoint, MetricsCheck
from oaiproxy.upstream.pool import Pool
from oaiproxy.web import Endpoint, JSONResource, NotFound, error_response

__all__ = [
    "Directory",
    "HealthResource",
    "UpstreamsHealthResource",
    "DisabledRoute",
    "build_root",
    "build_tree",
]


class Directory(JSONResource):
    """
    An inner node of the tree (C{/}, C{/v1}, C{/v1/chat}): it only has
    children, so asking for it directly is a 404, whatever the method.
    """

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class HealthResource(Endpoint):
    """
    C{GET /health}: the process is up and serving.  It never calls upstream,
    so a load balancer's probes cost no tokens and an upstream outage does
    not take every proxy out of rotation at once.

    @param upstreams: served at C{/health/upstreams}, when given.
    """

    _HEALTHY = json.dumps({"status": "healthy"}).encode("ascii")
    _DRAINING = json.dumps({"status": "draining"}).encode("ascii")

    def __init__(self, lifecycle: Optional[Lifecycle] = None, upstreams: Optional[IResource] = None) -> None:
        super().__init__()
        self._lifecycle = lifecycle or Lifecycle()
        if upstreams is not None:
            # No longer a leaf: /health/upstreams is its child, anything else
            # below it a 404 (JSONResource.getChild).
            self.isLeaf = False
            self.putChild(b"upstreams", upstreams)

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        if self._lifecycle.draining:
            # A load balancer stops sending traffic to a 503.
            request.setResponseCode(503)
            return self._DRAINING
        return self._HEALTHY


class UpstreamsHealthResource(GuardedEndpoint):
    """
    C{GET /health/upstreams}: each upstream of the pool as its breaker sees
    it (L{oaiproxy.upstream.pool.Health}: state, requests in flight, the
    last failure's kind and time, the cooldown left), for an operator
    asking which upstream is out and why.  No URL, key or header.

    Always a 200 while the proxy runs: it describes the upstreams, it is
    not a probe (that is C{/health}, which an upstream outage must not
    fail).  C{status} sums it up: C{ok} when every breaker is closed,
    C{degraded} when some are not, C{unavailable} when none is.

    @param authorized: who may read it: the same check as C{/metrics}
        (the metrics key, or a client key); C{None} lets everyone in.
    """

    def __init__(self, pool: Pool, authorized: Optional[MetricsCheck] = None) -> None:
        super().__init__(authorized)
        self._pool = pool

    def answer(self, request: Request) -> bytes:
        upstreams = [member.health() for member in self._pool.members]
        closed = sum(1 for health in upstreams if health.state_value == 0)
        status = "ok" if closed == len(upstreams) else "unavailable" if closed == 0 else "degraded"
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        document = {"status": status, "upstreams": [asdict(health) for health in upstreams]}
        return json.dumps(document).encode("utf-8")


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
    usage: Optional[IResource] = None,
) -> Resource:
    """
    Assemble the tree::

        /health                 health check
        /v1/<route>             each API route (SDK base URL .../v1)
        /<route>                the same (SDK base URL without /v1)
        /metrics                Prometheus metrics, when given
        /usage                  the clients' usage and budgets, when given

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
    if usage is not None:
        root.putChild(b"usage", usage)
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
