# -*- test-case-name: tests.access.test_budgets -*-
"""
Budget policy: the calendar periods a budget covers, what a request
reserves from it, and whether it fits.  Pure functions of their arguments
(the time is passed in), so every boundary is a test on a fake clock; the
store that keeps the totals is L{oaiproxy.access.budgetstore}.

A day ends at midnight and a month on the 1st, in the client's
C{budget_timezone} (UTC unless its entry says otherwise).  A day in a zone
with daylight saving time may be 23 or 25 hours long: the period is
computed from the local calendar, not by adding 24 hours.

Like the token limits, a budget is enforced by B{reserving} the most a
request can cost at admission and B{settling} on what it used: its prompt
estimate plus the output it allows, in tokens, and in dollars at its
model's prices (the prompt at the input price, the output at the output
price).  Concurrent requests therefore cannot overshoot a budget: each
sees what the others reserved.  A settlement may still charge more than
was reserved (a stream whose end could not be counted is charged its
reservation as a floor, and upstream may report more prompt tokens than
the estimate); the total can then exceed the budget by at most that
difference, and the next request is refused.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import cached_property
from typing import Optional
from zoneinfo import ZoneInfo

from oaiproxy.access.clients import Budgets, Client
from oaiproxy.ledger.prices import Price

__all__ = ["Period", "Cost", "Exhausted", "period_of", "reservation_cost", "decide", "exhausted_message", "PERIODS"]

#: The periods a budget can cover, shortest first.
PERIODS = ("day", "month")


@dataclass(frozen=True)
class Period:
    """
    One calendar day or month in a zone.

    @ivar kind: C{"day"} or C{"month"}.
    @ivar start: its first local date.
    @ivar begins: its start as a Unix time.
    @ivar ends: the start of the next one, as a Unix time.
    """

    kind: str
    start: datetime.date
    begins: float
    ends: float

    @cached_property
    def key(self) -> str:
        """
        Its name in the totals: C{2026-12-03} or C{2026-12} (computed once:
        every admission looks it up).
        """
        return self.start.isoformat() if self.kind == "day" else self.start.strftime("%Y-%m")

    def previous(self, zone: ZoneInfo) -> "Period":
        """
        The period just before this one.
        """
        return period_of(self.begins - 1, zone, self.kind)

    def utc_days(self) -> tuple[datetime.date, datetime.date]:
        """
        The first and last UTC days this period overlaps: the ledger's rows
        are by UTC day, so a period in another zone is seeded from every
        UTC day it touches, which may count a little more than the period
        (never less).
        """
        first = datetime.datetime.fromtimestamp(self.begins, datetime.timezone.utc).date()
        last = datetime.datetime.fromtimestamp(self.ends - 1, datetime.timezone.utc).date()
        return first, last


def _midnight(day: datetime.date, zone: ZoneInfo) -> float:
    # A local midnight that does not exist (a zone that skips it for DST)
    # resolves forward, as zoneinfo does with fold=0.
    return datetime.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def current_periods(now: float, zone: ZoneInfo) -> dict[str, Period]:
    """
    The day and the month holding C{now} in C{zone}, by kind.
    """
    return {kind: period_of(now, zone, kind) for kind in PERIODS}


def period_of(now: float, zone: ZoneInfo, kind: str) -> Period:
    """
    The day or month (C{kind}) holding the Unix time C{now} in C{zone}.
    """
    local = datetime.datetime.fromtimestamp(now, zone).date()
    if kind == "day":
        start = local
        following = start + datetime.timedelta(days=1)
    elif kind == "month":
        start = local.replace(day=1)
        following = (start + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {kind!r}")
    return Period(kind, start, _midnight(start, zone), _midnight(following, zone))


@dataclass(frozen=True)
class Cost:
    """
    Tokens and dollars; C{usd} is C{None} when the model has no price.
    """

    tokens: int
    usd: Optional[float]


def reservation_cost(prompt_estimate: int, total_estimate: int, price: Optional[Price]) -> Cost:
    """
    The most a request can cost: C{total_estimate} tokens, of which
    C{prompt_estimate} at the input price and the rest (the output it
    allows) at the output price.
    """
    output = max(0, total_estimate - prompt_estimate)
    prompt = total_estimate - output
    usd = None if price is None else (prompt * price.input + output * price.output) / 1e6
    return Cost(total_estimate, usd)


@dataclass(frozen=True)
class Exhausted:
    """
    A request over a budget: which one, and when its period ends.
    """

    budget: str
    resets: float
    message: str


def _budget_fields(budgets: Budgets, kind: str) -> tuple[tuple[str, Optional[float], str], ...]:
    if kind == "day":
        return (("tokens_per_day", budgets.tokens_per_day, "tokens"), ("usd_per_day", budgets.usd_per_day, "usd"))
    return (
        ("tokens_per_month", budgets.tokens_per_month, "tokens"),
        ("usd_per_month", budgets.usd_per_month, "usd"),
    )


def decide(
    client: Client, spent: dict[str, Cost], periods: dict[str, Period], cost: Cost, share: int = 1
) -> Optional[Exhausted]:
    """
    Whether C{cost} fits in every budget of C{client}, given what is
    C{spent} (reserved or settled) in each period kind: C{None} when it
    does, else the first budget it would exceed.  A request that would
    reach a budget exactly fits.  With C{share} above 1, only that part
    of each budget is available (a process deciding on its own spend
    alone, see L{oaiproxy.access.sharedbudgets}).
    """
    budgets = client.budgets
    for kind in PERIODS:
        used = spent.get(kind, Cost(0, 0.0))
        for name, limit, unit in _budget_fields(budgets, kind):
            if limit is None:
                continue
            available = limit / share
            if unit == "tokens":
                over = used.tokens + cost.tokens > available
            else:
                # An unpriced model never reaches here: admission refuses it
                # for a client with a dollar budget.
                over = (used.usd or 0.0) + (cost.usd or 0.0) > available + 1e-12
            if over:
                period = periods[kind]
                return Exhausted(name, period.ends, exhausted_message(client, name, limit, period))
    return None


def _dollars(amount: float) -> str:
    """
    C{$12.50}; a budget under a dollar keeps its significant digits
    (C{$0.001}), so no refusal reads "a budget of $0.00".
    """
    if amount >= 1 or amount == 0:
        return f"${amount:.2f}"
    return f"${amount:.6f}".rstrip("0")


def exhausted_message(client: Client, budget: str, limit: float, period: Period) -> str:
    """
    What the refusal says: which budget ran out, and when it resets (in the
    client's zone, and in UTC).
    """
    amount = f"{int(limit)} tokens" if budget.startswith("tokens") else _dollars(limit)
    per = "day" if budget.endswith("day") else "month"
    zone = client.budgets.zone
    resets = datetime.datetime.fromtimestamp(period.ends, zone)
    when = resets.isoformat(timespec="seconds")
    utc = datetime.datetime.fromtimestamp(period.ends, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if client.budgets.budget_timezone != "UTC":
        when = f"{when} ({client.budgets.budget_timezone}, {utc})"
    else:
        when = utc
    return (
        f"Budget exhausted for client {client.name!r}: its {budget} budget of {amount} per {per} "
        f"is spent (or reserved by requests in flight). It resets at {when}."
    )
