# -*- test-case-name: tests.test_site -*-
"""
The HTTP server side: a L{Site} whose requests enforce the body limit before
reading the body, answer failures in JSON, and write one access log line
each, including for requests that end by disconnect.

Nothing of a request body is read before its headers pass the site's gate
(the client key, see L{ProxySite.admit}), and a body must keep arriving
(L{BODY_MIN_RATE}); connections from one address that have not presented a
valid key are capped, and so are all of its connections, at a much higher
bound (L{ALL_CONNECTIONS_FACTOR}).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from oaiproxy import __version__
from oaiproxy.drain import Lifecycle
from oaiproxy.errors import (
    ApiError,
    bad_http,
    body_timeout,
    body_too_large,
    header_timeout,
    internal_error,
    shut_down_mid_response,
    sse_error_event,
)
from oaiproxy.observe.accesslog import AccessLog, TextAccessLog
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord, new_request_id
from oaiproxy.routetable import ROUTES
from oaiproxy.server.twisted_internals import (
    bound_chunked_body,
    hold_channel,
    release_channel,
    unparsed_head,
    write_now,
)
from oaiproxy.upstream.bodies import BodyPipe, BodyRefused
from oaiproxy.upstream.headers import client_request_id
from oaiproxy.upstream.relay import KEEPALIVE
from oaiproxy.web import error_response, shown_path

try:
    import resource as _resource
except ImportError:  # pragma: no cover - not on Windows
    _resource = None  # type: ignore[assignment]

__all__ = [
    "ProxyRequest",
    "ProxySite",
    "Gate",
    "SERVER",
    "raw_error_response",
    "check_open_files",
    "LINGER_SECONDS",
    "LINGER_TOTAL_SECONDS",
    "BODY_MIN_RATE",
    "ALL_CONNECTIONS_FACTOR",
    "STREAMS_WANTED",
]

SERVER = b"oaiproxy/" + __version__.encode("ascii")

#: After answering before the body is in (a 413, or a refused upload), how
#: long to keep reading (and discarding) what the client still sends, since
#: its last bytes, before closing.  Closing at once would make the kernel
#: reset the connection, and a reset can destroy the answer before the
#: client reads it; nginx's "lingering close" is the model.
LINGER_SECONDS = 5.0
#: ... and at most this long in all (nginx's lingering_time).
LINGER_TOTAL_SECONDS = 30.0

#: Bytes per second of request body that buy a second more than the body
#: timeout: a body must be in within C{body_timeout} seconds, plus one
#: second for every C{BODY_MIN_RATE} bytes received.  A client sending at
#: least this fast (512 kbit/s) is never cut off; one sending at half of
#: it gets twice the timeout; one trickling a byte every few seconds gets
#: the timeout and no more, whatever length it declared.  Time the proxy
#: holds the client back (an upload whose upstream is slower) is not
#: counted.
BODY_MIN_RATE = 64 * 1024

#: An address may hold C{max_connections_per_ip} connections that have not
#: presented a valid client key, and this many times as many in all: an
#: app server (one address, many users) gets 4,096 by default.
ALL_CONNECTIONS_FACTOR = 16

#: Concurrent streams a default configuration must be able to hold; less
#: is warned about at startup (see L{check_open_files}).
STREAMS_WANTED = 2000

#: Descriptors kept for what is not a client or upstream connection
#: (listeners, logs, temporary files of uploads, the metrics directory).
_FD_RESERVE = 64
#: What "unlimited" becomes when the hard limit is infinite: Linux refuses
#: more than its nr_open (1048576 by default).
_FD_UNLIMITED = 1 << 20

#: After a TLS handshake on a plain listener is noted, further ones go
#: unlogged (but counted) for this long.
TLS_NOTICE_SECONDS = 60.0

#: The answer to a TLS handshake on a plain-HTTP listener.
_NOT_TLS = bad_http("This port speaks plain HTTP, not TLS: use an http:// URL (or serve TLS with an ssl: endpoint).")

#: The check a request's headers pass before its body is read: whether the
#: request may send one (see L{ProxySite.admit}).
Gate = Callable[[Request], bool]

#: Access lines and request failures.  A module-level logger, not a class
#: attribute: bound to a request, a Logger would attach the request as
#: C{log_source}, whose repr carries the full URI, query string included.
_log = Logger(namespace="oaiproxy.access")
#: The site's own notices (open-file limit, TLS on a plain port).
_notice = Logger(namespace="oaiproxy.server.site")


def raw_error_response(error: ApiError, request_id: Optional[str] = None) -> bytes:
    """
    A complete HTTP/1.1 response for C{error} that closes the connection,
    for the moment before twisted.web has a request to answer through.
    """
    body = error.body()
    phrase = RESPONSES.get(error.status, b"Error")
    head = [
        b"HTTP/1.1 %d %s" % (error.status, phrase),
        b"Content-Type: application/json",
        b"Content-Length: %d" % (len(body),),
        b"Connection: close",
        b"Server: " + SERVER,
    ]
    head.extend(name + b": " + value for name, value in error.headers)
    if request_id is not None:
        head.append(_REQUEST_ID_HEADER + b": " + request_id.encode("ascii"))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


#: Route labels for metrics and logs, by path (an API route with or
#: without the /v1 prefix).
ROUTE_LABELS = {b"/health": "health", b"/metrics": "metrics", b"/usage": "usage"}
for _route in ROUTES:
    ROUTE_LABELS[b"/v1" + _route.path.encode("ascii")] = ROUTE_LABELS[_route.path.encode("ascii")] = _route.label

_REQUEST_ID_HEADER = b"x-oaiproxy-request-id"


#: twisted.web's per-request attributes, kept in L{ProxyRequest}'s slots.
#: Those with a class default in C{Request} are set to it first (a slot has
#: no class value to fall back on); the others read and delete as an
#: instance dictionary's would.  Not C{content}, which C{Request} deletes
#: when done, back to its class value, nor anything that shadows a method.
_TWISTED_STATE = (
    "producer",
    "finished",
    "code",
    "code_message",
    "method",
    "clientproto",
    "uri",
    "path",
    "args",
    "startedWriting",
    "chunked",
    "sentLength",
    "_disconnected",
    "site",
    "prepath",
    "postpath",
    "channel",
    "transport",
    "client",
    "host",
    "queued",
    "notifications",
    "cookies",
    "received_cookies",
    "requestHeaders",
    "responseHeaders",
    "streamingProducer",
    "sitepath",
    "_parsePOSTFormSubmission",
    "_adapterCache",
)


def _class_defaults(kind: type, names: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """
    The names of C{names} that C{kind} has a class value for, with it.
    """
    return tuple((name, getattr(kind, name)) for name in names if hasattr(kind, name))


_TWISTED_DEFAULTS = _class_defaults(Request, _TWISTED_STATE)


class ProxyRequest(Request):
    """
    A request that keeps its body in memory within the site's limit and
    refuses a larger one as soon as the length is known.

    On an upload route (L{ProxySite.streams_body}) the request is processed
    as soon as its headers are in, and its body follows through
    L{body_pipe} to go upstream as it arrives.

    @ivar record: what this request did, for the access log and metrics.
    @ivar body_pipe: the body still arriving, on an upload route.
    """

    # A stream keeps its request for minutes: this class's own attributes
    # and twisted.web's go in slots; the instance dictionary keeps only
    # C{content}.  CPython 3.11 gives an instance whose attributes outgrow
    # its class's shared keys (30, and no new ones once a few dozen
    # instances exist) a dictionary of its own: 1.6 KB a request (issue 17).
    __slots__ = _TWISTED_STATE + (
        # Admission's memo of who the request authenticated as
        # (oaiproxy.access.admission._AUTHENTICATED), reused by the route.
        "_oaiproxy_authenticated",
        "body_pipe",
        "request_line",
        "connection_lost",
        "record",
        "_body_bytes",
        "_declared_length",
        "_body_complete",
        "_early",
        "_chunks",
        "_refused",
        "_channel_held",
        "_logged",
        "_processing",
        "_streaming",
        "_cut_by_proxy",
        "_shutdown",
        "_linger",
        "_linger_until",
        "_body_deadline",
        "_body_clock_on",
        "_body_started",
        "_body_held",
        "_held_since",
        "_timed_out",
        "_site",
        "_clock",
        "_limit",
        "_lifecycle",
    )

    body_pipe: Optional[BodyPipe]
    #: The request line (method, target, version) as the channel read it;
    #: set by L{ProxyChannel.lineReceived} before the headers.
    request_line: tuple[bytes, bytes, bytes]
    #: The connection was lost (twisted.web's own flag is private).
    connection_lost: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name, default in _TWISTED_DEFAULTS:
            setattr(self, name, default)
        self.body_pipe = None
        self.request_line = (b"-", b"-", b"-")
        self.connection_lost = False
        super().__init__(*args, **kwargs)
        self._body_bytes = 0
        self._declared_length: Optional[int] = None
        self._body_complete = False
        self._early = False
        self._chunks: list[bytes] = []
        self._refused = False
        #: The channel is kept on this request (hold_channel) until its body is in.
        self._channel_held = False
        self._logged = False
        self._processing = False
        self._streaming = False
        self._cut_by_proxy = False
        self._shutdown = False
        self._linger: Optional[IDelayedCall] = None
        self._linger_until = 0.0
        self._body_deadline: Optional[IDelayedCall] = None
        self._body_clock_on = False
        self._body_started = 0.0
        self._body_held = 0.0
        self._held_since: Optional[float] = None
        self._timed_out = False
        site: ProxySite = self.channel.site  # type: ignore[attr-defined]
        self._site = site
        self._clock: IReactorTime = site.reactor
        self._limit: int = site.max_body_bytes
        self._lifecycle: Lifecycle = site.lifecycle
        self.record = RequestRecord(new_request_id(), self._clock.seconds())
        self.record.worker = site.worker
        self.record.peer = getattr(self.client, "host", "-")

    # Body handling.

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self._limit:
            self._refuse_body()
            return
        self._declared_length = length
        # The body is parsed as JSON whole, so it is in memory anyway: keep
        # its chunks instead of twisted.web's temporary file, and join them
        # once when the body is complete (see requestReceived).
        self._chunks = []
        if length != 0:
            self._start_body_clock()

    @property
    def body_allowance(self) -> int:
        """
        How many more body bytes the limit lets in.
        """
        return max(self._limit - self._body_bytes, 0)

    @property
    def body_held(self) -> int:
        """
        Body bytes held in memory until the body is complete (never any
        of a refused one).
        """
        return sum(len(chunk) for chunk in self._chunks)

    @property
    def refused(self) -> bool:
        """
        The request was answered before its body was in, and what remains
        of the body is being discarded.
        """
        return self._refused

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._extend_linger()
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._limit:
            self.body_over_limit()
            return
        pipe = self.body_pipe
        if pipe is not None:
            pipe.write(data)
            return
        self._chunks.append(data)

    def body_over_limit(self) -> None:
        """
        The body is, or has declared a chunk that makes it, larger than
        the limit: answer 413 and throw the rest away.
        """
        self._refused = True
        pipe = self.body_pipe
        if pipe is not None:
            # Already being answered: the upload's request fails with a 413
            # (see oaiproxy.upstream.exchange.classify_upstream_failure).
            self._stop_body_clock()
            pipe.fail(BodyRefused(body_too_large(self._limit)))
            return
        self._refuse_body()

    def start_streaming(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Process the request now, before its body: the body follows through
        L{body_pipe}.  Called by L{ProxyChannel} once the headers are in.
        """
        channel: Any = self.channel
        self.body_pipe = BodyPipe(self._declared_length, channel.hold_for_upstream, channel.release_for_upstream)
        self._early = True
        self.content = io.BytesIO()  # type: ignore[assignment]
        Request.requestReceived(self, command, path, version)

    def answer_without_body(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Process the request now, as if it had no body, and discard the
        body as it arrives: its headers did not pass the site's gate (no
        valid client key), so its route refuses it (a 401; a 404 for an
        unknown path...) without reading a byte of it.  Called by
        L{ProxyChannel} once the headers are in.
        """
        self._refused = True
        self._early = True
        self.content = io.BytesIO()  # type: ignore[assignment]
        Request.requestReceived(self, command, path, version)

    def _refuse_body(self) -> None:
        """
        Answer 413 now, before the body is read, then discard the rest.
        """
        self._answer_unprocessed(body_too_large(self._limit))
        self._start_linger()

    def _answer_unprocessed(self, error: ApiError) -> None:
        """
        Answer C{error} for a request not processed yet (its body is not
        all in), whose rest is then discarded.
        """
        self._refused = True
        self._stop_body_clock()
        self._chunks = []
        self.content = io.BytesIO()  # type: ignore[assignment]
        # Do not invite the body with "100 Continue".
        self.requestHeaders.removeHeader(b"expect")
        self.channel.write(raw_error_response(error, self.record.request_id))
        self.code = error.status
        self.sentLength = len(error.body())
        # The request line has been parsed but not handed to us yet (the
        # channel hands it over once the body is complete).
        command, path, _ = self.request_line
        self.record.route = ROUTE_LABELS.get(path.split(b"?", 1)[0], "other")
        self._record_end(command, path)

    # The body's deadline.

    def _start_body_clock(self) -> None:
        self._body_clock_on = True
        self._body_started = self._clock.seconds()
        self._body_deadline = self._clock.callLater(self._site.body_timeout, self._body_clock_rang)

    def _stop_body_clock(self) -> None:
        self._body_clock_on = False
        if self._body_deadline is not None and self._body_deadline.active():
            self._body_deadline.cancel()
        self._body_deadline = None

    def hold_body_clock(self) -> None:
        """
        The proxy stopped reading the client (its upload's upstream is
        behind): that time is not the client's.
        """
        if self._held_since is None:
            self._held_since = self._clock.seconds()

    def release_body_clock(self) -> None:
        """
        The proxy reads the client again.
        """
        if self._held_since is None:
            return
        self._body_held += self._clock.seconds() - self._held_since
        self._held_since = None
        if self._body_clock_on and self._body_deadline is None:
            self._body_deadline = self._clock.callLater(
                max(self._body_due() - self._clock.seconds(), 0), self._body_clock_rang
            )

    def _body_due(self) -> float:
        """
        When the body must be complete, given what has arrived so far.
        """
        held = self._body_held
        if self._held_since is not None:
            held += self._clock.seconds() - self._held_since
        return self._body_started + held + self._site.body_timeout + self._body_bytes / BODY_MIN_RATE

    def _body_clock_rang(self) -> None:
        # Rung at the deadline as it stood when the timer was set; what
        # arrived since has moved it on.  (Checked lazily: resetting the
        # timer on every chunk would cost more than the body.)
        self._body_deadline = None
        if not self._body_clock_on or self._held_since is not None:
            # Held by the proxy: release_body_clock sets it again.
            return
        left = self._body_due() - self._clock.seconds()
        if left > 0:
            # At least a second, so a body crawling just under the rate is
            # not checked ever more often as it nears its deadline.
            self._body_deadline = self._clock.callLater(max(left, 1.0), self._body_clock_rang)
            return
        self._body_too_slow()

    def _body_too_slow(self) -> None:
        """
        The body did not arrive in time: a 408, and the connection closes
        (a client this slow is not worth lingering for).
        """
        self._body_clock_on = False
        transport = self.channel.transport if self.channel is not None else None
        _log.info(
            "closing a connection from {client}: request body incomplete after {seconds:.0f}s ({received} bytes in)",
            client=self.record.peer,
            seconds=self._clock.seconds() - self._body_started,
            received=self._body_bytes,
        )
        error = body_timeout(self._site.body_timeout, BODY_MIN_RATE)
        self._timed_out = True
        pipe = self.body_pipe
        if pipe is None:
            # Not processed yet: the proxy answers for it.
            self._answer_unprocessed(error)
            if transport is not None:
                transport.loseConnection()
            return
        # An upload already on its way: its upstream request fails, and the
        # exchange answers with this error; finish() then closes.
        self._refused = True
        pipe.fail(BodyRefused(error))
        if not self.finished:
            # No answer could be given (the response had started): close
            # once the linger runs out, unless finish() comes first.
            self._start_linger()

    def _start_linger(self) -> None:
        self._linger_until = self._clock.seconds() + LINGER_TOTAL_SECONDS
        self._linger = self._clock.callLater(LINGER_SECONDS, self._stop_lingering)

    def _extend_linger(self) -> None:
        """
        The client is still sending a body being discarded: give it up to
        another L{LINGER_SECONDS}, within L{LINGER_TOTAL_SECONDS} in all.
        """
        if self._linger is not None and self._linger.active():
            left = self._linger_until - self._clock.seconds()
            self._linger.reset(max(min(LINGER_SECONDS, left), 0))

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def _stop_lingering(self) -> None:
        self._linger = None
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()  # type: ignore[attr-defined]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_body_clock()
        if self._early:
            # The end of a body that came after its request was processed.
            self._body_complete = True
            if not self._refused and self.body_pipe is not None:
                self.body_pipe.finish()
            if self._channel_held:
                # It was answered early (see finish): now that the rest of
                # the body is read, the channel may move on.
                self._channel_held = False
                self._cancel_linger()
                release_channel(self)
            return
        if self._refused:
            # The whole oversized body has been read and discarded; the
            # answer is already out.
            if self._linger is not None and self._linger.active():
                self._linger.cancel()
            self.channel.loseConnection()
            return
        # One copy of the body, shared (not copied again) by getvalue().
        self.content = io.BytesIO(b"".join(self._chunks))  # type: ignore[assignment]
        self._chunks = []
        super().requestReceived(command, path, version)

    # Responses.

    def process(self) -> None:
        record = self.record
        record.started = self._clock.seconds()
        record.method = self.method.decode("latin-1")
        record.path = shown_path(self.path)
        record.route = ROUTE_LABELS.get(self.path, "other")
        # A client's own request id is kept (and forwarded upstream with
        # the other end-to-end headers); otherwise the proxy makes one.
        own = client_request_id(self.requestHeaders.getRawHeaders(b"x-request-id", [None])[0])
        if own is not None:
            record.request_id = own
        self.responseHeaders.setRawHeaders(_REQUEST_ID_HEADER, [record.request_id.encode("ascii")])
        self._processing = True
        self._site.metrics.request_started()
        self._lifecycle.started(self)
        if self._lifecycle.draining:
            # Answer this one (503 from the resources), then close: the
            # client's next request must find the next process.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().process()

    def cut_off_for_shutdown(self) -> None:
        """
        The drain ran out of time: end this response.  An event stream gets
        a final error event first, so the SDK raises a clear C{APIError};
        anything else is cut off, which no client takes for complete.
        """
        content_type = (self.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
        if self.startedWriting and content_type.startswith(b"text/event-stream"):
            self.write(sse_error_event(shut_down_mid_response()))
        self._shutdown = True
        self.loseConnection()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
            if self._early and not self._body_complete:
                # An answer before the whole body (a refusal, an upload's
                # early upstream error): the rest of the body is read and
                # thrown away, then the connection closes.
                self.channel.persistent = False
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            content_type = (self.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
            if content_type.startswith(b"text/event-stream"):
                self._streaming = True
                self._site.metrics.stream_started()
            self.record.head_sent = self._clock.seconds()
        if data and self.record.first_chunk is None and data != KEEPALIVE:
            self.record.first_chunk = self._clock.seconds()
        if self._streaming and self.startedWriting and data and write_now(self, data):
            # An event goes to the client's socket at once (see write_now).
            return
        super().write(data)

    def processingFailed(self, reason: Failure) -> None:
        """
        A bug in a resource: log the traceback, answer a JSON 500 that says
        nothing about it.
        """
        _log.failure("error rendering {path}", failure=reason, path=self.path.decode("latin-1"))
        if self.finished or self.connection_lost:
            return
        body = error_response(self, internal_error())
        self.write(body)
        self.finish()

    # Access log.

    def finish(self) -> None:
        pipe = self.body_pipe
        if self._early and not self._body_complete and not self.connection_lost:
            # The channel must not parse the rest of the body as the next
            # request: it stays on this one (see hold_channel) until
            # requestReceived, at the body's end, releases it; or the linger
            # runs out and closes the connection.  (Pinned by
            # tests.routes.test_uploads.StreamingTests.)
            self._refused = True
            self._channel_held = True
            hold_channel(self)
            self._stop_body_clock()
            if not self._timed_out:
                self._start_linger()
        super().finish()
        if pipe is not None:
            # Whatever is held for upstream (a temporary file) goes now.
            pipe.close()
        self._record_end(self.method, self.path)
        if self._timed_out and self.channel is not None and self.channel.transport is not None:
            # The 408 for a body too slow is out: close now.
            self._cancel_linger()
            self.channel.transport.loseConnection()

    def loseConnection(self) -> None:
        """
        Close the connection without finishing the response: how the proxy
        cuts off a response whose upstream failed.  Noted so the access
        line does not blame the client.
        """
        self._cut_by_proxy = True
        super().loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.connection_lost = True
        self._cancel_linger()
        self._stop_body_clock()
        if self.body_pipe is not None:
            self.body_pipe.close()
        method, path = self.method, getattr(self, "path", None)
        super().connectionLost(reason)
        if path is not None:
            if self._shutdown:
                ended = "shutdown"
            elif self._cut_by_proxy:
                ended = "cut_off"
            elif self.record.end_sent:
                # It read the stream's end and hung up before upstream's
                # last bytes (see oaiproxy.upstream.exchange): not an early leave.
                ended = "complete"
            else:
                ended = "client_disconnected"
            self._record_end(method, path, ended)

    def _record_end(self, method: bytes, path: bytes, ended: str = "complete") -> None:
        """
        The request is over: complete the record, then hand it to the
        access log and the metrics, once.

        @param ended: C{complete}, C{client_disconnected}, C{cut_off} (the
            proxy closed the connection mid-response because upstream
            failed), or C{shutdown} (cut at the drain deadline).
        """
        if self._logged:
            return
        self._logged = True
        self._lifecycle.ended(self)
        record = self.record
        record.bytes_in = self._body_bytes
        if record.path == "-":
            # Not processed (refused at its head): the request line's.
            # (process() set both from the same request otherwise.)
            record.method = method.decode("latin-1")
            record.path = shown_path(path)
        # A client that left before any answer was written: nginx's 499,
        # not twisted.web's default 200.
        record.status = self.code if (self.startedWriting or ended == "complete") else 499
        record.bytes_out = self.sentLength
        record.ended_at = self._clock.seconds()
        record.ended = ended
        metrics = self._site.metrics
        if self._processing:
            metrics.request_finished()
        if self._streaming:
            metrics.stream_finished()
        metrics.observe(record)
        self._site.access_log(record)


#: twisted.web's per-connection attributes (of C{HTTPChannel} and its
#: bases), kept in L{ProxyChannel}'s slots, as L{_TWISTED_STATE} for the
#: request.  Not C{callLater}, a method the factory shadows per instance.
_CHANNEL_STATE = (
    "transport",
    "connected",
    "factory",
    "requestFactory",
    "line_mode",
    "_buffer",
    "_busyReceiving",
    "length",
    "persistent",
    "requests",
    "_HTTPChannel__header",
    "_HTTPChannel__first_line",
    "_HTTPChannel__content",
    "_command",
    "_path",
    "_version",
    "_savedTimeOut",
    "timeOut",
    "_TimeoutMixin__timeoutCall",
    "_dataBuffer",
    "_handlingRequest",
    "_transferDecoder",
    "_networkProducer",
    "_requestProducer",
    "_requestProducerStreaming",
    "_waitingForTransport",
    "_receivedHeaderCount",
    "_receivedHeaderSize",
    "_abortingCall",
)
_CHANNEL_DEFAULTS = _class_defaults(HTTPChannel, _CHANNEL_STATE)


class ProxyChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with bounds a hostile client cannot stretch, and
    that the drain can see open and close.

    twisted.web's own timeout is an idle timeout: each byte restarts it, so a
    client trickling a header byte every few seconds (slowloris) would hold
    its connection forever.  Here the request line and headers must all
    arrive within C{header_timeout} of their first byte.
    """

    # As for ProxyRequest: this class's attributes and twisted.web's in
    # slots, only C{callLater} in the instance dictionary (issue 17: a
    # dictionary of 0.8 KB a connection before).
    __slots__ = _CHANNEL_STATE + (
        "site",
        "admitted",
        "_header_deadline",
        "_in_request",
        "_bytes_seen",
        "_not_http",
        "held_for_upstream",
    )

    site: "ProxySite"
    #: A request on this connection passed the site's gate (see
    #: L{ProxySite.admit}): it no longer counts as unauthenticated.
    admitted: bool
    # A request line plus headers: OpenAI SDK requests use about 1 KB.
    totalHeadersSize = 16384
    maxHeaders = 100
    # The longest single line (request line or header).
    MAX_LENGTH = 16384

    _header_deadline: Optional[IDelayedCall]
    _in_request: bool
    _bytes_seen: bool
    _not_http: bool
    #: Not read from while an upload's upstream is behind (see
    #: L{hold_for_upstream}).
    held_for_upstream: bool

    def __init__(self) -> None:
        for name, default in _CHANNEL_DEFAULTS:
            setattr(self, name, default)
        self.admitted = False
        self._header_deadline = None
        self._in_request = False
        self._bytes_seen = False
        self._not_http = False
        self.held_for_upstream = False
        super().__init__()

    def hold_for_upstream(self) -> None:
        """
        Stop reading the client: the upload it is sending goes upstream
        more slowly than it arrives.  The silence is the proxy's, so the
        idle timeout does not apply meanwhile (upstream's silence is
        bounded by the read timeout).
        """
        self.held_for_upstream = True
        if self.requests:
            self.requests[-1].hold_body_clock()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def release_for_upstream(self) -> None:
        """
        Upstream caught up: read the client again.
        """
        if not self.held_for_upstream:
            return
        self.held_for_upstream = False
        if self.requests:
            self.requests[-1].release_body_clock()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def timeoutConnection(self) -> None:
        if self.held_for_upstream:
            # Not idle: held back by the proxy.  (The timer that fired is
            # spent, so a new one is set rather than the old one reset.)
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def resumeProducing(self) -> None:
        # The transport's send buffer drained: twisted.web would read the
        # client again, even while an upload is held for its upstream.
        super().resumeProducing()
        if self.held_for_upstream and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.lifecycle.opened(self)
        self._expect_headers()

    def dataReceived(self, data: bytes) -> None:
        if self._not_http or getattr(self.transport, "disconnecting", False):
            # Closing (a TLS handshake, a body too slow): what else arrives
            # is not read.
            return
        if not self._bytes_seen and data:
            self._bytes_seen = True
            # A TLS record starts 0x16 (handshake), then the version, 0x03
            # 0x0X: a client speaking https:// to a plain port.  It would
            # wait for the header timeout, then fail to read the 408.
            if data[:1] == b"\x16" and data[1:2] in (b"", b"\x03"):
                self._not_http = True
                self.site.tls_on_plain_port(self)
                if self.transport is not None:
                    # Plain HTTP at once, then close: TLS clients report
                    # it as a "wrong version number", the usual sign of
                    # https:// sent to an http:// port, rather than a
                    # bare connection loss.
                    self.transport.write(raw_error_response(_NOT_TLS))
                    self.transport.loseConnection()
                return
        if not self._in_request and self._header_deadline is None:
            self._expect_headers()
        super().dataReceived(data)
        # LineReceiver splits lines on CRLF only: a head whose lines end
        # in a bare LF would sit in its buffer until the header timeout.
        # Whatever is left there after parsing is an incomplete line, so
        # an LF in it is a bare one.
        if self.line_mode and b"\n" in unparsed_head(self) and not getattr(self.transport, "disconnecting", True):
            self._bad_request()

    def lineReceived(self, line: bytes) -> None:
        # twisted.web keeps the request line it parsed in private
        # attributes until the body is in; the request needs it as soon as
        # the headers are in.  A new request on the channel means this line
        # was its request line (and the parent refuses one that is not
        # three words).
        last = self.requests[-1] if self.requests else None
        super().lineReceived(line)
        if self.requests and self.requests[-1] is not last:
            parts = line.split()
            if len(parts) == 3:
                self.requests[-1].request_line = (parts[0], parts[1], parts[2])

    def _expect_headers(self) -> None:
        self._header_deadline = self.callLater(self.site.header_timeout, self._headers_too_slow)

    def allHeadersReceived(self) -> None:
        self._in_request = True
        self._cancel_deadline()
        request: ProxyRequest = self.requests[-1]
        # twisted.web's decoder would take any chunk size up to 1 KB of hex
        # digits and read it to the limit (pinned by
        # tests.server.test_site.FramingTests).
        bound_chunked_body(self, request)
        command, path, version = request.request_line
        if not self.site.admit(self, request, has_body=self.length != 0):
            # Refused on its headers: its route answers it now, and not one
            # byte of its body is kept.  ("100 Continue" is not sent.)
            request.answer_without_body(command, path, version)
            return
        if not self.site.streams_body(command, path):
            super().allHeadersReceived()
            return
        # An upload: processed now, before its body.  "100 Continue" is
        # sent only once it is accepted (twisted.web would send it first),
        # so a refused client is not invited to send the file.
        expect = request.requestHeaders.getRawHeaders(b"expect", [b""])[0].lower() == b"100-continue"
        request.requestHeaders.removeHeader(b"expect")
        super().allHeadersReceived()
        if request.refused:
            return
        request.start_streaming(command, path, version)
        if expect and version == b"HTTP/1.1" and not request.finished and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def requestDone(self, request: Any) -> None:
        # Before the parent replays any pipelined bytes, which start the next
        # request's deadline.
        self._in_request = False
        super().requestDone(request)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        _log.info(
            "closing a connection from {client}: no complete request headers within {seconds:g}s",
            client=getattr(self.transport.getPeer(), "host", "-") if self.transport else "-",
            seconds=self.site.header_timeout,
        )
        if self.transport is not None:
            self.transport.write(raw_error_response(header_timeout(self.site.header_timeout)))
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would just hang up; say why.
        self._bad_request()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's only way to answer a request it cannot parse (too
        # many headers, a malformed request line or framing) calls this
        # private method, and no public hook replaces its bare "400 Bad
        # Request".  Pinned by tests.server.test_twisted_pins.
        self._bad_request()

    def _bad_request(self) -> None:
        """
        Answer a request that cannot be parsed with a JSON 400, then close.
        """
        if self.requests and (self.requests[-1].startedWriting or self.requests[-1].refused):
            # The request was answered already (refused before its body's
            # end, whose rest is malformed): a second response would
            # corrupt the first.
            self.loseConnection()
            return
        # twisted.web answers a bare "400 Bad Request"; answer in JSON.
        if self.transport is not None:
            self.transport.write(
                raw_error_response(
                    bad_http(
                        "The request could not be parsed: line or headers too long, too many headers, "
                        "or malformed framing."
                    )
                )
            )
        self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)
        self.site.lifecycle.closed(self)
        self.site.connection_closed(self)

    def close_gracefully(self) -> None:
        if self.requests and self.requests[-1].refused:
            # Answered, and still reading the rest of its body so the
            # answer is not lost to a reset: the body's end, or the linger,
            # closes it.
            return
        # The transport's close is idempotent and flushes first; the
        # channel's own loseConnection raises if called twice.
        if self.transport is not None:
            self.transport.loseConnection()


class ProxySite(Site):
    """
    The proxy's HTTP factory.

    @ivar max_body_bytes: the request body limit.
    @ivar lifecycle: serving or draining, and the requests in flight.
    @ivar metrics: counts every request.
    @ivar access_log: writes one entry per request.
    """

    requestFactory = ProxyRequest
    # Plain HTTP/1.1 channels (the proxy does not negotiate HTTP/2), so
    # the drain can track each connection.
    protocol = ProxyChannel  # type: ignore[assignment]
    # The startup report names every listener; "Starting factory" adds noise.
    noisy = False
    # Tracebacks go to the log only, never to a client.
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        *,
        max_body_bytes: int,
        idle_timeout: float,
        header_timeout: float = 10.0,
        body_timeout: float = 60.0,
        max_connections_per_ip: int = 256,
        gate: Optional[Gate] = None,
        lifecycle: Optional[Lifecycle] = None,
        metrics: Optional[Metrics] = None,
        access_log: Optional[AccessLog] = None,
        worker: Optional[int] = None,
        streamed_paths: frozenset[bytes] = frozenset(),
        reactor: Any = None,
    ) -> None:
        # No form parsing: the proxy only takes JSON, and twisted.web would
        # parse every request's Content-Type with the email package for it.
        super().__init__(resource, timeout=idle_timeout, reactor=reactor, parsePOSTFormSubmission=False)
        self.metrics = metrics if metrics is not None else Metrics()
        self.access_log: AccessLog = access_log if access_log is not None else TextAccessLog()
        self.max_body_bytes = max_body_bytes
        #: Which worker of a group this is (see oaiproxy.daemon.workers), if any.
        self.worker = worker
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections_per_ip = max_connections_per_ip
        self.max_all_connections_per_ip = max_connections_per_ip * ALL_CONNECTIONS_FACTOR
        self.gate = gate
        self.lifecycle = lifecycle or Lifecycle()
        #: Paths whose POST bodies go upstream as they arrive (uploads).
        self.streamed_paths = streamed_paths
        #: Per address: connections not admitted yet, and all of them.
        self._unadmitted: dict[str, int] = {}
        self._open: dict[str, int] = {}
        self._host_of: dict[ProxyChannel, str] = {}
        self._refusing: set[str] = set()
        self._tls_quiet_until = float("-inf")
        self._tls_unlogged = 0

    def streams_body(self, method: bytes, uri: bytes) -> bool:
        """
        Whether a request's body is to be streamed rather than read whole
        before the request is processed.
        """
        if method != b"POST" or not self.streamed_paths:
            # Every request asks: keep the common answer cheap.
            return False
        # Unquoted segment by segment, as twisted.web's traversal does.
        path = b"/".join(unquote_to_bytes(segment) for segment in uri.split(b"?", 1)[0].split(b"/"))
        return path in self.streamed_paths

    def startFactory(self) -> None:
        super().startFactory()
        global _open_files_checked
        if not _open_files_checked:
            # Once per process, when its first listener opens.
            _open_files_checked = True
            check_open_files(self.max_all_connections_per_ip)

    def buildProtocol(self, addr: Any) -> Any:
        """
        Refuse a connection from an address that already has
        C{max_connections_per_ip} open that have not passed the gate, or
        L{ALL_CONNECTIONS_FACTOR} times as many in all: one client cannot
        take every socket the process has, yet an app server holding
        thousands of streams for its users is served.
        """
        host = getattr(addr, "host", None)
        if host is not None:
            if self._unadmitted.get(host, 0) >= self.max_connections_per_ip:
                return self._refuse(
                    host, "{limit} open that have not presented a valid client key", self.max_connections_per_ip
                )
            if self._open.get(host, 0) >= self.max_all_connections_per_ip:
                return self._refuse(host, "{limit} open", self.max_all_connections_per_ip)
        channel = super().buildProtocol(addr)
        if host is not None and channel is not None:
            self._unadmitted[host] = self._unadmitted.get(host, 0) + 1
            self._open[host] = self._open.get(host, 0) + 1
            self._host_of[channel] = host
        return channel

    def _refuse(self, host: str, why: str, limit: int) -> None:
        if host not in self._refusing:
            # Said once per episode, not once per refused connection.
            self._refusing.add(host)
            _log.warn("refusing connections from {client}: " + why, client=host, limit=limit)
        return None

    def admit(self, channel: ProxyChannel, request: Request, has_body: bool) -> bool:
        """
        A request's headers are in: check them with the gate before any of
        its body is read.

        A request that passes admits its connection, which stops counting
        against C{max_connections_per_ip}.  One that fails may not send a
        body: it is answered before its body (see
        L{ProxyRequest.answer_without_body}).  Without a body there is
        nothing to hold, and it is served as usual (its route answers a
        401, C{/health} needs no key).  Without a gate (no client keys to
        check) every request passes.

        @return: whether the request's body may be read.
        """
        if self.gate is None or self.gate(request):
            if not channel.admitted:
                channel.admitted = True
                host = self._host_of.get(channel)
                if host is not None:
                    _decrement(self._unadmitted, host)
            return True
        return not has_body

    def connection_closed(self, channel: ProxyChannel) -> None:
        host = self._host_of.pop(channel, None)
        if host is None:
            return
        _decrement(self._open, host)
        if not channel.admitted:
            _decrement(self._unadmitted, host)
        self._refusing.discard(host)

    def connections_from(self, host: str) -> tuple[int, int]:
        """
        The connections open from C{host}: those not admitted yet, and all.
        """
        return self._unadmitted.get(host, 0), self._open.get(host, 0)

    def tls_on_plain_port(self, channel: ProxyChannel) -> None:
        """
        A client began a TLS handshake on this plain-HTTP listener (an
        C{https://} URL for an C{http://} port): say so, at most once per
        L{TLS_NOTICE_SECONDS}, so that nobody can flood the log with
        handshakes.
        """
        now = self.reactor.seconds()
        if now < self._tls_quiet_until:
            self._tls_unlogged += 1
            return
        self._tls_quiet_until = now + TLS_NOTICE_SECONDS
        unlogged, self._tls_unlogged = self._tls_unlogged, 0
        _notice.warn(
            "closed a connection from {client} that began a TLS handshake on a plain-HTTP listener: "
            "use http:// or an ssl: endpoint{more}",
            client=getattr(channel.transport.getPeer(), "host", "-") if channel.transport else "-",
            more=f" ({unlogged} more since the last notice)" if unlogged else "",
        )

    def log(self, request: Any) -> None:
        """
        Do nothing: L{ProxyRequest} logs itself, including requests that
        end without C{finish()}, which twisted.web would never report.
        """


def _decrement(counts: dict[str, int], host: str) -> None:
    count = counts.get(host, 0) - 1
    if count > 0:
        counts[host] = count
    else:
        counts.pop(host, None)


_open_files_checked = False


def check_open_files(per_address: int, limits: Any = None) -> int:
    """
    Raise the process's soft limit on open files to its hard limit, and
    warn if what is left cannot hold L{STREAMS_WANTED} streams: each takes
    two descriptors (the client's connection and the upstream's), and the
    usual soft limit of 1,024 would cut a busy proxy off at about 480 with
    "Too many open files".

    @param per_address: the most connections one address may hold.
    @param limits: where C{getrlimit}, C{setrlimit}, C{RLIMIT_NOFILE} and
        C{RLIM_INFINITY} come from (the C{resource} module; injected by
        tests).
    @return: the concurrent streams the limit leaves room for.
    """
    limits = limits if limits is not None else _resource
    if limits is None:  # pragma: no cover - not on Windows
        return STREAMS_WANTED
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    infinity = limits.RLIM_INFINITY
    target = _FD_UNLIMITED if hard == infinity else hard
    if soft != infinity and soft < target:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            _notice.warn(
                "could not raise the open-file limit from {soft} to {target}: {why}",
                soft=soft,
                target=target,
                why=str(e),
            )
        else:
            _notice.info("raised the open-file limit from {soft} to {target}", soft=soft, target=target)
            soft = target
    streams = _FD_UNLIMITED if soft == infinity else max((soft - _FD_RESERVE) // 2, 0)
    if streams < STREAMS_WANTED:
        _notice.warn(
            "the open-file limit ({limit}) leaves room for about {streams} concurrent streams (each takes a "
            "client and an upstream connection), fewer than {wanted}: raise it (ulimit -n, or LimitNOFILE= "
            "in the systemd unit)",
            limit=soft,
            streams=streams,
            wanted=STREAMS_WANTED,
        )
    if per_address < STREAMS_WANTED:
        _notice.warn(
            "one client address may hold at most {count} connections ({factor} x --max-connections-per-ip), "
            "fewer than {wanted} streams",
            count=per_address,
            factor=ALL_CONNECTIONS_FACTOR,
            wanted=STREAMS_WANTED,
        )
    return streams
