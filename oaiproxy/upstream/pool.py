# -*- test-case-name: tests.upstream.test_pool -*-
"""
Several upstreams for one proxy: which one a request goes to, and when it
goes to the next.  Pure policy over an injected clock and random source;
the exchange drives it (see L{Attempts}) and does the I/O.

Choosing (L{Pool.choose}):
    1. The candidates are the upstreams that serve the request's model
       (their C{models} globs; no list means any model) and that the
       request has not tried yet.
    2. Of those, an upstream is ready when its breaker admits a request and
       it is below its C{max_concurrent}.  The lowest C{priority} tier with
       a ready upstream is used; a higher tier only when no lower one has
       any.
    3. Within the tier: weighted power of two choices.  Two different
       ready upstreams are drawn at random, each with a probability
       proportional to its C{weight}; the one with fewer requests in flight
       per unit of weight wins (the first drawn on a tie).  With equal
       loads that sends each upstream its weight's share of the traffic;
       with unequal ones it steers away from the busy one without the herd
       effect of always picking the least loaded.
    4. When no candidate is ready and every one of them is open, the one
       whose cooldown ends first gets the request as an early probe, so
       that a recovery is seen at once; one at a time for the model.  A cooldown upstream itself set (a
       C{retry-after}, a refused key) is never cut short: such an upstream
       gets no early probe.  Every other request gets a L{Refusal}
       carrying the time the first breaker admits again (none when every
       candidate's key was refused: only an operator can fix that).

Failing over (L{decide}): only while nothing has reached the client, on a
connection that could not be made (refused, DNS, TLS, connect timeout), no
response head within the read timeout, a C{429}, a C{500}, C{502}, C{503}
or C{504}, a C{401}/C{403} (the key is refused: its breaker opens for long),
and for streams the first-byte deadline, which is never armed for the last
candidate (L{Attempts.first_byte_deadline}).  Never on another C{4xx}: the
request itself is wrong.  A request tries each upstream at most once and
at most C{max_attempts} (3) in all.
"""

from __future__ import annotations

import enum
import math
import random
import re
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union
from typing import Protocol as Interface

from twisted.internet.interfaces import IReactorTime

from oaiproxy.config import Secret
from oaiproxy.errors import ApiError, model_not_found, upstreams_unavailable
from oaiproxy.upstream.breaker import Breaker, BreakerGroup, Permit, State

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "Upstream",
    "Kind",
    "Outcome",
    "Decision",
    "decide",
    "Member",
    "Health",
    "Choice",
    "Refusal",
    "Pool",
    "Attempts",
    "retry_after_seconds",
    "worst_case_upstream_requests",
    "Advice",
    "refusal_error",
    "advice",
    "Verdict",
    "PoolObserver",
    "PoolGroup",
    "outcome_label",
]

DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Upstream:
    """
    One entry of the upstreams file.  Its repr never shows the key.

    @ivar name: unique; the label in logs, metrics and errors.
    @ivar url: the base URL, checked as C{--upstream} is.
    @ivar key_source: where the key was read from, in words
        (C{"key_file /etc/oaiproxy/openai-1"}), for messages.
    @ivar models: the model names it serves, C{*}/C{?}/C{[...]} globs
        allowed, case-sensitive; C{None} serves any model.
    @ivar model_map: client model -> upstream model (or Azure deployment).
    @ivar headers: static headers sent with every request to it.
    @ivar connect_timeout: and the three after it: C{None} means the
        global setting.
    """

    name: str
    url: str
    key: Secret = field(repr=False)
    style: str = "openai"
    key_source: str = ""
    weight: float = 1.0
    priority: int = 0
    models: Optional[tuple[str, ...]] = None
    model_map: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    connect_timeout: Optional[float] = None
    read_timeout: Optional[float] = None
    first_byte_timeout: Optional[float] = None
    max_concurrent: Optional[int] = None

    def serves(self, model: Optional[str]) -> bool:
        """
        Whether this upstream takes requests for C{model}.  A request that
        names no model (a route where upstream picks the default) goes only
        to upstreams without a C{models} list.
        """
        if self.models is None:
            return True
        return model is not None and any(fnmatchcase(model, pattern) for pattern in self.models)

    def upstream_model(self, model: str) -> str:
        """
        The model (or Azure deployment) to ask this upstream for.
        """
        return self.model_map.get(model, model)


class Kind(enum.Enum):
    """
    How one attempt ended, as the exchange saw it.
    """

    #: A response head came (its status is in L{Outcome.status}).
    ANSWERED = "answered"
    #: No connection: refused, DNS, TLS, connect timeout.
    CONNECT = "connect"
    #: Connected, but no response head within the read timeout.
    NO_HEAD = "no_head"
    #: A stream's first body byte did not come within the first-byte
    #: deadline (which is armed only when another candidate remains).
    FIRST_BYTE = "first_byte"
    #: The upstream failed after bytes of its answer reached the client.
    BROKEN = "broken"
    #: The client went away, or the proxy's own overall deadline ran out:
    #: nothing is said about the upstream.
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    """
    One attempt's end.

    @ivar status: the response status, for L{Kind.ANSWERED}.
    @ivar retry_after: seconds from the answer's C{retry-after} (see
        L{retry_after_seconds}).
    @ivar reached_client: whether any byte of the answer was sent to the
        client already; after that nothing is retried.
    """

    kind: Kind
    status: Optional[int] = None
    retry_after: Optional[float] = None
    reached_client: bool = False

    @property
    def reason(self) -> str:
        """
        The outcome in a few words, for logs and the failover metric.
        """
        if self.kind is Kind.ANSWERED:
            return f"status {self.status}"
        return self.kind.value


#: Statuses that say the upstream, not the request, is at fault right now.
_FAIL_OVER_STATUSES = frozenset({429, 500, 502, 503, 504})
_KEY_REFUSED = frozenset({401, 403})


def outcome_label(outcome: Outcome) -> str:
    """
    An attempt's end as the per-upstream metrics label it, from a small
    fixed set (so the label stays bounded whatever upstream answers):
    C{ok} (a 2xx or 3xx), C{client_error} (a 4xx the client's request
    earned), C{rate_limited} (429), C{key_refused} (401, 403),
    C{server_error} (5xx), or the kind of a failure without an answer
    (C{connect}, C{no_head}, C{first_byte}, C{broken}, C{cancelled}).
    """
    if outcome.kind is not Kind.ANSWERED:
        return outcome.kind.value
    status = outcome.status or 0
    if status in _KEY_REFUSED:
        return "key_refused"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


class PoolObserver(Interface):
    """
    What the pool tells the metrics (L{oaiproxy.observe.metrics.Metrics}
    is one), by upstream name and L{outcome_label}: plain strings, since
    the metrics sit below this layer.
    """

    def attempt_finished(self, upstream: str, outcome: str) -> None:
        """
        One attempt on C{upstream} ended as C{outcome}.
        """

    def failed_over(self, upstream: str, reason: str) -> None:
        """
        A request left C{upstream} for the next candidate, because of
        C{reason} (an L{outcome_label}).
        """


class Verdict(enum.Enum):
    """
    What an outcome tells the upstream's breaker.
    """

    SUCCESS = "success"
    FAILURE = "failure"
    KEY_REFUSED = "key_refused"
    NONE = "none"


@dataclass(frozen=True)
class Decision:
    """
    What to do after an attempt.

    @ivar fail_over: try the next candidate rather than answer the client.
    @ivar verdict: what the breaker is told.
    """

    fail_over: bool
    verdict: Verdict


def decide(outcome: Outcome) -> Decision:
    """
    Whether an attempt's outcome fails over, and what it tells the
    breaker, regardless of whether another attempt is left (L{Attempts}
    bounds that).

    A 2xx or 3xx, and a 4xx other than 401, 403 and 429, are answers from a
    healthy upstream and go to the client: the request itself is wrong,
    and another upstream would say the same.  A 5xx other than 500, 502,
    503 and 504 (501, 505...) goes to the client too, but counts against
    the upstream.  Once a byte has reached the client nothing fails over.
    """
    kind, status = outcome.kind, outcome.status
    if kind is Kind.CANCELLED:
        return Decision(False, Verdict.NONE)
    if kind is Kind.BROKEN:
        return Decision(False, Verdict.FAILURE)
    if kind is Kind.ANSWERED:
        assert status is not None
        if status in _KEY_REFUSED:
            verdict = Verdict.KEY_REFUSED
        elif status in _FAIL_OVER_STATUSES or status >= 500:
            verdict = Verdict.FAILURE
        else:
            return Decision(False, Verdict.SUCCESS)
        fails_over = status in _KEY_REFUSED or status in _FAIL_OVER_STATUSES
        return Decision(fails_over and not outcome.reached_client, verdict)
    # CONNECT, NO_HEAD, FIRST_BYTE: no answer reached the client.
    return Decision(not outcome.reached_client, Verdict.FAILURE)


class Member:
    """
    An upstream in a pool, with its breaker and its requests in flight.
    """

    def __init__(self, upstream: Upstream, breaker: Breaker) -> None:
        self.upstream = upstream
        self.breaker = breaker
        self.in_flight = 0

    @property
    def name(self) -> str:
        return self.upstream.name

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.breaker.state.label}, in_flight={self.in_flight})"

    @property
    def full(self) -> bool:
        limit = self.upstream.max_concurrent
        return limit is not None and self.in_flight >= limit

    def ready(self) -> bool:
        return not self.full and self.breaker.admits()

    def health(self) -> "Health":
        """
        This upstream as C{GET /health/upstreams} shows it.
        """
        breaker = self.breaker
        state = breaker.state
        return Health(
            self.name,
            state.label,
            state.value,
            self.in_flight,
            breaker.last_failure,
            breaker.last_failure_at,
            round(breaker.cooldown_left(), 3),
        )


@dataclass(frozen=True)
class Health:
    """
    One upstream's health, for C{GET /health/upstreams}
    (C{dataclasses.asdict} makes it JSON-ready).  No URL, key or header:
    only what an operator needs to see which one is out and why.

    @ivar state: C{closed}, C{half-open} or C{open}.
    @ivar state_value: the state gauge's number for it (0, 1, 2).
    @ivar last_failure: the last failure's kind (C{"status 503"},
        C{"connect"}...), with its POSIX time C{last_failure_at}.
    @ivar cooldown_left: seconds until an open breaker half-opens.
    """

    name: str
    state: str
    state_value: int
    in_flight: int
    last_failure: Optional[str]
    last_failure_at: Optional[float]
    cooldown_left: float


@dataclass
class Choice:
    """
    The upstream chosen for one attempt.  Report its end with
    L{Pool.finish} (or through L{Attempts.report}), exactly once.

    @ivar early: whether it is an early probe of an open breaker.
    """

    member: Member
    permit: Permit
    early: bool = False


@dataclass(frozen=True)
class Refusal:
    """
    No upstream can take the request now.

    @ivar serves: whether any upstream serves the model at all: when none
        does, waiting cannot help.
    @ivar retry_after: seconds until the first breaker admits again (at
        least 1), or C{None} when waiting cannot help.
    """

    model: Optional[str]
    serves: bool
    retry_after: Optional[float]


class PoolGroup(BreakerGroup, Interface):
    """
    A L{BreakerGroup} the pool joins its members' breakers to.
    """

    def join(self, breaker: Breaker) -> None:
        """
        Share C{breaker} (a new member's) with the group.
        """

    def leave(self, name: str) -> None:
        """
        The member C{name} is gone (a reload dropped it).
        """


class Pool:
    """
    The upstreams and their breakers.

    @param draw: the random source (C{random.random}-shaped) of the
        weighted choice; seed it in tests.
    @param breaker: makes the breaker of a new upstream, from its name
        (by default one with the README's policy, on C{clock}, drawing its
        jitter from C{draw}); the place to set a policy or an observer of
        transitions.
    @param group: the processes the breakers are shared with (a
        L{oaiproxy.upstream.shared.SharedBreakers}), if any: every member's
        breaker joins it, and leaves it when a reload drops the member.
    @ivar observer: told of every attempt's end and every failover (the
        metrics), if set.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        clock: IReactorTime,
        draw: Callable[[], float] = random.random,
        breaker: Optional[Callable[[str], Breaker]] = None,
        observer: Optional[PoolObserver] = None,
        group: Optional["PoolGroup"] = None,
    ) -> None:
        self.observer = observer
        self.group = group
        self._clock = clock
        self._draw = draw
        self._breaker = breaker or (lambda name: Breaker(name, clock, draw=draw))
        self.members: tuple[Member, ...] = ()
        self.replace(upstreams)

    def replace(self, upstreams: Sequence[Upstream]) -> None:
        """
        Take a new list of upstreams (a reload).  An entry whose name stays
        keeps its breaker and its in-flight count, whatever else changed;
        a new name starts closed.
        """
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        old = {m.name: m for m in self.members}
        members = []
        for upstream in upstreams:
            kept = old.get(upstream.name)
            if kept is not None:
                kept.upstream = upstream
                members.append(kept)
            else:
                member = Member(upstream, self._breaker(upstream.name))
                if self.group is not None:
                    self.group.join(member.breaker)
                members.append(member)
        if self.group is not None:
            for name in set(old) - set(names):
                self.group.leave(name)
        self.members = tuple(members)

    def now(self) -> float:
        """
        The pool's clock, in seconds.
        """
        return self._clock.seconds()

    def __getitem__(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    def serving(self, model: Optional[str]) -> list[Member]:
        """
        The members that serve C{model}, healthy or not.
        """
        return [m for m in self.members if m.upstream.serves(model)]

    def choose(self, model: Optional[str], exclude: Iterable[str] = ()) -> Union[Choice, Refusal]:
        """
        The upstream for the next attempt of a request for C{model} (see
        the module's docstring), skipping the names in C{exclude} (those it
        tried already).  A L{Choice} counts as in flight until
        L{finish}ed.
        """
        skipped = set(exclude)
        serving = self.serving(model)
        candidates = [m for m in serving if m.name not in skipped]
        if not candidates:
            return Refusal(model, bool(serving), None if not serving else self.retry_after(serving))
        if len(candidates) == 1 and candidates[0].ready():
            # The common pool of one: its only tier, its only draw.
            only = candidates[0]
            permit = only.breaker.acquire()
            assert permit is not None
            return self._start(only, permit, early=False)
        for priority in sorted({m.upstream.priority for m in candidates}):
            ready = [m for m in candidates if m.upstream.priority == priority and m.ready()]
            if ready:
                member = self._two_choices(ready)
                permit = member.breaker.acquire()
                assert permit is not None
                return self._start(member, permit, early=False)
        if all(m.breaker.state is State.OPEN for m in candidates) and not any(m.breaker.probing for m in serving):
            probeable = [m for m in candidates if m.breaker.early_probe_allowed and not m.full]
            if probeable:
                first = min(probeable, key=lambda m: (m.breaker.cooldown_left(), m.upstream.priority))
                # None when another process of the group is to send it.
                permit = first.breaker.acquire_early()
                if permit is not None:
                    return self._start(first, permit, early=True)
            elif all(m.breaker.key_refused_open for m in candidates):
                # Only an operator can fix refused keys: no retry helps.
                return Refusal(model, True, None)
        return Refusal(model, True, self.retry_after(candidates))

    def finish(self, choice: Choice, outcome: Outcome) -> Decision:
        """
        Report how an attempt ended: the breaker hears the verdict, the
        in-flight count drops.
        """
        decision = decide(outcome)
        member, permit, breaker = choice.member, choice.permit, choice.member.breaker
        if not permit.done:
            member.in_flight -= 1
        if decision.verdict is Verdict.SUCCESS:
            breaker.succeeded(permit)
        elif decision.verdict is Verdict.FAILURE:
            retry_after = outcome.retry_after if outcome.status in (429, 503) else None
            breaker.failed(permit, outcome.reason, retry_after)
        elif decision.verdict is Verdict.KEY_REFUSED:
            breaker.key_refused(permit, outcome.reason)
        else:
            breaker.release(permit)
        if self.observer is not None:
            self.observer.attempt_finished(member.name, outcome_label(outcome))
        return decision

    def _start(self, member: Member, permit: Permit, early: bool) -> Choice:
        member.in_flight += 1
        return Choice(member, permit, early)

    def _two_choices(self, ready: list[Member]) -> Member:
        if len(ready) == 1:
            return ready[0]
        first = self._weighted(ready)
        second = self._weighted([m for m in ready if m is not first])
        if second.in_flight / second.upstream.weight < first.in_flight / first.upstream.weight:
            return second
        return first

    def _weighted(self, members: list[Member]) -> Member:
        total = sum(m.upstream.weight for m in members)
        point = self._draw() * total
        for member in members:
            point -= member.upstream.weight
            if point < 0:
                return member
        return members[-1]

    def retry_after(self, members: Sequence[Member]) -> float:
        """
        Seconds until the first of C{members} admits again, at least 1
        (a half-open breaker waiting on its probe, or a full upstream,
        may admit any moment).
        """
        return max(1.0, float(math.ceil(min(m.breaker.cooldown_left() for m in members))))


class Attempts:
    """
    One request's way through the pool: each upstream at most once, at
    most C{max_attempts} in all, and no new attempt after the overall
    C{deadline} (the read timeout, counted from the first attempt).

    The exchange calls L{next} for an upstream, sends the request, and
    L{report}s how it ended; L{report} says whether to go on.  When it
    stops, L{last} is the last outcome, whose answer (a 429 with its
    C{retry-after}, a 503) is what the client gets if it had one.
    """

    def __init__(
        self, pool: Pool, model: Optional[str], max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout: float = 600.0
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.pool = pool
        self.model = model
        self.max_attempts = max_attempts
        self.deadline = pool.now() + timeout
        self.tried: list[str] = []
        self.failovers: list[tuple[str, str]] = []
        self.last: Optional[Outcome] = None
        self._current: Optional[Choice] = None

    @property
    def attempts(self) -> int:
        return len(self.tried)

    def next(self) -> Union[Choice, Refusal, None]:
        """
        The upstream for the next attempt; a L{Refusal} when none can take
        it; C{None} when this request has had all its attempts.
        """
        assert self._current is None, "report the current attempt first"
        if self.attempts >= self.max_attempts or (self.tried and self.pool.now() >= self.deadline):
            return None
        choice = self.pool.choose(self.model, self.tried)
        if isinstance(choice, Choice):
            self.tried.append(choice.member.name)
            self._current = choice
        return choice

    def first_byte_deadline(self, timeout: Optional[float]) -> Optional[float]:
        """
        The first-byte deadline to arm for the current attempt: the
        upstream's own C{first_byte_timeout} when its entry sets one (0 is
        off), else the global C{timeout}; none for the last candidate (it
        runs to its read timeout), since cutting it would leave nothing to
        fail over to.  The last is the last attempt the bound allows, or
        the one after which no untried upstream could take the request
        (each is open on a cooldown upstream set, or full, or does not
        serve the model).
        """
        assert self._current is not None, "no attempt in progress"
        own = self._current.member.upstream.first_byte_timeout
        timeout = own if own is not None else timeout
        if not timeout or self.attempts >= self.max_attempts:
            return None
        others = [
            m
            for m in self.pool.serving(self.model)
            if m.name not in self.tried and (m.ready() or (m.breaker.early_probe_allowed and not m.full))
        ]
        return timeout if others else None

    def report(self, outcome: Outcome) -> bool:
        """
        How the current attempt ended; C{True} when the request should
        try the next upstream.
        """
        choice, self._current = self._current, None
        assert choice is not None, "no attempt in progress"
        decision = self.pool.finish(choice, outcome)
        self.last = outcome
        go_on = decision.fail_over and self.attempts < self.max_attempts
        go_on = go_on and self.pool.now() < self.deadline
        if go_on:
            self.failovers.append((choice.member.name, outcome.reason))
            if self.pool.observer is not None:
                self.pool.observer.failed_over(choice.member.name, outcome_label(outcome))
        return go_on


@dataclass(frozen=True)
class Advice:
    """
    What the proxy tells a client whose request no upstream answered well,
    to bound retry amplification.

    @ivar retry: C{False} when waiting cannot help (C{x-should-retry:
        false}).
    @ivar after: seconds to wait (C{retry-after}), when known.
    """

    retry: bool
    after: Optional[float] = None


def advice(pool: Pool, model: Optional[str], last: Optional[Outcome] = None) -> Advice:
    """
    The retry advice for a request that ended without a good answer, after
    C{last} (the last attempt's outcome, if any).

    Nothing serves the model, or every upstream that does has refused its
    key: waiting cannot help.  The last upstream answered with its own
    C{retry-after} (a 429, a 503): that, passed on with its answer.
    Otherwise the time until the first of the model's breakers admits
    again, if one is open; else no figure (the SDK's own backoff).
    """
    serving = pool.serving(model)
    if not serving or all(m.breaker.key_refused_open for m in serving):
        return Advice(False)
    if last is not None and last.kind is Kind.ANSWERED and last.retry_after is not None:
        if last.status in (429, 503):
            return Advice(True, last.retry_after)
    if any(m.ready() for m in serving):
        return Advice(True)
    return Advice(True, pool.retry_after(serving))


def refusal_error(refusal: Refusal) -> ApiError:
    """
    The client's answer to a L{Refusal}: OpenAI's C{404 model_not_found}
    when no upstream serves the model, else a C{503 upstreams_unavailable}
    with the refusal's C{retry-after}.
    """
    if not refusal.serves and refusal.model is not None:
        return model_not_found(refusal.model)
    return upstreams_unavailable(refusal.model, refusal.retry_after)


def worst_case_upstream_requests(sdk_attempts: int, max_attempts: int, upstreams: int) -> int:
    """
    The most upstream requests one SDK call can cause: each of the SDK's
    attempts (the openai SDKs make 3: C{max_retries=2}) reaches the proxy,
    which makes at most C{max_attempts} upstream requests for it, one per
    upstream.  With the defaults and three upstreams or more, 9; the
    proxy's C{x-should-retry: false} (when waiting cannot help) and its
    breakers (an upstream that failed is skipped by the next attempts)
    make the common case far smaller.
    """
    return sdk_attempts * min(max_attempts, upstreams)


_DIGITS = re.compile(r"^\s*\d+(\.\d+)?\s*$")


def retry_after_seconds(
    retry_after: Optional[bytes], retry_after_ms: Optional[bytes] = None, now: Optional[float] = None
) -> Optional[float]:
    """
    The wait an upstream asked for, in seconds: C{retry-after-ms} (OpenAI's
    and Azure's own) when present and sane, else C{retry-after} as seconds
    or as an HTTP date (against C{now}, a POSIX time).  C{None} when neither
    reads as a wait.
    """
    for raw, scale in ((retry_after_ms, 0.001), (retry_after, 1.0)):
        if raw is None:
            continue
        text = raw.decode("latin-1", "replace")
        if _DIGITS.match(text):
            value = float(text) * scale
            if math.isfinite(value):
                return value
        elif scale == 1.0 and now is not None:
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                continue
            if when.tzinfo is not None:
                return max(0.0, when.timestamp() - now)
    return None
