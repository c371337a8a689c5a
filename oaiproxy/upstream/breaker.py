# -*- test-case-name: tests.upstream.test_breaker -*-
"""
A circuit breaker for one upstream: a pure state machine over an injected
clock.

Closed
    Requests flow.  C{failure_threshold} failures in a row, or a failure
    ratio of at least C{failure_ratio} over the last C{window} seconds
    (once C{minimum_requests} have been seen in it), open it.  A consecutive
    count alone misses an upstream that fails every other request; a ratio
    alone reacts late on a quiet upstream: both are kept.
Open
    No requests, for a cooldown.  When upstream said how long (a C{429} or
    C{503} with C{retry-after}), the cooldown is that long, at once: a rate
    limit is per key, and hammering it only extends it.  Otherwise it is a
    growing backoff: C{base_backoff} (5 s), twice that, four times... at
    most C{max_backoff} (5 minutes), each step shortened by up to
    C{jitter} of itself at random, so that breakers opened by one outage do
    not all come back at the same instant.  A key refused by upstream
    (C{401}/C{403}) opens it for C{key_refused_cooldown}.  A cooldown is
    only ever extended, never shortened, by what later failures say.
Half-open
    Once the cooldown is over, exactly one request at a time is admitted,
    as a probe.  Its success closes the breaker and resets the backoff; its
    failure opens it again with the next backoff step.

The state is computed when asked (L{Breaker.state}), from the clock: no
timer is scheduled, so there is nothing to cancel and a breaker can be
dropped at any time.  Each transition is reported exactly once, when it is
first seen, to the C{observer} and as a C{twisted.logger} event with its
reason (warning when opening, critical for a refused key, info when
half-opening or closing).

A request's result is reported against the L{Permit} it was admitted
with.  Results of requests admitted before the last transition (still in
flight when the breaker opened, say) neither count twice towards a
threshold nor close a breaker; they may only extend an open cooldown with a
C{retry-after}.  A request the client gave up on is L{Breaker.release}d: it
says nothing about the upstream.

A breaker may belong to a L{BreakerGroup} (the processes sharing breakers
through Redis: L{oaiproxy.upstream.shared}).  It still decides alone, from
its own state, without waiting on anyone; the group only tells it what the
others saw (L{Breaker.adopt}, L{Breaker.close_by_group}) and, before it
sends a probe, whether this process is the one to send it
(L{BreakerGroup.may_probe}).  Without a group, or when the group says it is
out of reach, the breaker behaves as above.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional
from typing import Protocol as Interface

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = ["State", "BreakerPolicy", "DEFAULT_POLICY", "Permit", "Transition", "Breaker", "BreakerGroup"]


class State(enum.Enum):
    """
    A breaker's state; its C{value} is the number the state gauge shows.
    """

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """
        The state as logs and C{/health/upstreams} spell it.
        """
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class BreakerPolicy:
    """
    When a breaker opens and for how long.  The defaults are those the
    README documents.

    @ivar failure_threshold: failures in a row that open the breaker.
    @ivar failure_ratio: the share of failed requests over C{window} that
        opens it.
    @ivar window: the span of that ratio, in seconds.
    @ivar minimum_requests: how many requests the window must hold before
        the ratio counts: one failure out of one is no evidence.
    @ivar base_backoff: the first cooldown without C{retry-after}.
    @ivar max_backoff: the longest one.
    @ivar jitter: the largest share of a step taken off at random.
    @ivar key_refused_cooldown: the cooldown after a C{401}/C{403}.
    @ivar max_retry_after: the longest C{retry-after} believed, so that a
        bogus header cannot take an upstream out for a day.
    """

    failure_threshold: int = 5
    failure_ratio: float = 0.5
    window: float = 30.0
    minimum_requests: int = 20
    base_backoff: float = 5.0
    max_backoff: float = 300.0
    jitter: float = 0.1
    key_refused_cooldown: float = 300.0
    max_retry_after: float = 3600.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError("failure_ratio must be above 0 and at most 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be at least 0 and below 1")
        if not 0 < self.base_backoff <= self.max_backoff:
            raise ValueError("base_backoff must be positive and at most max_backoff")
        if self.window <= 0 or self.minimum_requests < 1:
            raise ValueError("window and minimum_requests must be positive")

    def backoff(self, step: int, draw: float) -> float:
        """
        The cooldown of the C{step}th opening in a row (from 1), for a
        random C{draw} in [0, 1): C{base_backoff * 2 ** (step - 1)}, at
        most C{max_backoff}, less up to C{jitter} of it.
        """
        nominal = min(self.max_backoff, self.base_backoff * 2.0 ** min(step - 1, 64))
        return nominal * (1.0 - self.jitter * draw)


#: The README's defaults.
DEFAULT_POLICY = BreakerPolicy()


class Permit:
    """
    A request admitted by a breaker; its result is reported with it.

    @ivar probe: whether it is the one probe of a half-open breaker (or the
        early probe of an open one).
    """

    __slots__ = ("probe", "_epoch", "done")

    def __init__(self, probe: bool, epoch: int) -> None:
        self.probe = probe
        self._epoch = epoch
        self.done = False

    def __repr__(self) -> str:
        return f"Permit(probe={self.probe})"


@dataclass(frozen=True)
class Transition:
    """
    One change of state, as reported to the observer.

    @ivar reason: why, in a few secret-free words (C{"5 failures in a
        row"}, C{"retry-after 2s (status 429)"}, C{"probe succeeded"}).
    @ivar cooldown: for an opening, how long it lasts, in seconds.
    @ivar shared: learnt from the group (another process saw it), not seen
        here.
    """

    upstream: str
    old: State
    new: State
    reason: str
    cooldown: Optional[float] = None
    critical: bool = False
    shared: bool = False


class BreakerGroup(Interface):
    """
    The other processes a breaker shares its state with (see
    L{oaiproxy.upstream.shared.SharedBreakers}).  Every method answers at
    once, from what the group last heard: none waits on the network.
    """

    def may_probe(self, breaker: "Breaker", early: bool) -> bool:
        """
        Whether this process may send C{breaker}'s probe now (an C{early}
        one: of an open breaker whose cooldown is the proxy's own guess).
        C{False} while another process probes, or while this one has not
        yet won the right to (asking may start winning it); C{True} when
        the group is out of reach.
        """

    def probing_elsewhere(self, breaker: "Breaker") -> bool:
        """
        Whether another process of the group has a probe of C{breaker}'s
        upstream in flight.
        """

    def moved(self, breaker: "Breaker", transition: Transition) -> None:
        """
        C{breaker} changed state (told after the observer).
        """

    def failure(self, breaker: "Breaker") -> None:
        """
        C{breaker} counted a failure without opening: the group may know
        more (another process may have opened it already).
        """


class _Window:
    """
    Requests and failures over the last C{span} seconds, in ten buckets, so
    memory stays constant whatever the request rate.
    """

    _BUCKETS = 10

    def __init__(self, span: float) -> None:
        self._width = span / self._BUCKETS
        self._buckets: deque[list[int]] = deque()  # [index, requests, failures]

    def add(self, now: float, failed: bool) -> None:
        index = math.floor(now / self._width)
        self._trim(index)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed

    def counts(self, now: float) -> tuple[int, int]:
        self._trim(math.floor(now / self._width))
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def _trim(self, index: int) -> None:
        while self._buckets and self._buckets[0][0] <= index - self._BUCKETS:
            self._buckets.popleft()

    def clear(self) -> None:
        self._buckets.clear()


class Breaker:
    """
    The breaker of one upstream.

    @param name: the upstream's name, for reports.
    @param clock: where time comes from (the reactor; a C{Clock} in tests).
    @param draw: the random source of the jitter, returning [0, 1).
    @param observer: called with each L{Transition}, once.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        policy: BreakerPolicy = DEFAULT_POLICY,
        draw: Callable[[], float] = random.random,
        observer: Optional[Callable[[Transition], None]] = None,
    ) -> None:
        self.name, self.policy = name, policy
        self._clock, self._draw, self._observer = clock, draw, observer
        self._state = State.CLOSED
        self._epoch = 0
        self._consecutive = 0
        self._window = _Window(policy.window)
        #: Openings in a row without a success between them.
        self._step = 0
        self._reopen_at = 0.0
        #: Whether the cooldown is one upstream (or a refused key) set, which
        #: an early probe must not cut short.
        self._told = False
        #: The probe in flight, whose result decides a half-open breaker
        #: even if the cooldown ran out while it was on its way.
        self._probe: Optional[Permit] = None
        self._key_refused = False
        self.last_failure: Optional[str] = None
        self.last_failure_at: Optional[float] = None
        #: The processes this breaker shares its state with, if any (set by
        #: the group when the pool joins the breaker to it).
        self.group: Optional[BreakerGroup] = None

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, {self.state.label})"

    @property
    def state(self) -> State:
        """
        The state now; an open breaker whose cooldown is over becomes
        half-open here (and reports it).
        """
        if self._state is State.OPEN and self._clock.seconds() >= self._reopen_at:
            self._move(State.HALF_OPEN, "cooldown over")
        return self._state

    @property
    def probing(self) -> bool:
        """
        Whether a probe is in flight, here or in another process of the
        group.
        """
        return self._probe is not None or (self.group is not None and self.group.probing_elsewhere(self))

    @property
    def probing_here(self) -> bool:
        """
        Whether this process has a probe in flight.
        """
        return self._probe is not None

    @property
    def told(self) -> bool:
        """
        Whether the current cooldown is one upstream (or a refused key)
        set, not the proxy's own guess.
        """
        return self._told

    def cooldown_left(self) -> float:
        """
        Seconds until an open breaker half-opens; 0 when it is not open.
        """
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self._reopen_at - self._clock.seconds())

    @property
    def key_refused_open(self) -> bool:
        """
        Whether the breaker is open because upstream refused the key.
        """
        return self.state is State.OPEN and self._key_refused

    @property
    def early_probe_allowed(self) -> bool:
        """
        Whether an open breaker may take an early probe: only when its
        cooldown is the proxy's own guess (a backoff), never a
        C{retry-after} upstream gave or a refused key, and when no probe is
        in flight.
        """
        return self.state is State.OPEN and not self._told and not self.probing

    def _may_probe(self, early: bool) -> bool:
        return self.group is None or self.group.may_probe(self, early)

    def admits(self) -> bool:
        """
        Whether L{acquire} would give a permit now.
        """
        state = self.state
        return state is State.CLOSED or (state is State.HALF_OPEN and self._probe is None and self._may_probe(False))

    def acquire(self) -> Optional[Permit]:
        """
        A permit for one request, or C{None} when the breaker refuses it.
        """
        state = self.state
        if state is State.CLOSED:
            return Permit(False, self._epoch)
        if state is State.HALF_OPEN and self._probe is None and self._may_probe(False):
            self._probe = Permit(True, self._epoch)
            return self._probe
        return None

    def acquire_early(self) -> Optional[Permit]:
        """
        A permit for an early probe of an open breaker (when every
        candidate of a model is open: see L{early_probe_allowed}), or
        C{None} (also when another process of the group is to send it).
        """
        if not self.early_probe_allowed or not self._may_probe(True):
            return None
        self._probe = Permit(True, self._epoch)
        return self._probe

    def release(self, permit: Permit) -> None:
        """
        The request ended with no verdict on the upstream (the client went
        away, the proxy's own deadline): a probe's slot is freed.
        """
        if self._settle(permit) and permit is self._probe:
            self._probe = None

    def succeeded(self, permit: Permit) -> None:
        """
        The request got a sane answer from upstream.
        """
        if not self._settle(permit):
            return
        now = self._clock.seconds()
        if permit is self._probe:
            # The count and the window were emptied when it opened, and
            # nothing counted since: only the backoff is left to reset.
            self._probe = None
            self._step = 0
            self._move(State.CLOSED, "probe succeeded")
        elif permit._epoch == self._epoch and self._state is State.CLOSED:
            self._consecutive = 0
            self._window.add(now, False)

    def failed(self, permit: Permit, reason: str, retry_after: Optional[float] = None) -> None:
        """
        The request failed in a way that speaks of the upstream's health.

        @param reason: a few secret-free words for the log
            (C{"status 503"}, C{"connect"}).
        @param retry_after: the seconds upstream asked for with a C{429} or
            C{503}, if any: the breaker opens for that long at once.
        """
        if not self._settle(permit):
            return
        now = self._clock.seconds()
        self.last_failure, self.last_failure_at = reason, now
        if retry_after is not None:
            retry_after = min(max(0.0, retry_after), self.policy.max_retry_after)
        if permit is self._probe:
            self._probe = None
            self._open(now, f"probe failed ({reason})", retry_after)
            return
        if permit._epoch != self._epoch:
            # Admitted before the last transition (in flight when the
            # breaker opened): the same outage seen again.  It may only
            # extend the cooldown.
            if retry_after is not None and self.state is State.OPEN:
                self._extend(now + retry_after, told=True)
            return
        self._consecutive += 1
        self._window.add(now, True)
        if retry_after is not None:
            self._open(now, f"retry-after {retry_after:g}s ({reason})", retry_after)
            return
        if self._consecutive >= self.policy.failure_threshold:
            self._open(now, f"{self._consecutive} failures in a row, the last {reason}", None)
            return
        requests, failures = self._window.counts(now)
        if requests >= self.policy.minimum_requests and failures >= self.policy.failure_ratio * requests:
            self._open(now, f"{failures} of {requests} requests failed in {self.policy.window:g}s", None)
        elif self.group is not None:
            self.group.failure(self)

    def adopt(self, cooldown: float, told: bool, key_refused: bool, reason: str) -> None:
        """
        Another process of the group opened the upstream: it is open here
        too for C{cooldown} more seconds (0: its cooldown is over and the
        group waits on its probe).  An open breaker's cooldown is only
        extended; a closed one opens (reported as a shared transition, at
        warning level even for a refused key: the process that saw it
        says so critically).

        @param reason: why it opened, as the process that saw it said.
        """
        now = self._clock.seconds()
        until = now + max(0.0, cooldown)
        state = self.state
        if state is State.OPEN:
            self._extend(until, told)
            self._key_refused = self._key_refused or key_refused
            return
        if state is State.HALF_OPEN and until <= now:
            return
        self._step += 1
        self._enter_open(now, until, f"open in the group ({reason})", told, shared=True)
        self._key_refused = key_refused

    def close_by_group(self) -> None:
        """
        The group's probe, sent by another process, succeeded: closed here
        too, the backoff reset.
        """
        if self.state is State.CLOSED:
            return
        self._probe = None
        self._step = 0
        self._consecutive = 0
        self._window.clear()
        self._move(State.CLOSED, "closed in the group (probe succeeded)", shared=True)

    def key_refused(self, permit: Permit, reason: str) -> None:
        """
        Upstream refused the key (C{401}/C{403}): only an operator can fix
        that, so the breaker opens at once, for C{key_refused_cooldown},
        and the report is critical.
        """
        if not self._settle(permit):
            return
        now = self._clock.seconds()
        self.last_failure, self.last_failure_at = reason, now
        if permit is self._probe:
            self._probe = None
        elif self.state is State.OPEN:
            self._extend(now + self.policy.key_refused_cooldown, told=True)
            self._key_refused = True
            return
        self._step += 1
        self._enter_open(
            now, now + self.policy.key_refused_cooldown, f"key refused ({reason})", told=True, critical=True
        )

    def _settle(self, permit: Permit) -> bool:
        # A permit reports once; a second report is a caller's bug, ignored.
        if permit.done:
            return False
        permit.done = True
        return True

    def _open(self, now: float, reason: str, retry_after: Optional[float]) -> None:
        self._step += 1
        if retry_after is not None:
            self._enter_open(now, now + retry_after, reason, told=True)
        else:
            self._enter_open(now, now + self.policy.backoff(self._step, self._draw()), reason, told=False)

    def _enter_open(
        self, now: float, until: float, reason: str, told: bool, critical: bool = False, shared: bool = False
    ) -> None:
        self._key_refused = critical
        if self._state is State.OPEN and self._reopen_at > until:
            # An early probe failed: what it says never shortens the
            # cooldown it cut into.
            until, told = self._reopen_at, told or self._told
        self._reopen_at, self._told = until, told
        self._consecutive = 0
        self._window.clear()
        # A probe still in flight from before is no longer the probe.
        self._probe = None
        self._move(State.OPEN, reason, until - now, critical, shared)

    def _extend(self, until: float, told: bool) -> None:
        if until > self._reopen_at:
            self._reopen_at = until
            self._told = self._told or told

    def _move(
        self, new: State, reason: str, cooldown: Optional[float] = None, critical: bool = False, shared: bool = False
    ) -> None:
        old, self._state = self._state, new
        self._epoch += 1
        transition = Transition(self.name, old, new, reason, cooldown, critical, shared)
        if new is State.OPEN:
            level = LogLevel.critical if critical else LogLevel.warn
            self.log.emit(
                level,
                "upstream {upstream} breaker opened for {cooldown:.1f}s: {reason}",
                upstream=self.name,
                cooldown=cooldown,
                reason=reason,
                old_state=old.label,
                new_state=new.label,
                shared=shared,
            )
        else:
            self.log.info(
                "upstream {upstream} breaker {new_state}: {reason}",
                upstream=self.name,
                reason=reason,
                old_state=old.label,
                new_state=new.label,
                shared=shared,
            )
        if self._observer is not None:
            self._observer(transition)
        if self.group is not None:
            self.group.moved(self, transition)
