# -*- test-case-name: tests.routes.test_chat,tests.routes.test_uploads,tests.routes.test_pending_admission -*-
"""
The base of every route that forwards: a request goes through admission
(L{oaiproxy.access.admission}), then upstream (L{oaiproxy.upstream.exchange}),
each called from here and neither calling back.

Admission's last step (the client's limits) may be a round trip away, so
a request goes upstream when its admission answers (L{ForwardingResource.
when_admitted}); with the in-process store that is at once, within the
resource's C{render}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.access.admission import Admission
from oaiproxy.access.clients import Credentials
from oaiproxy.access.limits import UNLIMITED, Held, LimitStore
from oaiproxy.drain import Lifecycle
from oaiproxy.errors import internal_error
from oaiproxy.observe.records import record_of
from oaiproxy.routetable import CHAT, Route
from oaiproxy.upstream.client import UpstreamClient
from oaiproxy.upstream.exchange import BodyFor, Collect, Exchange
from oaiproxy.upstream.upstreams import Upstreams
from oaiproxy.web import Endpoint, send_error

__all__ = ["ForwardingResource"]


class ForwardingResource(Endpoint):
    """
    What every forwarding endpoint shares: its collaborators, the
    admission every request passes (L{Admission}: not draining, a valid
    client, then the client's model allow-list and limits), then the trip
    upstream (L{Exchange}).

    @param upstream: where requests go: the pool (or one client, made a
        pool of one).
    @param clock: the clock for timeouts and records.
    @param credentials: the clients allowed in (none: no client auth); read
        per request, so a reload applies at once.
    @param lifecycle: tells whether the proxy is draining.
    @param connect_timeout: named in the 502 for a connect timeout.
    @param store: where the clients' limits live, shared by every route.
    @param stream_usage: ask upstream for usage on streams whose client did
        not, and remove it before the client sees it (exact token counts;
        the one change the proxy makes to a request body).
    @param sse_keepalive: seconds of upstream silence in a stream after
        which a C{: keepalive} comment is sent; 0 for never.
    @param route: the route served, when not the class's own.

    @ivar admission: what a request passes before it is forwarded.
    """

    log = Logger()
    route: Route = CHAT

    def __init__(
        self,
        upstream: "Upstreams | UpstreamClient",
        clock: IReactorTime,
        credentials: Credentials,
        lifecycle: Optional[Lifecycle] = None,
        connect_timeout: float = 10.0,
        store: Optional[LimitStore] = None,
        stream_usage: bool = True,
        sse_keepalive: float = 15.0,
        route: Optional[Route] = None,
    ) -> None:
        super().__init__()
        if route is not None:
            self.route = route
        self._upstream = upstream if isinstance(upstream, Upstreams) else Upstreams.of(upstream, clock)
        self._clock = clock
        self.admission = Admission(credentials, clock, lifecycle, store)
        self._connect_timeout = connect_timeout
        self._stream_usage = stream_usage
        self._sse_keepalive = sse_keepalive
        # The class's logger bound to this resource, once: each
        # C{self.log} makes a new one (0.2 KB), which an exchange keeps for
        # as long as its stream is open.
        self._exchange_log: Logger = self.log

    @staticmethod
    def note(request: Request, model: Optional[str] = None, stream: Optional[bool] = None) -> None:
        """
        Put what the request asks for on its record, as far as it is known
        (C{None}: not said): the model it names, whether it streams.  (The
        routes' one way to write these fields: see
        L{oaiproxy.observe.records.RequestRecord}.)
        """
        record = record_of(request)
        if model is not None:
            record.model = model
        if stream is not None:
            record.stream = stream

    def when_admitted(
        self,
        request: Request,
        admitted: "Held | bytes | Deferred[Held | bytes]",
        forward: Callable[[Held], object],
        refused: Optional[Callable[[], object]] = None,
    ) -> bytes | int:
        """
        Go on with C{request} once its admission (L{Admission.answer})
        answers: C{forward} it with its hold, or answer with the refusal
        (after telling C{refused}).  What C{render} returns.

        Already answered (the in-process store's answer, or a Deferred that
        has fired): the refusal's body is returned for C{render} to send,
        as any other synchronous refusal, and nothing more is set up.
        Still pending (a store a round trip away): C{NOT_DONE_YET}, and,
        when the answer comes,
          - if the request is over meanwhile (its client went away, the
            drain cut it off, or the route answered it itself), a hold is
            settled with 0 at once, so no concurrency slot or token stays
            taken, and nothing goes upstream;
          - otherwise it is forwarded or refused as above.  A drain that
            began meanwhile does not refuse it: it was in flight when the
            drain began (it passed the draining check), so the drain waits
            for it like for any other, up to the drain's deadline.
        """
        if not isinstance(admitted, Deferred):
            return self._go_on(admitted, forward, refused)
        answer: list["Held | bytes"] = []
        admitted.addCallback(answer.append)
        if answer:
            return self._go_on(answer[0], forward, refused)
        over: list[object] = []
        request.notifyFinish().addBoth(over.append)

        def answered(_: object) -> None:
            result = answer[0]
            # (An upload answered early finishes before its body is in, and
            # notifyFinish fires only once it is.)
            if over or request.finished:
                if not isinstance(result, bytes):
                    result.settle(0)
                return
            body = self._go_on(result, forward, refused)
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("bug going on with an admitted request", failure)
            if answer and not isinstance(answer[0], bytes):
                answer[0].settle(0)
            if over or request.finished:
                return
            if request.startedWriting:
                request.loseConnection()
            else:
                send_error(request, internal_error())

        admitted.addCallback(answered).addErrback(failed)
        return NOT_DONE_YET

    @staticmethod
    def _go_on(
        result: "Held | bytes",
        forward: Callable[[Held], object],
        refused: Optional[Callable[[], object]],
    ) -> bytes | int:
        if isinstance(result, bytes):
            if refused is not None:
                refused()
            return result
        forward(result)
        return NOT_DONE_YET

    def exchange(
        self,
        request: Request,
        route: Route,
        reservation: Held = UNLIMITED,
        prompt_estimate: int = 0,
        strip_usage: bool = False,
        metered: bool = True,
        collect: Optional[Collect] = None,
        body_for: Optional[BodyFor] = None,
    ) -> "Exchange":
        """
        A trip upstream for C{request}; see L{Exchange}.
        """
        return Exchange(
            request,
            self._upstream,
            self._clock,
            self._connect_timeout,
            self._exchange_log,
            reservation,
            prompt_estimate,
            record_of(request),
            route=route,
            strip_usage=strip_usage,
            sse_keepalive=self._sse_keepalive,
            metered=metered,
            collect=collect,
            body_for=body_for,
        )
