# -*- test-case-name: tests.routes.test_chat,tests.test_routetable -*-
"""
One request's trip upstream and back, shared by every forwarding route
(admission, before it, is L{oaiproxy.access.admission}).

A request is sent upstream unchanged; the upstream status, headers and body
come back as they arrive.  L{Exchange} follows the discipline twisted.web
requires of asynchronous resources (and that klein's
C{KleinResource.render} models): the resource returns C{NOT_DONE_YET}, the
exchange tracks whether the client is still there through C{notifyFinish},
cancels the upstream work when it is not, and never calls C{finish()} on a
request whose connection is gone.

With several upstreams it is also where failover happens: the request
goes to the candidate L{oaiproxy.upstream.pool.Pool.choose} gives, and on
an outcome that fails over (L{oaiproxy.upstream.pool.decide}) while
nothing has reached the client, to the next, at most C{max_attempts} in
all, each upstream once, within the read timeout overall
(L{oaiproxy.upstream.pool.Attempts}).  A JSON body is replayed from
memory; a streamed upload only if upstream took none of it.  Every
attempt's end is told to its upstream's breaker exactly once, whichever
way it ends (an answer, a failure, the client leaving), which is what
releases its in-flight count.
"""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any, Callable, Optional
from typing import Protocol as Interface

from twisted.internet import error as netError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webClient
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.server import Request

from oaiproxy.errors import (
    ApiError,
    model_not_found,
    not_found,
    sse_error_event,
    upstream_failed_mid_response,
    upstream_rejected_proxy_key,
    upstream_response_too_large,
    upstream_timeout,
    upstream_unreachable,
)
from oaiproxy.observe.records import RequestRecord
from oaiproxy.observe.usage import UsageEventFilter, UsageMeter
from oaiproxy.routetable import CHAT, Route
from oaiproxy.upstream.bodies import IStreamedBody
from oaiproxy.upstream.client import UpstreamClient, UpstreamTimeout
from oaiproxy.upstream.headers import client_request_id, client_response_headers
from oaiproxy.upstream.pool import Attempts, Choice, Kind, Outcome, advice, decide, refusal_error, retry_after_seconds
from oaiproxy.upstream.relay import BodyRelay, UpstreamIdle
from oaiproxy.upstream.styles import UpstreamStyle
from oaiproxy.upstream.upstreams import Upstreams
from oaiproxy.web import error_response, send_error, shown_path

__all__ = [
    "Exchange",
    "Allowance",
    "Collect",
    "BodyFor",
    "BoundedCollector",
    "COLLECT_LIMIT",
    "classify_upstream_failure",
]

#: What an exchange that reads its response whole (see L{BoundedCollector})
#: does with it: given the upstream status and the decoded body, the body
#: the client gets, or an error to answer instead.
Collect = Callable[[int, bytes], "bytes | ApiError"]

#: The request body one upstream gets, from its style (the model renamed
#: where its C{model_map} says so); see L{oaiproxy.routes.jsonapi}.
BodyFor = Callable[[UpstreamStyle], bytes]


class Allowance(Interface):
    """
    What an exchange needs of the client's hold on its limits (an
    L{oaiproxy.access.limits.Reservation}): the tokens it was admitted for,
    and a way to give back what the response did not use.  Declared here so
    that the exchange never reaches up to admission.
    """

    @property
    def estimate(self) -> int:
        """
        The tokens reserved when the request was admitted.
        """

    def settle(self, used_tokens: int) -> None:
        """
        Charge what the response used; once.
        """


def classify_upstream_failure(failure: Failure, connect_timeout: float) -> ApiError:
    """
    Turn a failure to get a response head from upstream into the error the
    client receives.

    Only exception class names reach the message: a formatted exception
    could quote a URL or a header.
    """
    if failure.check(UpstreamTimeout):
        return upstream_timeout(failure.value.seconds, "send a response")
    if failure.check(netError.TimeoutError):
        # "Cannot connect" is a bad gateway; 504 is kept for an upstream
        # that accepted the request and then stayed silent.
        return upstream_unreachable(f"no connection within {connect_timeout:g} seconds")
    if failure.check(webClient.ResponseNeverReceived, webClient.RequestTransmissionFailed):
        names = sorted({_reason(r.value) for r in getattr(failure.value, "reasons", [])}) or ["no response"]
        return upstream_unreachable(", ".join(names))
    return upstream_unreachable(_reason(failure.value))


def _reason(exception: BaseException) -> str:
    """
    A short, secret-free name for why a connection failed.
    """
    module = type(exception).__module__
    if module.startswith("OpenSSL") or module.startswith("service_identity"):
        # pyOpenSSL names its exception just "Error"; say what it means.
        return "TLS handshake failed: certificate not trusted or not for this host"
    return type(exception).__name__


def _failure_kind(failure: Failure) -> str:
    """
    The metrics' name for an upstream failure before the response head.
    """
    if failure.check(UpstreamTimeout):
        return "timeout"
    if failure.check(webClient.ResponseNeverReceived, webClient.RequestTransmissionFailed):
        return "reset"
    return "connect"


class _Discard(Protocol):
    """
    Reads a response body and throws it away (so the pooled connection can
    be reused).
    """

    def dataReceived(self, data: bytes) -> None:
        pass


class BodyTooLarge(Exception):
    """
    A response body read whole was larger than its limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BoundedCollector:
    """
    A L{oaiproxy.upstream.relay.Transform} that passes nothing on until the body
    has ended, then the whole body rewritten: for a response the proxy must
    read whole (a model list it filters).

    What it holds is bounded by C{limit} bytes of I{decoded} body (treq
    has already undone any gzip), so a gzip bomb or an endless upstream
    stops at the limit, not at the proxy's memory.

    @param finish: given the whole body, returns what the client gets.
    @param overflow: called once when the body passes C{limit}, to stop
        reading it.
    """

    def __init__(self, limit: int, finish: Callable[[bytes], bytes], overflow: Callable[[], None]) -> None:
        self._limit = limit
        self._finish = finish
        self._overflow = overflow
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def __call__(self, data: bytes) -> bytes:
        if self.overflowed:
            return b""
        self._size += len(data)
        if self._size > self._limit:
            self.overflowed = True
            self._chunks = []
            self._overflow()
            return b""
        self._chunks.append(data)
        return b""

    def flush(self) -> bytes:
        if self.overflowed:
            # A body without length ends at the close that stopped it,
            # which looks like a normal end: the exchange answers instead.
            return b""
        body = b"".join(self._chunks)
        self._chunks = []
        return self._finish(body)

    def discard(self) -> None:
        self._chunks = []


#: The most of a response body an exchange reads whole, decoded (a model
#: list to filter: OpenAI's is about 10 KB; lists of hundreds of models
#: with descriptions, as OpenRouter serves, stay in the low megabytes).
COLLECT_LIMIT = 8 * 1024 * 1024


def _drop_request_body(request: Request) -> None:
    """
    Let go of the client request's body, read and sent upstream:
    twisted.web keeps it in C{content} until the request is over, which
    for a stream is minutes (a long prompt's megabytes, for each open
    stream).  Only an in-memory body; C{content} stays a readable, empty
    file.
    """
    if type(getattr(request, "content", None)) is io.BytesIO:
        request.content = io.BytesIO()  # type: ignore[assignment]


class Exchange:
    """
    One client request's trip upstream and back: one attempt, or several
    when the upstreams fail over (see the module's docstring).

    @param upstream: the pool, or one client (made a pool of one).
    @param metered: the response's usage is this request's cost (not so
        for a stored response read back).
    @param collect: read the response body whole (at most
        C{collect_limit} bytes, decoded) and send the client what this
        makes of it, instead of relaying it as it comes.  The status and
        headers wait for the body, so a body that fails or grows too large
        is answered with an error of its own.  Everything else (the
        head timeout, the idle timeout on the body, an upstream that
        refuses the proxy's key) is as for any exchange.
    @param body_for: the body for an upstream's style, when it is not the
        same for all (see L{BodyFor}).

    @ivar finished: the client request is over, either finished by us or
        disconnected; nothing may be written to it any more.
    """

    # One per request, kept for a stream's minutes: slots instead of an
    # instance dictionary (31 attributes outgrow CPython's shared-key
    # dictionaries; 1.6 KB a stream against 0.3 KB; issue 17).
    __slots__ = (
        "_request",
        "_collect",
        "_collect_limit",
        "_collector",
        "_route",
        "_metered",
        "_record",
        "_strip_usage",
        "_sse_keepalive",
        "_upstreams",
        "_body_for",
        "_clock",
        "_connect_timeout",
        "_log",
        "_reservation",
        "_prompt_estimate",
        "_pending",
        "_body",
        "_relay",
        "_meter",
        "_event_stream",
        "_body_whole",
        "finished",
        "_attempts",
        "_choice",
        "_upstream",
        "_deadline",
        "_cut",
        "_held",
        "_sent",
    )

    def __init__(
        self,
        request: Request,
        upstream: "Upstreams | UpstreamClient",
        clock: IReactorTime,
        connect_timeout: float,
        log: Logger,
        reservation: Allowance,
        prompt_estimate: int,
        record: RequestRecord,
        route: Route = CHAT,
        strip_usage: bool = False,
        sse_keepalive: float = 0.0,
        metered: bool = True,
        collect: Optional[Collect] = None,
        collect_limit: int = COLLECT_LIMIT,
        body_for: Optional[BodyFor] = None,
    ) -> None:
        self._request = request
        self._collect = collect
        self._collect_limit = collect_limit
        self._collector: Optional[BoundedCollector] = None
        self._route = route
        self._metered = metered
        self._record = record
        self._strip_usage = strip_usage
        self._sse_keepalive = sse_keepalive
        self._upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams.of(upstream, clock)
        self._body_for = body_for
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._log = log
        self._reservation = reservation
        self._prompt_estimate = prompt_estimate
        self._pending: Optional[Deferred[IResponse]] = None
        self._body: "Optional[bytes | IBodyProducer]" = None
        self._relay: Optional[BodyRelay] = None
        self._meter: Optional[UsageMeter] = None
        self._event_stream = False
        #: The upstream body arrived whole.
        self._body_whole = False
        self.finished = False
        self._attempts: Optional[Attempts] = None
        #: The attempt in progress, until its outcome is reported.
        self._choice: Optional[Choice] = None
        self._upstream: Optional[UpstreamClient] = None
        #: The first-byte deadline of the attempt in progress, and whether
        #: it cut the attempt.
        self._deadline: Optional[IDelayedCall] = None
        self._cut: Optional[float] = None
        #: A stream's head, held until its first byte (see _first_byte).
        self._held: Optional[IResponse] = None
        self._sent: tuple[str, str, Optional[str], bytes] = ("POST", "", None, b"")

    def start(
        self,
        body: "Optional[bytes | IBodyProducer]",
        method: str = "POST",
        path: Optional[str] = None,
        model: Optional[str] = None,
        query: bytes = b"",
    ) -> None:
        """
        Send the request upstream: to the first candidate of the pool.

        @param path: below the API base; the route's own path by default.
        @param model: the model named, for an Azure deployment, and for
            the upstreams that serve it.
        """
        path = path or self._route.path
        upstreams = self._upstreams
        self._body = body
        self._sent = (method, path, model, query)
        attempts = self._attempts = Attempts(upstreams.pool, model, upstreams.max_attempts, upstreams.read_timeout)
        choice = attempts.next()
        if not isinstance(choice, Choice):
            self.finished = True
            self._reservation.settle(0)
            assert choice is not None
            # (Debug: in an outage every request would say it; the breakers'
            # transitions and the access log's 503s already do, once each.)
            self._log.debug(
                "no upstream can take a request for {model}: {status}",
                model=model,
                status="none serves it" if not choice.serves else "every one is out",
            )
            send_error(self._request, refusal_error(choice))
            return
        self._request.notifyFinish().addBoth(self._client_done)
        self._send(choice)

    def _send(self, choice: Choice) -> None:
        """
        One attempt, on the upstream of C{choice}.
        """
        method, path, model, query = self._sent
        attempts = self._attempts
        assert attempts is not None
        self._choice = choice
        name = choice.member.name
        upstream = self._upstream = self._upstreams.client(name)
        self._relay, self._meter, self._collector, self._event_stream = None, None, None, False
        self._cut = self._held = None
        record = self._record
        record.upstream, record.attempts = name, attempts.attempts
        if not upstream.style.addressable(path, model):
            # The resources refuse ids that are not one path segment before
            # they get here; this is the last line, for every route.
            self._log.warn("refused to send {method} to an upstream path that is not its own", method=method)
            self._end_attempt(Outcome(Kind.CANCELLED))
            self.finished = True
            self._reservation.settle(0)
            if upstream.style.addressable(path, None):
                send_error(self._request, model_not_found(model or ""))
            else:
                send_error(self._request, not_found(method, shown_path(self._request.path)))
            return
        body = self._body
        if self._body_for is not None:
            body = self._body_for(upstream.style)
        now = self._clock.seconds()
        if record.upstream_sent is None:
            # From the first attempt: the time failing over took is the
            # upstreams', not the proxy's own overhead.
            record.upstream_sent = now
        timeout = None
        if attempts.attempts > 1:
            # Within the read timeout overall.
            timeout = max(0.001, min(upstream.read_timeout, attempts.deadline - now))
        pending = upstream.request(method, path, body, self._request.requestHeaders, model, query, timeout)
        self._pending = pending
        if record.stream:
            first_byte = attempts.first_byte_deadline(self._upstreams.first_byte_timeout)
            if first_byte is not None:
                self._deadline = self._clock.callLater(first_byte, self._first_byte_late, first_byte)
        pending.addCallbacks(self._got_head, self._no_head)
        pending.addErrback(self._bug)

    def _first_byte_late(self, seconds: float) -> None:
        """
        A stream's first body byte is late: cut this attempt (its handler
        then tries the next candidate).
        """
        self._deadline = None
        self._cut = seconds
        self._log.info(
            "upstream {upstream} sent no first byte within {seconds:g}s; trying the next",
            upstream=self._record.upstream,
            seconds=seconds,
        )
        if self._relay is not None:
            self._relay.abort()
        elif self._pending is not None:
            self._pending.cancel()

    def _first_byte(self, response: IResponse) -> None:
        """
        The first body byte of a stream whose head was held for the
        first-byte deadline: the client gets the head now.
        """
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._held = None
        self._send_head(response, None if response.length is UNKNOWN_LENGTH else response.length)
        self._request.write(b"")

    def _end_attempt(self, outcome: Outcome) -> bool:
        """
        Report the attempt in progress (once; later calls do nothing):
        its breaker and in-flight count hear of it.  C{True} when the
        request should try the next candidate.
        """
        choice, self._choice = self._choice, None
        if choice is None:
            return False
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        attempts = self._attempts
        assert attempts is not None
        go_on = attempts.report(outcome)
        self._upstreams.attempted(choice.member.name, outcome)
        return go_on

    def _next(self, go_on: bool) -> Optional[Choice]:
        """
        The next candidate, when the last outcome fails over and one can
        take the request.
        """
        if not go_on or self.finished:
            return None
        attempts = self._attempts
        assert attempts is not None
        choice = attempts.next()
        if isinstance(choice, Choice):
            failed, reason = attempts.failovers[-1]
            self._log.info(
                "upstream {upstream} failed ({reason}); trying {next}",
                upstream=failed,
                reason=reason,
                next=choice.member.name,
            )
            return choice
        return None

    def _replayable(self) -> bool:
        """
        Whether the body can go to another upstream: one in memory always,
        a streamed upload only if upstream took none of it (what it took
        is gone).
        """
        body: Any = self._body
        return not (IStreamedBody.providedBy(body) and body.sent)

    def _advice(self, headers: "tuple[tuple[bytes, bytes], ...]") -> "tuple[tuple[bytes, bytes], ...]":
        """
        The retry advice headers (see L{oaiproxy.upstream.pool.advice}) not
        already in C{headers}, for an answer after every attempt failed.
        """
        attempts = self._attempts
        assert attempts is not None
        told = advice(attempts.pool, attempts.model, attempts.last)
        names = {name.lower() for name, _ in headers}
        extra: list[tuple[bytes, bytes]] = []
        if not told.retry and b"x-should-retry" not in names:
            extra.append((b"x-should-retry", b"false"))
        if told.after is not None and b"retry-after" not in names:
            extra.append((b"retry-after", b"%d" % max(1, -int(-told.after // 1))))
        return tuple(extra)

    def _settle(self) -> None:
        """
        Charge the client's token allowance with what the response used: as
        reported, or as estimated from what was streamed (see
        L{oaiproxy.access.limits}).  Idempotent, and it never fails to release the
        reservation (its concurrency slot above all): whatever goes wrong
        in the metering is logged once, and the reservation is charged.
        """
        try:
            charge = self._charge()
        except Exception:
            self._log.failure("bug while metering a response; charging its reservation")
            charge = max(self._prompt_estimate, self._reservation.estimate)
        self._reservation.settle(charge)

    def _charge(self) -> int:
        """
        The tokens the response cost, for L{_settle}.
        """
        meter = self._meter
        if not self._metered:
            # Reading a stored response: its usage was charged when it was
            # made.
            return 0
        if meter is None:
            # No response head: the upstream was cancelled or failed early,
            # and only the prompt may have been processed.
            return self._prompt_estimate
        unread = meter.failed is not None or meter.incomplete
        if meter.failed is not None:
            self._log.failure(
                "the usage meter failed on an upstream response; its output goes uncounted", failure=meter.failed
            )
        status = self._record.upstream_status
        if status is not None and status >= 400 and meter.reported is None:
            # Upstream refused the request (429, 401, 5xx...): nothing was
            # generated, and charging the client would make its retries
            # through an upstream rate limit exhaust its own allowance.
            return 0
        usage = meter.usage(self._prompt_estimate)
        self._record.usage = usage
        # A plain answer is generated whole before its head is sent: cut
        # short (upstream broke, or the client hung up at the head), its
        # output was made, and paid upstream, but never counted.
        cut = not self._event_stream and not self._body_whole
        if meter.reported is None and (unread or cut):
            # Part of the output could not be counted: the reservation (the
            # most the request was admitted for) is the floor.
            return max(usage.total, self._reservation.estimate)
        return usage.total

    def _client_done(self, result: Optional[Failure]) -> None:
        # The client's request is over, so no attempt follows (see _next):
        # an upstream connection still sending its copy of the body can
        # outlast the answer (issue 17: 1 MB bodies at 8 concurrent held
        # about 27 bodies and parsed documents at once).
        self._release_body()
        if self.finished:
            return
        self.finished = True
        if isinstance(result, Failure):
            # Nothing said about the upstream: its breaker only gets the
            # slot back.
            self._end_attempt(Outcome(Kind.CANCELLED))
            if self._meter is not None and self._meter.ended:
                # The client read the stream's end event and hung up before
                # upstream's last bytes, as the openai SDKs do after
                # "data: [DONE]": it did not leave early.
                self._record.end_sent = True
                self._log.debug(
                    "client closed {method} {path} after the end of the stream",
                    method=self._request.method.decode("latin-1"),
                    path=self._request.path.decode("latin-1"),
                )
            else:
                self._log.info(
                    "client went away during {method} {path}; upstream request cancelled",
                    method=self._request.method.decode("latin-1"),
                    path=self._request.path.decode("latin-1"),
                )
            if self._relay is not None:
                self._relay.abort()
            elif self._pending is not None:
                self._pending.cancel()
        self._settle()

    def _got_head(self, response: IResponse) -> None:
        self._pending = None
        if self.finished:
            response.deliverBody(_Discard())
            return
        record = self._record
        record.upstream_head = self._clock.seconds()
        record.upstream_status = response.code
        record.upstream_request_id = client_request_id((response.headers.getRawHeaders(b"x-request-id") or [None])[0])
        record.upstream_error = "status" if response.code >= 500 else None
        if decide(Outcome(Kind.ANSWERED, response.code)).fail_over and self._failed_over(response):
            return
        if response.code == 401:
            self._proxy_key_rejected(response)
            return
        request = self._request
        held = self._deadline is not None and self._collect is None
        if held:
            self._held = response
        if self._collect is None:
            if not held:
                self._send_head(response, None if response.length is UNKNOWN_LENGTH else response.length)
        else:
            self._collector = self._collector_for(response)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        self._event_stream = content_type.lower().startswith(b"text/event-stream")
        json_body = content_type.lower().startswith(b"application/json")
        self._meter = UsageMeter(self._event_stream, self._route.text_keys, plain=json_body)
        if self._collector is None and not held:
            # Send the head now, as upstream did, so a client sees the status
            # of a long stream before its first token.
            request.write(b"")
        assert self._upstream is not None
        self._relay = BodyRelay(
            request,
            self._clock,
            self._upstream.read_timeout,
            self._body_done,
            # A body read whole (a model list) has no usage to meter.
            observe=self._meter.feed if self._collector is None else None,
            transform=self._collector or (UsageEventFilter() if (self._strip_usage and self._event_stream) else None),
            keepalive=self._sse_keepalive if self._event_stream else 0.0,
            first=(lambda: self._first_byte(response)) if held else None,
        )
        response.deliverBody(self._relay)

    def _failed_over(self, response: IResponse) -> bool:
        """
        An answer another upstream may answer better (a 429, a 5xx of the
        upstream's own, a refused key, which its breaker logs as critical):
        report it, and when a next
        candidate takes the request, drop this answer and go there.  When
        none does, this is the client's answer, with the retry advice.
        """
        code = response.code
        headers = response.headers
        retry_after = retry_after_seconds(
            (headers.getRawHeaders(b"retry-after") or [None])[0],
            (headers.getRawHeaders(b"retry-after-ms") or [None])[0],
            self._clock.seconds(),
        )
        go_on = self._end_attempt(Outcome(Kind.ANSWERED, code, retry_after))
        choice = self._next(go_on and self._replayable())
        if choice is not None:
            response.deliverBody(_Discard())
            self._send(choice)
            return True
        for name, value in self._advice(tuple((n, v) for n, vs in headers.getAllRawHeaders() for v in vs)):
            self._request.responseHeaders.setRawHeaders(name, [value])
        return False

    def _send_head(self, response: IResponse, length: Optional[int]) -> None:
        """
        Upstream's status and headers, for a body of C{length} bytes (or
        one framed by twisted.web).
        """
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        for name, values in client_response_headers(response.headers, length):
            request.responseHeaders.setRawHeaders(name, values)
        if self._deadline is None:
            # The client has this answer's head and no first-byte deadline
            # can cut it: no attempt follows.  A stream may stay open for
            # minutes; its body is not needed for them.
            self._release_body()
            _drop_request_body(request)

    def _release_body(self) -> None:
        """
        Let go of an in-memory body and its variants for other styles (with
        the parsed document): once no attempt can follow, only memory.  An
        upload's pipe stays (it is still being read, and refuses the rest).
        """
        if not IStreamedBody.providedBy(self._body):
            self._body = None
        self._body_for = None

    def _collector_for(self, response: IResponse) -> BoundedCollector:
        """
        The transform that reads C{response}'s body whole, then sets the
        head for what the client gets.
        """
        collect = self._collect
        assert collect is not None

        def finish(body: bytes) -> bytes:
            answer = collect(response.code, body)
            if isinstance(answer, ApiError):
                return error_response(self._request, answer)
            self._send_head(response, len(answer))
            return answer

        def overflow() -> None:
            if self._relay is not None:
                self._relay.abort()

        return BoundedCollector(self._collect_limit, finish, overflow)

    def _proxy_key_rejected(self, response: IResponse) -> None:
        """
        Upstream refused the proxy's key: the operator's problem, not the
        client's.  Its body (which quotes part of the key) is dropped.
        """
        self._record.upstream_error = "status"
        response.deliverBody(_Discard())
        self.finished = True
        self._reservation.settle(0)
        send_error(self._request, upstream_rejected_proxy_key())

    def _no_head(self, failure: Failure) -> None:
        self._pending = None
        if self._cut is not None and not self.finished:
            self._cut_short(self._cut)
            return
        if self.finished:
            # The client left and we cancelled: whatever the failure says,
            # nobody is waiting for an answer.
            return
        error = classify_upstream_failure(failure, self._connect_timeout)
        body: Any = self._body
        streamed = IStreamedBody.providedBy(body)
        if streamed and body.refusal is not None:
            # The proxy stopped the upload on its way (too large, or a form
            # it cannot vouch for): that is the answer, whatever became of
            # the upstream request.  It says nothing about the upstream.
            self._end_attempt(Outcome(Kind.CANCELLED))
            error = body.refusal
        else:
            kind = _failure_kind(failure)
            go_on = self._end_attempt(Outcome(Kind.CONNECT if kind == "connect" else Kind.NO_HEAD))
            choice = self._next(go_on and self._replayable())
            if choice is not None:
                self._send(choice)
                return
        if error.status >= 500:
            # (A 4xx here is the proxy refusing an upload on its way.)
            self._record.upstream_error = _failure_kind(failure)
            error = replace(error, headers=error.headers + self._advice(error.headers))
        self._log.warn(
            "upstream gave no response: {status} {code} ({message})",
            status=error.status,
            code=error.code,
            message=error.message,
        )
        self.finished = True
        # A connection that never carried the request cost nothing; one that
        # failed after sending it (a timeout, a reset) may have been billed
        # for the prompt.
        self._reservation.settle(0 if self._record.upstream_error == "connect" else self._prompt_estimate)
        send_error(self._request, error)

    def _cut_short(self, seconds: float) -> None:
        """
        The first-byte deadline cut the attempt: the next candidate (the
        deadline is armed only when one could take the request), else a
        504.
        """
        self._record.upstream_error = "timeout"
        if self._relay is not None:
            # The head came, the body did not: the relay had become the
            # client's producer.
            self._relay = None
            self._request.unregisterProducer()
        choice = self._next(self._end_attempt(Outcome(Kind.FIRST_BYTE)))
        if choice is not None:
            self._send(choice)
            return
        self.finished = True
        self._reservation.settle(self._prompt_estimate)
        error = upstream_timeout(seconds, "send the first byte of its stream")
        send_error(self._request, replace(error, headers=error.headers + self._advice(error.headers)))

    def _body_done(self, failure: Optional[Failure]) -> None:
        if self._cut is not None and not self.finished:
            # (The first byte would have disarmed the deadline.)
            self._cut_short(self._cut)
            return
        if self.finished:
            return
        status = self._record.upstream_status
        if self._held is not None:
            # A body that ended before any byte of it: its head is due.
            self._first_byte(self._held)
        if failure is None and not (self._collector is not None and self._collector.overflowed):
            self._end_attempt(Outcome(Kind.ANSWERED, status))
        else:
            self._end_attempt(Outcome(Kind.BROKEN, status, reached_client=True))
        self.finished = True
        if self._meter is not None and failure is None:
            # (It never raises: a failure is kept for _settle to log.)
            self._meter.finish()
            self._body_whole = True
        self._settle()
        request = self._request
        request.unregisterProducer()
        if self._collector is not None and self._collector.overflowed:
            failure = Failure(BodyTooLarge(self._collect_limit))
        if failure is None:
            request.finish()
            return
        if failure.check(BodyTooLarge):
            reason = f"over {self._collect_limit} bytes"
            self._record.upstream_error = "status"
        elif failure.check(UpstreamIdle):
            reason = f"no data for {failure.value.seconds:g} seconds"
            self._record.upstream_error = "timeout"
        else:
            reason = type(failure.value).__name__
            self._record.upstream_error = "reset"
        self._log.warn("upstream response cut short: {reason}", reason=reason)
        if self._collector is not None:
            # Nothing was sent yet: the client gets an answer of its own.
            send_error(request, self._collected_failure(failure, reason))
            return
        if self._event_stream and self._relay is not None and self._relay.at_boundary:
            # The status line is long gone; the SDKs raise APIError on an
            # event whose JSON has an "error" key.  (Glued onto half an
            # event it would only corrupt that event: then the truncation
            # alone reports the failure.)
            request.write(sse_error_event(upstream_failed_mid_response(reason)))
        # Close without the final chunk, so no client can take the partial
        # body for a complete one.
        request.loseConnection()

    def _collected_failure(self, failure: Failure, reason: str) -> ApiError:
        """
        The answer for a body read whole that did not arrive whole.
        """
        if failure.check(BodyTooLarge):
            return upstream_response_too_large(self._collect_limit)
        if failure.check(UpstreamIdle):
            return upstream_timeout(failure.value.seconds, "send the rest of its response")
        return upstream_failed_mid_response(reason)

    def _bug(self, failure: Failure) -> None:
        self._log.failure("bug while relaying a response", failure=failure)
        self._end_attempt(Outcome(Kind.CANCELLED))
        self._reservation.settle(self._prompt_estimate)
        if not self.finished:
            self.finished = True
            self._request.loseConnection()
