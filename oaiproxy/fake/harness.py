# -*- test-case-name: tests.server.test_build -*-
"""
The proxy in memory: the daemon's own wiring
(L{oaiproxy.server.build.build_site}) behind an in-memory HTTP client (the
client's view), forwarding through another in-memory client to a
L{FakeUpstream}, with one L{Clock} for every timeout.

No sockets and no reactor: each request moves only when L{Harness.pump}
says so, which is what lets a test look at a stream between two chunks.
Shipped with the package, like treq's C{treq.testing}, so tests and
benchmarks share it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from oaiproxy.access.clients import Client, ClientRegistry, Credentials, Limits
from oaiproxy.config import Config, Secret
from oaiproxy.daemon.lifecycle import Lifecycle
from oaiproxy.fake.upstream import FakeUpstream
from oaiproxy.ledger.prices import EMPTY, Prices
from oaiproxy.ledger.recorder import UsageRecorder
from oaiproxy.ledger.writer import LedgerWriter
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord
from oaiproxy.routetable import DEFAULT_ROUTES
from oaiproxy.server.build import build_site
from oaiproxy.upstream.client import TreqLike, http_client
from oaiproxy.upstream.pool import Upstream
from oaiproxy.upstream.styles import AzureStyle, UpstreamStyle

__all__ = [
    "AZURE_URL",
    "CLIENT_KEY",
    "UPSTREAM_KEY",
    "UPSTREAM_URL",
    "Harness",
    "FakesByHost",
    "SiteAgent",
    "chat_body",
    "harness_config",
    "pool_harness",
    "registry",
]

UPSTREAM_KEY = b"sk-proj-UPSTREAMSECRET0123456789"
CLIENT_KEY = b"oai-client-CLIENTSECRET42"
UPSTREAM_URL = "http://upstream.test/v1"
AZURE_URL = "http://example-resource.openai.azure.test"

_CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 31337)
_SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 80)


def registry(*keys: bytes, limits: Optional[Limits] = None, models: Optional[Sequence[str]] = None) -> ClientRegistry:
    """
    Clients named C{client-1}, C{client-2}... for the given keys.
    """
    return ClientRegistry(
        [
            Client(
                name=f"client-{i}",
                key_sha256=hashlib.sha256(key).digest(),
                limits=limits or Limits(),
                models=frozenset(models) if models is not None else None,
            )
            for i, key in enumerate(keys, 1)
        ]
    )


def chat_body(model: str = "gpt-4o-mini", stream: bool = False, **more: Any) -> bytes:
    """
    A valid chat completions body.
    """
    document: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello proxy"}]}
    if stream:
        document["stream"] = True
    document.update(more)
    return json.dumps(document).encode()


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, site_agent: "SiteAgent") -> None:
        self._site_agent = site_agent

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        return succeed(self._site_agent.join(protocolFactory))


@implementer(IAgent)
class SiteAgent:
    """
    An agent whose every connection is a new protocol of C{site} (the
    proxy's own C{ProxySite}, so requests are its requests on its channels),
    joined to the client in memory; bytes move only on L{flush}.

    treq's C{RequestTraversalAgent} does the same for a Resource, behind a
    plain C{Site} of its own; this one takes the Site.
    """

    def __init__(self, site: Site) -> None:
        self._site = site
        self._pumps: list[iosim.IOPump] = []
        endpoints = self

        class _Endpoints:
            def endpointForURI(self, uri: Any) -> _Endpoint:
                return _Endpoint(endpoints)

        # A plain twisted.web Agent does the HTTP; only its connections are
        # ours, joined to the site in memory by join().
        self._http = Agent.usingEndpointFactory(MemoryReactorClock(), _Endpoints())

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Optional[IBodyProducer] = None
    ) -> "Deferred[IResponse]":
        return self._http.request(method, uri, headers, bodyProducer)

    def join(self, factory: IProtocolFactory) -> IProtocol:
        """
        A client protocol of C{factory}, connected in memory to a new
        server protocol of the site.
        """
        server = self._site.buildProtocol(_CLIENT_ADDRESS)
        client = factory.buildProtocol(_SERVER_ADDRESS)
        assert server is not None and client is not None
        here, there = _SERVER_ADDRESS, _CLIENT_ADDRESS
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=here, peerAddress=there)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=there, peerAddress=here)
        self._pumps.append(iosim.connect(server, server_io, client, client_io))
        return client

    def flush(self) -> None:
        """
        Move every pending byte both ways, once; forget connections closed
        at both ends.
        """
        for pump in list(self._pumps):
            pump.flush()
        self._pumps = [p for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)]


def harness_config(
    *,
    clients: ClientRegistry,
    read_timeout: float = 30.0,
    stream_usage: bool = True,
    sse_keepalive: float = 0.0,
    routes: Iterable[str] = DEFAULT_ROUTES,
    style: Optional[UpstreamStyle] = None,
    max_body_bytes: int = 64 * 1024 * 1024,
) -> Config:
    """
    The configuration L{Harness} serves by default: the daemon's defaults,
    but connections that a test's clock leaps never time out (a test moves
    the clock by minutes to reach an upstream timeout).
    """
    azure = isinstance(style, AzureStyle)
    return Config(
        ports=(),
        upstream=AZURE_URL if azure else UPSTREAM_URL,
        api_key=Secret(UPSTREAM_KEY),
        clients=clients,
        read_timeout=read_timeout,
        stream_usage=stream_usage,
        sse_keepalive=sse_keepalive,
        routes=frozenset(routes),
        max_body_bytes=max_body_bytes,
        idle_timeout=600,
        header_timeout=600,
        upstream_style="azure" if azure else "openai",
        azure_api_version=style.api_version if isinstance(style, AzureStyle) else None,
        azure_deployments=tuple(style.deployments.items()) if isinstance(style, AzureStyle) else (),
    )


class Harness:
    """
    A proxy wired to a fake upstream, entirely in memory.

    Keyword arguments other than C{config}, C{http}, C{upstream_resource}
    and C{chunk_interval} make the L{Config} (see L{harness_config}); a
    C{config} given whole (from L{oaiproxy.daemon.tap.Options}, say) is
    served as it is, its upstream's path included (C{/v1} for the OpenAI
    style, none for Azure), whatever host it names: every upstream request
    goes to the fake.

    @ivar fake: the upstream resource (records requests, counts
        disconnects).
    @ivar clock: drives read timeouts and the fake's chunk pacing.
    @ivar proxy: a treq client whose requests reach the proxy's Site.
    @ivar records: the record of every finished request, in order.

    @param clock: the clock (by default a new one): a ledger's, to share it.
    @param ledger: the usage ledger's writer every finished request goes
        to (by default, none: the spend metrics only).
    """

    def __init__(
        self,
        *,
        client_keys: Sequence[bytes] = (),
        clients: Optional[ClientRegistry] = None,
        read_timeout: float = 30.0,
        chunk_interval: float = 0.0,
        http: Optional[TreqLike] = None,
        upstream_resource: Optional[IResource] = None,
        stream_usage: bool = True,
        sse_keepalive: float = 0.0,
        routes: Iterable[str] = DEFAULT_ROUTES,
        style: Optional[UpstreamStyle] = None,
        max_body_bytes: int = 64 * 1024 * 1024,
        config: Optional[Config] = None,
        clock: Optional[Clock] = None,
        ledger: Optional[LedgerWriter] = None,
    ) -> None:
        if config is None:
            config = harness_config(
                clients=clients if clients is not None else registry(*client_keys),
                read_timeout=read_timeout,
                stream_usage=stream_usage,
                sse_keepalive=sse_keepalive,
                routes=routes,
                style=style,
                max_body_bytes=max_body_bytes,
            )
        else:
            # Whatever host it names, the upstream is the fake, in memory.
            config = replace(config, clients=config.clients if config.clients is not None else ClientRegistry())
        self.config = config
        self.clock = clock if clock is not None else Clock()
        azure = config.upstream_style == "azure"
        self.fake = FakeUpstream(self.clock, api_key=UPSTREAM_KEY, chunk_interval=chunk_interval, azure=azure)
        # The proxy's own client configuration (no cookies, one-write
        # bodies) over an in-memory agent instead of a connection pool.
        self.upstream_agent = RequestTraversalAgent(upstream_resource or self.fake)
        self.credentials = Credentials(Secret(UPSTREAM_KEY), config.clients, config.admin_key)
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.records: list[RequestRecord] = []
        built = build_site(
            config,
            http=http or http_client(self.upstream_agent, self.clock),
            credentials=self.credentials,
            clock=self.clock,
            lifecycle=self.lifecycle,
            metrics=self.metrics,
            access_log=self.records.append,
            usage=None
            if ledger is None
            else UsageRecorder(self.clock, self.metrics, Prices(config.prices or EMPTY), ledger),
        )
        self.built = built
        self.site = built.site
        self.upstream = built.upstream
        self.limiter = built.limiter
        self.api = built.api
        self.chat = self.api.get("chat/completions")
        self.proxy_agent = SiteAgent(self.site)
        self.proxy: HTTPClient = http_client(self.proxy_agent, self.clock)

    def pump(self) -> None:
        """
        Move every pending byte between client, proxy and upstream, and run
        what was left for the reactor's next turn (C{callLater(0)}: a
        gzipped body is inflated a bounded amount per turn; C{Clock} runs
        the turns those calls schedule in the same C{advance}, so one round
        inflates a body whole).  Ten rounds bound the loop; one request
        needs at most three.
        """
        for _ in range(10):
            self.proxy_agent.flush()
            self.upstream_agent.flush()
            self.clock.advance(0)

    def post(
        self,
        body: bytes,
        path: str = "/v1/chat/completions",
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> "Deferred[IResponse]":
        """
        Send a POST to the proxy, unbuffered so a test sees a stream's
        chunks as they arrive; the request is pumped until it settles.
        """
        sent: dict[Any, Any] = {b"content-type": [b"application/json"]}
        sent.update(headers or {})
        d: Deferred[Any] = self.proxy.request(
            "POST",
            "http://proxy.test" + path,
            data=body,
            headers=sent,
            unbuffered=True,
            # Like the openai SDK (httpx), never follow a redirect.
            allow_redirects=False,
        )
        self.pump()
        return d


class FakesByHost(Resource):
    """
    Several fake upstreams behind the harness's one in-memory agent: a
    request goes to the fake named by the first label of its host
    (C{http://a.test/v1} reaches C{fakes["a"]}).
    """

    isLeaf = True

    def __init__(self, fakes: dict[str, FakeUpstream]) -> None:
        super().__init__()
        self.fakes = fakes

    def render(self, request: Request) -> Any:
        host = (request.getHeader(b"host") or b"").decode("ascii").split(":")[0]
        return self.fakes[host.split(".")[0]].render(request)


def pool_harness(*upstreams: Upstream, **config: Any) -> tuple[Harness, dict[str, FakeUpstream]]:
    """
    A harness whose pool is C{upstreams} (as an upstreams file would give
    them), each served by its own fake, which demands that upstream's key:
    name an entry's URL C{http://NAME.test/...}.  Other keyword arguments
    make the L{Config}, as for L{Harness}.
    """
    fakes = {u.name: FakeUpstream(Clock(), api_key=u.key.reveal(), azure=u.style == "azure") for u in upstreams}
    base = harness_config(clients=config.pop("clients", None) or registry(CLIENT_KEY), **config)
    harness = Harness(config=replace(base, upstreams=tuple(upstreams)), upstream_resource=FakesByHost(fakes))
    return harness, fakes
