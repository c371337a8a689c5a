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
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from oaiproxy.resources import Endpoint, build_root
from oaiproxy.site import LINGER_SECONDS, ProxySite

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
