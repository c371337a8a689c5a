"""
The upstream client's configuration: what treq is asked to do for every
forwarded request, and the connection pool.
"""

from __future__ import annotations

import gc
import gzip
from http.cookiejar import CookieJar
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Agent, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from oaiproxy.access.clients import Credentials
from oaiproxy.config import Secret
from oaiproxy.upstream.client import (
    MAX_PERSISTENT_PER_HOST,
    WRITE_PIECE,
    UpstreamClient,
    UpstreamEndpoints,
    UpstreamTimeout,
    _body_producer,
    _NoCookies,
    host_header,
    http_client,
    make_http_client,
    make_pool,
)


class Recording:
    """
    A treq-like client that records its calls and never answers.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.cancelled = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((args, kwargs))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class UpstreamClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = Recording()
        self.clock = Clock()
        self.client = UpstreamClient(self.http, "https://api.test/v1/", Credentials(Secret(b"sk-UP")), self.clock, 30.0)

    def test_request_options(self) -> None:
        """
        Every forward is a POST of the exact body to base + path, unbuffered
        (chunks are relayed as they come, not collected in memory) and
        without following redirects (which would carry the key elsewhere).
        """
        self.client.request("POST", "/chat/completions", b'{"a": 1}', Headers({b"x-stainless-lang": [b"python"]}))
        [(args, kwargs)] = self.http.calls
        self.assertEqual(args, ("POST", "https://api.test/v1/chat/completions"))
        self.assertEqual(kwargs["data"], b'{"a": 1}')
        self.assertIs(kwargs["unbuffered"], True)
        self.assertIs(kwargs["allow_redirects"], False)
        self.assertEqual(kwargs["headers"].getRawHeaders(b"authorization"), [b"Bearer sk-UP"])
        self.assertEqual(kwargs["headers"].getRawHeaders(b"x-stainless-lang"), [b"python"])

    def test_host_header_as_agent_sends_it(self) -> None:
        """
        The client sets C{Host} itself, once per upstream, to exactly what
        twisted.web's C{Agent} would have added (host, IPv6 in brackets,
        the port unless the scheme's default), so upstream sees the same
        request; a client's own C{Host} never goes upstream.
        """
        agent = Agent(MemoryReactorClock())
        for url in [
            "https://api.test/v1",
            "https://api.test:8443/v1",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:80/v1",
            "http://[::1]:8080/v1",  # (treq cannot send to it: Agent adds no header)
            "http://vllm.internal/v1",
        ]:
            uri = URI.fromBytes(url.encode("ascii"))
            expected = agent._computeHostValue(uri.scheme, uri.host, uri.port)
            if host_header(url) is None:
                # hyperlink's IDNA check refuses an IPv6 host: treq fails
                # such a request before it is sent, as it always did.
                self.assertEqual(url, "http://[::1]:8080/v1")
                continue
            self.assertEqual(host_header(url), expected, url)
            http = Recording()
            client = UpstreamClient(http, url, Credentials(Secret(b"sk-UP")), self.clock, 30.0)
            client.request("POST", "/chat/completions", b"{}", Headers({b"host": [b"evil.test"]}))
            [(_, kwargs)] = http.calls
            self.assertEqual(kwargs["headers"].getRawHeaders(b"host"), [expected], url)

    def test_head_timeout(self) -> None:
        """
        No response head within the read timeout cancels the request (which
        closes its connection) and fails with L{UpstreamTimeout}.
        """
        d = self.client.request("POST", "/chat/completions", b"{}", Headers())
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.http.cancelled, 1)
        self.assertEqual(self.failureResultOf(d, UpstreamTimeout).value.seconds, 30.0)

    def test_key_not_in_repr(self) -> None:
        """
        The client's repr names the upstream, never the key.
        """
        self.assertNotIn("sk-UP", repr(self.client))


class PoolTests(SynchronousTestCase):
    def test_pool_keeps_connections(self) -> None:
        """
        Upstream connections are persistent and many are kept per host
        (Twisted's default of 2 would make a busy proxy reconnect, with a
        TLS handshake, for most requests).
        """
        pool = make_pool(MemoryReactorClock())
        self.assertTrue(pool.persistent)
        self.assertEqual(pool.maxPersistentPerHost, MAX_PERSISTENT_PER_HOST)
        self.assertGreaterEqual(MAX_PERSISTENT_PER_HOST, 64)


class ProductionClientTests(SynchronousTestCase):
    def test_wired_through_the_lean_agent(self) -> None:
        """
        The production client connects through L{UpstreamEndpoints} (an
        address directly, with the connect timeout), writes the request
        with treq's C{Accept-Encoding: gzip}, and hands back a gzipped
        answer decoded, through L{oaiproxy.upstream.http11}'s agent.
        """
        reactor = MemoryReactorClock()
        client = make_http_client(reactor, 5.0)
        headers = Headers({b"host": [b"127.0.0.1:9"], b"authorization": [b"Bearer sk-UP"]})
        d = client.request(
            "POST",
            "http://127.0.0.1:9/v1/chat/completions",
            data=b"{}",
            headers=headers,
            unbuffered=True,
            allow_redirects=False,
        )
        host, port, factory, timeout, _ = reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 5.0))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        sent = transport.value()
        self.assertTrue(sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n"))
        self.assertIn(b"\r\nAccept-Encoding: gzip\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n{}"))
        answer = gzip.compress(b'{"id": "x"}')
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )
        response = self.successResultOf(d)
        self.assertEqual(_body_of(response), b'{"id": "x"}')


class StaticHeaderTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        --upstream-header takes NAME:VALUE, and refuses headers the proxy
        owns, bad names and control characters without quoting the value.
        """
        from oaiproxy.upstream.headers import parse_static_header

        self.assertEqual(
            parse_static_header("HTTP-Referer: https://app.example"), (b"HTTP-Referer", b"https://app.example")
        )
        self.assertEqual(parse_static_header("X-Title:My App"), (b"X-Title", b"My App"))
        for bad in ("NoColon", "Bad Name: x", "Authorization: Bearer sk-SECRETVALUE", "Host: a", "X-A: a\rb"):
            with self.assertRaises(ValueError) as caught:
                parse_static_header(bad)
            self.assertNotIn("SECRETVALUE", str(caught.exception))

    def test_sent_with_every_request(self) -> None:
        """
        Static headers go upstream with every request, replacing a client's
        header of the same name, and cannot displace the proxy's key.
        """
        http = Recording()
        client = UpstreamClient(
            http,
            "https://openrouter.test/api/v1",
            Credentials(Secret(b"sk-UP")),
            Clock(),
            30.0,
            [(b"HTTP-Referer", b"https://app.example"), (b"X-Title", b"My App")],
        )
        client.request("POST", "/chat/completions", b"{}", Headers({b"x-title": [b"client's"]}))
        [(_, kwargs)] = http.calls
        headers = kwargs["headers"]
        self.assertEqual(headers.getRawHeaders(b"http-referer"), [b"https://app.example"])
        self.assertEqual(headers.getRawHeaders(b"x-title"), [b"My App"])
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer sk-UP"])


class EndpointTests(SynchronousTestCase):
    """
    L{UpstreamEndpoints}: a refused connection to an upstream given by
    address is reported at once, so failing over from it costs nothing.
    """

    def test_address_connects_directly(self) -> None:
        """
        An IPv4 or IPv6 address gets a plain TCP endpoint; a name keeps
        Twisted's HostnameEndpoint; another scheme is refused.
        """
        endpoints = UpstreamEndpoints(MemoryReactorClock(), 5.0)
        self.assertIsInstance(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/v1")), TCP4ClientEndpoint)
        self.assertIsInstance(endpoints.endpointForURI(URI.fromBytes(b"http://[::1]:8000/v1")), TCP6ClientEndpoint)
        self.assertIsInstance(endpoints.endpointForURI(URI.fromBytes(b"http://gpu-host:8000/v1")), HostnameEndpoint)
        self.assertRaises(SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://127.0.0.1/"))

    def test_refusal_reported_without_waiting(self) -> None:
        """
        The connection to an address is refused: the attempt fails without
        the clock moving (HostnameEndpoint would report it 0.3 s later).
        """
        reactor = MemoryReactorClock()
        endpoint = UpstreamEndpoints(reactor, 5.0).endpointForURI(URI.fromBytes(b"http://127.0.0.1:9/v1"))
        attempt = endpoint.connect(Factory.forProtocol(Protocol))
        host, port, factory, timeout, _ = reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 5.0))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(attempt, ConnectionRefusedError)

    def test_https_verifies(self) -> None:
        """
        An https address is wrapped in TLS: the first bytes on the
        connection are a TLS handshake record, not the HTTP request.
        """
        reactor = MemoryReactorClock()
        endpoint = UpstreamEndpoints(reactor, 5.0).endpointForURI(URI.fromBytes(b"https://10.0.0.1/v1"))
        endpoint.connect(Factory.forProtocol(Protocol))
        protocol = reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value()[:1], b"\x16")


@implementer(IAgent)
class _AgentLog:
    """
    An agent that records what it is asked to send, its body included, and
    answers each request with the next of C{answers}.
    """

    def __init__(self, answers: list[Any]) -> None:
        self.sent: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self._answers = answers

    def request(
        self, method: bytes, uri: bytes, headers: Optional[Headers] = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        body = StringTransport()
        if bodyProducer is not None:
            bodyProducer.startProducing(body)
        pairs = sorted((name, value) for name, values in (headers or Headers()).getAllRawHeaders() for value in values)
        self.sent.append((method, uri, pairs, body.value()))
        return succeed(self._answers.pop(0))


@implementer(IResponse)
class _Answer:
    """
    An upstream response with a body in memory.
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], body: bytes) -> None:
        self.code = code
        self.headers = Headers(headers)
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


def _body_of(response: Any) -> bytes:
    chunks: list[bytes] = []

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            chunks.append(data)

    response.deliverBody(Collect())
    return b"".join(chunks)


class ProxyHTTPClientTests(SynchronousTestCase):
    """
    The production treq client sends what treq itself would send for the
    proxy's calls (it only skips work that does nothing for a proxy).
    """

    URLS = [
        "http://127.0.0.1:9/v1/chat/completions",
        "https://api.test/v1/responses/resp_1/input_items?after=a%20b&limit=2",
        "https://api.test/openai/deployments/caf\u00e9/chat/completions?api-version=2024-10-21",
        "https://api.test/v1/models/x y",
    ]

    def sent(self, client_of: Any, url: str, body: Any) -> list[Any]:
        agent = _AgentLog(
            [
                _Answer(200, {b"set-cookie": [b"session=UPSTREAM; path=/"]}, b"{}"),
                _Answer(200, {}, b"{}"),
            ]
        )
        client = client_of(agent)
        for _ in range(2):
            headers = Headers({b"content-type": [b"application/json"], b"authorization": [b"Bearer sk-UP"]})
            d = client.request("POST", url, data=body, headers=headers, unbuffered=True, allow_redirects=False)
            self.assertEqual(_body_of(self.successResultOf(d)), b"{}")
        return agent.sent

    def test_same_as_treq(self) -> None:
        """
        Method, URL (as treq encodes it), headers (C{Accept-Encoding: gzip}
        added, no cookie from an earlier answer) and body are what treq's
        own C{HTTPClient}, with a jar that refuses cookies, sends.
        """

        def treq_itself(agent: IAgent) -> HTTPClient:
            return HTTPClient(agent, cookiejar=CookieJar(policy=_NoCookies()), data_to_body_producer=_body_producer)

        for url in self.URLS:
            for body in [b'{"model": "m"}', b"", None]:
                expected = self.sent(treq_itself, url, body)
                self.assertEqual(self.sent(lambda agent: http_client(agent, Clock()), url, body), expected, (url, body))
                [(_, _, headers, _), _] = expected
                self.assertIn((b"Accept-Encoding", b"gzip"), headers)
                self.assertNotIn(b"Cookie", [name for name, _ in headers])

    def test_gzip_decoded(self) -> None:
        """
        A gzipped answer reaches the proxy decoded, without its
        C{Content-Encoding}.
        """
        answer = _Answer(200, {b"content-encoding": [b"gzip"]}, gzip.compress(b'{"id": "x"}'))
        client = http_client(_AgentLog([answer]), Clock())
        d = client.request("POST", self.URLS[0], data=b"{}", headers=Headers(), unbuffered=True, allow_redirects=False)
        response = self.successResultOf(d)
        self.assertFalse(response.headers.hasHeader(b"content-encoding"))
        self.assertEqual(_body_of(response), b'{"id": "x"}')

    def test_other_calls_go_to_treq(self) -> None:
        """
        A call the proxy does not make (here: following redirects) is
        treq's as it is.
        """
        agent = _AgentLog([_Answer(302, {b"location": [b"https://api.test/v1/other"]}, b""), _Answer(200, {}, b"{}")])
        d = http_client(agent, Clock()).request("GET", self.URLS[1], headers=Headers(), unbuffered=True)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual([uri for _, uri, _, _ in agent.sent], [self.URLS[1].encode(), b"https://api.test/v1/other"])


class _PausingConsumer:
    """
    A transport's side of a streaming producer: it pauses the producer once
    more than C{limit} bytes wait, and the test drains it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting: list[bytes] = []
        self.sent: list[bytes] = []
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.waiting.append(data)
        if sum(map(len, self.waiting)) > self.limit:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.sent += self.waiting
        self.waiting = []
        self.producer.resumeProducing()


class BytesProducerTests(SynchronousTestCase):
    """
    An in-memory body goes to the connection in one write when small, in
    pieces under the transport's backpressure when large, and the producer
    does not hold it afterwards: the connection's request (and its
    producer) lives until upstream has read the whole body, which can be
    long after upstream answered.
    """

    def test_small_body_in_one_write(self) -> None:
        body = b'{"model": "m", "pad": "' + b"x" * 100_000 + b'"}'
        consumer = _PausingConsumer(limit=65536)
        producer = _body_producer(body)
        consumer.producer = producer
        self.successResultOf(producer.startProducing(consumer))
        self.assertEqual(consumer.waiting, [body])

    def test_large_body_waits_for_the_buffer(self) -> None:
        """
        A large body is written a piece at a time, each once the transport
        has room: what waits in the transport is never more than a piece
        past its limit (an aborted connection keeps it until the garbage
        collector frees the transport).
        """
        body = b'{"model": "m", "pad": "' + bytes(range(256)) * 8000 + b'"}'
        consumer = _PausingConsumer(limit=65536)
        producer = _body_producer(body)
        consumer.producer = producer
        done = producer.startProducing(consumer)
        self.assertNoResult(done)
        drains = 0
        while consumer.waiting and drains < 100:
            self.assertLessEqual(sum(map(len, consumer.waiting)), 65536 + WRITE_PIECE)
            consumer.drain()
            drains += 1
        self.successResultOf(done)
        self.assertEqual(b"".join(consumer.sent), body)
        self.assertGreater(drains, 4)
        self.assertFalse(any(held is body for held in gc.get_referents(vars(producer))))

    def test_stopped_large_body_writes_no_more(self) -> None:
        """
        Stopped (the connection is gone): nothing more is written, the
        body is let go of, and the Deferred stays unfired as
        C{FileBodyProducer}'s does.
        """
        body = b'{"model": "m", "pad": "' + b"x" * 1_000_000 + b'"}'
        consumer = _PausingConsumer(limit=65536)
        producer = _body_producer(body)
        consumer.producer = producer
        done = producer.startProducing(consumer)
        self.assertEqual(len(consumer.waiting), 1)
        producer.stopProducing()
        consumer.drain()
        self.assertEqual(consumer.waiting, [])
        self.assertNoResult(done)
        self.assertFalse(any(held is body for held in gc.get_referents(vars(producer))))

    def test_body_written_then_let_go(self) -> None:
        body = b'{"model": "m", "pad": "' + b"x" * 1_000_000 + b'"}'
        producer = _body_producer(body)
        self.assertEqual(producer.length, len(body))
        consumer = StringTransport()
        self.successResultOf(producer.startProducing(consumer))
        self.assertEqual(consumer.value(), body)
        self.assertFalse(any(held is body for held in gc.get_referents(vars(producer))))
