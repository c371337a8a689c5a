"""
Tests for L{oaiproxy.upstream.gzipped}: a gzipped upstream body inflated a
bounded piece at a time, under the body protocol's backpressure.
"""

from __future__ import annotations

import functools
import gzip
import random
import zlib
from typing import Any, Optional

from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ContentDecoderAgent, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from oaiproxy.upstream.gzipped import STEP, TRAILING_LIMIT, TURN_BYTES, BoundedGzipDecoder, GzipTruncated


class _Upstream:
    """
    The producer a response gives its body protocol: upstream's socket.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
class _Response:
    version = (b"HTTP", 1, 1)
    code = 200
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, encoding: bytes) -> None:
        self.headers = Headers({b"content-encoding": [encoding], b"content-type": [b"application/json"]})
        self.length = 1234
        self.upstream = _Upstream()
        self.protocol: Optional[Protocol] = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.upstream)

    def setPreviousResponse(self, response: Any) -> None:
        pass


class _Turns:
    """
    A clock of reactor turns: C{callLater(0, ...)} runs at the next
    L{turn}, and what a call schedules runs at the turn after (as the
    reactor runs what was due when its turn began, then reads and writes
    sockets).
    """

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        turns = self

        class Call:
            def cancel(self) -> None:
                turns.calls.remove(self)

            def __call__(self) -> None:
                f(*args)

        call = Call()
        self.calls.append(call)
        return call

    def turn(self) -> None:
        due, self.calls = self.calls, []
        for call in due:
            call()


class _Agent:
    def __init__(self, response: _Response) -> None:
        self.response = response

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return succeed(self.response)


class _Body(Protocol):
    """
    A body protocol that keeps what it is given, and pauses its producer
    once it holds more than C{pause_after} bytes since the last resume.
    """

    def __init__(self, pause_after: Optional[int] = None) -> None:
        self.pieces: list[int] = []
        self.data: list[bytes] = []
        self.ended: Optional[Failure] = None
        self.ends = 0
        self._pause_after = pause_after
        self._since = 0

    def dataReceived(self, data: bytes) -> None:
        assert self.ended is None, "data after the end"
        self.pieces.append(len(data))
        self.data.append(data)
        self._since += len(data)
        if self._pause_after is not None and self._since > self._pause_after:
            self.transport.pauseProducing()

    def resume(self) -> None:
        self._since = 0
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended = reason
        self.ends += 1

    @property
    def received(self) -> int:
        return sum(self.pieces)


def _decoded(encoding: bytes, clock: Optional["_Turns"] = None) -> tuple[_Response, IResponse]:
    """
    A response with C{Content-Encoding: encoding}, through the proxy's
    C{ContentDecoderAgent} with L{BoundedGzipDecoder}.
    """
    raw = _Response(encoding)
    decoder = functools.partial(BoundedGzipDecoder, clock=clock if clock is not None else _Turns())
    agent = ContentDecoderAgent(_Agent(raw), [(b"gzip", decoder)])
    d = agent.request(b"GET", b"http://upstream.test/v1/models")
    response: list[IResponse] = []
    d.addCallback(response.append)
    return raw, response[0]


class BoundedGzipDecoderTests(SynchronousTestCase):
    def resume_to_the_end(self, clock: _Turns, body: _Body, limit: int) -> None:
        """
        Resume C{body}'s producer, a turn of the reactor after each, until
        C{body} has its end (at most C{limit} times): a client reading as
        fast as it can.
        """
        for _ in range(limit):
            if body.ended is not None:
                return
            body.resume()
            clock.turn()

    def turn_to_the_end(self, clock: _Turns, body: _Body, limit: int) -> int:
        """
        Run reactor turns until C{body} has its end (at most C{limit}),
        checking that no turn gives it more than L{TURN_BYTES} and a piece;
        return how many it took.  The end must be a complete body's.
        """
        turns = 0
        while body.ended is None and turns < limit:
            before = body.received
            clock.turn()
            self.assertLessEqual(body.received - before, TURN_BYTES + STEP)
            turns += 1
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseDone))
        return turns

    def test_bomb_inflated_a_piece_at_a_time(self) -> None:
        """
        One read of a gzip bomb (16 MiB of zeros in about 16 KB) is not
        inflated whole: each piece is at most L{STEP}, and once the body
        protocol pauses (well before a turn's pieces are spent), inflating
        stops and upstream's socket is paused, with at most one piece
        beyond the protocol's threshold given.  Each resume goes on from
        where it stopped, until all of it and then the end have reached the
        protocol.
        """
        size = 16 * 1024 * 1024
        bomb = gzip.compress(b"\0" * size)
        self.assertLess(len(bomb), 20_000)
        clock = _Turns()
        raw, response = _decoded(b"gzip", clock)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        threshold = 300 * 1024
        self.assertLess(threshold + STEP, TURN_BYTES)
        body = _Body(pause_after=threshold)
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(bomb)
        self.assertLessEqual(max(body.pieces), STEP)
        self.assertLessEqual(body.received, threshold + STEP)
        self.assertTrue(raw.upstream.paused)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(body.ended, "the end went ahead of the body")
        self.resume_to_the_end(clock, body, 2 * size // threshold + 2)
        self.assertEqual(body.received, size)
        self.assertEqual(set(b"".join(body.data)), {0})
        self.assertLessEqual(max(body.pieces), STEP)
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseDone))
        self.assertEqual(body.ends, 1)

    def test_stacked_encodings_stay_bounded(self) -> None:
        """
        C{Content-Encoding: gzip, gzip} stacks two decoders (the ratios
        multiply: a few KB become 64 MiB): every piece is still at most
        L{STEP}, a pause still stops both layers, and the whole body comes
        out right.
        """
        size = 64 * 1024 * 1024
        bomb = gzip.compress(gzip.compress(b"\0" * size))
        self.assertLess(len(bomb), 10_000)
        clock = _Turns()
        raw, response = _decoded(b"gzip, gzip", clock)
        threshold = 300 * 1024
        body = _Body(pause_after=threshold)
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(bomb)
        self.assertLessEqual(body.received, threshold + STEP)
        self.assertTrue(raw.upstream.paused)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.resume_to_the_end(clock, body, 2 * size // threshold + 2)
        self.assertEqual(body.received, size)
        self.assertLessEqual(max(body.pieces), STEP)
        self.assertEqual(body.ends, 1)

    def test_any_split_decodes_the_same(self) -> None:
        """
        Incompressible bytes in reads of any size come out as they went
        in; bytes after the gzip stream's end are ignored, as twisted.web
        ignores them.
        """
        rng = random.Random(17)
        original = rng.randbytes(300_000)
        compressed = gzip.compress(original) + b"trailing garbage"
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        at = 0
        while at < len(compressed):
            step = rng.randint(1, 9000)
            raw.protocol.dataReceived(compressed[at : at + step])
            at += step
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(b"".join(body.data), original)
        self.assertEqual(body.ends, 1)
        self.assertFalse(raw.upstream.paused)

    def test_corrupt_stream_fails_the_body(self) -> None:
        """
        Bytes that are not gzip end the body with L{ResponseFailed} and
        stop upstream's socket; the connection's loss that follows is not
        a second end.
        """
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(b"this is not gzip at all")
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseFailed))
        self.assertTrue(raw.upstream.stopped)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(body.ends, 1)
        self.assertEqual(body.pieces, [])

    def test_stopped_body_gets_nothing_more_and_its_end(self) -> None:
        """
        A protocol that stops its producer (a collector past its limit)
        stops upstream's socket and is given nothing more, but is still
        told of the end once the connection goes.
        """
        raw, response = _decoded(b"gzip")
        body = _Body(pause_after=STEP)
        response.deliverBody(body)
        assert raw.protocol is not None
        compressed = gzip.compress(random.Random(5).randbytes(8 * STEP))
        raw.protocol.dataReceived(compressed[: len(compressed) // 2])
        given = body.received
        self.assertTrue(raw.upstream.paused)
        body.transport.stopProducing()
        self.assertTrue(raw.upstream.stopped)
        body.resume()
        # (A read already on its way when upstream's socket stopped.)
        raw.protocol.dataReceived(compressed[len(compressed) // 2 :])
        self.assertEqual(body.received, given)
        self.assertTrue(raw.upstream.paused, "a stopped body's upstream was resumed")
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(body.ends, 1)

    def test_truncated_stream_fails_the_body(self) -> None:
        """
        A gzip stream cut short (a close-delimited or a framed body that
        ends before the gzip stream does) gives what could be inflated,
        then fails the body with L{ResponseFailed}: a client is never sent
        part of a body as if it were all of it.
        """
        original = random.Random(3).randbytes(100_000)
        compressed = gzip.compress(original)
        for end in (ResponseDone, PotentialDataLoss):
            raw, response = _decoded(b"gzip")
            body = _Body()
            response.deliverBody(body)
            assert raw.protocol is not None
            raw.protocol.dataReceived(compressed[: len(compressed) // 2])
            raw.protocol.connectionLost(Failure(end()))
            decoded = b"".join(body.data)
            self.assertGreater(len(decoded), 0)
            self.assertEqual(decoded, original[: len(decoded)])
            assert body.ended is not None
            self.assertTrue(body.ended.check(ResponseFailed), end)
            self.assertTrue(any(r.check(GzipTruncated) for r in body.ended.value.reasons))
            self.assertEqual(body.ends, 1)

    def test_empty_body_is_empty(self) -> None:
        """
        A body of no bytes at all labelled gzip is an empty body, as
        twisted.web's decoder takes it.
        """
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.connectionLost(Failure(ResponseDone()))
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseDone))
        self.assertEqual(body.pieces, [])

    def test_fast_client_gets_bounded_turns(self) -> None:
        """
        A protocol that never pauses (a stream's client whose socket takes
        every chunk) gets at most L{TURN_BYTES} (and a piece) per turn of the
        reactor: the rest waits for the next turn, with upstream's socket
        paused meanwhile, so one bomb cannot hold the reactor from every
        other connection.
        """
        size = 8 * 1024 * 1024
        clock = _Turns()
        raw, response = _decoded(b"gzip", clock)
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(b"\0" * size))
        self.assertEqual(body.received, TURN_BYTES)
        self.assertTrue(raw.upstream.paused)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        turns = self.turn_to_the_end(clock, body, 100)
        self.assertEqual(body.received, size)
        self.assertGreaterEqual(turns, size // TURN_BYTES - 1)

    def test_upstream_read_again_once_all_is_given(self) -> None:
        """
        Upstream's socket, paused while inflated bytes wait, reads again
        once the protocol has had them all.
        """
        clock = _Turns()
        raw, response = _decoded(b"gzip", clock)
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        compressed = gzip.compress(b"\0" * (4 * TURN_BYTES))
        raw.protocol.dataReceived(compressed)
        self.assertTrue(raw.upstream.paused)
        for _ in range(4):
            self.assertTrue(raw.upstream.paused)
            clock.turn()
        self.assertEqual(body.received, 4 * TURN_BYTES)
        self.assertFalse(raw.upstream.paused)
        self.assertEqual(clock.calls, [])

    def test_endless_bytes_after_the_end(self) -> None:
        """
        Bytes after the gzip stream's end (which zlib would keep, every
        one) are dropped; past L{TRAILING_LIMIT} upstream is stopped and
        the body, complete, ends.
        """
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(b'{"id": "x"}') + b"junk")
        self.assertEqual(b"".join(body.data), b'{"id": "x"}')
        self.assertIsNone(body.ended)
        sent = 0
        while not raw.upstream.stopped and sent < 10 * TRAILING_LIMIT:
            raw.protocol.dataReceived(b"j" * 4096)
            sent += 4096
        self.assertTrue(raw.upstream.stopped)
        self.assertLessEqual(sent, TRAILING_LIMIT + 4096)
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseDone))
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(body.ends, 1)

    def test_members_in_series(self) -> None:
        """
        A gzip body of several members (RFC 1952 allows a series) is
        decoded whole, wherever the reads split it.
        """
        first = gzip.compress(b'{"a": ')
        compressed = first + gzip.compress(b'"b"}')
        # (len(first) + 1: a read that ends inside the next member's magic.)
        for split in (1, 10, len(first), len(first) + 1, len(compressed) // 2, len(compressed)):
            raw, response = _decoded(b"gzip")
            body = _Body()
            response.deliverBody(body)
            assert raw.protocol is not None
            raw.protocol.dataReceived(compressed[:split])
            raw.protocol.dataReceived(compressed[split:])
            raw.protocol.connectionLost(Failure(ResponseDone()))
            self.assertEqual(b"".join(body.data), b'{"a": "b"}', split)
            assert body.ended is not None
            self.assertTrue(body.ended.check(ResponseDone), split)

    def test_stop_after_the_end_still_ends(self) -> None:
        """
        A paused protocol that stops its producer after the connection was
        lost, with inflated bytes still waiting, is told of the end.
        """
        raw, response = _decoded(b"gzip")
        body = _Body(pause_after=STEP)
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(random.Random(9).randbytes(4 * STEP)))
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(body.ended)
        body.transport.stopProducing()
        self.assertEqual(body.ends, 1)

    def test_pause_and_resume_from_inside_data_received(self) -> None:
        """
        A protocol that pauses and resumes its producer from inside
        C{dataReceived} gets the rest from the loop already running, not
        a call deeper each time.
        """

        class Bouncing(_Body):
            depth = deepest = 0

            def dataReceived(self, data: bytes) -> None:
                self.depth += 1
                self.deepest = max(self.deepest, self.depth)
                super().dataReceived(data)
                self.transport.pauseProducing()
                self.transport.resumeProducing()
                self.depth -= 1

        clock = _Turns()
        raw, response = _decoded(b"gzip", clock)
        body = Bouncing()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(b"\0" * (64 * STEP)))
        raw.protocol.connectionLost(Failure(ResponseDone()))
        for _ in range(64 * STEP // TURN_BYTES + 1):
            clock.turn()
        self.assertEqual(body.received, 64 * STEP)
        self.assertEqual(body.ends, 1)
        self.assertEqual(body.deepest, 1)

    def test_only_gzip_is_inflated(self) -> None:
        """
        zlib's other formats are not gzip: a deflate body labelled gzip
        fails as corrupt.
        """
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(zlib.compress(b"{}"))
        assert body.ended is not None
        self.assertTrue(body.ended.check(ResponseFailed))

    def test_pause_while_idle_holds_upstream(self) -> None:
        """
        A protocol that pauses while nothing waits here (its client's
        buffer filled) pauses upstream's socket, and its resume lets it
        read again.
        """
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(b"hello")[:10])
        self.assertFalse(raw.upstream.paused)
        body.transport.pauseProducing()
        self.assertTrue(raw.upstream.paused)
        body.resume()
        self.assertFalse(raw.upstream.paused)

    def test_stacked_encodings_bounded_per_turn(self) -> None:
        """
        Stacked decoders share the bound of a turn: the outer layer's
        pieces do not each give the inner one a new turn's worth, so a fast
        protocol gets at most L{TURN_BYTES} (and a piece) per turn of the
        reactor from C{gzip, gzip} too.
        """
        size = 32 * 1024 * 1024
        clock = _Turns()
        raw, response = _decoded(b"gzip, gzip", clock)
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(gzip.compress(gzip.compress(random.Random(1).randbytes(4096) * (size // 4096))))
        self.assertLessEqual(body.received, TURN_BYTES + STEP)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.turn_to_the_end(clock, body, 1000)
        self.assertEqual(body.received, size)
