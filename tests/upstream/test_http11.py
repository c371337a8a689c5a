"""
The lean upstream agent (L{oaiproxy.upstream.http11}) at the byte level:
what it writes, how it frames what it reads, what fails how, and the
pool, compared with twisted.web's C{Agent} where the proxy relies on
twisted.web's behaviour.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from oaiproxy.upstream.client import _body_producer, http_client
from oaiproxy.upstream.http11 import (
    MAX_HEAD_BYTES,
    ConnectionPool,
    HTTP11Agent,
    MalformedResponse,
    ResponseCutShort,
    WrongBodyLength,
)

URL = b"http://api.test:8000/v1/chat/completions?x=1"


class _Transport(StringTransport):
    """
    A StringTransport that remembers an abort, and reports the loss of the
    connection to its protocol when asked.
    """

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class _Endpoint:
    def __init__(self, endpoints: "_Endpoints") -> None:
        self._endpoints = endpoints

    def connect(self, factory: Factory) -> "Deferred[Any]":
        endpoints = self._endpoints
        if endpoints.hold:
            d: Deferred[Any] = Deferred(lambda d: endpoints.cancelled.append(d))
            endpoints.pending.append((d, factory))
            return d
        return succeed(endpoints.attach(factory))


class _Endpoints:
    """
    An endpoint factory whose connections are StringTransports.
    """

    def __init__(self) -> None:
        self.connections: list[tuple[Protocol, _Transport]] = []
        self.hold = False
        self.pending: list[tuple[Deferred[Any], Factory]] = []
        self.cancelled: list[Deferred[Any]] = []

    def endpointForURI(self, uri: URI) -> _Endpoint:
        return _Endpoint(self)

    def attach(self, factory: Factory) -> Protocol:
        protocol = factory.buildProtocol(None)
        transport = _Transport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol


class _Body(Protocol):
    """
    A body protocol that records what it gets.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


@implementer(IBodyProducer)
class _Upload:
    """
    A body producer the test feeds by hand.
    """

    def __init__(self, length: Any = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False
        self.paused = False

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints = _Endpoints()
        self.pool = ConnectionPool(self.clock)
        self.pool.maxPersistentPerHost = 64
        self.agent = HTTP11Agent(self.endpoints, self.pool)

    def request(self, method: bytes = b"GET", body: Any = None, url: bytes = URL, headers: Any = None) -> Any:
        d = self.agent.request(method, url, headers, body)
        protocol, transport = self.endpoints.connections[-1]
        return d, protocol, transport

    def answer(self, raw: bytes, method: bytes = b"GET", body: Any = None) -> tuple[Any, Any, _Transport]:
        d, protocol, transport = self.request(method, body)
        protocol.dataReceived(raw)
        return d, protocol, transport

    def body_of(self, response: Any) -> _Body:
        body = _Body()
        response.deliverBody(body)
        return body


class RequestBytesTests(_Case):
    """
    The request on the wire is what twisted.web's C{Agent} writes for the
    same call.
    """

    def agent_bytes(self, method: bytes, headers: Optional[Headers], body: Any) -> bytes:
        endpoints = _Endpoints()
        agent = Agent.usingEndpointFactory(Clock(), endpoints, pool=HTTPConnectionPool(Clock(), persistent=True))
        agent.request(method, URL, headers, body)
        return endpoints.connections[-1][1].value()

    def ours(self, method: bytes, headers: Optional[Headers], body: Any) -> bytes:
        self.agent.request(method, URL, headers, body)
        return self.endpoints.connections[-1][1].value()

    def test_same_bytes_as_agent(self) -> None:
        """
        Request line, the C{Host} Agent adds, headers in order with repeated
        values, and the body's framing: none for a GET, C{Content-Length: 0}
        for a bodiless POST, the length of a known body, chunked for an
        unknown one.
        """

        def headers() -> Headers:
            return Headers(
                {
                    b"authorization": [b"Bearer sk-UP"],
                    b"x-many": [b"a", b"b"],
                    b"content-type": [b"application/json"],
                }
            )

        cases: list[tuple[bytes, Any, Any]] = [
            (b"GET", None, lambda: None),
            (b"GET", headers, lambda: None),
            (b"POST", headers, lambda: None),
            (b"PUT", None, lambda: None),
            (b"DELETE", headers, lambda: None),
            (b"POST", headers, lambda: _body_producer(b'{"model": "m"}')),
        ]
        for method, make_headers, make_body in cases:
            with_host = make_headers() if make_headers else None
            expected = self.agent_bytes(method, with_host, make_body())
            got = self.ours(method, make_headers() if make_headers else None, make_body())
            self.assertEqual(got, expected, method)
        self.assertIn(b"Host: api.test:8000\r\n", got)
        self.assertTrue(got.endswith(b'\r\n\r\n{"model": "m"}'))

    def test_chunked_body_same_bytes(self) -> None:
        """
        An upload of unknown length goes chunked, each write one chunk, and
        ends with the last chunk, as Agent frames it.
        """
        written = []
        for agent_of in (
            lambda e: Agent.usingEndpointFactory(Clock(), e, pool=HTTPConnectionPool(Clock())),
            lambda e: HTTP11Agent(e, ConnectionPool(Clock())),
        ):
            endpoints = _Endpoints()
            upload = _Upload()
            agent_of(endpoints).request(b"POST", URL, Headers({b"host": [b"up.test"]}), upload)
            upload.consumer.write(b"hello")
            upload.consumer.write(b"x" * 300)
            upload.done.callback(None)
            written.append(endpoints.connections[-1][1].value())
        self.assertEqual(written[1], written[0])
        self.assertTrue(written[1].endswith(b"5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"))

    def test_through_treq(self) -> None:
        """
        The production treq client over this agent sends what it sends over
        twisted.web's Agent (C{Accept-Encoding: gzip} added).
        """
        sent = []
        for agent_of in (
            lambda e: Agent.usingEndpointFactory(Clock(), e, pool=HTTPConnectionPool(Clock())),
            lambda e: HTTP11Agent(e, ConnectionPool(Clock())),
        ):
            endpoints = _Endpoints()
            client = http_client(agent_of(endpoints), Clock())
            client.request(
                "POST",
                URL.decode(),
                data=b"{}",
                headers=Headers({b"authorization": [b"Bearer k"]}),
                unbuffered=True,
                allow_redirects=False,
            )
            sent.append(endpoints.connections[-1][1].value())
        self.assertEqual(sent[0], sent[1])
        self.assertIn(b"Accept-Encoding: gzip\r\n", sent[1])

    def test_invalid_method_or_uri(self) -> None:
        """
        A method or URI Agent would refuse is refused the same way, before
        anything is sent.
        """
        self.assertRaises(ValueError, self.agent.request, b"GE T", URL)
        self.assertRaises(ValueError, self.agent.request, b"GET", b"http://api.test/a b")
        self.assertRaises(TypeError, self.agent.request, "GET", URL)
        self.assertEqual(self.endpoints.connections, [])


class FramingTests(_Case):
    """
    Every way a response body is delimited.
    """

    def test_content_length(self) -> None:
        d, _, _ = self.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A:  v \r\n\r\nhello")
        response = self.successResultOf(d)
        self.assertEqual((response.version, response.code, response.phrase), ((b"HTTP", 1, 1), 201, b"Created"))
        self.assertEqual(response.length, 5)
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"v"])
        # Connection-control headers are not the message's (as twisted.web).
        self.assertFalse(response.headers.hasHeader(b"content-length"))
        body = self.body_of(response)
        self.assertEqual(b"".join(body.data), b"hello")
        assert body.reason is not None
        body.reason.trap(ResponseDone)

    def test_chunked_with_trailers(self) -> None:
        """
        Chunks reach the body protocol as they arrive; trailers are ignored.
        """
        d, protocol, _ = self.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        body = self.body_of(response)
        protocol.dataReceived(b"5\r\nhello\r\n")
        self.assertEqual(body.data, [b"hello"])
        self.assertIsNone(body.reason)
        protocol.dataReceived(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(body.data, [b"hello", b" world"])
        assert body.reason is not None
        body.reason.trap(ResponseDone)
        self.assertFalse(response.headers.hasHeader(b"x-trailer"))

    def test_until_close(self) -> None:
        """
        No length and no chunking: the body ends with the connection, as
        L{PotentialDataLoss}, and the connection is not reused.
        """
        d, protocol, _ = self.answer(b"HTTP/1.1 200 OK\r\n\r\nsome")
        body = self.body_of(self.successResultOf(d))
        protocol.dataReceived(b" more")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(b"".join(body.data), b"some more")
        assert body.reason is not None
        body.reason.trap(PotentialDataLoss)
        self.request()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_no_body(self) -> None:
        """
        HEAD, 204 and 304 have no body whatever their C{Content-Length}
        says (a HEAD response keeps it as a header), and leave the
        connection reusable.
        """
        for method, raw in [
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 42\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        ]:
            d, protocol, transport = self.answer(raw, method)
            response = self.successResultOf(d)
            self.assertEqual(response.length, 0)
            body = self.body_of(response)
            self.assertEqual(body.data, [])
            assert body.reason is not None
            body.reason.trap(ResponseDone)
            self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"42"] if method == b"HEAD" else None)
            self.assertFalse(transport.disconnecting)
            self.agent.request(b"GET", URL)
            self.assertEqual(len(self.endpoints.connections), 1, method)
            # (Answer the reuse so the next case starts clean.)
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def test_interim_responses_skipped(self) -> None:
        """
        1xx interim responses (100, 103) are skipped; the final one is the
        response.
        """
        d, _, _ = self.answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertFalse(response.headers.hasHeader(b"link"))
        self.assertEqual(self.body_of(response).data, [b"ok"])

    def test_buffered_until_delivered(self) -> None:
        """
        Body bytes that arrive before C{deliverBody} are kept for it, and
        the socket is paused meanwhile (as twisted.web): nothing more is
        read until someone takes the body.
        """
        d, protocol, transport = self.request()
        holder: list[Any] = []
        d.addCallback(holder.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        self.assertEqual(transport.producerState, "paused")
        body = self.body_of(holder[0])
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"-rest")
        self.assertEqual(body.data, [b"first", b"-rest"])
        assert body.reason is not None
        body.reason.trap(ResponseDone)

    def test_pause_while_given_the_buffered_body_holds(self) -> None:
        """
        A body protocol that pauses while it is given what was buffered
        (its own client is slow) stays paused: delivery does not resume
        the socket over its head, and its own resume does.
        """
        d, protocol, transport = self.request()
        holder: list[Any] = []
        d.addCallback(holder.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")

        class Slow(_Body):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.pauseProducing()

        body = Slow()
        holder[0].deliverBody(body)
        self.assertEqual(body.data, [b"first"])
        self.assertEqual(transport.producerState, "paused", "the protocol asked for a pause")
        body.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_http10_keep_alive_rule(self) -> None:
        """
        An HTTP/1.0 response keeps its connection only when it says
        C{keep-alive}; C{Connection: close} never does.
        """
        for raw, reused in [
            (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na", False),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na", True),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na", False),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", True),
        ]:
            self.setUp()
            d, _, transport = self.answer(raw)
            self.body_of(self.successResultOf(d))
            self.assertEqual(transport.disconnecting, not reused, raw)
            self.agent.request(b"GET", URL)
            self.assertEqual(len(self.endpoints.connections), 1 if reused else 2, raw)


class MalformedTests(_Case):
    """
    A response this agent refuses fails the request with L{ResponseFailed}
    and gives the connection up.
    """

    def refused(self, *pieces: bytes) -> tuple[ResponseFailed, _Transport]:
        d, protocol, transport = self.request()
        for piece in pieces:
            protocol.dataReceived(piece)
            if transport.disconnecting:
                break
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(transport.disconnecting)
        return failure.value, transport

    def test_bad_status_lines(self) -> None:
        for raw in [
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTPX 200 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        ]:
            self.setUp()
            failed, _ = self.refused(raw)
            [reason] = failed.reasons
            reason.trap(MalformedResponse)

    def test_switching_protocols(self) -> None:
        """
        A 101, with or without an C{Upgrade} header, fails the request as
        malformed (the proxy never asks for an upgrade), even with a
        response after it: it is not skipped as an interim head.
        """
        for head in [b"Upgrade: websocket\r\nConnection: Upgrade\r\n", b""]:
            self.setUp()
            failed, _ = self.refused(
                b"HTTP/1.1 101 Switching Protocols\r\n" + head + b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            )
            [reason] = failed.reasons
            reason.trap(MalformedResponse)

    def test_smuggling_shapes(self) -> None:
        """
        Conflicting or repeated lengths, a length with chunking, and a
        transfer coding other than chunked.
        """
        for head in [
            b"Content-Length: 3\r\nContent-Length: 4\r\n",
            b"Content-Length: 3\r\nContent-Length: 3\r\n",
            b"Content-Length: 3, 4\r\n",
            b"Content-Length: -1\r\n",
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            b"Transfer-Encoding: gzip\r\n",
        ]:
            self.setUp()
            self.refused(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nabc")

    def test_huge_head(self) -> None:
        """
        An endless header (or endless headers, or endless interim
        responses) fails the request once the head passes
        L{MAX_HEAD_BYTES}: memory does not grow with it.
        """
        for start, piece in [
            (b"HTTP/1.1 200 OK\r\nX-Long: ", b"a" * 1000),
            (b"HTTP/1.1 200 OK\r\n", b"X-Many: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 30),
            (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 40),
        ]:
            self.setUp()
            d, protocol, transport = self.request()
            protocol.dataReceived(start)
            fed = len(start)
            while not transport.disconnecting:
                protocol.dataReceived(piece)
                fed += len(piece)
                self.assertLessEqual(fed, MAX_HEAD_BYTES + len(piece))
            [reason] = self.failureResultOf(d, ResponseFailed).value.reasons
            reason.trap(MalformedResponse)

    def test_head_just_under_the_bound(self) -> None:
        """
        A large head below the bound is a response like any other.
        """
        d, protocol, _ = self.request()
        padding = b"X-Pad: " + b"a" * (MAX_HEAD_BYTES - 200) + b"\r\n"
        head = b"HTTP/1.1 200 OK\r\n" + padding + b"Content-Length: 0\r\n\r\n"
        # In many reads, as a large head arrives.
        for start in range(0, len(head), 1000):
            protocol.dataReceived(head[start : start + 1000])
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(response.headers.getRawHeaders(b"x-pad")[0]), MAX_HEAD_BYTES - 200)

    def test_malformed_chunk(self) -> None:
        """
        A bad chunk size after the head cuts the body short.
        """
        d, protocol, transport = self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        body = self.body_of(self.successResultOf(d))
        protocol.dataReceived(b"zz\r\n")
        self.assertEqual(body.data, [b"abc"])
        assert body.reason is not None
        failed = body.reason.trap(ResponseFailed) and body.reason.value
        self.assertTrue(failed.reasons[0].check(MalformedResponse))
        self.assertTrue(transport.disconnecting)


class ConnectionEndTests(_Case):
    """
    The errors for a connection that ends early are twisted.web's.
    """

    def test_before_any_byte(self) -> None:
        d, protocol, _ = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        [reason] = self.failureResultOf(d, ResponseNeverReceived).value.reasons
        reason.trap(ConnectionDone)

    def test_inside_the_head(self) -> None:
        d, protocol, _ = self.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-A")
        protocol.connectionLost(Failure(ConnectionLost()))
        failed = self.failureResultOf(d, ResponseFailed).value
        self.assertNotIsInstance(failed, ResponseNeverReceived)
        [reason] = failed.reasons
        reason.trap(ConnectionLost)

    def test_while_the_body_is_sent(self) -> None:
        """
        The connection is lost while the upload is being written: the
        upload is stopped and the request fails with
        L{RequestTransmissionFailed}.
        """
        upload = _Upload()
        d, protocol, _ = self.request(b"POST", upload)
        upload.consumer.write(b"part")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, RequestTransmissionFailed)
        self.assertTrue(upload.stopped)

    def test_body_cut_short(self) -> None:
        for raw in [
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ]:
            self.setUp()
            d, protocol, _ = self.answer(raw)
            body = self.body_of(self.successResultOf(d))
            protocol.connectionLost(Failure(ConnectionLost()))
            assert body.reason is not None
            reasons = body.reason.trap(ResponseFailed) and body.reason.value.reasons
            self.assertTrue(reasons[0].check(ConnectionLost))
            self.assertTrue(reasons[1].check(ResponseCutShort))

    def test_body_protocol_error(self) -> None:
        """
        A body protocol that raises gets the rest of its body cut, and the
        connection is given up (not returned to the pool).
        """

        class Raising(_Body):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError()

        d, protocol, transport = self.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        body = Raising()
        self.successResultOf(d).deliverBody(body)
        protocol.dataReceived(b"abcd")
        assert body.reason is not None
        self.assertTrue(body.reason.value.reasons[0].check(ZeroDivisionError))
        self.assertTrue(transport.disconnecting)


class ProducerTests(_Case):
    """
    The body protocol's transport, and the upload's backpressure.
    """

    def test_pause_resume_stop(self) -> None:
        d, protocol, transport = self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = self.body_of(self.successResultOf(d))
        body.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        body.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        body.transport.stopProducing()
        self.assertTrue(transport.aborted)

    def test_producer_detached_after_the_body(self) -> None:
        """
        Once the body is over, its transport no longer reaches the
        connection, which may carry another request by then.
        """
        d, protocol, transport = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        body = self.body_of(self.successResultOf(d))
        body.transport.pauseProducing()
        body.transport.stopProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.aborted)

    def test_upload_registered_streaming(self) -> None:
        """
        An upload is the connection's streaming producer while it is
        written, so a full socket buffer pauses it; then it is let go.
        """
        upload = _Upload(length=4)
        d, protocol, transport = self.request(b"POST", upload)
        self.assertTrue(transport.streaming)
        transport.producer.pauseProducing()
        self.assertTrue(upload.paused, "a full buffer must pause the upload")
        transport.producer.resumeProducing()
        self.assertFalse(upload.paused)
        upload.consumer.write(b"abcd")
        upload.done.callback(None)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nabcd"))
        self.assertNoResult(d)

    def test_body_still_buffered_keeps_the_connection_out_of_the_pool(self) -> None:
        """
        A body written whole but still in the transport's buffer (it paused
        its producer: full) is not over: an answer that ends meanwhile (an
        upstream that answered early and stopped reading) closes the
        connection at once, dropping what is buffered, instead of pooling
        it with the rest of the body queued before the next request.
        """
        upload = _Upload(length=4)
        d, protocol, transport = self.request(b"POST", upload)
        upload.consumer.write(b"abcd")
        transport.producer.pauseProducing()
        upload.done.callback(None)
        self.assertIsNotNone(transport.producer, "the body has not left the buffer")
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n{}")
        body = self.body_of(self.successResultOf(d))
        assert body.reason is not None
        body.reason.trap(ResponseDone)
        self.assertTrue(transport.aborted)
        self.request()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_body_that_drained_keeps_the_connection(self) -> None:
        """
        Once the buffer has drained (the transport resumes its producer),
        the body is over and the connection goes back to the pool after
        its answer.
        """
        upload = _Upload(length=4)
        d, protocol, transport = self.request(b"POST", upload)
        upload.consumer.write(b"abcd")
        transport.producer.pauseProducing()
        upload.done.callback(None)
        transport.producer.resumeProducing()
        self.assertIsNone(transport.producer)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.body_of(self.successResultOf(d))
        self.assertFalse(transport.aborted)
        self.request()
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_early_response_while_uploading(self) -> None:
        """
        A response head that arrives while the upload is still being
        written is delivered at once; the upload goes on; a response that
        ends first leaves the connection to close, not to be reused.
        """
        upload = _Upload()
        d, protocol, transport = self.request(b"POST", upload)
        upload.consumer.write(b"first")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        response = self.successResultOf(d)
        body = self.body_of(response)
        self.assertEqual(body.data, [b"hi"])
        upload.consumer.write(b"second")
        self.assertIn(b"6\r\nsecond\r\n", transport.value())
        protocol.dataReceived(b"0\r\n\r\n")
        assert body.reason is not None
        body.reason.trap(ResponseDone)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upload.stopped)

    def test_upload_fails(self) -> None:
        """
        An upload that fails before the response fails the request with
        twisted.web's L{RequestGenerationFailed} and aborts the connection
        (no last chunk: upstream must not take half a body as whole).
        """
        upload = _Upload()
        d, protocol, transport = self.request(b"POST", upload)
        upload.consumer.write(b"part")
        upload.done.errback(Failure(ValueError("refused")))
        [reason] = self.failureResultOf(d, RequestGenerationFailed).value.reasons
        reason.trap(ValueError)
        self.assertTrue(transport.aborted)
        self.assertTrue(transport.value().endswith(b"\r\n\r\n4\r\npart\r\n"))

    def test_wrong_length(self) -> None:
        for writes in ([b"abcdef"], [b"ab"]):
            self.setUp()
            upload = _Upload(length=4)
            d, _, transport = self.request(b"POST", upload)
            for data in writes:
                upload.consumer.write(data)
            if not upload.stopped:
                upload.done.callback(None)
            [reason] = self.failureResultOf(d, RequestGenerationFailed).value.reasons
            reason.trap(WrongBodyLength)
            self.assertTrue(transport.aborted)
            self.assertNotIn(b"abcdef", transport.value())


class PoolTests(_Case):
    """
    Connection reuse, as C{HTTPConnectionPool(persistent=True)}.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def complete(self, method: bytes = b"GET") -> tuple[Any, _Transport]:
        d = self.agent.request(method, URL)
        protocol, transport = self.endpoints.connections[-1]
        protocol.dataReceived(self.OK)
        self.body_of(self.successResultOf(d))
        return protocol, transport

    def test_reuse(self) -> None:
        self.complete()
        self.complete()
        self.assertEqual(len(self.endpoints.connections), 1)
        _, transport = self.endpoints.connections[0]
        self.assertEqual(transport.value().count(b"GET /v1/chat/completions?x=1 HTTP/1.1"), 2)

    def test_not_reused_while_busy_or_unread(self) -> None:
        """
        A connection whose response is not over is not shared.
        """
        d = self.agent.request(b"GET", URL)
        self.endpoints.connections[0][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        self.body_of(self.successResultOf(d))
        self.agent.request(b"GET", URL)
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_idle_timeout(self) -> None:
        _, transport = self.complete()
        self.clock.advance(239)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.agent.request(b"GET", URL)
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_closed_while_idle(self) -> None:
        protocol, _ = self.complete()
        protocol.connectionLost(Failure(ConnectionDone()))
        # Dropped at once: no idle timer left for it.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.agent.request(b"GET", URL)
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_bytes_while_idle(self) -> None:
        """
        Bytes nobody asked for close an idle connection (as twisted.web).
        """
        protocol, transport = self.complete()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)

    def test_most_kept(self) -> None:
        """
        At most C{maxPersistentPerHost} idle connections: the oldest goes.
        """
        self.pool.maxPersistentPerHost = 1
        first = self.agent.request(b"GET", URL)
        second = self.agent.request(b"GET", URL)
        (p1, t1), (p2, t2) = self.endpoints.connections
        p1.dataReceived(self.OK)
        p2.dataReceived(self.OK)
        self.body_of(self.successResultOf(first))
        self.body_of(self.successResultOf(second))
        self.assertTrue(t1.disconnecting)
        self.assertFalse(t2.disconnecting)

    def test_retry_rule(self) -> None:
        """
        On a reused connection, an idempotent request without a body that
        fails before any answer is sent once more on a new connection; a
        POST, or a request with a body, is not.
        """
        self.complete()
        d = self.agent.request(b"GET", URL)
        self.endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoints.connections), 2)
        self.assertNoResult(d)
        self.endpoints.connections[1][0].dataReceived(self.OK)
        self.assertEqual(self.successResultOf(d).code, 200)

        # Nor one that failed after part of an answer, or that was
        # cancelled.
        self.setUp()
        self.complete()
        d = self.agent.request(b"GET", URL)
        self.endpoints.connections[0][0].dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseFailed)
        self.setUp()
        self.complete()
        d = self.agent.request(b"GET", URL)
        d.cancel()
        self.endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.endpoints.connections), 1)
        for method, body in [(b"POST", None), (b"GET", _body_producer(b"{}"))]:
            self.setUp()
            self.complete(method)
            d = self.agent.request(method, URL, None, body)
            self.endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
            self.failureResultOf(d, ResponseNeverReceived)
            self.assertEqual(len(self.endpoints.connections), 1)

    def test_fresh_connection_not_retried(self) -> None:
        d, protocol, _ = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_close_cached_connections(self) -> None:
        protocol, transport = self.complete()
        closed = self.pool.closeCachedConnections()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.agent.request(b"GET", URL)
        self.assertEqual(len(self.endpoints.connections), 2)


class CancelTests(_Case):
    def test_cancel_waiting(self) -> None:
        """
        Cancelling before the head aborts the connection; the request fails
        as twisted.web's does, and is not retried.
        """
        d, protocol, transport = self.request()
        d.cancel()
        self.assertTrue(transport.aborted)
        [reason] = self.failureResultOf(d, ResponseNeverReceived).value.reasons
        reason.trap(CancelledError)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_cancel_while_uploading(self) -> None:
        upload = _Upload()
        d, _, transport = self.request(b"POST", upload)
        d.cancel()
        self.assertTrue(transport.aborted)
        self.assertTrue(upload.stopped)
        [reason] = self.failureResultOf(d, RequestGenerationFailed).value.reasons
        reason.trap(CancelledError)

    def test_cancel_while_connecting(self) -> None:
        self.endpoints.hold = True
        d = self.agent.request(b"GET", URL)
        d.cancel()
        self.assertEqual(len(self.endpoints.cancelled), 1)
        self.failureResultOf(d, CancelledError)

    def test_cancel_with_the_head_partly_in(self) -> None:
        """
        Cancelling while the head is arriving aborts the connection, and
        the request fails as twisted.web's does once part of an answer is
        in (C{ResponseFailed}); the rest of the head, if the transport still
        delivers it, answers nothing and the connection is not reused.
        """
        d, protocol, transport = self.answer(b"HTTP/1.1 200 OK\r\nContent-Le")
        d.cancel()
        self.assertTrue(transport.aborted)
        [reason] = self.failureResultOf(d, ResponseFailed).value.reasons
        reason.trap(CancelledError)
        protocol.dataReceived(b"ngth: 2\r\n\r\nok")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.agent.request(b"GET", URL)
        self.assertEqual(len(self.endpoints.connections), 2)


class LoopbackTests(TestCase):
    """
    Over real sockets on 127.0.0.1, through L{UpstreamEndpoints}.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        from oaiproxy.upstream.client import UpstreamEndpoints, make_pool

        self.reactor: Any = reactor
        self.served: list[bytes] = []
        self.connections = 0
        served = self.served
        outer = self

        class Server(Protocol):
            def connectionMade(self) -> None:
                outer.connections += 1
                self.buffer = b""

            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:
                    head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                    served.append(head)
                    if b"/stream" in head:
                        self.transport.write(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                        )
                    elif b"/close" in head:
                        self.transport.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
                        self.transport.loseConnection()
                    else:
                        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        self.port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = make_pool(reactor)
        self.agent = HTTP11Agent(UpstreamEndpoints(reactor, 5.0), self.pool)
        self.addCleanup(self.pool.closeCachedConnections)
        self.base = b"http://127.0.0.1:%d" % self.port.getHost().port

    async def fetch(self, path: bytes) -> tuple[int, bytes, Failure]:
        from twisted.internet.defer import Deferred as D

        response = await self.agent.request(b"GET", self.base + path)
        done: D[None] = D()
        body = _Body()
        original = body.connectionLost

        def lost(reason: Failure = None) -> None:  # type: ignore[assignment]
            original(reason)
            done.callback(None)

        body.connectionLost = lost  # type: ignore[method-assign]
        response.deliverBody(body)
        await done
        assert body.reason is not None
        return response.code, b"".join(body.data), body.reason

    async def test_requests_share_a_connection(self) -> None:
        """
        Sequential requests to a real server reuse one connection; chunked,
        sized and close-delimited bodies arrive whole.
        """
        code, data, reason = await self.fetch(b"/stream")
        self.assertEqual((code, data), (200, b"hello world"))
        reason.trap(ResponseDone)
        code, data, reason = await self.fetch(b"/sized")
        self.assertEqual(data, b"ok")
        self.assertEqual(self.connections, 1)
        code, data, reason = await self.fetch(b"/close")
        self.assertEqual(data, b"until close")
        reason.trap(PotentialDataLoss)
        code, data, reason = await self.fetch(b"/sized")
        self.assertEqual(self.connections, 2)
        self.assertTrue(all(head.endswith(b"Host: 127.0.0.1:%d" % self.port.getHost().port) for head in self.served))

    async def test_early_answer_to_a_big_body_does_not_stall_the_next_request(self) -> None:
        """
        An upstream that answers a 5 MB body after its first read, keeps
        the connection alive and reads no more: the next request gets a
        fresh connection and its answer, instead of queueing behind the
        megabytes still buffered on the old one.
        """
        from twisted.internet.defer import Deferred as D

        from oaiproxy.upstream.client import _BytesProducer

        outer = self

        class Early(Protocol):
            def connectionMade(self) -> None:
                outer.connections += 1
                self.answered = False

            def dataReceived(self, data: bytes) -> None:
                if data.startswith(b"POST /big") and not self.answered:
                    self.answered = True
                    self.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n{}")
                    self.transport.pauseProducing()  # reads no more
                elif data.startswith(b"POST /next"):
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        port = self.reactor.listenTCP(0, Factory.forProtocol(Early), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = b"http://127.0.0.1:%d" % port.getHost().port
        response = await self.agent.request(b"POST", base + b"/big", None, _BytesProducer(b"x" * (5 << 20)))
        self.assertEqual(response.code, 413)
        done: D[None] = D()
        body = _Body()
        body.connectionLost = lambda reason=None: done.callback(None)  # type: ignore[assignment,method-assign]
        response.deliverBody(body)
        await done
        timeout = self.reactor.callLater(10, lambda: next_one.cancel())
        # (A POST: never retried on a fresh connection, so the old one's
        # state decides.)
        next_one = self.agent.request(b"POST", base + b"/next", None, _BytesProducer(b"{}"))
        second = await next_one
        timeout.cancel()
        self.assertEqual(second.code, 200)
        self.assertEqual(self.connections, 2)

    async def test_refused(self) -> None:
        """
        A refused connection fails with the endpoint's error, unwrapped.
        """
        from twisted.internet.error import ConnectionRefusedError

        port = self.port.getHost().port
        await self.port.stopListening()
        with self.assertRaises(ConnectionRefusedError):
            await self.agent.request(b"GET", b"http://127.0.0.1:%d/x" % port)
