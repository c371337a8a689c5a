# -*- test-case-name: tests.test_chat -*-
"""
C{POST /v1/chat/completions}: check, forward, relay.

The request body is validated, then sent upstream unchanged; the upstream
status, headers and body come back as they arrive.  The render method
follows the discipline twisted.web requires of asynchronous resources (and
that klein's C{KleinResource.render} models): it returns C{NOT_DONE_YET},
tracks whether the client is still there through C{notifyFinish}, cancels
the upstream work when it is not, and never calls C{finish()} on a request
whose connection is gone.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import error as netError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webClient
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.clients import Client, Credentials, Limits, looks_like_openai_key
from oaiproxy.errors import (
    ApiError,
    draining,
    invalid_api_key,
    model_not_allowed,
    openai_key_sent,
    rate_limited,
    sse_error_event,
    upstream_failed_mid_response,
    upstream_rejected_proxy_key,
    upstream_timeout,
    upstream_unreachable,
)
from oaiproxy.headers import bearer_token, client_request_id, client_response_headers
from oaiproxy.lifecycle import Lifecycle
from oaiproxy.limits import UNLIMITED, Limiter, Refusal, Reservation, estimate_tokens
from oaiproxy.records import RequestRecord, record_of
from oaiproxy.relay import BodyRelay, UpstreamIdle
from oaiproxy.resources import Endpoint, error_response, send_error
from oaiproxy.upstream import UpstreamClient, UpstreamTimeout
from oaiproxy.usage import UsageEventFilter, UsageMeter, inject_include_usage
from oaiproxy.validation import parse_chat_request

__all__ = ["ChatCompletionsResource", "classify_upstream_failure", "read_body"]

CHAT_COMPLETIONS = "/chat/completions"


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
        reasons = getattr(failure.value, "reasons", [])
        names = sorted({_reason(r.value) for r in reasons}) or ["no response"]
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


def authenticate(request: Request, credentials: Credentials) -> "Optional[Client] | ApiError":
    """
    Who is asking: the client whose key the request carries (C{None} when
    the proxy has no client keys), or the error to answer with.  A request
    carrying what looks like an OpenAI key is refused either way.  The
    client's name goes on the request's record, for logs and metrics.
    """
    token = bearer_token(request.requestHeaders)
    clients = credentials.clients
    client = clients.identify(token) if (token is not None and len(clients)) else None
    if token is not None and client is None and looks_like_openai_key(token):
        return openai_key_sent()
    if len(clients) and client is None:
        return invalid_api_key()
    if client is not None:
        # Who, never with what key.
        record_of(request).client = client.name
    return client


def read_body(request: Request) -> bytes:
    """
    The whole request body.  L{oaiproxy.site.ProxyRequest} keeps it in
    memory; a plain twisted.web request may have spooled it to a file.
    """
    content: Any = request.content
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        body: bytes = getvalue()
        return body
    content.seek(0)
    data: bytes = content.read()
    return data


class ForwardingResource(Endpoint):
    """
    What every forwarding endpoint shares: its collaborators, and the
    admission every request passes first (not draining, a valid client).

    @param upstream: where requests go.
    @param clock: the clock for timeouts and records.
    @param credentials: the clients allowed in (none: no client auth); read
        per request, so a reload applies at once.
    @param lifecycle: tells whether the proxy is draining.
    @param connect_timeout: named in the 502 for a connect timeout.
    """

    log = Logger()

    def __init__(
        self,
        upstream: UpstreamClient,
        clock: IReactorTime,
        credentials: Credentials,
        lifecycle: Optional[Lifecycle] = None,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._clock = clock
        self._credentials = credentials
        self._lifecycle = lifecycle or Lifecycle()
        self._connect_timeout = connect_timeout

    def _admit(self, request: Request, route: str) -> "Optional[Client] | bytes":
        """
        The client making the request (C{None} without client auth), or the
        body of the error already set on the request.
        """
        if self._lifecycle.draining:
            return error_response(request, draining())
        client = authenticate(request, self._credentials)
        if isinstance(client, ApiError):
            return error_response(request, client)
        record_of(request).route = route
        return client


class ChatCompletionsResource(ForwardingResource):
    """
    The chat completions endpoint.

    Before anything goes upstream a request passes, in order: the client
    key check, body validation, the client's model allow-list, and the
    client's limits.  Each refusal is an OpenAI-shaped error.

    Collaborators as for L{ForwardingResource}, and:

    @param limiter: the clients' limit state.
    @param stream_usage: ask upstream for usage on streams whose client did
        not, and remove it before the client sees it (exact token counts;
        the one change the proxy makes to a request body).
    @param sse_keepalive: seconds of upstream silence in a stream after
        which a C{: keepalive} comment is sent; 0 for never.
    """

    def __init__(
        self,
        upstream: UpstreamClient,
        clock: IReactorTime,
        credentials: Credentials,
        lifecycle: Optional[Lifecycle] = None,
        connect_timeout: float = 10.0,
        limiter: Optional[Limiter] = None,
        stream_usage: bool = True,
        sse_keepalive: float = 15.0,
    ) -> None:
        super().__init__(upstream, clock, credentials, lifecycle, connect_timeout)
        self._limiter = limiter or Limiter(clock)
        self._stream_usage = stream_usage
        self._sse_keepalive = sse_keepalive

    def render_POST(self, request: Request) -> bytes | int:
        client = self._admit(request, "chat_completions")
        if isinstance(client, bytes):
            return client
        record = record_of(request)
        body = read_body(request)
        parsed = parse_chat_request(body)
        if isinstance(parsed, ApiError):
            return error_response(request, parsed)
        record.model = parsed.model
        record.stream = parsed.stream
        reservation: Reservation = UNLIMITED
        limits = client.limits if client is not None else Limits()
        prompt_estimate, estimate = estimate_tokens(body, parsed.document, limits)
        if client is not None:
            if not client.allows(parsed.model):
                return error_response(request, model_not_allowed(client.name, parsed.model))
            admitted = self._limiter.admit(client, estimate)
            if isinstance(admitted, Refusal):
                self.log.info(
                    "client {client} over its {limit} limit",
                    client=client.name,
                    limit=admitted.limit,
                )
                headers = tuple(self._limiter.headers(client))
                return error_response(request, rate_limited(admitted.message, admitted.retry_after, headers))
            reservation = admitted
        strip_usage = False
        if parsed.stream and self._stream_usage:
            injected = inject_include_usage(body, parsed.document)
            if injected is not None:
                body, strip_usage = injected, True
        exchange = _Exchange(
            request,
            self._upstream,
            self._clock,
            self._connect_timeout,
            self.log,
            reservation,
            prompt_estimate,
            record,
            strip_usage,
            self._sse_keepalive,
        )
        exchange.start(body)
        return NOT_DONE_YET


class _Discard(Protocol):
    """
    Reads a response body and throws it away (so the pooled connection can
    be reused).
    """

    def dataReceived(self, data: bytes) -> None:
        pass


class _Exchange:
    """
    One client request's trip upstream and back.

    @ivar finished: the client request is over, either finished by us or
        disconnected; nothing may be written to it any more.
    """

    def __init__(
        self,
        request: Request,
        upstream: UpstreamClient,
        clock: IReactorTime,
        connect_timeout: float,
        log: Logger,
        reservation: Reservation,
        prompt_estimate: int,
        record: RequestRecord,
        strip_usage: bool = False,
        sse_keepalive: float = 0.0,
    ) -> None:
        self._request = request
        self._record = record
        self._strip_usage = strip_usage
        self._sse_keepalive = sse_keepalive
        self._upstream = upstream
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._log = log
        self._reservation = reservation
        self._prompt_estimate = prompt_estimate
        self._pending: Optional[Deferred[IResponse]] = None
        self._relay: Optional[BodyRelay] = None
        self._meter: Optional[UsageMeter] = None
        self._event_stream = False
        self.finished = False

    def start(self, body: Optional[bytes], method: str = "POST", path: str = CHAT_COMPLETIONS) -> None:
        self._request.notifyFinish().addBoth(self._client_done)
        self._record.upstream_sent = self._clock.seconds()
        pending = self._upstream.request(method, path, body, self._request.requestHeaders)
        self._pending = pending
        pending.addCallbacks(self._got_head, self._no_head)
        pending.addErrback(self._bug)

    def _settle(self) -> None:
        """
        Charge the client's token allowance with what the response used: as
        reported, or as estimated from what was streamed (see
        L{oaiproxy.limits}).  Idempotent.
        """
        meter = self._meter
        if meter is None:
            # No response head: the upstream was cancelled or failed early,
            # and only the prompt may have been processed.
            self._reservation.settle(self._prompt_estimate)
            return
        status = self._record.upstream_status
        if status is not None and status >= 400 and meter.reported is None:
            # Upstream refused the request (429, 401, 5xx...): nothing was
            # generated, and charging the client would make its retries
            # through an upstream rate limit exhaust its own allowance.
            self._reservation.settle(0)
            return
        usage = meter.usage(self._prompt_estimate)
        self._record.usage = usage
        self._reservation.settle(usage.total)

    def _client_done(self, result: Optional[Failure]) -> None:
        if self.finished:
            return
        self.finished = True
        if isinstance(result, Failure):
            self._log.info(
                "client went away during {method} {path}; upstream request cancelled",
                method="POST",
                path=self._request.path.decode("latin-1"),
            )
            if self._relay is not None:
                self._relay.abort()
            elif self._pending is not None:
                self._pending.cancel()
        self._settle()

    def _got_head(self, response: IResponse) -> None:
        self._pending = None
        record = self._record
        record.upstream_head = self._clock.seconds()
        record.upstream_status = response.code
        record.upstream_request_id = client_request_id((response.headers.getRawHeaders(b"x-request-id") or [None])[0])
        if response.code >= 500:
            record.upstream_error = "status"
        if response.code == 401:
            self._proxy_key_rejected(response)
            return
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        length = None if response.length is UNKNOWN_LENGTH else response.length
        for name, values in client_response_headers(response.headers, length):
            request.responseHeaders.setRawHeaders(name, values)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        self._event_stream = content_type.lower().startswith(b"text/event-stream")
        self._meter = UsageMeter(self._event_stream)
        # Send the head now, as upstream did, so a client sees the status of
        # a long stream before its first token.
        request.write(b"")
        self._relay = BodyRelay(
            request,
            self._clock,
            self._upstream.read_timeout,
            self._body_done,
            observe=self._meter.feed,
            transform=UsageEventFilter() if (self._strip_usage and self._event_stream) else None,
            keepalive=self._sse_keepalive if self._event_stream else 0.0,
        )
        response.deliverBody(self._relay)

    def _proxy_key_rejected(self, response: IResponse) -> None:
        """
        Upstream refused the proxy's key: the operator's problem, not the
        client's.  Its body (which quotes part of the key) is dropped.
        """
        self._record.upstream_error = "status"
        self._log.critical("the upstream API rejected the proxy's API key (401): check --api-key-file / OPENAI_API_KEY")
        response.deliverBody(_Discard())
        self.finished = True
        self._reservation.settle(0)
        send_error(self._request, upstream_rejected_proxy_key())

    def _no_head(self, failure: Failure) -> None:
        self._pending = None
        if self.finished:
            # The client left and we cancelled: whatever the failure says,
            # nobody is waiting for an answer.
            return
        error = classify_upstream_failure(failure, self._connect_timeout)
        self._record.upstream_error = _failure_kind(failure)
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

    def _body_done(self, failure: Optional[Failure]) -> None:
        if self.finished:
            return
        self.finished = True
        if self._meter is not None and failure is None:
            self._meter.finish()
        self._settle()
        request = self._request
        request.unregisterProducer()
        if failure is None:
            request.finish()
            return
        if failure.check(UpstreamIdle):
            reason = f"no data for {failure.value.seconds:g} seconds"
            self._record.upstream_error = "timeout"
        else:
            reason = type(failure.value).__name__
            self._record.upstream_error = "reset"
        self._log.warn("upstream response cut short: {reason}", reason=reason)
        if self._event_stream and self._relay is not None and self._relay.at_boundary:
            # The status line is long gone; the SDKs raise APIError on an
            # event whose JSON has an "error" key.  (Glued onto half an
            # event it would only corrupt that event: then the truncation
            # alone reports the failure.)
            request.write(sse_error_event(upstream_failed_mid_response(reason)))
        # Close without the final chunk, so no client can take the partial
        # body for a complete one.
        request.loseConnection()

    def _bug(self, failure: Failure) -> None:
        self._log.failure("bug while relaying a chat completion", failure=failure)
        self._reservation.settle(self._prompt_estimate)
        if not self.finished:
            self.finished = True
            self._request.loseConnection()
