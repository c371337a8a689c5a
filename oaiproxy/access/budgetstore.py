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

Several processes on one ledger (C{--workers}, or daemons on one SQLite
file or PostgreSQL database): L{BudgetRefresh} reads the ledger's totals
again every second, so a total is the ledger's (every process's settled
and written spend, plus this one's unwritten) plus this process's
reservations in flight and what it settled since the read.  What the
others have in flight, and settled within the last flush and read (about
two seconds), is not seen: that is the overshoot bound of the README's
"Usage and budgets".  Without a ledger the totals are this process's
alone, from its start.  With C{--shared-state} the totals live in Redis
(L{oaiproxy.access.sharedbudgets}), and these are its fallback.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.access.budgets import (
    PERIODS,
    Cost,
    Exhausted,
    Period,
    current_periods,
    decide,
    reservation_cost,
)
from oaiproxy.access.clients import Client
from oaiproxy.access.limits import Held, LimitStore, Refusal
from oaiproxy.ledger.prices import Price, Prices
from oaiproxy.ledger.queries import COLUMNS, Spend
from oaiproxy.observe.metrics import BUDGET_REMAINING
from oaiproxy.observe.records import RequestRecord

__all__ = [
    "PeriodTotal",
    "BUDGETS",
    "REFRESH_SECONDS",
    "BudgetHold",
    "BudgetRefresh",
    "BudgetStore",
    "BudgetedLimits",
    "Unpriced",
    "ledger_days",
    "seed_from_ledger",
    "spent_cost",
]

_log = Logger()


@dataclass(frozen=True)
class Unpriced:
    """
    A client with a dollar budget asked for a model without a price.
    """

    model: Optional[str]
    prices_file: Optional[str]


class PeriodTotal:
    """
    One client's total in one period, in three parts: what the ledger said
    at its last read (every process's settled spend, written or still in
    this process's writer), what this process reserved for requests in
    flight, and what it settled since that read.  A read of the ledger
    replaces the first and empties the last: what was settled before it
    is in the ledger's rows (or its writer's) by then.
    """

    __slots__ = ("ledger_tokens", "ledger_usd", "reserved_tokens", "reserved_usd", "settled_tokens", "settled_usd")

    def __init__(self) -> None:
        self.ledger_tokens = 0
        self.ledger_usd = 0.0
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        self.settled_tokens = 0
        self.settled_usd = 0.0

    def reserve(self, cost: Cost) -> None:
        self.reserved_tokens += cost.tokens
        self.reserved_usd += cost.usd or 0.0

    def settle(self, reserved: Cost, spent: Cost) -> None:
        self.reserved_tokens -= reserved.tokens
        self.reserved_usd -= reserved.usd or 0.0
        self.settled_tokens += spent.tokens
        self.settled_usd += spent.usd or 0.0

    def read(self, tokens: int, usd: float) -> None:
        self.ledger_tokens, self.ledger_usd = tokens, usd
        self.settled_tokens, self.settled_usd = 0, 0.0

    def cost(self) -> Cost:
        return Cost(
            self.ledger_tokens + self.reserved_tokens + self.settled_tokens,
            self.ledger_usd + self.reserved_usd + self.settled_usd,
        )

    def ledger(self) -> Cost:
        return Cost(self.ledger_tokens, self.ledger_usd)


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
        self, totals: Sequence[PeriodTotal], reserved: Cost, record: Optional[RequestRecord], price: Optional[Price]
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
            total.settle(self._reserved, spent)
        self._settled_as(spent)

    def _settled_as(self, spent: Cost) -> None:
        """
        Where else the settlement goes (the shared store's Redis).
        """


class BudgetStore:
    """
    The budget totals of every client, by (client, period).

    @param clock: tells which period it is.
    @param prices: the prices in use (replaced on reload).
    @param share: what part of each budget this process may spend on its
        own knowledge alone (the shared store's fallback without a ledger:
        C{instances}); 1 otherwise.
    """

    def __init__(self, clock: IReactorTime, prices: Prices, share: int = 1) -> None:
        self._clock = clock
        self.prices = prices
        self.share = share
        self._totals: dict[tuple[str, str, str], PeriodTotal] = {}
        self._periods: dict[ZoneInfo, dict[str, Period]] = {}
        self._forget_at = 4 * _PERIOD_KEYS

    def periods(self, client: Client) -> dict[str, Period]:
        """
        The client's current day and month (not to be changed: the same
        dict serves every client in that zone until the day ends, since
        working them out is most of an admission's cost otherwise).
        """
        now = self._clock.seconds()
        zone = client.budgets.zone
        known = self._periods.get(zone)
        if known is not None:
            day = known["day"]
            if day.begins <= now < day.ends:
                return known
        periods = self._periods[zone] = current_periods(now, zone)
        return periods

    def _total(self, client: str, period: Period) -> PeriodTotal:
        key = (client, period.kind, period.key)
        total = self._totals.get(key)
        if total is None:
            if len(self._totals) > self._forget_at:
                self._forget_past()
            total = self._totals[key] = PeriodTotal()
        return total

    def _forget_past(self) -> None:
        """
        Drop the totals of periods that are over and have nothing in
        flight: memory stays bounded by the clients, not by the days run.
        """
        oldest = _oldest_current(self._clock.seconds())
        for key, total in list(self._totals.items()):
            if total.reserved_tokens == 0 and key[2] < oldest[key[1]]:
                del self._totals[key]
        # With many clients and little to drop, the next scan waits until
        # the totals have doubled: a scan per new total would make every
        # admission O(clients).
        self._forget_at = max(4 * _PERIOD_KEYS, 2 * len(self._totals))

    def spent(self, client: Client) -> dict[str, Cost]:
        """
        What the client has spent or reserved in its current periods, as
        this process knows it (see the module's docstring).
        """
        return {kind: self._total(client.name, period).cost() for kind, period in self.periods(client).items()}

    def current(self, client: Client) -> "Deferred[dict[str, Cost]]":
        """
        What the client has spent or reserved in its current periods, the
        group's truth: here L{spent}; the shared store reads Redis.
        """
        return succeed(self.spent(client))

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
        refused = decide(client, {kind: t.cost() for kind, t in zip(PERIODS, totals)}, periods, cost, self.share)
        if refused is not None:
            return refused
        for total in totals:
            total.reserve(cost)
        return BudgetHold(totals, cost, record, price)

    def reserve(
        self,
        client: Client,
        model: Optional[str],
        prompt_estimate: int,
        estimate: int,
        record: Optional[RequestRecord] = None,
    ) -> "Optional[BudgetHold] | Exhausted | Unpriced | Deferred[Optional[BudgetHold] | Exhausted | Unpriced]":
        """
        L{admit}, as admission calls it: here the answer itself; the
        shared store's may be a Deferred, a round trip away.
        """
        return self.admit(client, model, prompt_estimate, estimate, record)

    def seed(self, client: Client, rows: Iterable[tuple[str, int, float]]) -> None:
        """
        Set what the ledger says the client spent: C{(utc_day, tokens,
        usd)} rows (the whole ledger's over its current periods), each
        counted in every current period it overlaps.  What this process
        settled before is in those rows; what it has in flight stays.
        """
        rows = list(rows)
        for period in self.periods(client).values():
            first, last = (d.isoformat() for d in period.utc_days())
            tokens, usd = 0, 0.0
            for day, t, u in rows:
                if first <= day <= last:
                    tokens += t
                    usd += u
            self._total(client.name, period).read(tokens, usd)

    def ledger(self, client: Client) -> dict[str, Cost]:
        """
        What the ledger said at its last read, by period kind (what the
        shared store seeds an absent Redis key with).
        """
        return {kind: self._total(client.name, period).ledger() for kind, period in self.periods(client).items()}


#: Totals kept before the past ones are looked for (times 4).
_PERIOD_KEYS = 1024


def _oldest_current(now: float) -> dict[str, str]:
    """
    By period kind, a key older than any zone's current period: the UTC
    day before yesterday, the month of 32 days ago (zones are at most a
    day apart).
    """
    day = datetime.datetime.fromtimestamp(now - 2 * 86400, datetime.timezone.utc).date()
    month = datetime.datetime.fromtimestamp(now - 32 * 86400, datetime.timezone.utc).date()
    return {"day": day.isoformat(), "month": month.strftime("%Y-%m")}


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

    def admit(self, client: Client, estimate: int) -> "Held | Refusal | Deferred[Held | Refusal]":
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
    Set the totals of C{clients}' current periods from the ledger: its
    rows (L{oaiproxy.ledger.queries.Spend} or
    L{Row <oaiproxy.ledger.queries.Row>}) and the writer's L{pending_rows
    <oaiproxy.ledger.writer.LedgerWriter.pending_rows>} (keyed by
    C{(day, client, model, upstream)}, totals in
    L{oaiproxy.ledger.queries.COLUMNS} order).  Every client with a budget
    is set, to nothing if the ledger has nothing of it.  Returns the
    clients the ledger had spend of.
    """
    by_client: dict[str, list[tuple[str, int, float]]] = {}
    for row in rows:
        tokens = row.tokens if isinstance(row, Spend) else row.prompt_tokens + row.completion_tokens
        by_client.setdefault(row.client, []).append((row.day, tokens, row.cost_usd))
    prompt, completion, cost = (COLUMNS.index(n) for n in ("prompt_tokens", "completion_tokens", "cost_usd"))
    for (day, name, _, _), totals in pending.items():
        by_client.setdefault(name, []).append((day, totals[prompt] + totals[completion], totals[cost]))
    seeded = 0
    for client in clients:
        if client.budgets.any:
            store.seed(client, by_client.get(client.name, ()))
            seeded += client.name in by_client
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


#: Seconds between two reads of the ledger's totals (and of the gauges).
REFRESH_SECONDS = 1.0


class BudgetRefresh(Service):
    """
    Keeps this process's totals near the group's: every C{interval}
    seconds (on the clock passed in, never on the request path) one
    aggregate query reads every client's spend in the current periods
    from the ledger, and the totals are set from it plus what the writer
    still holds (L{seed_from_ledger}).  Another process's settled spend
    therefore counts here within about a flush and a refresh (two
    seconds); this process's own reservations stay local.  At most one
    read is in flight; a read that fails keeps the totals and is said once
    per episode.  Each tick also sets C{oaiproxy_budget_remaining}.

    @ivar shown: the C{(client, budget)} series of the gauge in use now.

    @param clients: the clients in use (read at every tick: a reload's
        budgets count at once).
    @param read: C{(first_day, last_day) -> Deferred[list[Spend]]}, the
        ledger's query; C{None} without a ledger (the gauges only).
    @param unwritten: the writer's L{pending_rows
        <oaiproxy.ledger.writer.LedgerWriter.pending_rows>}.
    @param registry: where the gauge registers (the metrics'
        C{series_registry}).
    """

    def __init__(
        self,
        store: BudgetStore,
        clients: Callable[[], Iterable[Client]],
        clock: IReactorTime,
        read: Optional[Callable[[str, str], "Deferred[list[Spend]]"]] = None,
        unwritten: Callable[[], Mapping[tuple[str, str, str, str], Sequence[Any]]] = dict,
        registry: Optional[CollectorRegistry] = None,
        interval: float = REFRESH_SECONDS,
    ) -> None:
        self._store = store
        self._clients = clients
        self._clock = clock
        self._read = read
        self._unwritten = unwritten
        self._reading: Optional[Deferred[None]] = None
        self._failing = False
        #: Clients whose figure is being read (one read each at a time).
        self._gauging: set[str] = set()
        self._gauge_failing = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._interval = interval
        self.shown: set[tuple[str, str]] = set()
        # A group's series go to files, not to a registry.
        self._group = registry is None
        self.remaining = Gauge(
            BUDGET_REMAINING,
            "What is left of each client's budget in its current period (tokens, or USD for usd_per_*), as this "
            "process sees it (a group shows the lowest of its workers).",
            ["client", "budget"],
            registry=registry,
            multiprocess_mode="livemin",
        )

    def startService(self) -> None:
        super().startService()
        # A tick that raised would end the loop (and its Deferred's error
        # would otherwise go unseen): said, then the loop starts again.
        self._loop.start(self._interval, now=True).addErrback(self._stopped)

    def _stopped(self, failure: Failure) -> None:
        _log.failure("budgets: the refresh failed; starting it again", failure)
        if self.running and not self._loop.running:
            self._loop.start(self._interval, now=False).addErrback(self._stopped)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return succeed(None)

    def tick(self) -> None:
        """
        Read the ledger (unless a read is in flight) and set the gauges.
        """
        budgeted = [client for client in self._clients() if client.budgets.any]
        if self._read is not None and self._reading is None:
            days = ledger_days(self._store, budgeted)
            if days is not None:
                d = self._read(*days)
                # (_read_failed also sees an error of _read_back itself.)
                self._reading = d.addCallback(self._read_back).addErrback(self._read_failed)
                self._reading.addBoth(self._done)
        self._gauges(budgeted)

    def _read_back(self, rows: list[Spend]) -> None:
        # The clients of now, not of when the read was asked: a reload in
        # between is applied, and the writer's rows are those it missed.
        seed_from_ledger(self._store, self._clients(), rows, self._unwritten())
        if self._failing:
            self._failing = False
            _log.info("budgets: reading the usage ledger again; totals are the group's again")

    def _read_failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            _log.warn(
                "budgets: cannot read the usage ledger ({why}); other processes' spend is not seen until it is back",
                why=failure.getErrorMessage().splitlines()[0] if failure.getErrorMessage() else "",
            )

    def _done(self, _: object) -> None:
        self._reading = None

    def _gauges(self, budgeted: Sequence[Client]) -> None:
        shown: set[tuple[str, str]] = set()
        for client in budgeted:
            fields = [(name, getattr(client.budgets, name)) for name in BUDGETS]
            fields = [(name, limit) for name, limit in fields if limit is not None]
            shown.update((client.name, name) for name, _ in fields)
            if client.name in self._gauging:
                # The last read has not come back (Redis slow): no pile-up.
                continue
            self._gauging.add(client.name)
            d = self._store.current(client).addCallback(self._show, client.name, fields)
            d.addErrback(self._gauge_failed).addBoth(self._gauged, client.name)
        if not self._group:
            # (In a group the files keep a removed series anyway, and
            # prometheus_client warns: the scrape leaves it out instead.)
            for gone in self.shown - shown:
                self.remaining.remove(*gone)
        self.shown = shown

    def _gauged(self, _: object, client: str) -> None:
        self._gauging.discard(client)

    def _gauge_failed(self, failure: Failure) -> None:
        """
        A figure could not be read: the gauge keeps its last value; logged
        once until a read succeeds again.
        """
        if not self._gauge_failing:
            self._gauge_failing = True
            _log.failure("could not read a client's budget totals for oaiproxy_budget_remaining", failure)

    def _show(self, spent: dict[str, Cost], client: str, fields: Sequence[tuple[str, float]]) -> None:
        for name, limit in fields:
            used = spent[name.rpartition("_")[2]]
            value = used.tokens if name.startswith("tokens") else (used.usd or 0.0)
            self.remaining.labels(client, name).set(max(0.0, limit - value))
        self._gauge_failing = False


#: The budgets a client can have, as the clients file names them.
BUDGETS = ("tokens_per_day", "usd_per_day", "tokens_per_month", "usd_per_month")
