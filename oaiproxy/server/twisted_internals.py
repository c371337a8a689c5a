# -*- test-case-name: tests.server.test_twisted_pins -*-
"""
Every private twisted.web name the server relies on, in one place.

twisted.web's public API has no hook for what these do: bounding a chunked
body's chunk sizes before they are read, seeing the unparsed rest of a
request head, and keeping a connection on a request answered before its
body is in.  Each is used here only, with why, and pinned by
L{tests.server.test_twisted_pins}, which fails with a message naming the
name if a Twisted release changes it.  (The channel's override of
C{HTTPChannel._respondToBadRequestAndDisconnect}, twisted.web's one way
to answer a malformed request, lives on L{oaiproxy.server.site.ProxyChannel}
since it must be a method; it is pinned there too.)

Everything else the server does goes through public names:
C{HTTPChannel.lineReceived} and C{requests} for the request line,
C{Request.connectionLost} for a client gone, a plain transport write for
"100 Continue".
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol

from twisted.internet import tcp
from twisted.protocols.basic import LineReceiver

# _ChunkedTransferDecoder: the decoder twisted.web picks for
# "Transfer-Encoding: chunked".  No public name: HTTPChannel chooses its
# decoder itself, and lets no one see or bound a chunk's declared size
# before reading up to it.
from twisted.web.http import HTTPChannel, Request, _ChunkedTransferDecoder

__all__ = [
    "BodyBound",
    "bound_chunked_body",
    "unparsed_head",
    "hold_channel",
    "release_channel",
    "write_now",
    "send_now",
]

#: The significant digits of a chunk size.
_CHUNK_DIGITS = re.compile(rb"0*([0-9a-fA-F]*)")


class BodyBound(Protocol):
    """
    What a chunked body is bounded by: the request it belongs to.
    """

    @property
    def refused(self) -> bool: ...

    @property
    def body_allowance(self) -> int: ...

    def body_over_limit(self) -> None: ...


class _BoundedChunkedDecoder(_ChunkedTransferDecoder):
    """
    A chunked body decoder that refuses, as soon as it is declared, a chunk
    the body limit has no room for: a chunk size with more significant
    digits than the room left needs, even before its line is complete, or
    a chunk size larger than that room.  (twisted.web's own would read up
    to the limit first.)  The request answers 413 and discards the rest.

    Relies on C{_dataReceived_CHUNK_LENGTH} (the state that reads a size
    line from C{_buffer}, returning whether it is complete) and on
    C{length}, the size it read.
    """

    def __init__(
        self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None], bound: BodyBound
    ) -> None:
        super().__init__(dataCallback, finishCallback)
        self._bound = bound

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        bound = self._bound
        if bound.refused:
            # Being discarded: only the framing matters now.
            return bool(super()._dataReceived_CHUNK_LENGTH())
        room = bound.body_allowance
        digits = _CHUNK_DIGITS.match(self._buffer)
        if digits is not None and len(digits.group(1)) > len(b"%x" % (room,)):
            bound.body_over_limit()
            return bool(super()._dataReceived_CHUNK_LENGTH())
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        if self.length > room:
            bound.body_over_limit()
        return True


def bound_chunked_body(channel: HTTPChannel, bound: BodyBound) -> bool:
    """
    If the request whose headers C{channel} just read has a chunked body,
    decode it with chunk sizes bounded by C{bound}.  Call from
    C{allHeadersReceived}, before the body.

    C{HTTPChannel._transferDecoder} is where the channel keeps the decoder
    it chose; it has no public setter.

    @return: whether the body is chunked (and now bounded).
    """
    decoder: Any = getattr(channel, "_transferDecoder", None)
    if type(decoder) is not _ChunkedTransferDecoder:
        return False
    channel._transferDecoder = _BoundedChunkedDecoder(decoder.dataCallback, decoder.finishCallback, bound)
    return True


def unparsed_head(receiver: LineReceiver) -> bytes:
    """
    What a line receiver holds that is not yet a complete line.

    C{LineReceiver} splits lines on CRLF only and keeps the rest in
    C{_buffer}; its public C{clearLineBuffer} would empty it.  A head whose
    lines end in a bare LF would sit there until the header timeout, so
    the channel looks for one.
    """
    buffer: bytes = receiver._buffer
    return buffer


def hold_channel(request: Request) -> None:
    """
    Keep C{request}'s channel on it after C{finish()}: the channel must not
    parse the rest of a body still arriving as the next request.

    C{Request.finish} skips its cleanup (C{_cleanup}: the channel's
    C{requestDone}, the finish notifications) while C{queued} is true, a
    flag left from twisted.web's pipelining; there is no public way to
    defer the channel's next request.
    """
    request.queued = 1


def release_channel(request: Request) -> None:
    """
    The body of a request held by L{hold_channel} is all in: do the cleanup
    C{finish()} deferred, so the channel moves on to the next request.
    """
    request.queued = 0
    request._cleanup()


def write_now(request: Request, data: bytes) -> bool:
    """
    Send C{data}, a chunk of C{request}'s chunked response whose head is
    out, to the socket now, if the connection is plain TCP and has nothing
    waiting to be sent; return whether it did (if not, the caller writes it
    the usual way, C{Request.write}).

    Why: C{Request.write} only buffers; the chunk leaves at the reactor's
    next turn, when the socket is reported writable, after an epoll
    registration for writing and before one to undo it.  A stream chunk
    goes out alone anyway (each comes in its own read from upstream), so
    that is a reactor event, two C{epoll_ctl} calls and their Python per
    chunk for nothing: about a third of a relayed chunk's instructions
    (bench/README.md, issue 17).  What the socket does not take now is
    buffered by C{transport.write} as before, and every later chunk waits
    behind it, so the order and the backpressure (the transport pauses its
    producer past its buffer size) stay as they were.  A lost connection
    is left for the reactor to find, as a buffered write would be.

    Relies on: C{Request.channel} being C{None} once the client is gone
    (C{Request.connectionLost} sets it so, beside its private
    C{_disconnected}) and
    C{Request._encoder} (a content encoding, which the proxy never sets);
    on C{FileDescriptor.dataBuffer}, C{_tempDataLen} and
    C{_writeDisconnected} (what is waiting, and a closed write side) and
    C{tcp.Connection.TLS}; and on public C{Request.chunked},
    C{Request.sentLength} and C{FileDescriptor.writeSomeData}.  The
    framing is C{http.toChunk}'s.
    """
    if request.finished or request.channel is None or not request.chunked or getattr(request, "_encoder", None):
        return False
    framed = b"%x\r\n%b\r\n" % (len(data), data)
    if not send_now(request.channel.transport, framed):
        return False
    request.sentLength += len(data)
    return True


def send_now(transport: Any, data: bytes) -> bool:
    """
    Send C{data} on C{transport} now if it is a plain TCP connection with
    nothing waiting to be sent, buffering what the socket does not take;
    return whether it did (if not, nothing was written).  L{write_now}'s
    part below HTTP, and what C{bench/floor.py} sends with, so that the
    floor measures the proxy's own path.

    Relies on C{FileDescriptor.dataBuffer}, C{_tempDataLen} and
    C{_writeDisconnected} and C{tcp.Connection.TLS}, beside public
    C{writeSomeData} and C{write}.
    """
    if (
        type(transport) is not tcp.Server
        or transport.TLS
        or transport.dataBuffer
        or transport._tempDataLen
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
    ):
        return False
    sent = transport.writeSomeData(data)
    if type(sent) is not int:
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])
    return True
