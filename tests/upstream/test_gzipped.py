"""
Tests for L{oaiproxy.upstream.gzipped}: a gzipped upstream body inflated a
bounded piece at a time, under the body protocol's backpressure.
"""

from __future__ import annotations

import gzip
import random
from typing import Any, Optional

from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ContentDecoderAgent, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from oaiproxy.upstream.gzipped import STEP, BoundedGzipDecoder


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


def _decoded(encoding: bytes) -> tuple[_Response, IResponse]:
    """
    A response with C{Content-Encoding: encoding}, through the proxy's
    C{ContentDecoderAgent} with L{BoundedGzipDecoder}.
    """
    raw = _Response(encoding)
    agent = ContentDecoderAgent(_Agent(raw), [(b"gzip", BoundedGzipDecoder)])
    d = agent.request(b"GET", b"http://upstream.test/v1/models")
    response: list[IResponse] = []
    d.addCallback(response.append)
    return raw, response[0]


class BoundedGzipDecoderTests(SynchronousTestCase):
    def test_bomb_inflated_a_piece_at_a_time(self) -> None:
        """
        One read of a gzip bomb (16 MiB of zeros in about 16 KB) is not
        inflated whole: each piece is at most L{STEP}, and once the body
        protocol pauses, inflating stops and upstream's socket is paused,
        with at most one piece beyond the protocol's threshold given.  Each
        resume goes on from where it stopped, until all of it and then the
        end have reached the protocol.
        """
        size = 16 * 1024 * 1024
        bomb = gzip.compress(b"\0" * size)
        self.assertLess(len(bomb), 20_000)
        raw, response = _decoded(b"gzip")
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        body = _Body(pause_after=1024 * 1024)
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(bomb)
        self.assertLessEqual(max(body.pieces), STEP)
        self.assertLessEqual(body.received, 1024 * 1024 + STEP)
        self.assertTrue(raw.upstream.paused)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(body.ended, "the end went ahead of the body")
        for _ in range(size // (1024 * 1024) + 2):
            if body.ended is not None:
                break
            body.resume()
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
        raw, response = _decoded(b"gzip, gzip")
        body = _Body(pause_after=512 * 1024)
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(bomb)
        self.assertLessEqual(body.received, 512 * 1024 + STEP)
        self.assertTrue(raw.upstream.paused)
        raw.protocol.connectionLost(Failure(ResponseDone()))
        for _ in range(size // (512 * 1024) + 2):
            if body.ended is not None:
                break
            body.resume()
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

    def test_truncated_stream_ends_with_what_it_had(self) -> None:
        """
        A gzip stream cut short gives what could be inflated, then the
        connection's reason, as twisted.web's decoder does.
        """
        original = random.Random(3).randbytes(100_000)
        compressed = gzip.compress(original)
        raw, response = _decoded(b"gzip")
        body = _Body()
        response.deliverBody(body)
        assert raw.protocol is not None
        raw.protocol.dataReceived(compressed[: len(compressed) // 2])
        raw.protocol.connectionLost(Failure(ResponseDone()))
        decoded = b"".join(body.data)
        self.assertGreater(len(decoded), 0)
        self.assertEqual(decoded, original[: len(decoded)])
        self.assertEqual(body.ends, 1)
