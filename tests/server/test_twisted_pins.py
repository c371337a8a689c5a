"""
Pins for the private Twisted and treq names the proxy relies on (see
L{oaiproxy.server.twisted_internals}): each test fails with a message
naming what a Twisted or treq release changed, rather than the proxy
misbehaving somewhere downstream.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from oaiproxy.server import twisted_internals
from oaiproxy.server.site import ProxyChannel

CHANGED = "Twisted changed {what}; oaiproxy.server.twisted_internals relies on it: {why}"


class _Bound:
    """
    A body limit of C{room} bytes, recording when it is exceeded.
    """

    refused = False

    def __init__(self, room: int) -> None:
        self.body_allowance = room
        self.over: list[bytes] = []
        self.received: list[bytes] = []

    def body_over_limit(self) -> None:
        self.refused = True
        self.over.append(b"".join(self.received))


class _Channel(http.HTTPChannel):
    """
    A plain twisted.web channel that bounds a chunked body in
    C{allHeadersReceived}, as the proxy's does.
    """

    bound: _Bound
    chunked = False

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        self.chunked = twisted_internals.bound_chunked_body(self, self.bound)


class _Recorder(http.Request):
    def handleContentChunk(self, data: bytes) -> None:
        self.channel.bound.received.append(data)  # type: ignore[attr-defined]

    def process(self) -> None:
        pass


def _channel(room: int) -> _Channel:
    channel = _Channel()
    channel.requestFactory = _Recorder  # type: ignore[assignment]
    channel.bound = _Bound(room)
    channel.makeConnection(StringTransport())
    return channel


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


class ChunkedDecoderPins(SynchronousTestCase):
    def test_channel_keeps_its_chunked_decoder_where_we_swap_it(self) -> None:
        """
        C{HTTPChannel._transferDecoder} holds a C{_ChunkedTransferDecoder}
        once a chunked request's headers are in, and the one put there
        decodes the rest of the body.
        """
        self.assertTrue(
            hasattr(http, "_ChunkedTransferDecoder"),
            CHANGED.format(what="twisted.web.http._ChunkedTransferDecoder", why="the chunked body decoder"),
        )
        channel = _channel(room=100)
        channel.dataReceived(CHUNKED_HEAD)
        self.assertTrue(
            channel.chunked,
            CHANGED.format(
                what="HTTPChannel._transferDecoder",
                why="where the channel keeps its body decoder, swapped for a bounded one",
            ),
        )
        channel.dataReceived(b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(b"".join(channel.bound.received), b"hello")
        self.assertEqual(channel.bound.over, [])

    def test_chunk_size_state_is_seen_before_the_chunk(self) -> None:
        """
        C{_dataReceived_CHUNK_LENGTH} reads the size line from C{_buffer}
        and leaves the size in C{length}: a size over the limit is refused
        before a byte of its chunk is read, even before its line ends.
        """
        channel = _channel(room=100)
        channel.dataReceived(CHUNKED_HEAD)
        channel.dataReceived(b"65\r\n")  # 101 bytes: one over
        self.assertEqual(
            channel.bound.over,
            [b""],
            CHANGED.format(
                what="_ChunkedTransferDecoder._dataReceived_CHUNK_LENGTH or .length",
                why="the chunk size is checked against the body limit as it is declared",
            ),
        )
        early = _channel(room=100)
        early.dataReceived(CHUNKED_HEAD)
        early.dataReceived(b"0001000")  # 4 significant digits, no CRLF yet
        self.assertEqual(
            early.bound.over,
            [b""],
            CHANGED.format(
                what="_ChunkedTransferDecoder._buffer",
                why="an incomplete size line is read from it",
            ),
        )


class LineBufferPins(SynchronousTestCase):
    def test_incomplete_line_is_in_the_buffer(self) -> None:
        """
        C{LineReceiver._buffer} holds what is not yet a CRLF-terminated
        line: a head with bare LFs stays there.
        """
        channel = _channel(room=0)
        channel.dataReceived(b"GET / HTTP/1.1\nHost: x\n\n")
        self.assertEqual(
            twisted_internals.unparsed_head(channel),
            b"GET / HTTP/1.1\nHost: x\n\n",
            CHANGED.format(what="LineReceiver._buffer", why="a bare LF in an unparsed head is found there"),
        )


class BadRequestPins(SynchronousTestCase):
    def test_malformed_requests_go_through_the_overridden_method(self) -> None:
        """
        HTTPChannel answers a request line that is not three words, and too
        many headers, through C{_respondToBadRequestAndDisconnect}, which
        L{ProxyChannel} overrides to answer in JSON.
        """
        self.assertIn(
            "_respondToBadRequestAndDisconnect",
            vars(ProxyChannel),
            "ProxyChannel lost its override of _respondToBadRequestAndDisconnect",
        )
        for data in (
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (http.HTTPChannel.maxHeaders + 1) + b"\r\n",
        ):
            calls: list[bool] = []

            class Channel(http.HTTPChannel):
                def _respondToBadRequestAndDisconnect(self, calls: list[bool] = calls) -> None:
                    calls.append(True)
                    super()._respondToBadRequestAndDisconnect()

            channel = Channel()
            channel.makeConnection(StringTransport())
            channel.dataReceived(data)
            self.assertEqual(
                calls,
                [True],
                CHANGED.format(
                    what="HTTPChannel._respondToBadRequestAndDisconnect",
                    why="its only way to answer a malformed request; the proxy answers in JSON there",
                ),
            )


class _Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class _Pending(Resource):
    isLeaf = True

    def render(self, request: Any) -> int:
        return NOT_DONE_YET


class HoldChannelPins(SynchronousTestCase):
    def test_finish_while_held_keeps_the_channel_on_the_request(self) -> None:
        """
        While C{Request.queued} is set, C{finish()} skips C{_cleanup}: the
        channel keeps the request (and does not read a next one) and the
        finish notifications wait, until L{release_channel}.
        """
        channel = http.HTTPChannel()
        channel.requestFactory = Request  # type: ignore[assignment]
        channel.site = Site(_Pending())  # type: ignore[attr-defined]
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        (request,) = channel.requests
        finished: list[object] = []
        request.notifyFinish().addCallback(finished.append)
        twisted_internals.hold_channel(request)
        request.finish()
        why = "finish() must leave the channel on a request still receiving its body"
        self.assertEqual(channel.requests, [request], CHANGED.format(what="Request.queued", why=why))
        self.assertEqual(finished, [], CHANGED.format(what="Request.queued", why=why))
        twisted_internals.release_channel(request)
        why = "it is what finish() deferred: the channel moves on"
        self.assertEqual(channel.requests, [], CHANGED.format(what="Request._cleanup", why=why))
        self.assertEqual(finished, [None], CHANGED.format(what="Request._cleanup", why=why))


class _FDSet:
    """
    Just the reactor a C{tcp.Server} needs here: which descriptors want
    reading and writing.
    """

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(sock.recv(1 << 20))
        except BlockingIOError:
            return b"".join(chunks)


class WriteNowTests(SynchronousTestCase):
    """
    L{twisted_internals.write_now} sends a chunk of a streamed response to
    a plain TCP socket at once, framed as twisted.web would, and falls back
    to twisted.web's buffered write without reordering anything.
    """

    def setUp(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.peer = socket.create_connection(listener.getsockname())
        ours, address = listener.accept()
        listener.close()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        self.reactor = _FDSet()
        channel = http.HTTPChannel()
        channel.site = Site(_Pending())  # type: ignore[attr-defined]
        channel.requestFactory = Request  # type: ignore[assignment]
        self.transport = tcp.Server(ours, channel, address, None, 1, self.reactor)  # type: ignore[arg-type]
        channel.makeConnection(self.transport)
        self.addCleanup(channel.setTimeout, None)
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        (self.request,) = channel.requests
        self.request.setHeader(b"content-type", b"text/event-stream")
        self.request.write(b"")
        self.transport.doWrite()
        self.head = _read_all(self.peer)

    def test_sent_at_once(self) -> None:
        """
        The chunk is on the socket without a reactor turn, framed as
        C{Request.write} frames it, and counted in C{sentLength}; the
        connection was never registered for writing.
        """
        self.assertIn(b"transfer-encoding: chunked", self.head.lower())
        why = "a stream chunk must be written to the socket at once"
        self.assertTrue(twisted_internals.write_now(self.request, b"data: 1\n\n"), why)
        self.assertEqual(_read_all(self.peer), b"9\r\ndata: 1\n\n\r\n")
        self.assertEqual(self.reactor.writers, set())
        self.assertEqual(self.request.sentLength, 9)

    def test_order_kept_when_the_socket_is_full(self) -> None:
        """
        When the socket takes only part of a chunk, the rest is buffered
        (and the connection waits to be writable), the next chunks queue
        behind it, and the client receives every byte in order.
        """
        big = b"data: " + b"x" * (32 << 20) + b"\n\n"
        chunks = [big, b"data: after\n\n", b"data: last\n\n"]
        self.assertTrue(twisted_internals.write_now(self.request, big))
        self.assertEqual(self.reactor.writers, {self.transport}, "the socket took all of 32 MB at once")
        for chunk in chunks[1:]:
            # As ProxyRequest.write does: at once if it can, else buffered.
            self.assertFalse(twisted_internals.write_now(self.request, chunk), "something is waiting")
            self.request.write(chunk)
        received = [_read_all(self.peer)]
        while self.reactor.writers:
            self.transport.doWrite()
            received.append(_read_all(self.peer))
        expected = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        self.assertEqual(b"".join(received), expected)

    def test_not_for_other_transports(self) -> None:
        """
        Anything but an open plain TCP connection is left to
        C{Request.write}: a TLS one, a closing one, a request whose client
        has gone.
        """
        self.transport.TLS = True
        self.assertFalse(twisted_internals.write_now(self.request, b"data: 1\n\n"))
        self.transport.TLS = False
        self.transport.disconnecting = True
        self.assertFalse(twisted_internals.write_now(self.request, b"data: 1\n\n"))
        self.transport.disconnecting = False
        self.request.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(twisted_internals.write_now(self.request, b"data: 1\n\n"))
        self.assertEqual(_read_all(self.peer), b"")
