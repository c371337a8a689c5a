# -*- test-case-name: tests.upstream.test_gzipped -*-
"""
A gzipped upstream body, decoded a bounded piece at a time, under the body
protocol's backpressure.

Why: twisted.web's C{GzipDecoder} inflates each read from upstream whole,
in one call.  Zeros compress about a thousandfold, so one 64 KB read from a
hostile or broken upstream became some 64 MB in the proxy's memory before
anything could push back; and C{ContentDecoderAgent} stacks one decoder per
C{gzip} in C{Content-Encoding}, so C{gzip, gzip} multiplied the ratios, a
few kilobytes becoming gigabytes in a single read.  Here each call to zlib
yields at most L{STEP} bytes, each piece goes to the body protocol before
the next is inflated, and a protocol that pauses (its client is slow, or a
collector has read its limit) stops the inflating there: what is still
compressed waits, and upstream's socket is paused until the protocol
resumes.  Stacked layers compose (each is the producer of the next), so the
memory of a bomb is a few L{STEP}s per layer, whatever its ratio.

What it keeps of C{GzipDecoder}: the response's length becomes unknown, a
corrupt stream fails the body with L{ResponseFailed}, a stream cut short
ends with what could be inflated, and bytes after the gzip stream's end are
ignored.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

#: The most one call to zlib inflates, and so the largest piece the body
#: protocol is given.
STEP = 64 * 1024


class BoundedGzipDecoder(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    A C{ContentDecoderAgent} decoder for C{gzip}: the response, with its
    body inflated by L{_Inflating}.
    """

    def __init__(self, response: IResponse) -> None:
        self.original = response
        self.length = UNKNOWN_LENGTH

    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(_Inflating(protocol, self.original))


@implementer(IPushProducer)
class _Inflating(Protocol):
    """
    Between the response (whose producer is upstream's socket) and the body
    protocol, to which it is the producer: compressed bytes in, at most
    L{STEP} inflated bytes per piece out, none while the protocol is
    paused.
    """

    #: The response's producer: upstream's socket, paused, resumed and
    #: stopped for the protocol.
    transport: Any

    def __init__(self, protocol: Any, response: IResponse) -> None:
        self._protocol = protocol
        self._response = response
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        #: Compressed bytes not inflated yet.
        self._pending = b""
        #: The last inflation filled its piece: zlib may hold more output.
        self._full = False
        self._paused = False
        #: The protocol wants no more of the body.
        self._stopped = False
        #: The body's end, once it came and until it is passed on.
        self._ended: Optional[Failure] = None
        self._done = False

    def connectionMade(self) -> None:
        self._protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._pending += data
        self._inflate()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._ended = reason
        self._inflate()

    def _inflate(self) -> None:
        """
        Give the protocol what can be inflated, a piece at a time, until
        nothing is left or it pauses; then the end, if it came (a paused
        protocol is told of it once what is left has reached it).
        """
        while not (self._paused or self._stopped or self._done) and (self._pending or self._full):
            try:
                piece = self._zlib.decompress(self._pending, STEP)
            except zlib.error:
                self._fail()
                return
            self._pending = self._zlib.unconsumed_tail
            self._full = len(piece) == STEP
            if self._zlib.eof:
                # (What follows the gzip stream is ignored, as twisted.web does.)
                self._pending, self._full = b"", False
            if piece:
                self._protocol.dataReceived(piece)
        if self._done or self._ended is None or (self._pending or self._full) and not self._stopped:
            return
        self._done = True
        self._protocol.connectionLost(self._ended)

    def _fail(self) -> None:
        self._done = True
        failure = Failure()
        self.transport.stopProducing()
        self._protocol.connectionLost(Failure(ResponseFailed([failure], self._response)))

    # IPushProducer, for the body protocol.

    def pauseProducing(self) -> None:
        self._paused = True
        if self._ended is None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._inflate()
        if not (self._paused or self._stopped or self._done) and self._ended is None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The end still comes, as the connection's loss.
        self._stopped = True
        self._pending, self._full = b"", False
        if self._ended is None:
            self.transport.stopProducing()
