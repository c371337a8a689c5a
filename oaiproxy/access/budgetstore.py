# -*- test-case-name: tests.access.test_budgetstore -*-
"""
The budget totals of this process, and the reserve-then-settle that keeps
them (the policy is L{oaiproxy.access.budgets}).

Each client has a total per period (its current day and month, in its
zone): tokens and dollars, reserved by requests in flight or settled by
finished ones.  Admission reserves the most a request can cost and the
end of the request settles on what it used, so concurrent requests see
each other's reservations and cannot overshoot together.  The check and
the reservation happen in one synchronous step on the reactor thread:
nothing can come between them.

At startup the totals of the current periods are seeded from the ledger
(its rows, plus what it still holds in memory), so a restart does not
reset a budget.  The ledger's rows are by UTC day: a period in another
zone is seeded from every UTC day it overlaps (see
L{oaiproxy.access.budgets.Period.utc_days}), which can count a little more
than the period, never less.

The totals are this process's: with C{--workers} or C{--shared-state},
each process enforces the whole budget on what it saw itself plus what
the ledger had at its start (see the README, "Usage and budgets").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oaiproxy.access.budgets import PERIODS, Cost, Exhausted, Period, decide, period_of, reservation_cost
from oaiproxy.access.clients import Client
from oaiproxy.access.limits import Held, LimitStore, Refusal
from oaiproxy.ledger.prices import Price, Prices
from oaiproxy.ledger.queries import COLUMNS
from oaiproxy.observe.records import RequestRecord

__all__ = ["BudgetStore", "BudgetHold", "BudgetedLimits", "Unpriced", "spent_cost", "seed_from_ledger", "ledger_days"]

_log = Logger()


@dataclass(frozen=True)
class Unpriced:
    """
    A client with a dollar budget asked for a model without a price.
    """

    model: Optional[str]
    prices_file: Optional[str]


class _Total:
    __slots__ = ("tokens", "usd")

    def __init__(self) -> None:
        self.tokens = 0
        self.usd = 0.0

    def add(self, tokens: int, usd: float) -> None:
        self.tokens += tokens
        self.usd += usd

    def cost(self) -> Cost:
        return Cost(self.tokens, self.usd)


def spent_cost(used_tokens: int, record: Optional[RequestRecord], price: Optional[Price]) -> Cost:
    """
    What a request that used C{used_tokens} really cost.  The dollars come
    from the usage on its record (the exchange puts it there before it
    settles): prompt, cached and output at their prices; tokens charged
    beyond that usage (the reservation floor of a stream whose end could
    not be counted) at the output price.  Without usage on the record, only
    the prompt can have been processed: the input price.
    """
    if used_tokens <= 0:
        return Cost(0, 0.0 if price is not None else None)
    if price is None:
        return Cost(used_tokens, None)
    usage = record.usage if record is not None else None
    if usage is None:
        return Cost(used_tokens, used_tokens * price.input / 1e6)
    extra = max(0, used_tokens - usage.total)
    return Cost(used_tokens, price.cost(usage) + extra * price.output / 1e6)


class BudgetHold:
    """
    An admitted request's reservation in its client's budget periods.
    Settle it exactly once, when the request ends.
    """

    __slots__ = ("_totals", "_reserved", "_record", "_price", "_settled", "estimate")

    def __init__(
        self, totals: Sequence[_Total], reserved: Cost, record: Optional[RequestRecord], price: Optional[Price]
    ) -> None:
        self._totals = totals
        self._reserved = reserved
        self._record = record
        self._price = price
        self._settled = False
        self.estimate = reserved.tokens

    def settle(self, used_tokens: int) -> None:
        """
        Replace the reservation by what the request cost (see
        L{spent_cost}); only the first call counts.
        """
        if self._settled:
            return
        self._settled = True
        spent = spent_cost(used_tokens, self._record, self._price)
        for total in self._totals:
            total.add(spent.tokens - self._reserved.tokens, (spent.usd or 0.0) - (self._reserved.usd or 0.0))


class BudgetStore:
    """
    The budget totals of every client, by (client, period).

    @param clock: tells which period it is.
    @param prices: the prices in use (replaced on reload).
    """

    def __init__(self, clock: IReactorTime, prices: Prices) -> None:
        self._clock = clock
        self.prices = prices
        self._totals: dict[tuple[str, str, str], _Total] = {}

    def periods(self, client: Client) -> dict[str, Period]:
        """
        The client's current day and month.
        """
        now = self._clock.seconds()
        zone = client.budgets.zone
        return {kind: period_of(now, zone, kind) for kind in PERIODS}

    def _total(self, client: str, period: Period) -> _Total:
        key = (client, period.kind, period.key)
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = _Total()
        return total

    def spent(self, client: Client) -> dict[str, Cost]:
        """
        What the client has spent or reserved in its current periods.
        """
        return {kind: self._total(client.name, period).cost() for kind, period in self.periods(client).items()}

    def price(self, client: Client, model: Optional[str]) -> "Optional[Price] | Unpriced":
        """
        The price of C{model}; L{Unpriced} when the client has a dollar
        budget and the model has none (its spend could not be known).
        """
        book = self.prices.book
        price = book.price(model)
        if price is None and client.budgets.in_usd:
            return Unpriced(model, book.path)
        return price

    def admit(
        self,
        client: Client,
        model: Optional[str],
        prompt_estimate: int,
        estimate: int,
        record: Optional[RequestRecord] = None,
    ) -> "Optional[BudgetHold] | Exhausted | Unpriced":
        """
        Reserve the most the request can cost in every budget period of the
        client, or say why not: C{None} for a client without budgets.
        """
        if not client.budgets.any:
            return None
        price = self.price(client, model)
        if isinstance(price, Unpriced):
            return price
        periods = self.periods(client)
        totals = [self._total(client.name, periods[kind]) for kind in PERIODS]
        cost = reservation_cost(prompt_estimate, estimate, price)
        refused = decide(client, {kind: t.cost() for kind, t in zip(PERIODS, totals)}, periods, cost)
        if refused is not None:
            return refused
        for total in totals:
            total.add(cost.tokens, cost.usd or 0.0)
        return BudgetHold(totals, cost, record, price)

    def seed(self, client: Client, rows: Iterable[tuple[str, int, float]]) -> None:
        """
        Add what the ledger says the client spent: C{(utc_day, tokens,
        usd)} rows, each added to every current period it overlaps.
        """
        for period in self.periods(client).values():
            first, last = period.utc_days()
            total = self._total(client.name, period)
            for day, tokens, usd in rows:
                if first.isoformat() <= day <= last.isoformat():
                    total.add(tokens, usd)


class _BothHeld:
    """
    A request's hold on its limits and on its budgets, settled together.
    """

    __slots__ = ("limits", "budgets", "estimate", "_settled")

    def __init__(self, limits: Held, budgets: BudgetHold) -> None:
        self.limits = limits
        self.budgets = budgets
        self.estimate = limits.estimate
        self._settled = False

    def settle(self, used_tokens: int) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            self.budgets.settle(used_tokens)
        finally:
            self.limits.settle(used_tokens)


class BudgetedLimits:
    """
    A limit store with the budgets beside it: admission
    (L{oaiproxy.access.admission.Admission}) checks the limits through
    C{limits}, then reserves in C{budgets}, and hands the request one hold
    that settles both.
    """

    def __init__(self, limits: LimitStore, budgets: BudgetStore) -> None:
        self.limits = limits
        self.budgets = budgets

    def admit(self, client: Client, estimate: int) -> "Deferred[Held | Refusal]":
        return self.limits.admit(client, estimate)

    @staticmethod
    def both(limits: Held, budgets: Optional[BudgetHold]) -> Held:
        return limits if budgets is None else _BothHeld(limits, budgets)


def seed_from_ledger(
    store: BudgetStore,
    clients: Iterable[Client],
    rows: Iterable[Any],
    pending: Mapping[tuple[str, str, str, str], Sequence[Any]],
) -> int:
    """
    Start the totals of C{clients}' current periods from the ledger: its
    L{oaiproxy.ledger.queries.Row}s and the writer's L{pending_rows
    <oaiproxy.ledger.writer.LedgerWriter.pending_rows>} (keyed by
    C{(day, client, model, upstream)}, totals in
    L{oaiproxy.ledger.queries.COLUMNS} order).  Returns the clients seeded.
    """
    by_client: dict[str, list[tuple[str, int, float]]] = {}
    for row in rows:
        by_client.setdefault(row.client, []).append((row.day, row.prompt_tokens + row.completion_tokens, row.cost_usd))
    prompt, completion, cost = (COLUMNS.index(n) for n in ("prompt_tokens", "completion_tokens", "cost_usd"))
    for (day, name, _, _), totals in pending.items():
        by_client.setdefault(name, []).append((day, totals[prompt] + totals[completion], totals[cost]))
    seeded = 0
    for client in clients:
        if client.budgets.any and client.name in by_client:
            store.seed(client, by_client[client.name])
            seeded += 1
    return seeded


def ledger_days(store: BudgetStore, clients: Iterable[Client]) -> Optional[tuple[str, str]]:
    """
    The UTC days the ledger must be read over to seed C{clients}' current
    periods (the earliest month start to the latest day end), or C{None}
    when no client has a budget.
    """
    spans = [period.utc_days() for client in clients if client.budgets.any for period in store.periods(client).values()]
    if not spans:
        return None
    return min(a for a, _ in spans).isoformat(), max(b for _, b in spans).isoformat()
