# -*- test-case-name: tests.upstream.test_gzipped -*-
"""
A gzipped upstream body, decoded a bounded piece at a time, under the body
protocol's backpressure and in bounded turns of the reactor.

Why: twisted.web's C{GzipDecoder} inflates each read from upstream whole,
in one call.  Zeros compress about a thousandfold, so one 64 KB read from a
hostile or broken upstream became some 64 MB in the proxy's memory before
anything could push back; and C{ContentDecoderAgent} stacks one decoder per
C{gzip} in C{Content-Encoding}, so C{gzip, gzip} multiplied the ratios, a
few kilobytes becoming gigabytes in a single read.  Here:

 - each call to zlib yields at most L{STEP} bytes, and each piece goes to
   the body protocol before the next is inflated;
 - a protocol that pauses (its client is slow, or a collector has read its
   limit) stops the inflating there, and upstream's socket is paused while
   anything inflated or compressed waits, so what is held is a few
   L{STEP}s per layer whatever the ratio (stacked layers compose: each is
   the producer of the next);
 - one turn of the reactor inflates about L{TURN_BYTES} (a piece more at
   most), and stacked layers share that bound; the rest waits for the next
   turn: a client fast enough never to push back (a stream's chunks go to
   its socket at once) cannot have one response's gigabytes hold the
   reactor from every other connection;
 - a gzip stream that does not reach its end (cut short, or a hostile
   upstream's truncated bomb) fails the body with L{ResponseFailed}, as any
   body cut short does, instead of passing for complete; and bytes after
   its end that do not start another gzip member are ignored up to
   L{TRAILING_LIMIT}, past which the upstream is stopped and the body,
   complete, ends.  (twisted.web's decoder ends a truncated stream as
   complete, drops further members, and lets zlib keep every byte after
   the end.)

What it keeps of C{GzipDecoder}: the response's length becomes unknown, a
corrupt stream fails the body with L{ResponseFailed}, and a body with no
bytes at all is an empty body.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

#: The most one call to zlib inflates, and so the largest piece the body
#: protocol is given.
STEP = 64 * 1024

#: The most bytes inflated in one turn of the reactor, give or take a piece.
TURN_BYTES = 1024 * 1024

#: Bytes after the gzip stream's end ignored before the upstream is stopped.
TRAILING_LIMIT = 64 * 1024

_GZIP_MAGIC = b"\x1f\x8b"

__all__ = ["STEP", "TURN_BYTES", "TRAILING_LIMIT", "BoundedGzipDecoder", "GzipTruncated"]


class GzipTruncated(Exception):
    """
    The body ended before its gzip stream did.
    """


class BoundedGzipDecoder(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    A C{ContentDecoderAgent} decoder for C{gzip}: the response, with its
    body inflated by L{_Inflating}.  (C{ContentDecoderAgent} calls a
    decoder with the response alone: bind the clock first, as
    C{functools.partial(BoundedGzipDecoder, clock=reactor)}.)

    @param clock: where the next turn's inflating is scheduled.
    """

    def __init__(self, response: IResponse, clock: IReactorTime) -> None:
        self.original = response
        self.length = UNKNOWN_LENGTH
        self._clock = clock

    def deliverBody(self, protocol: IProtocol) -> None:
        self.original.deliverBody(_Inflating(protocol, self.original, self._clock))


@implementer(IPushProducer)
class _Inflating(Protocol):
    """
    Between the response (whose producer is upstream's socket) and the body
    protocol, to which it is the producer: compressed bytes in, at most
    L{STEP} inflated bytes per piece out, none while the protocol is
    paused, about L{TURN_BYTES} until the next turn of the reactor.
    Upstream's socket reads only while nothing waits here.
    """

    #: The response's producer: upstream's socket, paused, resumed and
    #: stopped for the protocol.
    transport: Any

    def __init__(self, protocol: IProtocol, response: IResponse, clock: IReactorTime) -> None:
        self._protocol = protocol
        self._response = response
        self._clock = clock
        self._zlib = _member()
        #: Compressed bytes not inflated yet.
        self._pending = b""
        #: The last inflation filled its piece: zlib may hold more output.
        self._full = False
        #: Some compressed byte came (a body with none is an empty body).
        self._begun = False
        #: After a member's end: the first byte of what follows, until the
        #: second tells whether another member begins.
        self._after = b""
        #: Bytes after the gzip stream's end, dropped so far.
        self._trailing = 0
        #: What this turn of the reactor may still inflate.
        self._budget = TURN_BYTES
        #: The next turn, once this one's pieces are spent.
        self._later: Optional[IDelayedCall] = None
        #: Inside L{_inflate} (a protocol may pause and resume from its
        #: dataReceived: the loop already running goes on).
        self._inflating = False
        #: Upstream's socket is paused by this layer.
        self._holding = False
        self._paused = False
        #: The protocol wants no more of the body.
        self._stopped = False
        #: The body's end, once it came.
        self._ended: Optional[Failure] = None
        #: The protocol was told of the end.
        self._done = False

    def connectionMade(self) -> None:
        # (A body protocol's transport is its producer, as in twisted.web.)
        self._protocol.makeConnection(self)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        if not data or self._stopped or self._done:
            return
        self._begun = True
        if self._zlib.eof:
            self._after_end(data)
        else:
            self._pending += data
        self._inflate()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = reason
        self._inflate()

    def _waiting(self) -> bool:
        return bool(self._pending) or self._full

    def _inflate(self) -> None:
        """
        Give the protocol what can be inflated, a piece at a time, until
        nothing is left, it pauses or stops, or this turn's bytes are
        spent; then the end, if it came (a paused protocol is told of it
        once what is left has reached it).
        """
        if self._inflating:
            return
        self._inflating = True
        try:
            while not (self._paused or self._stopped or self._done) and self._waiting():
                if self._budget <= 0:
                    break
                try:
                    piece = self._zlib.decompress(self._pending, STEP)
                except zlib.error:
                    self._fail(Failure())
                    return
                self._pending = self._zlib.unconsumed_tail
                self._full = len(piece) == STEP
                self._budget -= len(piece)
                if piece:
                    self._protocol.dataReceived(piece)
                if self._zlib.eof and not self._full:
                    rest, self._pending = self._zlib.unused_data, b""
                    self._after_end(rest)
        finally:
            self._inflating = False
        if self._budget <= 0 and self._later is None and not self._done:
            self._later = self._clock.callLater(0, self._next_turn)
        self._flow()
        if self._done or self._ended is None or (self._waiting() and not self._stopped):
            return
        self._finish(self._ended)

    def _after_end(self, data: bytes) -> None:
        """
        Bytes after a gzip member's end: another member (RFC 1952 allows a
        series), or what is dropped, up to L{TRAILING_LIMIT}.
        """
        if not data or self._stopped or self._done:
            return
        if self._trailing:
            self._drop(data)
            return
        head, self._after = self._after + data, b""
        if len(head) < len(_GZIP_MAGIC):
            self._after = head
        elif head.startswith(_GZIP_MAGIC):
            self._zlib = _member()
            self._pending = head
        else:
            self._drop(head)

    def _drop(self, data: bytes) -> None:
        self._trailing += len(data)
        if self._trailing > TRAILING_LIMIT:
            if self._ended is None:
                self.transport.stopProducing()
            self._finish(Failure(ResponseDone("gzip stream complete; what followed was dropped")))

    def _next_turn(self) -> None:
        self._later = None
        self._budget = TURN_BYTES
        self._inflate()

    def _cancel_turn(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None

    def _flow(self) -> None:
        """
        Upstream's socket reads only while nothing waits here and the
        protocol is not paused.
        """
        if self._ended is not None or self._stopped or self._done:
            return
        hold = self._paused or self._waiting()
        if hold != self._holding:
            self._holding = hold
            if hold:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _finish(self, reason: Failure) -> None:
        self._done = True
        self._pending, self._full = b"", False
        self._cancel_turn()
        if reason.check(ResponseDone, PotentialDataLoss) and self._begun and not self._zlib.eof and not self._stopped:
            # (PotentialDataLoss: a body delimited by the connection's close.)
            reason = Failure(ResponseFailed([reason, Failure(GzipTruncated())], self._response))
        self._protocol.connectionLost(reason)

    def _fail(self, failure: Failure) -> None:
        if self._ended is None:
            self.transport.stopProducing()
        self._finish(Failure(ResponseFailed([failure], self._response)))

    # IPushProducer, for the body protocol.

    def pauseProducing(self) -> None:
        self._paused = True
        self._flow()

    def resumeProducing(self) -> None:
        self._paused = False
        self._inflate()

    def stopProducing(self) -> None:
        # The end still comes: now if the connection's loss came already,
        # else with it.
        if self._stopped or self._done:
            return
        self._stopped = True
        self._pending, self._full = b"", False
        self._cancel_turn()
        if self._ended is None:
            self.transport.stopProducing()
        else:
            self._inflate()


def _member() -> Any:
    """
    A decompressor for one gzip member.
    """
    return zlib.decompressobj(16 + zlib.MAX_WBITS)
