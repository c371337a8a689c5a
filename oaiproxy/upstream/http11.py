# -*- test-case-name: tests.upstream.test_http11 -*-
"""
A lean HTTP/1.1 client agent for the upstream connections: requests written
here, responses framed by llhttp (C{httptools.HttpResponseParser}).

Why: a proxy of streams spends most of its time relaying chunks, and
twisted.web's C{_newclient} hands each one through a line receiver, a
chunked-transfer decoder's state loop and two state-dispatched methods
before the body protocol sees it (about a quarter of the proxy's CPU per
relayed chunk, and a fifth of a plain request's in request writing, head
parsing and the pool's wrappers).  Here a chunk goes from the socket to
C{feed_data} (C) to C{on_body}, which calls the body protocol's
C{dataReceived}: no Deferred, no state dispatch, no copy.

What it mirrors of C{Agent} over C{HTTPConnectionPool(persistent=True)}
(and the proxy relies on): the same request bytes; L{IResponse} with the
same fields (C{headers} without the connection-control headers, as
twisted.web gives them); the same errors (L{ResponseNeverReceived},
L{RequestTransmissionFailed}, L{ResponseFailed}, L{RequestGenerationFailed})
in the same situations; a body that ends with L{ResponseDone}, or
L{PotentialDataLoss} when it is delimited by the connection's close;
persistent connections, at most C{maxPersistentPerHost} idle ones per
host, closed after C{cachedConnectionTimeout}; one retry on a fresh
connection for an idempotent request without a body that failed on a
reused one before any answer.  Where it differs, on purpose:

 - A response head is delivered as soon as it is parsed, even while the
   request body is still being written (C{_newclient} waits for the end of
   the body or of the response).
 - llhttp's strictness: duplicate C{Content-Length} (even equal ones),
   C{Content-Length} with C{Transfer-Encoding}, header lines folded or ended
   by a bare LF, and a transfer coding other than C{chunked} are refused
   (the request fails with L{ResponseFailed}).
 - The response head (status line and headers, interim 1xx ones included)
   is bounded: L{MAX_HEAD_BYTES}.  C{_newclient} bounds each line (16 KiB)
   but not their number.
 - An HTTP/1.0 response without C{Connection: keep-alive} does not return
   its connection to the pool (llhttp's keep-alive rule).
 - Stopping a body's delivery (C{stopProducing}) aborts the connection.
 - A request body is over once it has left the transport's buffer, not
   when it was handed to it: an answer that ends before (an upstream that
   answered a large body early and stopped reading) closes the connection
   at once, dropping what is buffered, instead of pooling it with
   megabytes still queued before the next request.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Hashable, Optional

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

__all__ = [
    "HTTP11Agent",
    "ConnectionPool",
    "MAX_HEAD_BYTES",
    "MalformedResponse",
    "ResponseCutShort",
    "WrongBodyLength",
    "host_value",
]

#: The most bytes a response head may take, interim (1xx) heads included,
#: before the request fails: four of twisted.web's 16 KiB header lines
#: (nginx's buffer for an upstream head is 4 or 8 KiB).  Checked after each
#: read, so at most one read more is ever held.
MAX_HEAD_BYTES = 64 * 1024

#: Idempotent methods, retried once on a fresh connection (as
#: C{HTTPConnectionPool}'s C{_shouldRetry}).
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})

#: Headers about the connection rather than the message: twisted.web keeps
#: them out of C{IResponse.headers}, and so does this agent.
_CONNECTION_CONTROL = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)

# RFC 9110 token characters for the method; a URI of visible ASCII (as
# twisted.web's request validation).
_VALID_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALID_URI = re.compile(rb"\A[\x21-\x7e]+\Z")

_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}


class MalformedResponse(Exception):
    """
    The upstream's response is not HTTP/1.1 this agent accepts (llhttp's
    reason, or one of the checks named in the module docstring).
    """


class ResponseCutShort(Exception):
    """
    The connection ended before the end of a body with a declared length or
    chunked framing (twisted.web's C{_DataLoss}).
    """


class WrongBodyLength(Exception):
    """
    A request body producer wrote more or fewer bytes than its C{length}.
    """


class _Stop(Exception):
    """
    Raised from a parser callback to stop llhttp once the response is
    complete: what follows is not this response's.
    """


def _token_error(method: bytes) -> ValueError:
    return ValueError(f"Invalid method {method!r}")


@implementer(IClientRequest)
class _RequestInfo:
    """
    What C{IResponse.request} tells about the request.
    """

    def __init__(self, method: bytes, uri: URI, headers: Headers) -> None:
        self.method = method
        self._uri = uri
        self.headers = headers

    @property
    def absoluteURI(self) -> bytes:
        return bytes(self._uri.toBytes())


@implementer(IResponse, IPushProducer)
class _Response:
    """
    An upstream response, and the producer its body protocol is connected
    to: pausing it pauses the upstream socket, stopping it aborts the
    connection; once the body is over it no longer reaches the connection
    (which may carry another request by then).
    """

    previousResponse = None
    disconnecting = False

    def __init__(
        self, version: tuple[bytes, int, int], code: int, phrase: bytes, headers: Headers, request: _RequestInfo
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length: Any = UNKNOWN_LENGTH
        self.request = request
        self._transport: Any = None
        self._protocol: Optional[Protocol] = None
        self._buffer: Optional[list[bytes]] = []
        self._reason: Optional[Failure] = None
        #: Where body bytes go: the buffer until deliverBody, then the
        #: protocol's dataReceived.
        self.sink: Callable[[bytes], None] = self._buffer.append
        self._paused_for_delivery = False
        #: The body protocol asked for a pause (its client is slow).
        self._protocol_paused = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Protocol) -> None:
        buffered, self._buffer = self._buffer, None
        if buffered is None:
            raise RuntimeError("Response body already delivered")
        protocol.makeConnection(self)
        for data in buffered:
            protocol.dataReceived(data)
        if self._reason is not None:
            reason, self._reason = self._reason, None
            protocol.connectionLost(reason)
            return
        self._protocol = protocol
        self.sink = protocol.dataReceived
        if self._paused_for_delivery:
            self._paused_for_delivery = False
            if self._transport is not None and not self._protocol_paused:
                # (A protocol that paused while it was given what was
                # buffered, its own client being slow, stays paused.)
                self._transport.resumeProducing()

    def _finish(self, reason: Failure) -> None:
        """
        The body is over (or cut short): tell the protocol, or keep the
        reason for the protocol still to come.
        """
        self._transport = None
        protocol, self._protocol = self._protocol, None
        self.sink = _dropped
        if protocol is None:
            self._reason = reason
        else:
            protocol.connectionLost(reason)

    # IPushProducer, as the body protocol's transport.

    def pauseProducing(self) -> None:
        self._protocol_paused = True
        if self._transport is not None:
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._protocol_paused = False
        if self._transport is not None and not self._paused_for_delivery:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._transport is not None:
            self._transport.abortConnection()

    def loseConnection(self) -> None:
        if self._transport is not None:
            self._transport.loseConnection()


def _dropped(data: bytes) -> None:
    """
    Body bytes after the body's end: nobody's.
    """


def _done() -> Failure:
    return Failure(ResponseDone("Response body fully received"))


@implementer(IConsumer)
class _LengthConsumer:
    """
    The consumer a body of known length writes to: passes at most that
    many bytes to the transport (C{_newclient}'s C{LengthEnforcingConsumer}).
    """

    def __init__(self, exchange: "_Exchange", transport: Any, length: int) -> None:
        self._exchange = exchange
        self._transport = transport
        self.remaining = length

    def write(self, data: bytes) -> None:
        if len(data) <= self.remaining:
            self.remaining -= len(data)
            self._transport.write(data)
        else:
            # Nothing more passes, whatever the producer still writes.
            self.remaining = -1
            self._exchange.body_failed(Failure(WrongBodyLength("too many bytes written")))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


@implementer(IConsumer)
class _ChunkedConsumer:
    """
    The consumer a body of unknown length writes to: each write one chunk.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        if data:
            # (An empty chunk would end the body.)
            self._transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


@implementer(IPushProducer)
class _Sending:
    """
    The producer the transport sees while a request body is written: the
    body's own, passed every call, and whether the transport's buffer is
    full now (it pauses its producer then, and resumes it once the buffer
    is empty).
    """

    def __init__(self, producer: IBodyProducer) -> None:
        self._producer = producer
        self.paused = False
        #: What to do once the buffer drains (the body's end, when it was
        #: all written before it left).
        self.then: Optional[Callable[[], None]] = None

    def pauseProducing(self) -> None:
        self.paused = True
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        then, self.then = self.then, None
        if then is not None:
            then()
            return
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self.then = None
        self._producer.stopProducing()


class _Exchange:
    """
    One request and its response on a connection, and the parser's
    callbacks for that response (a parser per response: llhttp cannot be
    told a HEAD response has no body, and bytes after a response are not
    the next one's).
    """

    def __init__(self, connection: "_Connection", method: bytes, info: _RequestInfo, persistent: bool) -> None:
        self.connection = connection
        self.method = method
        self.info = info
        self.persistent = persistent
        self.parser = HttpResponseParser(self)
        self.result: Deferred[IResponse] = Deferred(self._cancel)
        self.producer: Optional[IBodyProducer] = None
        self.sending: Optional[_Sending] = None
        self.head_bytes = 0
        self.complete = False
        self.keep_alive = False
        self.response: Optional[_Response] = None
        self.until_close = False
        self._phrase = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._interim = False

    @property
    def writing(self) -> bool:
        """
        Whether the request body is still being written: its producer is
        let go of once it is written, has failed, or was stopped.
        """
        return self.producer is not None

    # The request.

    def write(self, transport: Any, path: bytes, headers: Headers, producer: Optional[IBodyProducer]) -> None:
        hosts = headers.getRawHeaders(b"host", ())
        if len(hosts) != 1:
            self.generation_failed(Failure(ValueError("Exactly one Host header required")))
            return
        lines = [self.method + b" " + path + b" HTTP/1.1\r\n"]
        if not self.persistent:
            lines.append(b"Connection: close\r\n")
        if producer is None:
            # As twisted.web: a method that expects a body says it has none.
            if self.method in (b"PUT", b"POST"):
                lines.append(b"Content-Length: 0\r\n")
        elif producer.length is UNKNOWN_LENGTH:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines.append(b"Content-Length: %d\r\n" % (producer.length,))
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        transport.write(b"".join(lines))
        if producer is None:
            return
        self.producer = producer
        consumer: Any
        if producer.length is UNKNOWN_LENGTH:
            consumer = _ChunkedConsumer(transport)
        else:
            consumer = _LengthConsumer(self, transport, producer.length)
        # Streaming: the transport pauses the producer when its buffer is
        # full, so an upload keeps its backpressure; the tracker also tells
        # when what the producer wrote has left the buffer.
        self.sending = _Sending(producer)
        transport.registerProducer(self.sending, True)
        try:
            produced = producer.startProducing(consumer)
        except BaseException:
            self.body_failed(Failure())
            return
        produced.addCallbacks(self._body_written, self.body_failed, callbackArgs=(consumer,))

    def _body_written(self, _: object, consumer: Any) -> None:
        if not self.writing:
            return
        if isinstance(consumer, _LengthConsumer) and consumer.remaining:
            self.body_failed(Failure(WrongBodyLength("too few bytes written")))
            return
        sending = self.sending
        if sending is not None and sending.paused:
            # Written to the transport, not yet to the socket (a body in
            # memory goes in one write): the request is over only once the
            # transport's buffer has drained, so an upstream that answered
            # early and stopped reading does not get this connection back
            # in the pool with megabytes still queued before the next
            # request.
            sending.then = lambda: self._body_written(None, consumer)
            return
        self.sending = None
        self.producer = None
        transport = self.connection.transport
        transport.unregisterProducer()
        if isinstance(consumer, _ChunkedConsumer):
            transport.write(b"0\r\n\r\n")
        # (If the response ended first, its connection is being closed:
        # see _Connection._completed.)

    def body_failed(self, reason: Failure) -> None:
        """
        The body producer failed (or wrote the wrong length): the request
        cannot be completed, nor the connection reused.
        """
        producer, self.producer = self.producer, None
        if producer is None:
            return
        connection = self.connection
        connection.transport.unregisterProducer()
        if reason.check(WrongBodyLength):
            producer.stopProducing()
        if self.complete:
            return
        connection.detach(self)
        connection.transport.abortConnection()
        if self.response is None:
            self.result.errback(Failure(RequestGenerationFailed([reason])))
        else:
            self.response._finish(Failure(ResponseFailed([reason], self.response)))

    def generation_failed(self, reason: Failure) -> None:
        connection = self.connection
        connection.detach(self)
        connection.transport.abortConnection()
        self.result.errback(Failure(RequestGenerationFailed([reason])))

    def stop_writing(self) -> None:
        """
        The request body can no longer go anywhere (the connection is gone
        or given up): stop its producer, which lets go of what it holds and
        of the client it may have paused.
        """
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                self.connection.transport.unregisterProducer()
                producer.stopProducing()
            except Exception:
                _log.failure("while stopping a request body")

    def _cancel(self, result: "Deferred[IResponse]") -> None:
        connection = self.connection
        connection.detach(self)
        connection.transport.abortConnection()
        cancelled = Failure(CancelledError())
        if self.writing:
            self.stop_writing()
            self.result.errback(Failure(RequestGenerationFailed([cancelled])))
        else:
            self.result.errback(self._head_failure(cancelled))

    def _head_failure(self, reason: Failure) -> Failure:
        if self.head_bytes:
            return Failure(ResponseFailed([reason]))
        return Failure(ResponseNeverReceived([reason]))

    # The connection's end, or a malformed response.

    def lost(self, reason: Failure, malformed: bool = False) -> None:
        """
        The connection is gone (or given up) before this exchange was over.
        """
        writing = self.writing
        self.stop_writing()
        response = self.response
        if response is None:
            if writing and not malformed:
                self.result.errback(Failure(RequestTransmissionFailed([reason])))
            elif malformed:
                self.result.errback(Failure(ResponseFailed([reason])))
            else:
                self.result.errback(self._head_failure(reason))
        elif not self.complete:
            self.complete = True
            if self.until_close:
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(ResponseFailed([reason, Failure(ResponseCutShort())], response)))

    # llhttp's callbacks.

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stop()

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is None:
            self._raw.append((name, value))
        # (After the head: trailers, ignored.)

    def on_headers_complete(self) -> None:
        parser = self.parser
        code = parser.get_status_code()
        raw, self._raw = self._raw, []
        phrase, self._phrase = self._phrase, b""
        if code == 101:
            # The proxy never asks for an upgrade.  (Left to llhttp, a 101
            # with an Upgrade header raises outside its parser errors, and
            # one without is skipped by some versions as an interim head.)
            raise MalformedResponse("unasked protocol upgrade")
        if 100 <= code < 200:
            # An interim response: skipped, as twisted.web does.
            self._interim = True
            return
        head = self.method == b"HEAD"
        headers = Headers()
        length: Optional[bytes] = None
        encoding: Optional[bytes] = None
        connection = b""
        for name, value in raw:
            name = name.lower()
            value = value.strip()
            if name in _CONNECTION_CONTROL:
                if name == b"content-length":
                    length = value
                    if not head:
                        continue
                else:
                    if name == b"transfer-encoding" and encoding is None:
                        encoding = value
                    elif name == b"connection":
                        connection += b"," + value
                    continue
            headers.addRawHeader(name, value)
        no_body = head or code == 204 or code == 304
        if encoding is not None and not no_body and encoding.lower() != b"chunked":
            # twisted.web fails such a response too (it decodes only
            # chunked); llhttp would read it until the close.
            raise MalformedResponse("unsupported transfer coding")
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            major, _, minor = parser.get_http_version().partition(".")
            version = (b"HTTP", int(major), int(minor))
        response = _Response(version, code, phrase, headers, self.info)
        self.response = response
        if no_body:
            response.length = 0
        elif encoding is None:
            if length is not None:
                response.length = int(length)
            else:
                self.until_close = True
        response._transport = self.connection.transport
        if no_body:
            # llhttp cannot be told that a HEAD response has no body (it
            # would wait for what Content-Length announces): the response
            # ends here, and its keep-alive is read from its head.
            tokens = {token.strip().lower() for token in connection.split(b",")}
            if version >= (b"HTTP", 1, 1):
                self.keep_alive = b"close" not in tokens
            else:
                self.keep_alive = b"keep-alive" in tokens
            self.complete = True
            self.result.callback(response)
            raise _Stop()
        self.result.callback(response)
        if response._protocol is None and not self.complete and response._reason is None:
            # Nobody reads the body yet: read no more of it (twisted.web
            # pauses the same way) until deliverBody.
            response._paused_for_delivery = True
            self.connection.transport.pauseProducing()

    def on_body(self, data: bytes) -> None:
        self.response.sink(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True


_log = Logger()


class _Connection(Protocol):
    """
    One upstream connection: at most one exchange at a time.
    """

    #: A TCP or TLS transport: a push producer that can be aborted.
    transport: Any

    def __init__(self, pool: "ConnectionPool", key: Hashable) -> None:
        self._pool = pool
        self._key = key
        self._exchange: Optional[_Exchange] = None
        self.closed = False
        self._finishing: Optional[_Exchange] = None
        self._lost: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        producer: Optional[IBodyProducer],
        info: _RequestInfo,
    ) -> "Deferred[IResponse]":
        if self._exchange is not None or self.closed:
            return fail(RequestNotSent())
        persistent = self._pool.persistent and b"close" not in (headers.getRawHeaders(b"connection") or ())
        exchange = self._exchange = _Exchange(self, method, info, persistent)
        try:
            exchange.write(self.transport, path, headers, producer)
        except BaseException:
            if exchange.writing:
                exchange.body_failed(Failure())
            elif exchange.result.called:
                pass
            else:
                exchange.generation_failed(Failure())
        return exchange.result

    def detach(self, exchange: _Exchange) -> None:
        if self._exchange is exchange:
            self._exchange = None

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes nobody asked for: give the connection up, as
            # twisted.web does.
            self.transport.loseConnection()
            return
        try:
            exchange.parser.feed_data(data)
        except HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                error = e.__context__ if e.__context__ is not None else e
                self._give_up(exchange, Failure(error), malformed=isinstance(error, MalformedResponse))
                return
        except HttpParserError as e:
            self._give_up(exchange, Failure(MalformedResponse(str(e) or type(e).__name__)), malformed=True)
            return
        if exchange.response is None:
            exchange.head_bytes += len(data)
            if exchange.head_bytes > MAX_HEAD_BYTES:
                self._give_up(exchange, Failure(MalformedResponse("response head too large")), malformed=True)
                return
        if exchange.complete:
            self._completed(exchange)

    def _give_up(self, exchange: _Exchange, reason: Failure, malformed: bool) -> None:
        if self._exchange is not exchange:
            return
        self._exchange = None
        self.transport.loseConnection()
        exchange.lost(reason, malformed)

    def _completed(self, exchange: _Exchange) -> None:
        if self._exchange is not exchange:
            return
        self._exchange = None
        response = exchange.response
        assert response is not None
        if exchange.keep_alive and exchange.persistent and not exchange.writing and not self.closed:
            # Back to the pool first (as twisted.web), so that what the
            # body's end starts may reuse it.
            self.transport.resumeProducing()
            self._pool._put(self._key, self)
        else:
            if exchange.writing:
                # The body is still being written, but the answer is in: its
                # producer stops when the connection is gone, and what is
                # still buffered for an upstream that may never read it is
                # dropped rather than kept until it does.
                self._finishing = exchange
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        try:
            response._finish(_done())
        except Exception:
            _log.failure("while ending a response body")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self._finishing is not None:
            self._finishing.stop_writing()
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            self._pool._forget(self._key, self)
        else:
            exchange.lost(reason)
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)

    def close(self) -> "Deferred[None]":
        """
        Close the connection; the Deferred fires once it is gone.
        """
        if self.closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        self.transport.loseConnection()
        return d


class _ConnectionFactory(Factory):
    # One "Starting factory" log line per upstream connection is noise.
    noisy = False

    def __init__(self, pool: "ConnectionPool", key: Hashable) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._pool, self._key)


class ConnectionPool:
    """
    Idle persistent connections per host (C{HTTPConnectionPool}'s policy):
    the oldest idle connection is reused first, at most
    C{maxPersistentPerHost} are kept (the oldest is closed for a newer
    one), each closed after C{cachedConnectionTimeout} seconds idle, and
    one closed by the upstream while idle is dropped.

    @param reactor: the clock for the idle timeouts (and nothing else).
    """

    maxPersistentPerHost = 2
    cachedConnectionTimeout = 240
    retryAutomatically = True

    def __init__(self, reactor: IReactorTime, persistent: bool = True) -> None:
        self._reactor = reactor
        self.persistent = persistent
        self._idle: dict[Hashable, list[_Connection]] = {}
        self._timeouts: dict[_Connection, Any] = {}

    def _take(self, key: Hashable) -> Optional[_Connection]:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop(0)
            self._timeouts.pop(connection).cancel()
            if not connection.closed:
                return connection
        return None

    def _connect(self, key: Hashable, endpoint: IStreamClientEndpoint) -> "Deferred[_Connection]":
        return endpoint.connect(_ConnectionFactory(self, key))  # type: ignore[return-value]

    def _put(self, key: Hashable, connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.maxPersistentPerHost:
            dropped = idle.pop(0)
            self._timeouts.pop(dropped).cancel()
            dropped.transport.loseConnection()
        idle.append(connection)
        self._timeouts[connection] = self._reactor.callLater(
            self.cachedConnectionTimeout, self._expire, key, connection
        )

    def _expire(self, key: Hashable, connection: _Connection) -> None:
        del self._timeouts[connection]
        self._idle[key].remove(connection)
        connection.transport.loseConnection()

    def _forget(self, key: Hashable, connection: _Connection) -> None:
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
            self._timeouts.pop(connection).cancel()

    def closeCachedConnections(self) -> "Deferred[None]":
        """
        Close every idle connection; fires once all are closed.
        """
        closing = [connection.close() for idle in self._idle.values() for connection in idle]
        self._idle = {}
        for call in self._timeouts.values():
            call.cancel()
        self._timeouts = {}
        return gatherResults(closing).addCallback(lambda _: None)


@functools.lru_cache(maxsize=512)
def _parsed(uri: bytes) -> tuple[URI, tuple[bytes, bytes, int], bytes, bytes]:
    """
    A request URI as Agent takes it apart: the parsed URI, the pool key,
    the C{Host} value it would add and the path it sends (C{originForm},
    which URI computes anew at every read).
    """
    parsed = URI.fromBytes(uri)
    return parsed, (parsed.scheme, parsed.host, parsed.port), host_value(parsed), parsed.originForm


def host_value(uri: URI) -> bytes:
    """
    The C{Host} header twisted.web's C{Agent} sends for C{uri}: the host,
    in brackets for an IPv6 address, with the port unless it is the
    scheme's default.
    """
    host = uri.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return bytes(host)
    return b"%b:%d" % (host, uri.port)


def _should_retry(failure: Failure) -> bool:
    """
    Whether an idempotent request without a body (the caller checks that)
    that failed on a reused connection is sent again on a new one:
    C{HTTPConnectionPool}'s rule, for a failure before any answer that the
    caller did not cause by cancelling.
    """
    exception = failure.value
    if not isinstance(exception, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)):
        return False
    return not any(reason.check(CancelledError) for reason in getattr(exception, "reasons", ()))


@implementer(IAgent)
class HTTP11Agent:
    """
    An L{IAgent} for HTTP/1.1 over the connections C{endpoints} makes (TLS
    included), pooled in C{pool}.
    """

    def __init__(self, endpoints: IAgentEndpointFactory, pool: ConnectionPool) -> None:
        self._endpoints = endpoints
        self._pool = pool

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        uri = uri.strip()
        if not _VALID_URI.match(uri):
            # (Not the URI itself: an upstream style may carry a key in it.)
            raise ValueError(f"Invalid URI ({len(uri)} bytes)")
        if not isinstance(method, bytes):
            raise TypeError(f"method={method!r} is {type(method)}, but must be bytes")
        if not _VALID_METHOD.match(method):
            raise _token_error(method)
        parsed, key, host, path = _parsed(uri)
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(b"Host", host)
        info = _RequestInfo(method, parsed, headers)
        pool = self._pool
        connection = pool._take(key)

        def on_fresh(fresh: _Connection) -> "Deferred[IResponse]":
            return fresh.request(method, path, headers, bodyProducer, info)

        if connection is not None:
            d = connection.request(method, path, headers, bodyProducer, info)
            if pool.retryAutomatically and method in _RETRYABLE and bodyProducer is None:

                def retry(failure: Failure) -> Any:
                    if _should_retry(failure):
                        return self._connected(key, parsed).addCallback(on_fresh)
                    return failure

                d.addErrback(retry)
            return d
        return self._connected(key, parsed).addCallback(on_fresh)

    def _connected(self, key: tuple[bytes, bytes, int], parsed: URI) -> "Deferred[_Connection]":
        try:
            endpoint = self._endpoints.endpointForURI(parsed)
        except Exception:
            return fail()
        return self._pool._connect(key, endpoint)
