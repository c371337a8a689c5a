"""
The HTTP server layer, driven with raw bytes over an in-memory transport:
the body limit, JSON answers to failures, the Server header and the access
log.  Bytes on the wire are what a client sees, so they are what is
checked.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from oaiproxy.access.admission import admission_gate
from oaiproxy.access.clients import ClientRegistry, Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, registry
from oaiproxy.routes.jsonapi import api_resources
from oaiproxy.routetable import BY_NAME
from oaiproxy.server.site import ALL_CONNECTIONS_FACTOR, BODY_MIN_RATE, LINGER_SECONDS, TLS_NOTICE_SECONDS, ProxySite
from oaiproxy.server.tree import build_root, build_tree
from oaiproxy.upstream.client import UpstreamClient
from oaiproxy.web import Endpoint

LIMIT = 1000


class Recorder(Endpoint):
    """
    An endpoint that records the bodies it is given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        self.bodies.append(request.content.read())
        return b"ok"


class Broken(Endpoint):
    def render_POST(self, request: Request) -> bytes:
        raise ZeroDivisionError("bug with sk-SECRET in a local")


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: proxy.test", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head + list(headers)) + b"\r\n\r\n" + body


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = Recorder()
        self.site = ProxySite(build_root(self.endpoint), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", "10.1.2.3", 40000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_body_within_limit_reaches_resource(self) -> None:
        """
        A body up to the limit is delivered whole.
        """
        protocol, transport = self.connect()
        body = b"x" * LIMIT
        protocol.dataReceived(post(b"/v1/chat/completions", body))
        self.assertEqual(self.endpoint.bodies, [body])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))

    def assertTooLarge(self, wire: bytes) -> None:
        self.assertTrue(wire.startswith(b"HTTP/1.1 413 "), wire[:40])
        head, _, body = wire.partition(b"\r\n\r\n")
        self.assertIn(b"Connection: close", head)
        self.assertIn(b"Content-Type: application/json", head)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "request_too_large")
        self.assertIn(str(LIMIT), error["message"])

    def test_declared_length_over_limit_answered_before_body(self) -> None:
        """
        A Content-Length over the limit gets 413 at once, before the body is
        sent; a client waiting on "Expect: 100-continue" is not invited to
        send it.
        """
        protocol, transport = self.connect()
        request = post(b"/v1/chat/completions", b"y" * (LIMIT + 1), b"Expect: 100-continue")
        head = request.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        protocol.dataReceived(head)
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTooLarge(transport.value())
        self.assertEqual(self.endpoint.bodies, [])

    def test_refused_body_is_drained_then_connection_closed(self) -> None:
        """
        After a 413 the rest of the body is read and thrown away (closing at
        once could reset the connection before the client reads the 413);
        then the connection closes.
        """
        protocol, transport = self.connect()
        request = post(b"/v1/chat/completions", b"y" * (LIMIT * 5))
        protocol.dataReceived(request[: len(request) // 2])
        self.assertTooLarge(transport.value())
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(request[len(request) // 2 :])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.endpoint.bodies, [])

    def test_lingering_is_bounded(self) -> None:
        """
        A client that never finishes sending a refused body is cut off
        after the linger time.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(post(b"/v1/chat/completions", b"y" * (LIMIT * 5))[:200])
        self.clock.advance(LINGER_SECONDS - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_over_limit(self) -> None:
        """
        A chunked body, whose size is not declared, is refused as soon as
        the count passes the limit.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"z" * 600
        protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertTooLarge(transport.value())
        protocol.dataReceived(b"0\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.endpoint.bodies, [])

    def test_bug_is_json_500_without_details(self) -> None:
        """
        A bug in a resource is logged, and the client gets an OpenAI-shaped
        500 that reveals nothing of it.
        """
        site = ProxySite(build_root(Broken()), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "))
        self.assertEqual(json.loads(body)["error"]["code"], "internal_error")
        self.assertNotIn(b"SECRET", body)
        self.assertNotIn(b"ZeroDivision", body)

    def test_bug_after_the_client_left_writes_nothing(self) -> None:
        """
        A bug in a resource whose client already left is logged, and no
        answer is written to the lost connection (twisted.web would raise
        for finishing a request whose connection is gone).
        """

        class LeftThenBroken(Endpoint):
            def render_POST(self, request: Request) -> bytes:
                request.channel.connectionLost(Failure(ConnectionDone()))
                raise ZeroDivisionError("bug")

        site = ProxySite(build_root(LeftThenBroken()), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])
        self.assertEqual(transport.value(), b"")

    def test_server_header_names_the_proxy(self) -> None:
        """
        Responses say they come from oaiproxy, not which Twisted version
        runs it.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}"))
        self.assertIn(b"\r\nServer: oaiproxy/", transport.value())
        self.assertNotIn(b"TwistedWeb", transport.value())

    def test_access_log_line(self) -> None:
        """
        Each request logs one line with client, method, path, status and
        size, but not the query string or any header value.
        """
        protocol, transport = self.connect()
        with capturedLogs() as events:
            protocol.dataReceived(
                post(b"/v1/chat/completions?api_key=sk-QUERYSECRET", b"{}", b"Authorization: Bearer sk-HEADERSECRET")
            )
        [access] = [e for e in events if "status" in e]
        self.assertEqual(
            (access["peer"], access["method"], access["path"], access["status"], access["bytes_out"]),
            ("10.1.2.3", "POST", "/v1/chat/completions", 200, 2),
        )
        everything = repr(events)
        self.assertNotIn("QUERYSECRET", everything)
        self.assertNotIn("HEADERSECRET", everything)

    def test_openai_key_never_logged(self) -> None:
        """
        A real OpenAI key pasted into the path or sent as X-Request-Id
        (both refused upstream of this site) is replaced in the access
        entry's path, and never becomes the request id the log and the
        response carry.
        """
        key = b"sk-proj-" + b"A" * 40 + b"T3BlbkFJ" + b"B" * 20
        protocol, transport = self.connect()
        with capturedLogs() as events:
            protocol.dataReceived(post(b"/v1/models/" + key + b"/x", b"{}", b"X-Request-Id: " + key))
        [access] = [e for e in events if "status" in e]
        self.assertEqual(access["path"], "/v1/models/<redacted>/x")
        self.assertTrue(access["request_id"].startswith("req_"), access["request_id"])
        self.assertNotIn(key.decode(), repr(events))
        # The 404's message names the path it could not serve, blanked too.
        self.assertIn(b"/v1/models/<redacted>/x", transport.value())
        self.assertNotIn(key, transport.value())

    def test_disconnect_is_logged_once(self) -> None:
        """
        A request that ends by the client leaving still gets its one access
        line, marked as a disconnect.
        """

        class Pending(Endpoint):
            def render_POST(self, request: Request) -> int:
                return 1  # NOT_DONE_YET

        site = ProxySite(build_root(Pending()), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)
        protocol = site.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        with capturedLogs() as events:
            protocol.dataReceived(post(b"/chat/completions", b"{}"))
            protocol.connectionLost(None)
        access = [e for e in events if "status" in e]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["ended"], "client_disconnected")

    def test_cut_off_by_proxy_is_not_blamed_on_the_client(self) -> None:
        """
        When the proxy itself cuts a response off (its upstream failed), the
        access line says so instead of "client disconnected".
        """

        class CutOff(Endpoint):
            def render_POST(self, request: Request) -> int:
                request.write(b"partial")
                request.loseConnection()
                return 1  # NOT_DONE_YET

        site = ProxySite(build_root(CutOff()), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        with capturedLogs() as events:
            protocol.dataReceived(post(b"/chat/completions", b"{}"))
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(None)
        [access] = [e for e in events if "status" in e]
        self.assertEqual(access["ended"], "cut_off")
        self.assertIn("upstream failed", formatEvent(access))

    def test_idle_connection_times_out(self) -> None:
        """
        A client connection left idle past the idle timeout is closed, so
        abandoned keep-alive sockets do not pile up.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}"))
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)


class AbuseTests(SynchronousTestCase):
    """
    Bounds a hostile client cannot stretch.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = Recorder()
        self.site = ProxySite(
            build_root(self.endpoint),
            max_body_bytes=LIMIT,
            idle_timeout=60,
            header_timeout=10,
            max_connections_per_ip=3,
            reactor=self.clock,
        )

    def connect(self, host: str = "10.0.0.1") -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", host, 40000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_trickled_headers_are_cut_off(self) -> None:
        """
        A client trickling its headers a byte at a time (slowloris) is cut
        off when the header deadline passes, although it was never idle.
        """
        protocol, transport = self.connect()
        request = post(b"/v1/chat/completions", b"{}")
        for byte in request[:40]:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(0.2)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10 - 40 * 0.2)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertEqual(self.endpoint.bodies, [])

    def test_deadline_does_not_cut_a_long_response(self) -> None:
        """
        Once the headers are in, the deadline is gone: a long-running
        response (a stream) is not cut off, and the next request on the
        connection gets a fresh deadline.
        """

        class Slow(Endpoint):
            pending: list[Request] = []

            def render_POST(self, request: Request) -> int:
                request.write(b"data: {}\n\n")
                self.pending.append(request)
                return 1  # NOT_DONE_YET

        self.site.resource = build_root(Slow())
        protocol, transport = self.connect()
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}"))
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        [request] = Slow.pending
        request.finish()
        protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_too_many_headers_is_a_json_400(self) -> None:
        """
        More headers than allowed is answered with an OpenAI-shaped 400,
        not an empty one.
        """
        protocol, transport = self.connect()
        headers = [b"X-Filler-%d: x" % i for i in range(200)]
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}", *headers))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "))
        self.assertEqual(json.loads(body)["error"]["code"], "bad_http_request")
        self.assertTrue(transport.disconnecting)

    def test_huge_header_is_a_json_400(self) -> None:
        """
        A request line and headers over the size bound get the same 400.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(post(b"/v1/chat/completions", b"{}", b"X-Big: " + b"y" * 20000))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))

    def test_connections_per_address_are_capped(self) -> None:
        """
        One address cannot open more than its share of connections; others
        are unaffected, and closing one makes room again.
        """
        opened = [self.connect("10.0.0.1") for _ in range(3)]
        refused, _ = self.connect("10.0.0.1")
        self.assertIsNone(refused)
        other, _ = self.connect("10.0.0.2")
        self.assertIsNotNone(other)
        opened[0][0].connectionLost(Failure(ConnectionDone()))
        again, _ = self.connect("10.0.0.1")
        self.assertIsNotNone(again)


class RequestIdTests(SynchronousTestCase):
    def test_413_carries_the_request_id(self) -> None:
        """
        Even a body refused before it was read gets x-oaiproxy-request-id,
        the id its access log entry has.
        """
        clock = MemoryReactorClock()
        records: list[Any] = []
        site = ProxySite(
            build_root(Recorder()), max_body_bytes=10, idle_timeout=60, reactor=clock, access_log=records.append
        )
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post(b"/v1/chat/completions", b"y" * 100)[:120])
        head = transport.value().split(b"\r\n\r\n")[0]
        [record] = records
        self.assertIn(b"x-oaiproxy-request-id: " + record.request_id.encode(), head)


class Pending(Endpoint):
    """
    Keeps every request open, as a long stream would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_POST(self, request: Request) -> int:
        request.write(b"data: {}\n\n")
        self.requests.append(request)
        return 1  # NOT_DONE_YET


def gate(*keys: bytes) -> Any:
    """
    The daemon's gate, for clients with C{keys} (none: no client auth).
    """
    return admission_gate(Credentials(Secret(UPSTREAM_KEY), registry(*keys) if keys else ClientRegistry()))


def bearer(key: bytes) -> bytes:
    return b"Authorization: Bearer " + key


class _Upstream:
    """
    A treq-like client that keeps each request (and never answers).
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []

    def request(self, method: str, url: str, data: Any = None, **kwargs: Any) -> "Deferred[Any]":
        self.requests.append((method, url, data))
        return Deferred()


class EarlyRefusalTests(SynchronousTestCase):
    """
    A body is read only from a client whose headers passed the gate: the
    client key is checked as soon as the headers are in, and a request
    that fails is answered by its route (the real chat route here) before
    its body.
    """

    def setUp(self, *keys: bytes) -> None:
        self.clock = MemoryReactorClock()
        self.http = _Upstream()
        credentials = Credentials(Secret(UPSTREAM_KEY), registry(*keys) if keys else ClientRegistry())
        upstream = UpstreamClient(self.http, "http://upstream.test/v1", credentials, self.clock, 30.0)
        api = api_resources([BY_NAME["chat/completions"]], upstream, self.clock, credentials)
        self.site = ProxySite(
            build_tree(api),
            max_body_bytes=64 * 1024 * 1024,
            idle_timeout=600,
            gate=admission_gate(credentials),
            access_log=lambda record: None,
            reactor=self.clock,
        )
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "10.9.9.9", 4000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def head(self, path: bytes, framing: bytes, *headers: bytes) -> bytes:
        lines = [b"POST " + path + b" HTTP/1.1", b"Host: p", framing, *headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def answered(self, status: bytes, code: str) -> bytes:
        wire = self.transport.value()
        head, _, body = wire.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 " + status + b" "), head[:40])
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(json.loads(body)["error"]["code"], code)
        return wire

    def test_unauthenticated_50_mb_body_is_refused_after_headers(self) -> None:
        """
        A request with a wrong key declaring 50 MB is answered 401 once its
        headers are in, without inviting the body; what it sends anyway is
        read and thrown away, never held, and the connection then closes.
        """
        self.setUp(CLIENT_KEY)
        size = 50 * 1024 * 1024
        self.protocol.dataReceived(
            self.head(
                b"/v1/chat/completions", b"Content-Length: %d" % (size,), b"Expect: 100-continue", bearer(b"oai-wrong")
            )
        )
        wire = self.answered(b"401", "invalid_api_key")
        self.assertNotIn(b"100 Continue", wire)
        [request] = self.protocol.requests
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            self.protocol.dataReceived(chunk)
            self.assertEqual(request.body_held, 0)
        self.assertEqual(self.http.requests, [])
        self.assertEqual(self.transport.value(), wire)
        self.assertTrue(self.transport.disconnecting)

    def test_chunked_unauthenticated_body_is_refused(self) -> None:
        """
        The same for a body without a declared length, and without a key.
        """
        self.setUp(CLIENT_KEY)
        self.protocol.dataReceived(self.head(b"/v1/chat/completions", b"Transfer-Encoding: chunked"))
        self.answered(b"401", "invalid_api_key")
        [request] = self.protocol.requests
        self.protocol.dataReceived(b"10000\r\n" + b"y" * 65536 + b"\r\n")
        self.assertEqual(request.body_held, 0)
        self.protocol.dataReceived(b"0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.http.requests, [])

    def test_unknown_path_is_answered_before_the_body(self) -> None:
        """
        A body for an unknown path, without a key, gets the usual 404 (with
        its hint) before the body, which is not held either.
        """
        self.setUp(CLIENT_KEY)
        self.protocol.dataReceived(self.head(b"/v1/v1/chat/completions", b"Content-Length: 100000") + b"{" * 1000)
        self.answered(b"404", "unknown_url")
        self.assertEqual(self.protocol.requests[0].body_held, 0)

    def test_openai_key_refused_before_the_body_without_client_keys(self) -> None:
        """
        Without client keys, a body that comes with an OpenAI key is still
        refused on its headers.
        """
        self.setUp()
        key = b"sk-proj-" + b"a" * 20 + b"T3BlbkFJ" + b"b" * 20
        self.protocol.dataReceived(self.head(b"/v1/chat/completions", b"Content-Length: 100000", bearer(key)))
        self.answered(b"401", "openai_key_not_accepted")
        self.assertNotIn(key, self.transport.value())
        self.protocol.dataReceived(b"{" * 50_000)
        self.assertEqual(self.protocol.requests[0].body_held, 0)

    def test_valid_key_and_bodyless_requests_pass(self) -> None:
        """
        A valid key's body is read as usual; a request without a body and
        without a key is served as before (C{/health} needs no key).
        """
        self.setUp(CLIENT_KEY)
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        self.protocol.dataReceived(post(b"/v1/chat/completions", body, bearer(CLIENT_KEY)))
        [(_, _, sent)] = self.http.requests
        self.assertEqual(sent, body)
        other = self.site.buildProtocol(IPv4Address("TCP", "10.9.9.9", 4001))
        transport = StringTransport()
        other.makeConnection(transport)
        other.dataReceived(b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:40])


class BodyTimeoutTests(SynchronousTestCase):
    """
    A body must keep arriving: C{body_timeout} seconds, plus one for every
    L{BODY_MIN_RATE} bytes received.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = Recorder()
        self.records: list[Any] = []
        self.site = ProxySite(
            build_root(self.endpoint),
            max_body_bytes=16 * 1024 * 1024,
            idle_timeout=600,
            body_timeout=60,
            access_log=self.records.append,
            reactor=self.clock,
        )
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "10.9.9.9", 4000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def head(self, length: int) -> bytes:
        return b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % (length,)

    def test_trickling_body_is_cut_off(self) -> None:
        """
        A byte every 2 s (never idle) is cut off at the body timeout with
        an OpenAI-shaped 408, and the connection closes.
        """
        self.protocol.dataReceived(self.head(1000))
        for _ in range(29):
            self.clock.advance(2)
            self.protocol.dataReceived(b"x")
        self.clock.advance(1.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(json.loads(body)["error"]["code"], "request_timeout")
        self.assertEqual(self.endpoint.bodies, [])
        [record] = self.records
        self.assertEqual((record.status, record.path), (408, "/v1/chat/completions"))

    def test_steady_body_is_not_cut_off(self) -> None:
        """
        A large body arriving at the minimum rate takes as long as it
        needs: here 8 MiB over 128 s, twice the timeout.
        """
        size = 8 * 1024 * 1024
        self.protocol.dataReceived(self.head(size))
        for _ in range(size // BODY_MIN_RATE):
            self.clock.advance(1)
            self.assertFalse(self.transport.disconnecting)
            self.protocol.dataReceived(b"z" * BODY_MIN_RATE)
        self.assertEqual(len(self.endpoint.bodies), 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        # Nothing left scheduled but the idle timeout.
        self.clock.advance(300)
        self.assertFalse(self.transport.disconnecting)

    def test_time_held_by_the_proxy_is_not_counted(self) -> None:
        """
        While the proxy does not read the client (an upload's upstream is
        behind), the body's clock stops.
        """
        self.protocol.dataReceived(self.head(1000) + b"x" * 10)
        self.clock.advance(30)
        self.protocol.hold_for_upstream()
        self.clock.advance(600)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.release_for_upstream()
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1.1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))


class ConnectionCapTests(SynchronousTestCase):
    """
    The per-address cap counts connections that have not presented a valid
    key: an app server's thousands of streams from one address are served,
    anonymous connections beyond the cap are refused.
    """

    HOST = "10.20.30.40"

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = Pending()

    def site(self, *keys: bytes, cap: int = 256) -> ProxySite:
        return ProxySite(
            build_root(self.endpoint),
            max_body_bytes=LIMIT,
            idle_timeout=600,
            gate=gate(*keys),
            max_connections_per_ip=cap,
            access_log=lambda record: None,
            reactor=self.clock,
        )

    def connect(self, site: ProxySite) -> Any:
        address = IPv4Address("TCP", self.HOST, 40000)
        protocol = site.buildProtocol(address)
        if protocol is not None:
            protocol.makeConnection(StringTransport(peerAddress=address))
        return protocol

    def streams(self, site: ProxySite, count: int, *headers: bytes) -> None:
        for _ in range(count):
            protocol = self.connect(site)
            self.assertIsNotNone(protocol)
            protocol.dataReceived(post(b"/v1/chat/completions", b"{}", *headers))

    def test_thousands_of_authenticated_streams_from_one_address(self) -> None:
        """
        With the default cap, 2,500 streams with a valid key from one
        address are all served, while that address may still open only
        256 connections that have presented no key.
        """
        site = self.site(CLIENT_KEY)
        self.streams(site, 2500, bearer(CLIENT_KEY))
        self.assertEqual(len(self.endpoint.requests), 2500)
        self.assertEqual(site.connections_from(self.HOST), (0, 2500))
        anonymous = [self.connect(site) for _ in range(256)]
        self.assertNotIn(None, anonymous)
        self.assertIsNone(self.connect(site))
        # One that authenticates makes room for another.
        anonymous[0].dataReceived(post(b"/v1/chat/completions", b"{}", bearer(CLIENT_KEY)))
        self.assertIsNotNone(self.connect(site))

    def test_refused_key_keeps_counting(self) -> None:
        """
        A connection whose request carried a wrong key is still
        unauthenticated; closing one makes room.
        """
        site = self.site(CLIENT_KEY, cap=3)
        opened = [self.connect(site) for _ in range(3)]
        for protocol in opened:
            protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n" + bearer(b"wrong") + b"\r\n\r\n")
        self.assertIsNone(self.connect(site))
        opened[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.connect(site))

    def test_hard_cap_on_all_connections(self) -> None:
        """
        Authenticated connections are bounded too, at a much higher cap.
        """
        site = self.site(CLIENT_KEY, cap=2)
        self.streams(site, 2 * ALL_CONNECTIONS_FACTOR, bearer(CLIENT_KEY))
        self.assertIsNone(self.connect(site))
        self.assertEqual(site.connections_from(self.HOST), (0, 2 * ALL_CONNECTIONS_FACTOR))

    def test_without_client_keys_a_request_admits(self) -> None:
        """
        Without client keys (loopback use), no key can be presented: a
        connection counts against the cap until its first request's
        headers are in.
        """
        site = self.site()
        self.streams(site, 2100)
        self.assertEqual(len(self.endpoint.requests), 2100)
        idle = [self.connect(site) for _ in range(256)]
        self.assertNotIn(None, idle)
        self.assertIsNone(self.connect(site))


class FramingTests(SynchronousTestCase):
    """
    Malformed framing is answered at once, not after a timeout or after
    reading up to the body limit.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = Recorder()
        self.site = ProxySite(build_root(self.endpoint), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "10.9.9.9", 4000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def chunked(self) -> None:
        self.protocol.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

    def test_bare_lf_request_is_a_400_at_once(self) -> None:
        """
        A request whose lines end in a bare LF is answered 400 as soon as
        the LF arrives, not 408 at the header timeout.
        """
        for wire in (b"GET /health HTTP/1.1\nHost: p\n\n", b"GET /health HTTP/1.1\n"):
            self.setUp()
            self.protocol.dataReceived(wire)
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "), wire)
            self.assertIn(b"bad_http_request", self.transport.value())
            self.assertTrue(self.transport.disconnecting)

    def test_crlf_split_across_reads_is_fine(self) -> None:
        """
        A CR at the end of one read and its LF at the start of the next is
        a CRLF.
        """
        self.protocol.dataReceived(b"GET /health HTTP/1.1\r")
        self.protocol.dataReceived(b"\nHost: p\r")
        self.protocol.dataReceived(b"\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "), self.transport.value()[:40])

    def test_overlong_chunk_size_refused_at_once(self) -> None:
        """
        A chunk size with more hex digits than the limit needs is refused
        with a 413 before its line is even complete.
        """
        self.chunked()
        self.protocol.dataReceived(b"f" * 3)  # as many digits as 1000 (3e8) has
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(b"f")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "), self.transport.value()[:40])
        # The rest is discarded, not answered again.
        self.protocol.dataReceived(b"\r\n" + b"q" * 5000)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.endpoint.bodies, [])

    def test_chunk_larger_than_the_room_left(self) -> None:
        """
        A chunk declared larger than what the limit still allows is refused
        as soon as its size line is in, before its data.
        """
        self.chunked()
        self.protocol.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")  # 600 of 1000
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(b"191\r\n")  # 401 > 400
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "), self.transport.value()[:40])
        self.assertEqual(self.endpoint.bodies, [])

    def test_chunks_that_fit_are_read(self) -> None:
        """
        Chunks up to the limit, leading zeros included, are a body.
        """
        self.chunked()
        self.protocol.dataReceived(b"0000000000258\r\n" + b"a" * 600 + b"\r\n190\r\n" + b"b" * 400 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.endpoint.bodies, [b"a" * 600 + b"b" * 400])


class PlainPortTests(SynchronousTestCase):
    """
    A TLS handshake on a plain-HTTP listener.
    """

    HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site = ProxySite(build_root(Recorder()), max_body_bytes=LIMIT, idle_timeout=60, reactor=self.clock)

    def hello(self) -> StringTransport:
        address = IPv4Address("TCP", "10.9.9.9", 4000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.HELLO)
        return transport

    def test_client_hello_is_closed_at_once_and_logged_sparingly(self) -> None:
        """
        https:// sent to the plain port is answered in plain HTTP (which a
        TLS client reports as a wrong version number) and closed at once,
        and a log line says what to use; more within a minute are only
        counted.
        """
        with capturedLogs() as events:
            transport = self.hello()
            self.assertTrue(transport.disconnecting)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
            self.assertIn(b"use an http:// URL", transport.value())
            for _ in range(50):
                self.hello()
            self.clock.advance(TLS_NOTICE_SECONDS)
            self.hello()
        notices = [formatEvent(e) for e in events if "ssl: endpoint" in formatEvent(e)]
        self.assertEqual(len(notices), 2, notices)
        self.assertIn("use http:// or an ssl: endpoint", notices[0])
        self.assertIn("10.9.9.9", notices[0])
        self.assertIn("50 more", notices[1])
