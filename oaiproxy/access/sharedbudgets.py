# -*- test-case-name: tests.access.test_sharedbudgets,tests.e2e.test_shared_budgets -*-
"""
Budget totals shared through Redis by several processes and hosts
(C{--shared-state}); the ledger stays the record.

Over the link of L{oaiproxy.sharedstate.link}, a client's total in each
current period is one hash (L{KeySpace.budget}: tokens, and dollars as
integer nano-dollars so that Redis adds them exactly).  Admission is one
round trip (C{budget_admit.lua}: every budget of the request checked, and
the reservation taken in all of them, or none, atomically), settlement
one (C{budget_settle.lua}: the difference added).  A key absent from
Redis is created from the ledger's total (the local store's last read of
it, L{oaiproxy.access.budgetstore.BudgetRefresh}) by the script that
finds it absent: of several processes starting at once, only the first
seeds it.  Keys expire an hour after their period ends.

While Redis is unreachable (the link's deadline, the link down), the
process decides on its local totals (L{BudgetStore}, which it keeps up to
date beside Redis): with a ledger, the whole budget against the ledger's
totals, read every second, plus its own (the same bound as several
processes without C{--shared-state}); without a ledger, C{1 / instances}
of each budget against its own spend alone.  Every request so decided is
counted (C{oaiproxy_shared_state_budget_fallback_admitted_total}); what
it cost is added to Redis at settlement, or when the link is back up
(L{SharedBudgetStore._add}), as is a settlement that could not be sent.
A settlement sent but unanswered may leave its reservation charged there
(the safe side) until the period's key expires: counted
(C{oaiproxy_shared_state_budget_lost_settles_total}) and warned of once
per episode; the ledger has the truth.

An admission the process gave up waiting for (its deadline missed, its
caller cancelled) is decided locally, but Redis may still run it: the
script also writes a marker of what it reserved (L{KeySpace.budget_marker},
living L{MARKER_TTL}), settlement deletes it, and an abandoned admission
sends C{budget_release.lua}, which gives the marker's amounts back only if
the marker is there.  A release that cannot be sent (the link down) is
sent again when the link is back up, while its marker can still exist.
"""

from __future__ import annotations

import uuid
from typing import Callable, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.access.budgets import PERIODS, Cost, Exhausted, Period, exhausted_message, reservation_cost
from oaiproxy.access.budgetstore import BudgetHold, BudgetStore, PeriodTotal, Unpriced
from oaiproxy.access.clients import Client
from oaiproxy.ledger.prices import Price, Prices
from oaiproxy.observe.records import RequestRecord
from oaiproxy.sharedstate.link import KeySpace, RedisLink, Unavailable

__all__ = ["SharedBudgetStore", "SharedBudgetHold", "EXPIRY_MARGIN", "MARKER_TTL"]

#: Seconds a period's key outlives the period (clocks differ a little).
EXPIRY_MARGIN = 3600.0

#: Seconds an admission's marker lives in Redis: how long a release of an
#: abandoned admission can still give its reservation back (a link down
#: longer than this leaves it charged until the period's key expires).
MARKER_TTL = 600.0

#: Releases kept for the link's return at most (each is a few keys).
MAX_PENDING_RELEASES = 10_000

_log = Logger()


def nano(usd: Optional[float]) -> int:
    """
    Dollars as the integer nano-dollars Redis keeps.
    """
    return round((usd or 0.0) * 1e9)


class SharedBudgetHold(BudgetHold):
    """
    A reservation taken in Redis (and mirrored in the local totals): its
    settlement adds the difference there too.

    @ivar settled: fires once the settlement is done or given up.
    """

    __slots__ = ("_store", "_keys", "settled")

    def __init__(
        self,
        totals: Sequence[PeriodTotal],
        reserved: Cost,
        record: Optional[RequestRecord],
        price: Optional[Price],
        store: "SharedBudgetStore",
        keys: Sequence[str],
    ) -> None:
        super().__init__(totals, reserved, record, price)
        self._store = store
        self._keys = list(keys)
        self.settled: Deferred[None] = Deferred()

    def _settled_as(self, spent: Cost) -> None:
        tokens = spent.tokens - self._reserved.tokens
        usd = nano(spent.usd) - nano(self._reserved.usd)
        self._store._add(self._keys, tokens, usd).addBoth(lambda _: self.settled.callback(None))


class _FallbackHold(BudgetHold):
    """
    A reservation decided locally (Redis unreachable, or late): nothing of
    it is in Redis, so its settlement adds all it cost there (at once, or
    when the link is back up).
    """

    __slots__ = ("_store", "_keys")

    def __init__(self, held: BudgetHold, store: "SharedBudgetStore", keys: Sequence[str]) -> None:
        super().__init__(held._totals, held._reserved, held._record, held._price)
        self._store = store
        self._keys = list(keys)

    def _settled_as(self, spent: Cost) -> None:
        self._store._add(self._keys, spent.tokens, nano(spent.usd))


class SharedBudgetStore(BudgetStore):
    """
    The budget totals of a group, in Redis (see the module's docstring).

    @param instances: how many processes share the budgets.
    @param ledger: whether the process reads a ledger (it then falls back
        on the whole budget, else on C{1 / instances} of it).
    @ivar fallback_admitted: requests whose budgets were decided locally.
    """

    def __init__(
        self,
        clock: IReactorTime,
        prices: Prices,
        link: RedisLink,
        keys: Optional[KeySpace] = None,
        instances: int = 1,
        ledger: bool = False,
    ) -> None:
        super().__init__(clock, prices, share=1 if ledger else max(1, instances))
        self.link = link
        self.keys = keys or KeySpace()
        self.fallback_admitted = 0
        #: Called for each request decided locally (the metrics).
        self.on_fallback: Callable[[], None] = lambda: None
        #: Settlements that Redis may not have applied (see L{_add}).
        self.lost_settles = 0
        #: Called for each of them (the metrics).
        self.on_lost_settle: Callable[[], None] = lambda: None
        self._warned = False
        #: Releases not sent (the link down): (keys, when given up).
        self._pending: list[tuple[list[str], float]] = []
        #: Additions not sent (the link down), by keys: tokens, nano-USD.
        self._unsent: dict[tuple[str, ...], list[int]] = {}
        link.watchers.append(self._link_changed)

    def _add(self, keys: Sequence[str], tokens: int, usd: int) -> "Deferred[None]":
        """
        Add to a client's totals in Redis (C{budget_settle.lua}; the last
        key, a request's marker, deleted).  Not sent (the link down): kept,
        summed by keys, and sent when the link is back up, so what was
        spent meanwhile reaches Redis.  Sent but unanswered: counted and
        warned of once per episode (Redis may or may not have applied it;
        the ledger has the truth).
        """
        if not tokens and not usd:
            return succeed(None)
        d = self.link.call("budget_settle", keys, [tokens, usd])
        if d.called:
            unsent: list[Failure] = []
            d.addErrback(unsent.append)
            if unsent and unsent[0].check(Unavailable):
                total = self._unsent.setdefault(tuple(keys), [0, 0])
                total[0] += tokens
                total[1] += usd
                return succeed(None)
            if unsent:
                d = fail(unsent[0])

        def lost(failure: Failure) -> None:
            self.lost_settles += 1
            self.on_lost_settle()
            if failure.check(Unavailable, CancelledError):
                if not self._warned:
                    self._warned = True
                    _log.warn(
                        "budget settlements unconfirmed by the shared state ({why}): Redis may keep"
                        " reservations charged until their periods end; counted in"
                        " oaiproxy_shared_state_budget_lost_settles_total",
                        why=failure.getErrorMessage(),
                    )
                return
            _log.failure("the budget_settle script failed", failure)

        return d.addCallbacks(lambda _: None, lost)

    def _link_changed(self, up: bool) -> None:
        if not up:
            return
        self._warned = False
        unsent, self._unsent = self._unsent, {}
        for added, (tokens, usd) in unsent.items():
            self._add(list(added), tokens, usd)
        now = self._clock.seconds()
        pending, self._pending = self._pending, []
        for keys, since in pending:
            if now - since < MARKER_TTL:
                self._release(keys, since)

    def _release(self, keys: list[str], since: Optional[float] = None) -> None:
        """
        Give back what Redis may have reserved for an admission this
        process gave up on (see the module's docstring).
        """
        since = self._clock.seconds() if since is None else since

        def unsent(failure: Failure) -> None:
            if failure.check(Unavailable, CancelledError):
                if len(self._pending) < MAX_PENDING_RELEASES:
                    self._pending.append((keys, since))
                return
            _log.failure("the budget_release script failed", failure)

        self.link.call("budget_release", keys, []).addCallbacks(lambda _: None, unsent)

    def _keys(self, client: Client, periods: dict[str, Period]) -> list[str]:
        return [self.keys.budget(client.name, kind, periods[kind].key) for kind in PERIODS]

    def reserve(
        self,
        client: Client,
        model: Optional[str],
        prompt_estimate: int,
        estimate: int,
        record: Optional[RequestRecord] = None,
    ) -> "Deferred[Optional[BudgetHold] | Exhausted | Unpriced]":
        if not client.budgets.any:
            return succeed(None)
        price = self.price(client, model)
        if isinstance(price, Unpriced):
            return succeed(price)
        if not self.link.up:
            return succeed(self._locally(client, model, prompt_estimate, estimate, record))
        periods = self.periods(client)
        cost = reservation_cost(prompt_estimate, estimate, price)
        seeds = self.ledger(client)
        budgets = client.budgets
        args: list[int] = [cost.tokens, nano(cost.usd)]
        for kind in PERIODS:
            tokens = getattr(budgets, f"tokens_per_{kind}")
            usd = getattr(budgets, f"usd_per_{kind}")
            args += [
                -1 if tokens is None else int(tokens),
                -1 if usd is None else nano(usd),
                seeds[kind].tokens,
                nano(seeds[kind].usd),
                int((periods[kind].ends + EXPIRY_MARGIN) * 1000),
            ]
        args.append(int(MARKER_TTL * 1000))
        keys = self._keys(client, periods) + [self.keys.budget_marker(client.name, uuid.uuid4().hex)]
        # The caller's Deferred is not the link's: cancelling it abandons
        # the admission (decided by nobody; released in Redis) without
        # cancelling the call, whose late reply is then only read.
        result: "Deferred[Optional[BudgetHold] | Exhausted | Unpriced]" = Deferred(lambda _: None)
        d = self.link.call("budget_admit", keys, args)

        def answered(reply: Sequence[int]) -> "Optional[BudgetHold | Exhausted]":
            index, unit = (int(v) for v in reply[:2])
            if result.called:
                # The caller cancelled: nobody holds this reservation.
                if index == 0:
                    self._release(keys)
                return None
            if index == 0:
                totals = [self._total(client.name, periods[kind]) for kind in PERIODS]
                for total in totals:
                    total.reserve(cost)
                return SharedBudgetHold(totals, cost, record, price, self, keys)
            kind = PERIODS[index - 1]
            name = f"{'tokens' if unit == 1 else 'usd'}_per_{kind}"
            limit = getattr(budgets, name)
            period = periods[kind]
            return Exhausted(name, period.ends, exhausted_message(client, name, limit, period))

        def unanswered(failure: Failure) -> "Optional[BudgetHold] | Exhausted | Unpriced":
            if not failure.check(Unavailable, CancelledError):
                _log.failure("the budget_admit script failed; deciding locally", failure)
            # Redis may still run it (or have run it): give back what it
            # reserves, since this request is decided locally.
            self._release(keys)
            if result.called:
                return None
            return self._locally(client, model, prompt_estimate, estimate, record)

        def deliver(outcome: "Optional[BudgetHold] | Exhausted | Unpriced") -> None:
            if not result.called:
                result.callback(outcome)

        d.addCallbacks(answered, unanswered).addCallback(deliver)
        return result

    def _locally(
        self, client: Client, model: Optional[str], prompt: int, estimate: int, record: Optional[RequestRecord]
    ) -> "Optional[BudgetHold] | Exhausted | Unpriced":
        held = self.admit(client, model, prompt, estimate, record)
        if isinstance(held, BudgetHold):
            self.fallback_admitted += 1
            self.on_fallback()
            keys = self._keys(client, self.periods(client)) + [self.keys.budget_marker(client.name, "-")]
            return _FallbackHold(held, self, keys)
        return held

    def current(self, client: Client) -> "Deferred[dict[str, Cost]]":
        """
        The totals in Redis (a period whose key is absent, or Redis
        unreachable: the local totals).
        """
        local = self.spent(client)
        if not client.budgets.any or not self.link.up:
            return succeed(local)
        d = self.link.call("budget_read", self._keys(client, self.periods(client)), [])

        def answered(reply: Sequence[int]) -> dict[str, Cost]:
            values = [int(v) for v in reply]
            spent = dict(local)
            for i, kind in enumerate(PERIODS):
                exists, tokens, usd = values[3 * i : 3 * i + 3]
                if exists:
                    spent[kind] = Cost(tokens, usd / 1e9)
            return spent

        return d.addCallbacks(answered, lambda _: local)
