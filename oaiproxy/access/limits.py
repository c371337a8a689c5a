# -*- test-case-name: tests.test_limits -*-
"""
Per-client limits: requests per minute, tokens per minute, concurrency.

Each per-minute limit is a token bucket that holds at most one minute's
allowance and refills continuously, so a client can burst up to its limit
and then proceeds at the limit's pace.  Every check is O(1) and state is a
few numbers per client, in memory; a shared store for several processes
would hold the same three numbers per client.

Token limits must not overshoot, yet the real cost of a request is known
only after it ends.  So admission B{reserves} an upper estimate (the
request body's size in bytes divided by three, which is at least its token
count for common text, plus the output it allows: C{max_completion_tokens},
C{max_tokens}, or the client's C{default_max_tokens}, times C{n}), and the
end of the request B{settles} the reservation against the C{usage} upstream
reports, giving back what was not used.  A stream cancelled by its client
settles on what it had produced so far (see L{oaiproxy.observe.usage}).  A request
whose reservation is larger than the whole per-minute allowance could never
be admitted; it is refused at once rather than retried forever.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaiproxy.access.clients import Client, Limits

__all__ = [
    "Bucket",
    "Held",
    "LimitStore",
    "Limiter",
    "LocalLimitStore",
    "Reservation",
    "Refusal",
    "estimate_tokens",
    "format_reset",
    "rate_headers",
    "read_count",
    "refusal_message",
    "MAX_COUNT",
    "NOT_A_COUNT",
]


class Bucket:
    """
    A token bucket: C{capacity} units, refilled at C{capacity} per minute.
    Its level may go below zero when a settlement charges more than was
    reserved; the debt is then paid off before anything else is admitted.
    """

    __slots__ = ("capacity", "level", "_rate", "_updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self._rate = capacity / 60.0
        self._updated = now

    def refill(self, now: float) -> None:
        if now > self._updated:
            self.level = min(self.capacity, self.level + (now - self._updated) * self._rate)
        self._updated = now

    def wait(self, amount: float) -> float:
        """
        Seconds until C{amount} is available (after L{refill}).
        """
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self._rate

    def until_full(self) -> float:
        return (self.capacity - self.level) / self._rate


@dataclass
class Refusal:
    """
    A request over a limit: which one, and when to retry.

    @ivar retry_after: seconds, or C{None} when retrying cannot help.
    @ivar headers: the client's C{x-ratelimit-*} headers at the refusal,
        when the store that refused knows them (an asynchronous store
        answers them in the same round trip); empty otherwise.
    """

    limit: str
    message: str
    retry_after: Optional[float]
    headers: Sequence[tuple[bytes, bytes]] = ()


class _ClientState:
    __slots__ = ("requests", "tokens", "in_flight", "limits")

    def __init__(self, limits: Limits, now: float) -> None:
        self.in_flight = 0
        self.configure(limits, now)

    def configure(self, limits: Limits, now: float) -> None:
        """
        Apply (new) limits with full allowances.  The same object stays in
        place, so reservations held by requests in flight still settle here.
        """
        self.limits = limits
        self.requests = Bucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = Bucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None


class Reservation:
    """
    An admitted request's hold on its client's allowance.  Settle it
    exactly once, when the request ends.
    """

    __slots__ = ("_state", "estimate", "_settled")

    def __init__(self, state: Optional[_ClientState], estimate: int) -> None:
        self._state = state
        self.estimate = estimate
        self._settled = False

    def settle(self, used_tokens: int) -> None:
        """
        Replace the reserved estimate by what the request really used.
        """
        if self._settled:
            return
        self._settled = True
        state = self._state
        if state is None:
            return
        state.in_flight -= 1
        if state.tokens is not None:
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + self.estimate - used_tokens)


#: The reservation for a client without limits: nothing to settle.
UNLIMITED = Reservation(None, 0)


class Limiter:
    """
    The limit state of every client, by name.
    """

    def __init__(self, clock: IReactorTime, share: int = 1) -> None:
        """
        @param share: the number of worker processes the limits are split
            among (see L{oaiproxy.daemon.workers}); each enforces its share.
        """
        self._clock = clock
        self._share = share
        self._states: dict[str, _ClientState] = {}

    def _state(self, client: Client) -> _ClientState:
        limits = client.limits.split(self._share)
        state = self._states.get(client.name)
        if state is None:
            state = self._states[client.name] = _ClientState(limits, self._clock.seconds())
        elif state.limits is not limits and state.limits != limits:
            # Its limits changed on reload.
            state.configure(limits, self._clock.seconds())
        return state

    def admit(self, client: Client, estimate: int) -> "Reservation | Refusal":
        """
        Admit a request that may cost up to C{estimate} tokens, or say
        which limit it is over.
        """
        if not client.limits.any:
            return UNLIMITED
        state = self._state(client)
        limits = state.limits
        now = self._clock.seconds()
        if limits.concurrent_requests is not None and state.in_flight >= limits.concurrent_requests:
            return Refusal("concurrent", refusal_message(client, "concurrent", estimate), 1.0)
        if state.requests is not None:
            state.requests.refill(now)
            if state.requests.level < 1:
                return Refusal("requests", refusal_message(client, "requests", estimate), state.requests.wait(1))
        if state.tokens is not None:
            state.tokens.refill(now)
            if estimate > state.tokens.capacity:
                return Refusal("tokens", refusal_message(client, "too large", estimate), None)
            if state.tokens.level < estimate:
                return Refusal("tokens", refusal_message(client, "tokens", estimate), state.tokens.wait(estimate))
            state.tokens.level -= estimate
        if state.requests is not None:
            state.requests.level -= 1
        state.in_flight += 1
        return Reservation(state, estimate)

    def headers(self, client: Client) -> list[tuple[bytes, bytes]]:
        """
        OpenAI-style C{x-ratelimit-*} headers for the client's current
        state.
        """
        state = self._state(client)
        now = self._clock.seconds()
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            out += rate_headers(kind, bucket.capacity, max(0, int(bucket.level)), bucket.until_full())
        return out


def refusal_message(client: Client, over: str, estimate: int) -> str:
    """
    What a refusal says, the same from every store: C{over} is
    C{"concurrent"}, C{"requests"}, C{"too large"} or C{"tokens"}.
    """
    limits = client.limits
    if over == "concurrent":
        return f"Too many concurrent requests for client {client.name!r}: the limit is {limits.concurrent_requests}."
    if over == "requests":
        return f"Rate limit reached for client {client.name!r}: {limits.requests_per_minute} requests per minute."
    if over == "too large":
        return (
            f"Request too large for client {client.name!r}: it may use up to {estimate} tokens, "
            f"more than the limit of {limits.tokens_per_minute} tokens per minute. "
            "Lower max_tokens or the prompt size."
        )
    return (
        f"Rate limit reached for client {client.name!r}: "
        f"{limits.tokens_per_minute} tokens per minute (this request reserves {estimate})."
    )


class Held(Protocol):
    """
    What an admitted request holds until it ends: a L{Reservation} here, a
    L{oaiproxy.access.shared.SharedReservation} with Redis.
    """

    estimate: int

    def settle(self, used_tokens: int) -> None:
        """
        Replace the reserved estimate by what the request really used;
        only the first call counts.  It never raises and never waits: a
        store that settles remotely does so in the background.
        """


class LimitStore(Protocol):
    """
    Where client limits live, as the admission will use them: admission
    may be a round trip away (Redis), so it may be asynchronous.
    """

    def admit(self, client: Client, estimate: int) -> "Held | Refusal | Deferred[Held | Refusal]":
        """
        Admit a request that may cost up to C{estimate} tokens, or say
        which limit it is over (with the client's rate headers): the
        answer itself when it is known at once, or a Deferred of it when
        it is a round trip away.  The Deferred never fails: a store that
        cannot answer decides locally.
        """


class LocalLimitStore:
    """
    The in-process L{Limiter} behind the L{LimitStore} interface: the
    same decisions, answered at once (no Deferred: every request asks).
    The limiter stays usable directly, as before.
    """

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def admit(self, client: Client, estimate: int) -> "Held | Refusal":
        admitted = self.limiter.admit(client, estimate)
        if isinstance(admitted, Refusal) and not admitted.headers:
            admitted.headers = tuple(self.limiter.headers(client))
        return admitted


def rate_headers(kind: str, limit: int, remaining: int, reset: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + kind.encode(), b"%d" % limit),
        (b"x-ratelimit-remaining-" + kind.encode(), b"%d" % remaining),
        (b"x-ratelimit-reset-" + kind.encode(), format_reset(reset).encode()),
    ]


def format_reset(seconds: float) -> str:
    """
    A duration the way OpenAI writes it in C{x-ratelimit-reset-*}:
    C{"20ms"}, C{"1s"}, C{"6m0s"}, C{"1h2m3s"}.
    """
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def estimate_tokens(
    body: bytes, document: Mapping[str, Any], limits: Limits, generates: bool = True
) -> tuple[int, int]:
    """
    The reservation for a request: C{(prompt_estimate, total_estimate)}.

    @param generates: the route generates text (chat, completions,
        responses), so the reservation covers the requested output too;
        otherwise (embeddings, moderations...) the prompt is the cost.
    """
    prompt = math.ceil(len(body) / 3)
    if not generates:
        return prompt, prompt
    output: int = limits.default_max_tokens
    # Chat, legacy completions, and the Responses API's name for the same;
    # read as upstream reads them (validation refused what it cannot read).
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = _count(document.get(name))
        if value:
            output = value
            break
    # Legacy completions generate best_of choices to return n of them.
    n = max(_count(document.get("n")) or 1, _count(document.get("best_of")) or 1)
    return prompt, prompt + output * n


def _count(value: Any) -> int:
    """
    The count in C{value}, or 0 for none (absent, zero, or refused).
    """
    try:
        return read_count(value) or 0
    except ValueError:
        return 0


#: Counts beyond this are all "more than any limit": 2**53, the largest
#: integer a float holds exactly.
MAX_COUNT = 2**53

NOT_A_COUNT = "must be an integer"
_DIGITS = re.compile(r"\s*\+?([0-9]+)\s*\Z")


def read_count(value: Any, minimum: int = 0) -> Optional[int]:
    """
    The whole number an upstream reads in C{value}, for a member the token
    reservation depends on: the reservation must count what upstream will
    generate, and lax upstreams (vLLM's, and others built on pydantic)
    take C{100000.0}, C{1e5} and C{"100000"} for C{100000}.  So an integer,
    an integral float and a string of decimal digits are that number
    (capped at L{MAX_COUNT}, which is beyond every limit); C{None} for an
    absent or null member.

    @raise ValueError: with the reason, for anything an upstream would not
        take as the same count: a boolean (pydantic reads C{true} as 1,
        OpenAI refuses it), a fraction, a non-finite number, any other
        string or type, or a number below C{minimum}.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(NOT_A_COUNT)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(NOT_A_COUNT)
        number = int(value) if abs(value) < MAX_COUNT else int(math.copysign(MAX_COUNT, value))
    elif isinstance(value, str):
        digits = _DIGITS.match(value)
        if digits is None:
            raise ValueError(NOT_A_COUNT)
        text = digits.group(1)
        # (Past 16 digits it is beyond MAX_COUNT anyway: no long parse.)
        number = int(text) if len(text) <= 16 else MAX_COUNT
    else:
        raise ValueError(NOT_A_COUNT)
    if number < minimum:
        raise ValueError(f"must be at least {minimum}")
    return min(number, MAX_COUNT)
