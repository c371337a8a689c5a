# -*- test-case-name: tests.upstream.test_relay,tests.routes.test_chat -*-
"""
Copy an upstream response body to a client as it arrives.

One relay serves plain and streamed bodies alike: every chunk treq delivers
is written to the client at once, so server-sent events are never held
back, and a plain JSON body costs no buffer either.  Two things a naive
copy loop gets wrong are handled here:

 - B{backpressure}: the upstream transport is registered as the client
   request's push producer, so a client that reads slowly pauses the
   upstream socket instead of growing the proxy's memory;
 - B{silence}: treq's own timeout stops at the response head, so a stream
   that goes quiet is bounded here, with an injected clock, by a timer that
   restarts on every chunk and is suspended while the client holds the
   upstream paused (that silence is the client's, not upstream's).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import Any, Callable, Optional
from typing import Protocol as Interface

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

__all__ = ["BodyRelay", "UpstreamIdle", "Transform", "KEEPALIVE"]

#: The SSE comment sent on a silent stream; clients ignore comment lines.
KEEPALIVE = b": keepalive\n\n"


class Transform(Interface):
    """
    Rewrites a body on its way through.
    """

    def __call__(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def discard(self) -> None: ...


class UpstreamIdle(Exception):
    """
    The upstream sent no body data for longer than the read timeout.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


#: Seconds of a timer's rest that are only floating-point rounding.
_ROUNDING = 1e-6


class _Deadlines:
    """
    The due times of every idle timer of one clock, behind one delayed call.

    A C{DelayedCall} with its bound methods is about 0.4 KB, and an open
    stream keeps one or two timers for its minutes (issue 17: memory per
    idle stream).  Here a timer's due time is a three-item list, C{[due,
    order, timer]}, in a heap.  A stopped timer's entry is emptied (its
    timer C{None}) and dropped when it comes to the top, or all at once when
    no timer is left or emptied entries outnumber live ones, so a finished
    stream keeps nothing alive through its timer.
    """

    __slots__ = ("_clock", "_heap", "_call", "_order", "_live", "_firing", "_added")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[list[Any]] = []
        self._call: Optional[IDelayedCall] = None
        self._order = itertools.count()
        self._live = 0
        self._firing = False
        #: Entries added while due ones are being called: they join the
        #: heap afterwards, so none is called in the round that added it.
        self._added: list[list[Any]] = []

    def add(self, due: float, timer: "_IdleTimer") -> list[Any]:
        """
        Call C{timer._due()} at C{due} (on the clock's time); return the
        entry to L{discard}.
        """
        entry = [due, next(self._order), timer]
        self._live += 1
        if self._firing:
            self._added.append(entry)
        else:
            heapq.heappush(self._heap, entry)
            self._schedule()
        return entry

    def discard(self, entry: list[Any]) -> None:
        """
        Forget C{entry}: its timer was stopped.
        """
        entry[2] = None
        self._live -= 1
        if self._live == 0:
            self._heap.clear()
            self._added.clear()
            if self._call is not None:
                if self._call.active():
                    self._call.cancel()
                self._call = None
        elif len(self._heap) > 64 and len(self._heap) > 2 * self._live:
            self._heap = [kept for kept in self._heap if kept[2] is not None]
            heapq.heapify(self._heap)

    def _schedule(self) -> None:
        if not self._heap:
            return
        due = self._heap[0][0]
        delay = max(0.0, due - self._clock.seconds())
        if self._call is None:
            self._call = self._clock.callLater(delay, self._fire)
        elif due < self._call.getTime():
            self._call.reset(delay)

    def _fire(self) -> None:
        self._call = None
        self._firing = True
        try:
            now = self._clock.seconds()
            # (A due time within rounding of now is due: see _IdleTimer.)
            while self._heap and self._heap[0][0] <= now + _ROUNDING:
                entry = heapq.heappop(self._heap)
                timer: Optional[_IdleTimer] = entry[2]
                if timer is None:
                    continue
                entry[2] = None
                self._live -= 1
                timer._entry = None
                timer._due()
        finally:
            self._firing = False
            for entry in self._added:
                if entry[2] is not None:
                    heapq.heappush(self._heap, entry)
            self._added.clear()
        self._schedule()


#: The deadlines of each clock (the reactor; a test's own clocks).
_DEADLINES: "weakref.WeakKeyDictionary[IReactorTime, _Deadlines]" = weakref.WeakKeyDictionary()


def _deadlines_of(clock: IReactorTime) -> _Deadlines:
    deadlines = _DEADLINES.get(clock)
    if deadlines is None:
        deadlines = _DEADLINES[clock] = _Deadlines(clock)
    return deadlines


class _IdleTimer:
    """
    A restartable one-shot timer that costs a clock read per restart.

    It is restarted on every chunk of every stream, so a restart only notes
    the time: its entry in the clock's L{_Deadlines}, when it comes due,
    checks how long it has really been quiet and waits out the rest, or
    expires.  It fires when a timer moved on every restart would (to the
    microsecond: a rest below that is rounding, and waiting it out could
    loop on a clock that does not move between calls, like a test's
    C{Clock}), without a C{DelayedCall.active()} and C{reset()} per chunk,
    and without a C{DelayedCall} of its own.
    """

    # One or two per open stream (issue 17: memory per stream).
    __slots__ = ("_clock", "_deadlines", "_seconds", "_expired", "_entry", "_since")

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[], None]) -> None:
        self._clock = clock
        self._deadlines = _deadlines_of(clock)
        self._seconds = seconds
        self._expired = expired
        self._entry: Optional[list[Any]] = None
        self._since = 0.0

    def restart(self) -> None:
        self._since = self._clock.seconds()
        if self._entry is None:
            self._entry = self._deadlines.add(self._since + self._seconds, self)

    def _due(self) -> None:
        now = self._clock.seconds()
        left = self._since + self._seconds - now
        if left > _ROUNDING:
            self._entry = self._deadlines.add(now + left, self)
        else:
            self._expired()

    def stop(self) -> None:
        if self._entry is not None:
            self._deadlines.discard(self._entry)
        self._entry = None


@implementer(IPushProducer)
class _PauseAwareProducer:
    """
    The upstream transport as the client's producer, with the idle timer
    suspended for as long as the client keeps it paused.
    """

    __slots__ = ("_upstream", "_timer")

    def __init__(self, upstream: IPushProducer, timer: _IdleTimer) -> None:
        self._upstream = upstream
        self._timer = timer

    def pauseProducing(self) -> None:
        self._timer.stop()
        self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self._timer.restart()
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self._timer.stop()
        self._upstream.stopProducing()


class BodyRelay(Protocol):
    """
    An C{IResponse.deliverBody} protocol that writes each chunk to a
    twisted.web request.

    @param observe: called with each upstream chunk after it is written
        (usage metering); it must be cheap and must not raise.
    @param transform: rewrites the chunks on their way (see
        L{oaiproxy.observe.usage.UsageEventFilter}); its C{flush()} gives what it
        still holds when the body ends.
    @param keepalive: for an event stream, the seconds of upstream silence
        after which an SSE comment (C{: keepalive}) is sent so that idle
        timeouts between the proxy and the client do not cut the stream; 0
        for none.  Comments go only between events, never inside one.
    @param first: called once, before the first chunk is written, for a
        head held until the body starts (the first-byte deadline); no
        keepalive is written before it.
    @param done: called once when the body ends, with C{None} for a complete
        body or the L{Failure} that cut it short (L{UpstreamIdle} for a
        silent upstream).  It decides how to end the client's response.
    """

    # One per open stream: its attributes in slots (issue 17).  (Protocol's
    # transport and connected stay in the instance dictionary.)
    __slots__ = (
        "_request",
        "_first",
        "_observe",
        "_transform",
        "_read_timeout",
        "_done",
        "_timer",
        "_keepalive",
        "_at_boundary",
        "_timed_out",
        "_upstream",
    )

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        read_timeout: float,
        done: Callable[[Optional[Failure]], None],
        observe: Optional[Callable[[bytes], None]] = None,
        transform: Optional[Transform] = None,
        keepalive: float = 0.0,
        first: Optional[Callable[[], None]] = None,
    ) -> None:
        self._request = request
        self._first = first
        self._observe = observe
        self._transform = transform
        self._read_timeout = read_timeout
        self._done = done
        self._timer = _IdleTimer(clock, read_timeout, self._idle)
        self._keepalive = _IdleTimer(clock, keepalive, self._send_keepalive) if keepalive > 0 else None
        self._at_boundary = True
        self._timed_out = False

    def connectionMade(self) -> None:
        # deliverBody's transport is a pausable push producer (Twisted's
        # TransportProxyProducer), not just an ITransport.
        self._upstream: IPushProducer = self.transport  # type: ignore[assignment]
        self._request.registerProducer(_PauseAwareProducer(self._upstream, self._timer), True)
        self._timer.restart()
        if self._keepalive is not None:
            self._keepalive.restart()

    def dataReceived(self, data: bytes) -> None:
        self._timer.restart()
        if self._keepalive is not None:
            self._keepalive.restart()
        if not data:
            return
        if self._first is not None:
            first, self._first = self._first, None
            first()
        out = data if self._transform is None else self._transform(data)
        if out:
            self._request.write(out)
            self._at_boundary = out.endswith((b"\n\n", b"\r\n\r\n"))
        if self._observe is not None:
            self._observe(data)

    def _send_keepalive(self) -> None:
        if self._at_boundary and self._first is None:
            self._request.write(KEEPALIVE)
        assert self._keepalive is not None
        self._keepalive.restart()

    def _stop_timers(self) -> None:
        self._timer.stop()
        if self._keepalive is not None:
            self._keepalive.stop()

    def abort(self) -> None:
        """
        Close the upstream connection now: the client has gone.
        """
        self._stop_timers()
        self._upstream.stopProducing()

    def _idle(self) -> None:
        self._timed_out = True
        self._upstream.stopProducing()

    @property
    def at_boundary(self) -> bool:
        """
        Whether what the client has received ends between events, where an
        error event can be added without corrupting one.
        """
        return self._at_boundary

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_timers()
        complete = not self._timed_out and reason.check(ResponseDone, PotentialDataLoss)
        if self._transform is not None:
            if complete:
                rest = self._transform.flush()
                if rest:
                    self._request.write(rest)
                    self._at_boundary = rest.endswith((b"\n\n", b"\r\n\r\n"))
            else:
                # Half an event is worse than none: the failure is reported
                # right after what was complete.
                self._transform.discard()
        if self._timed_out:
            # First: a body without length or chunking ends at connection
            # close, so the close our timeout caused looks like a normal end
            # (PotentialDataLoss).  It is not.
            self._done(Failure(UpstreamIdle(self._read_timeout)))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._done(None)
        else:
            self._done(reason)
