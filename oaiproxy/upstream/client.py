# -*- test-case-name: tests.test_upstream,tests.test_chat -*-
"""
The proxy's one upstream: an HTTP client bound to a base URL and a key.

This is the only module that handles the upstream key in the clear, and the
only one that knows how treq is asked to behave like a proxy's client
rather than a browser: never buffer a body, never follow a redirect, never
keep a cookie, and give up when the response head is late.
"""

from __future__ import annotations

import functools
from http.cookiejar import CookiePolicy
from typing import Any, Optional, Protocol, Sequence

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ContentDecoderAgent
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from oaiproxy.config import Secret
from oaiproxy.upstream.bodies import IStreamedBody
from oaiproxy.upstream.gzipped import BoundedGzipDecoder
from oaiproxy.upstream.headers import upstream_request_headers
from oaiproxy.upstream.http11 import ConnectionPool, HTTP11Agent, host_value
from oaiproxy.upstream.styles import OpenAIStyle, UpstreamStyle

try:
    # treq 26.7 types HTTPClient's jar as its own CookieJar subclass.
    from treq.cookies import IndexableCookieJar as _CookieJar
except ImportError:  # pragma: no cover - treq < 26.7 (setup.py allows 24.9) takes any CookieJar.
    from http.cookiejar import CookieJar as _CookieJar  # type: ignore[assignment]

__all__ = [
    "UpstreamClient",
    "UpstreamTimeout",
    "TreqLike",
    "make_http_client",
    "make_pool",
    "http_client",
    "UpstreamEndpoints",
]

#: Idle upstream connections kept per host.  Twisted's default of 2 would
#: make a busy proxy open a new TCP and TLS connection for most requests.
MAX_PERSISTENT_PER_HOST = 64


#: A treq-like client: L{treq.client.HTTPClient}, or C{StubTreq} in tests.
#: Only C{request(method, url, data=, headers=, unbuffered=,
#: allow_redirects=)} is used.
TreqLike = Any


class UpstreamTimeout(Exception):
    """
    The upstream sent no response head within the read timeout.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class _NoCookies(CookiePolicy):
    """
    Refuse every cookie: an upstream session cookie stored by a shared
    client would be replayed on behalf of every user of the proxy.
    """

    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: Any) -> bool:
        return False

    def path_return_ok(self, path: str, request: Any) -> bool:
        return False


#: The most of an in-memory body handed to the connection at once.
#: Twisted's transport sends at most 128 KiB per writable event anyway
#: (C{FileDescriptor.SEND_LIMIT}), so pieces of that size cost no extra
#: turns; what they bound is what a transport holds in its own buffer.
WRITE_PIECE = 128 * 1024


@implementer(IBodyProducer)
class _BytesProducer:
    """
    Hand an in-memory body to the connection: at once when it is small, in
    pieces of L{WRITE_PIECE} under the transport's backpressure when it is
    not.

    treq's default producer for bytes feeds a C{FileBodyProducer} through
    the global cooperator 64 KiB per reactor turn; the body is already in
    memory (it was validated), so that only adds latency.

    Why pieces for a large body: a connection that is aborted (an upstream
    answered before reading it all) keeps whatever is in its transport's
    buffer until the garbage collector breaks the transport's reference
    cycles, which can be many requests later; with the whole body written
    at once that was a megabyte per early answer, and the proxy's peak
    memory at eight concurrent 1 MB requests doubled (bench/README.md,
    issue 17).  In pieces, at most one is left there.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)
        self._at = 0
        self._consumer: Any = None
        self._paused = False
        self._done: Optional[Deferred[None]] = None

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        if self.length <= WRITE_PIECE:
            # The connection keeps what it has not sent yet; the producer
            # lives as long as the upstream request (until upstream has
            # read the body, which can be after the answer), so it lets go
            # of its copy.
            body, self._body = self._body, b""
            consumer.write(body)
            return succeed(None)
        self._consumer = consumer
        done = self._done = Deferred()
        self._write()
        return done

    def _write(self) -> None:
        # The transport pauses this producer from inside write() once its
        # buffer is full, and resumes it once the buffer is empty.
        while not self._paused and self._done is not None:
            piece = self._body[self._at : self._at + WRITE_PIECE]
            self._at += len(piece)
            self._consumer.write(piece)
            if self._at >= self.length and self._done is not None:
                done, self._done = self._done, None
                self._body, self._consumer = b"", None
                done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        # The connection is gone: nothing more goes anywhere, and the
        # Deferred never fires (as FileBodyProducer's), the agent has
        # already given the request up.
        self._done = None
        self._body, self._consumer = b"", None


def make_http_client(reactor: Any, connect_timeout: float) -> HTTPClient:
    """
    Build the production treq client: pooled persistent connections and
    certificate-verifying TLS (Agent's default policy), over the lean
    HTTP/1.1 agent of L{oaiproxy.upstream.http11} (llhttp framing; see
    its docstring for why).
    """
    endpoints = UpstreamEndpoints(reactor, connect_timeout)
    return http_client(HTTP11Agent(endpoints, make_pool(reactor)), reactor)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    The endpoint for an upstream URL: what Agent's own factory makes (a
    C{HostnameEndpoint}, wrapped in TLS for https with Agent's default,
    verifying policy), except for a host given as an IP address, which is
    connected to directly.

    Why: C{HostnameEndpoint} starts one connection attempt per resolved
    address every C{attemptDelay} (0.3 s), and notices that the last one
    failed only at the next tick, so a refused connection is reported 0.3 s
    late, and every failover from a dead upstream would cost that much
    (C{bench/failover.py} measured it).  An address needs no resolution and
    has one attempt: C{TCP4ClientEndpoint}/C{TCP6ClientEndpoint} report
    the refusal at once.  A host name keeps Twisted's endpoint and its
    happy-eyeballs delay between addresses.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def make_pool(reactor: Any) -> ConnectionPool:
    """
    A pool of persistent upstream connections, many per host.
    """
    pool = ConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    return pool


def http_client(agent: IAgent, clock: IReactorTime) -> HTTPClient:
    """
    A treq client over C{agent} configured for a proxy: a cookie jar that
    stores nothing, request bodies written in one go, and gzipped answers
    inflated in bounded pieces and turns of C{clock}
    (L{BoundedGzipDecoder}).
    """
    return _ProxyHTTPClient(agent, clock)


#: Upstream URLs up to this long have their parsed form cached.
_CACHED_URL = 512


@functools.lru_cache(maxsize=512)
def _uri_bytes(url: str) -> bytes:
    """
    C{url} as treq's C{HTTPClient.request} hands it to its agent: parsed by
    hyperlink leniently, then encoded as a URI.
    """
    return bytes(EncodedURL.from_text(url).to_uri().to_text().encode("ascii"))


def host_header(url: str) -> Optional[bytes]:
    """
    The C{Host} header twisted.web's C{Agent} sends for C{url}: the host,
    in brackets for an IPv6 address, with the port unless it is the
    scheme's default; C{None} for a URL it would not parse.

    L{UpstreamClient} sets it itself, once per upstream: without one,
    C{Agent} copies every header of every request to add it (about 6 µs).
    """
    try:
        return host_value(URI.fromBytes(_uri_bytes(url)))
    except Exception:
        return None


class _ProxyHTTPClient(HTTPClient):
    """
    treq's client, with the one call the proxy makes done without what
    treq wraps around every request that does nothing for it.

    The proxy calls C{request(method, url, data=, headers=, unbuffered=True,
    allow_redirects=False)} for every request; treq would parse and
    re-encode the URL with hyperlink (about 22 µs, and the upstream URLs
    are a few strings), build a L{CookieAgent} whose jar here refuses
    every cookie (so it neither sends nor keeps one) and a
    L{ContentDecoderAgent}, and wrap the response in its own class (the
    proxy uses only L{IResponse}).  Here the URL's encoding is cached, the
    cookie agent is left out, and one C{ContentDecoderAgent} serves every
    request: upstream still gets C{Accept-Encoding: gzip} and a gzipped
    answer is still decoded, by L{BoundedGzipDecoder} (a piece at a time,
    under backpressure) instead of twisted.web's C{GzipDecoder}, which
    inflates each read whole.  Any other call (a keyword the proxy does not
    use, buffering, redirects) goes to treq as it is.
    """

    def __init__(self, agent: IAgent, clock: IReactorTime) -> None:
        super().__init__(agent, cookiejar=_CookieJar(policy=_NoCookies()), data_to_body_producer=_body_producer)
        self._decoding = ContentDecoderAgent(agent, [(b"gzip", functools.partial(BoundedGzipDecoder, clock=clock))])

    def request(
        self,
        method: str,
        url: Any,
        *,
        data: Any = None,
        headers: Any = None,
        unbuffered: bool = False,
        allow_redirects: bool = True,
        **kwargs: Any,
    ) -> "Deferred[Any]":
        if (
            kwargs
            or not unbuffered
            or allow_redirects
            or type(url) is not str
            or not isinstance(headers, Headers)
            or isinstance(data, (dict, list, tuple))
        ):
            return super().request(
                method,
                url,
                data=data,
                headers=headers,
                unbuffered=unbuffered,
                allow_redirects=allow_redirects,
                **kwargs,
            )
        uri = _uri_bytes(url) if len(url) <= _CACHED_URL else _uri_bytes.__wrapped__(url)
        # As treq: no body for None or b"", a producer for anything else.
        producer = _body_producer(data) if data else None
        return self._decoding.request(method.encode("ascii").upper(), uri, headers, producer)


def _body_producer(data: Any) -> IBodyProducer:
    """
    A body as treq sends it: an upload's producer as it is, bytes in one
    write.
    """
    if IBodyProducer.providedBy(data):
        producer: IBodyProducer = data
        return producer
    return _BytesProducer(data)


class KeyHolder(Protocol):
    """
    Where the upstream key is read for every request (an
    L{oaiproxy.access.clients.Credentials}, which a reload replaces): the
    client only reads it, so it names nothing of admission.
    """

    @property
    def api_key(self) -> Secret:
        """
        The upstream key in use.
        """


class UpstreamClient:
    """
    Sends requests to the upstream API on behalf of clients.

    @param http: a treq-like client (injected so tests can use
        C{StubTreq}).
    @param base_url: the upstream base, for example
        C{https://api.openai.com/v1}.
    @param credentials: holds the upstream key, read for every request so a
        reload takes effect at once.
    @param clock: the clock for the response-head timeout.
    @param read_timeout: seconds to wait for the response head.
    @param extra_headers: static headers for every upstream request
        (C{--upstream-header}), e.g. OpenRouter's C{HTTP-Referer}.
    @param style: how the upstream addresses routes and takes its key
        (OpenAI's way by default; see L{oaiproxy.upstream.styles}).
    """

    def __init__(
        self,
        http: TreqLike,
        base_url: str,
        credentials: KeyHolder,
        clock: IReactorTime,
        read_timeout: float,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        style: Optional[UpstreamStyle] = None,
    ) -> None:
        self._http = http
        self.style: UpstreamStyle = style if style is not None else OpenAIStyle()
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self._extra_headers = tuple(extra_headers)
        self._clock = clock
        self.read_timeout = read_timeout
        self._host = host_header(self.base_url)

    def __repr__(self) -> str:
        return f"UpstreamClient({self.base_url!r})"

    def request(
        self,
        method: str,
        path: str,
        body: "Optional[bytes | IBodyProducer]",
        client_headers: Headers,
        model: Optional[str] = None,
        query: bytes = b"",
        timeout: Optional[float] = None,
    ) -> "Deferred[IResponse]":
        """
        Forward a request, its body (if any) byte for byte, to the upstream
        address of C{path}: C{base_url + path} for OpenAI-style upstreams.

        @param path: the path as a client sends it below C{/v1}
            (C{/chat/completions}).
        @param body: the body, in memory or streamed (an upload).
        @param model: the model the request names, which selects an Azure
            deployment.
        @param query: the client's query string, passed on.
        @param timeout: the wait for the head, when shorter than
            C{read_timeout} (a later attempt of a failover, within the
            read timeout overall).
        @return: a Deferred firing with the unbuffered response as soon as
            its head arrives; failing with L{UpstreamTimeout} if that takes
            longer than C{read_timeout}.  Cancelling it aborts the upstream
            request, which is how a client disconnect stops token spend.
        """
        name, credential = self.style.credential(self._credentials.api_key.reveal())
        headers = upstream_request_headers(client_headers, credential, self._extra_headers, name)
        if self._host is not None:
            # As Agent would add it (the path never changes the host).
            headers.setRawHeaders(b"host", [self._host])
        d = self._http.request(
            method,
            self.base_url + self.style.target(path, model, query),
            data=body,
            headers=headers,
            unbuffered=True,
            allow_redirects=False,
        )
        timed_out = []
        read_timeout = self.read_timeout if timeout is None else timeout

        def on_timeout() -> None:
            timed_out.append(True)
            d.cancel()

        call = self._clock.callLater(read_timeout, on_timeout)
        if IStreamedBody.providedBy(body):
            # An upload in progress: upstream taking its bytes is upstream
            # alive, so the wait for the head counts from the last of them,
            # however long the client takes to send it.
            body.watch_progress(lambda: call.reset(read_timeout) if call.active() else None)

        def settle(result: Any) -> Any:
            if call.active():
                call.cancel()
            if timed_out and isinstance(result, Failure):
                return Failure(UpstreamTimeout(read_timeout))
            return result

        return d.addBoth(settle)
