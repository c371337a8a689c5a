"""
Tests for L{oaiproxy.access.budgetstore} and budgets at admission
(L{oaiproxy.access.admission.Admission.answer} with a
L{BudgetedLimits}): reserve-then-settle under concurrency, the
C{insufficient_quota} answer, unpriced models under a dollar budget, the
period reset on a fake clock, and the totals seeded from the ledger.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request

from oaiproxy.access.admission import Admission
from oaiproxy.access.budgets import Exhausted
from oaiproxy.access.budgetstore import BudgetedLimits, BudgetHold, BudgetRefresh, BudgetStore, spent_cost
from oaiproxy.access.clients import Budgets, Client, Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, registry
from oaiproxy.ledger.database import LedgerPool
from oaiproxy.ledger.engines import SqliteEngine
from oaiproxy.ledger.prices import Price, PriceBook, Prices
from oaiproxy.ledger.queries import select_spend
from oaiproxy.ledger.writer import LedgerWriter
from oaiproxy.observe.records import RequestRecord, Usage, record_of
from tests.ledger.fakes import Threadless, ThreadlessReactor, sqlite_ledger
from tests.routes.test_pending_admission import HandStore, Hold
from tests.support import temp_dir

PRICE = Price(input=1.0, cached_input=0.5, output=4.0)
PRICES = Prices(PriceBook({"gpt-4o": PRICE}, "/etc/oaiproxy/prices.toml"))


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def new_request() -> Request:
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    return Request(channel)


class BudgetAdmissionTests(SynchronousTestCase):
    """
    Admission reserves in the budgets once the limits admit, in the same
    turn as the check.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(at("2026-12-03T10:00:00+00:00"))
        [client] = registry(CLIENT_KEY)
        self.client = replace(client, budgets=Budgets(tokens_per_day=1000))
        self.limits = HandStore()
        self.budgets = BudgetStore(self.clock, PRICES)
        credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))
        self.admission = Admission(credentials, self.clock, None, BudgetedLimits(self.limits, self.budgets))

    def reserve(self, client: Client, model: str = "gpt-4o", estimate: int = 100, prompt: int = 20) -> Any:
        request = new_request()
        return request, maybeDeferred(self.admission.answer, request, client, model, estimate, prompt_estimate=prompt)

    def test_thirty_concurrent_for_ten(self) -> None:
        """
        A budget that fits 10 requests and 30 concurrent requests, whose
        limits are all answered after every one was asked: 10 are admitted,
        20 get the 429 C{insufficient_quota} with C{x-should-retry: false},
        a message naming the budget and its reset, and their limits' holds
        given back.
        """
        pending = [self.reserve(self.client) for _ in range(30)]
        holds = [Hold(100) for _ in pending]
        for (_, _, d), hold in zip(self.limits.asked, holds):
            d.callback(hold)
        results = [(request, self.successResultOf(d)) for request, d in pending]
        admitted = [held for _, held in results if not isinstance(held, bytes)]
        refused = [(request, body) for request, body in results if isinstance(body, bytes)]
        self.assertEqual((len(admitted), len(refused)), (10, 20))
        for request, body in refused:
            self.assertEqual(request.code, 429)
            error = json.loads(body)["error"]
            self.assertEqual((error["type"], error["code"]), ("insufficient_quota", "insufficient_quota"))
            self.assertIn("tokens_per_day", error["message"])
            self.assertIn("2026-12-04T00:00:00Z", error["message"])
            self.assertEqual(request.responseHeaders.getRawHeaders(b"x-should-retry"), [b"false"])
        self.assertEqual(sum(h.settled == [0] for h in holds), 20)

    def test_settle_gives_back_the_unused(self) -> None:
        """
        A request that used less than it reserved leaves the rest for the
        next; the settle reaches the limits' hold too, with the same count.
        """
        held = []
        for _ in range(10):
            _, d = self.reserve(self.client)
            hold = Hold(100)
            self.limits.asked.pop()[2].callback(hold)
            held.append((self.successResultOf(d), hold))
        _, d = self.reserve(self.client)
        self.limits.asked.pop()[2].callback(Hold(100))
        self.assertIsInstance(self.successResultOf(d), bytes)
        both, hold = held[0]
        both.settle(40)
        both.settle(1)
        self.assertEqual(hold.settled, [40])
        self.assertEqual(self.budgets.spent(self.client)["day"].tokens, 940)
        _, d = self.reserve(self.client, estimate=60)
        self.limits.asked.pop()[2].callback(Hold(60))
        self.assertNotIsInstance(self.successResultOf(d), bytes)

    def test_period_resets(self) -> None:
        """
        A day budget spent at 23:59 UTC admits again at midnight, on a
        fake clock.
        """
        self.clock.advance(at("2026-12-03T23:59:00+00:00") - self.clock.seconds())
        _, d = self.reserve(self.client, estimate=1000)
        self.limits.asked.pop()[2].callback(Hold(1000))
        self.assertNotIsInstance(self.successResultOf(d), bytes)
        _, d = self.reserve(self.client, estimate=1)
        self.limits.asked.pop()[2].callback(Hold(1))
        self.assertIsInstance(self.successResultOf(d), bytes)
        self.clock.advance(60)
        _, d = self.reserve(self.client, estimate=1)
        self.limits.asked.pop()[2].callback(Hold(1))
        self.assertNotIsInstance(self.successResultOf(d), bytes)

    def test_reloaded_budget_applies(self) -> None:
        """
        A larger budget (a reload replaces the client's entry) admits what
        the old one refused, on the same totals.
        """
        _, d = self.reserve(self.client, estimate=1000)
        self.limits.asked.pop()[2].callback(Hold(1000))
        self.successResultOf(d)
        bigger = replace(self.client, budgets=Budgets(tokens_per_day=2000))
        _, d = self.reserve(bigger, estimate=1000)
        self.limits.asked.pop()[2].callback(Hold(1000))
        self.assertNotIsInstance(self.successResultOf(d), bytes)

    def test_unpriced_model_under_dollar_budget(self) -> None:
        """
        A client with a dollar budget asking for a model without a price
        gets a 403 naming the prices file, and its limits are not asked.
        """
        client = replace(self.client, budgets=Budgets(usd_per_month=10))
        request, d = self.reserve(client, model="mystery-model")
        body = self.successResultOf(d)
        self.assertEqual(request.code, 403)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "model_not_priced")
        self.assertIn("/etc/oaiproxy/prices.toml", error["message"])
        self.assertEqual(self.limits.asked, [])

    def test_unpriced_model_under_token_budget_is_counted(self) -> None:
        """
        Under a token budget only, an unpriced model is admitted and its
        tokens count.
        """
        _, d = self.reserve(self.client, model="mystery-model")
        self.limits.asked.pop()[2].callback(Hold(100))
        self.successResultOf(d).settle(70)
        self.assertEqual(self.budgets.spent(self.client)["day"].tokens, 70)

    def test_dollars_reserved_and_settled(self) -> None:
        """
        The dollar reservation is the prompt estimate at the input price
        and the allowed output at the output price; the settle charges
        the usage on the request's record at its prices.
        """
        client = replace(self.client, budgets=Budgets(usd_per_day=10.0))
        request, d = self.reserve(client, estimate=1_000_000, prompt=200_000)
        self.limits.asked.pop()[2].callback(Hold(1_000_000))
        both = self.successResultOf(d)
        self.assertAlmostEqual(self.budgets.spent(client)["day"].usd or 0, 0.2 + 3.2)
        record_of(request).usage = Usage(prompt=100_000, completion=50_000)
        both.settle(150_000)
        self.assertAlmostEqual(self.budgets.spent(client)["day"].usd or 0, 0.1 + 0.2)
        self.assertEqual(self.budgets.spent(client)["day"].tokens, 150_000)


class SpentCostTests(SynchronousTestCase):
    """
    What a settled request cost in dollars.
    """

    def test_cases(self) -> None:
        record = RequestRecord("req-1", 0.0)
        self.assertEqual(spent_cost(0, record, PRICE).usd, 0.0)
        # No usage: only the prompt can have been processed.
        self.assertAlmostEqual(spent_cost(1000, record, PRICE).usd or 0, 1000 * 1.0 / 1e6)
        # A cancelled stream: its counted usage, plus a floor beyond it at
        # the output price.
        record.usage = Usage(prompt=1000, completion=500, cached=400, exact=False)
        self.assertAlmostEqual(spent_cost(1500, record, PRICE).usd or 0, (600 + 200 + 2000) / 1e6)
        self.assertAlmostEqual(spent_cost(2500, record, PRICE).usd or 0, (600 + 200 + 2000 + 4000) / 1e6)
        self.assertIsNone(spent_cost(10, record, None).usd)


class SeedTests(SynchronousTestCase):
    """
    The totals of the current periods start from the ledger.
    """

    def test_seed(self) -> None:
        clock = Clock()
        clock.advance(at("2026-12-03T10:00:00+00:00"))
        store = BudgetStore(clock, PRICES)
        [client] = registry(CLIENT_KEY)
        client = replace(client, budgets=Budgets(tokens_per_day=1000))
        store.seed(client, [("2026-12-03", 300, 1.5), ("2026-12-01", 50, 0.25), ("2026-11-30", 7, 9.0)])
        spent = store.spent(client)
        self.assertEqual((spent["day"].tokens, spent["month"].tokens), (300, 350))
        self.assertAlmostEqual(spent["month"].usd or 0, 1.75)


class Process:
    """
    One proxy process on a shared SQLite ledger, threadless on the test's
    clock: its writer, its budget totals, and their refresh reading the
    real file through the writer's pool.
    """

    def __init__(
        self, engine: SqliteEngine, reactor: ThreadlessReactor, clients: list[Client], flush_every: float = 1.0
    ) -> None:
        adbapi_pool = engine.make_pool(reactor)
        self.thread = Threadless(reactor)
        adbapi_pool.threadpool = self.thread  # type: ignore[assignment]
        self.registry = CollectorRegistry()
        pool = LedgerPool(engine, reactor, adbapi_pool)
        self.writer = LedgerWriter(pool, reactor, self.registry, interval=flush_every)
        self.store = BudgetStore(reactor, PRICES)
        self.clients = clients

        def read(first: str, last: str) -> Any:
            return pool.run("ledger_select_spend", select_spend, engine, first, last)

        self.refresh = BudgetRefresh(
            self.store, lambda: self.clients, reactor, read, self.writer.pending_rows, registry=self.registry
        )
        self.writer.startService()
        self.refresh.startService()

    def spend(self, client: Client, estimate: int, used: int) -> None:
        """
        One request: reserved, settled on C{used} tokens, and its record
        in the writer (as the recorder adds it: prompt + completion).
        """
        hold = self.store.admit(client, "gpt-4o", 0, estimate)
        assert isinstance(hold, BudgetHold), hold
        hold.settle(used)
        self.writer.add(("2026-12-03", client.name, "gpt-4o", "-"), [1, 0, 0, used, 0, 0, 0, used * 4e-6, 0])

    def stop(self) -> None:
        self.refresh.stopService()
        self.writer.stopService()


class LedgerRefreshTests(SynchronousTestCase):
    """
    Several processes on one ledger (a real SQLite file): each re-reads
    the current periods' totals every second, so the others' settled
    spend counts within about two seconds, and its own reservations stay.
    """

    def setUp(self) -> None:
        self.engine = sqlite_ledger(temp_dir(self))
        self.reactor = ThreadlessReactor()
        self.reactor.advance(at("2026-12-03T10:00:00+00:00"))
        [client] = registry(CLIENT_KEY)
        self.client = replace(client, budgets=Budgets(tokens_per_day=1000))
        self.a = Process(self.engine, self.reactor, [self.client])
        self.b = Process(self.engine, self.reactor, [self.client])
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        self.reactor.advance(0)

    def settle_clock(self, seconds: float) -> None:
        """
        Let C{seconds} pass, a tenth at a time (the pools' jobs run on
        the clock's next turns).
        """
        for _ in range(round(seconds * 10)):
            self.reactor.advance(0.1)
            self.reactor.advance(0)

    def test_others_spend_counts_within_two_seconds(self) -> None:
        """
        What process A settles is in B's total two seconds later (A's
        flush, then B's read), and B then refuses what would overshoot.
        """
        self.a.spend(self.client, 600, 600)
        self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 0)
        self.settle_clock(2)
        self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 600)
        self.assertIsInstance(self.b.store.admit(self.client, "gpt-4o", 0, 500), Exhausted)
        self.assertIsInstance(self.b.store.admit(self.client, "gpt-4o", 0, 400), BudgetHold)

    def test_own_reservations_stay_and_settled_counts_once(self) -> None:
        """
        A read replaces what the ledger said, keeps this process's
        reservations in flight, and does not count its own settled spend
        twice (it is in the ledger, or its writer, by then).
        """
        self.a.spend(self.client, 250, 250)
        in_flight = self.b.store.admit(self.client, "gpt-4o", 0, 200)
        self.b.spend(self.client, 100, 100)
        self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 300)
        self.settle_clock(3)
        for _ in range(3):
            self.settle_clock(1)
            self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 550)
            self.assertEqual(self.a.store.spent(self.client)["day"].tokens, 350)
        assert isinstance(in_flight, BudgetHold)
        in_flight.settle(0)
        self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 350)

    def test_own_unwritten_spend_counts_after_a_read(self) -> None:
        """
        What this process settled and its writer has not written yet (it
        flushes every 5 s here) stays counted across reads.
        """
        slow = Process(self.engine, self.reactor, [self.client], flush_every=5.0)
        self.addCleanup(slow.stop)
        slow.spend(self.client, 100, 100)
        self.settle_clock(3)
        self.assertEqual(slow.store.spent(self.client)["day"].tokens, 100)
        self.settle_clock(3)
        self.assertEqual(slow.store.spent(self.client)["day"].tokens, 100)
        self.assertEqual(self.a.store.spent(self.client)["day"].tokens, 100)

    def test_a_reload_budget_counts_at_the_next_read(self) -> None:
        """
        A client given a budget by a reload (SIGHUP) is read from the
        ledger at the next tick: its spend before the budget counts.
        """
        other = replace(self.client, name="client-2", budgets=Budgets())
        self.a.spend(replace(other, budgets=Budgets(tokens_per_day=10**6)), 700, 700)
        self.settle_clock(2)
        budgeted = replace(other, budgets=Budgets(tokens_per_month=1000))
        self.b.clients = [self.client, budgeted]
        self.assertEqual(self.b.store.spent(budgeted)["month"].tokens, 0)
        self.settle_clock(1)
        self.assertEqual(self.b.store.spent(budgeted)["month"].tokens, 700)
        remaining = self.b.registry.get_sample_value
        self.settle_clock(1)
        self.assertEqual(
            remaining("oaiproxy_budget_remaining", {"client": "client-2", "budget": "tokens_per_month"}), 300
        )
        self.assertEqual(
            remaining("oaiproxy_budget_remaining", {"client": "client-1", "budget": "tokens_per_day"}), 1000
        )
        # A budget taken away by the next reload: its series goes.
        self.b.clients = [self.client]
        self.settle_clock(1)
        self.assertIsNone(remaining("oaiproxy_budget_remaining", {"client": "client-2", "budget": "tokens_per_month"}))

    def test_a_failed_read_keeps_the_totals_said_once(self) -> None:
        """
        While the ledger cannot be read, the totals stay as they were and
        grow with this process's own spend; it is said once, and once
        when reading works again.
        """
        self.a.spend(self.client, 300, 300)
        self.settle_clock(2)
        self.b.thread.error = RuntimeError("database is locked")
        with capturedLogs() as events:
            self.settle_clock(3)
            self.b.store.admit(self.client, "gpt-4o", 0, 100)
            self.assertEqual(self.b.store.spent(self.client)["day"].tokens, 400)
            self.b.thread.error = None
            self.settle_clock(1)
        said = [e for e in events if "budgets:" in e.get("log_format", "")]
        self.assertEqual(len(said), 2)
        self.assertIn("database is locked", said[0]["why"])


class RefreshFailureTests(SynchronousTestCase):
    """
    The refresh survives its own mistakes: an error while applying a read
    is said like a failed read, and a tick that raises is said and the
    loop goes on.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(at("2026-12-03T10:00:00+00:00"))
        [client] = registry(CLIENT_KEY)
        self.client = replace(client, budgets=Budgets(tokens_per_day=1000))
        self.store = BudgetStore(self.clock, Prices(PriceBook({}, None)))
        self.reads: list[str] = []
        self.clients: Any = lambda: [self.client]

        def read(first: str, last: str) -> Any:
            self.reads.append(first)
            return succeed([("2026-12-03", "client-1", "not-a-number", 0.0)])

        self.refresh = BudgetRefresh(self.store, lambda: self.clients(), self.clock, read, registry=CollectorRegistry())

    def test_bad_read_said_and_the_loop_goes_on(self) -> None:
        """
        Rows the store cannot apply are said once, as a failed read, and
        the next tick reads again.
        """
        with capturedLogs() as events:
            self.refresh.startService()
            self.addCleanup(self.refresh.stopService)
            self.clock.advance(1)
        said = [e for e in events if "budgets:" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual(len(self.reads), 2)

    def test_tick_that_raises_is_said_and_started_again(self) -> None:
        """
        A tick that raises is logged once and the refresh keeps ticking.
        """

        def broken() -> Any:
            raise RuntimeError("boom")

        self.clients = broken
        with capturedLogs() as events:
            self.refresh.startService()
            self.addCleanup(self.refresh.stopService)
            self.clients = lambda: [self.client]
            self.clock.advance(1)
            self.clock.advance(1)
        self.assertEqual(len([e for e in events if "refresh failed" in e.get("log_format", "")]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.reads), 2)


class MemoryTests(SynchronousTestCase):
    def test_past_periods_are_forgotten(self) -> None:
        """
        A long-running process keeps totals for its clients' current
        periods, not one per day it has run; a past period's total with a
        request still in flight stays until it settles.
        """
        from oaiproxy.access import budgetstore

        self.patch(budgetstore, "_PERIOD_KEYS", 2)
        clock = Clock()
        clock.advance(at("2026-12-03T10:00:00+00:00"))
        store = BudgetStore(clock, PRICES)
        [client] = registry(CLIENT_KEY)
        client = replace(client, budgets=Budgets(tokens_per_day=1000))
        late = store.admit(client, "gpt-4o", 0, 10)
        for _ in range(60):
            clock.advance(86400)
            hold = store.admit(client, "gpt-4o", 0, 10)
            assert isinstance(hold, BudgetHold)
            hold.settle(10)
            self.assertLessEqual(len(store._totals), 4 * 2 + 4)
        self.assertIn((client.name, "day", "2026-12-03"), store._totals)
        self.assertEqual(store.spent(client)["day"].tokens, 10)
        assert isinstance(late, BudgetHold)
        late.settle(0)

    def test_many_clients_do_not_make_admission_scan(self) -> None:
        """
        With more current totals than the bound and nothing to drop, the
        store does not scan them all again for every new one.
        """
        from oaiproxy.access import budgetstore

        self.patch(budgetstore, "_PERIOD_KEYS", 2)
        clock = Clock()
        clock.advance(at("2026-12-03T10:00:00+00:00"))
        store = BudgetStore(clock, PRICES)
        scans = []
        forget = store._forget_past
        self.patch(store, "_forget_past", lambda: (scans.append(1), forget()))
        [client] = registry(CLIENT_KEY)
        for i in range(200):
            someone = replace(client, name=f"client-{i}", budgets=Budgets(tokens_per_day=1000))
            self.assertIsInstance(store.admit(someone, "gpt-4o", 0, 10), BudgetHold)
        self.assertEqual(len(store._totals), 400)
        self.assertLessEqual(len(scans), 8)
