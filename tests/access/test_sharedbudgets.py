"""
The shared budget store in memory: a fake txredisapi connection on a
Clock, for what is sent to the scripts, how their answers are read, the
settlement's difference, and the fallback while Redis is unreachable.
The scripts themselves run against a real Redis in
tests/e2e/test_shared_budgets.py.
"""

from __future__ import annotations

import datetime
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.budgets import Exhausted
from oaiproxy.access.budgetstore import BudgetHold, BudgetRefresh
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.access.sharedbudgets import SharedBudgetHold, SharedBudgetStore
from oaiproxy.ledger.prices import Price, PriceBook, Prices
from oaiproxy.sharedstate.link import KeySpace, RedisLink, script
from tests.access.test_shared import Connector

PRICES = Prices(PriceBook({"gpt-4o": Price(input=1.0, cached_input=0.5, output=4.0)}, None))
NOW = datetime.datetime(2026, 12, 3, 10, tzinfo=datetime.timezone.utc).timestamp()
DAY_END = datetime.datetime(2026, 12, 4, tzinfo=datetime.timezone.utc).timestamp()
MONTH_END = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def client(**budgets: Any) -> Client:
    return Client("alice", b"", budgets=Budgets(**budgets))


class SharedBudgetsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.connector = Connector()
        self.link = RedisLink(self.connector, self.clock, deadline=0.05, retry=(1.0, 4.0), keepalive=0)
        self.link.startService()
        self.addCleanup(self.link.stopService)
        self.store = self.make(ledger=False)

    def make(self, ledger: bool) -> SharedBudgetStore:
        return SharedBudgetStore(self.clock, PRICES, self.link, KeySpace("p:"), instances=2, ledger=ledger)

    @property
    def redis(self) -> Any:
        return self.connector.connections[-1]

    def reserve(self, c: Client, estimate: int = 100, prompt: int = 20, store: Any = None) -> Any:
        results: list[Any] = []
        (store or self.store).reserve(c, "gpt-4o", prompt, estimate).addCallback(results.append)
        return results[0] if results else None

    def test_every_budget_in_one_round_trip_seeded_from_the_ledger(self) -> None:
        """
        One call checks and reserves the day and the month, with the
        ledger's totals to seed absent keys from and their expiry (an
        hour after the period); dollars go as integer nano-dollars.
        """
        c = client(tokens_per_day=1000, usd_per_month=2.5)
        self.store.seed(c, [("2026-12-03", 300, 0.5), ("2026-12-01", 50, 0.25)])
        self.redis.answer = [0, 0]
        held = self.reserve(c)
        self.assertIsInstance(held, SharedBudgetHold)
        [(_, keys, args)] = self.redis.calls
        self.assertEqual(keys[:2], ["p:budget:{alice}:day:2026-12-03", "p:budget:{alice}:month:2026-12"])
        # Last, the request's marker (same hash tag), living 10 minutes.
        self.assertRegex(keys[2], r"^p:budget:\{alice\}:r:[0-9a-f]{32}$")
        usd = 20 * 1.0 + 80 * 4.0  # per million tokens: the prompt, then the output
        self.assertEqual(args[:2], [100, round(usd * 1000)])
        self.assertEqual(args[2:7], [1000, -1, 300, 500_000_000, int((DAY_END + 3600) * 1000)])
        self.assertEqual(args[7:12], [-1, 2_500_000_000, 350, 750_000_000, int((MONTH_END + 3600) * 1000)])
        self.assertEqual(args[12:], [600_000])
        # Mirrored in the local totals: the fallback knows what is in flight.
        self.assertEqual(self.store.spent(c)["day"].tokens, 400)

    def test_settlement_adds_the_difference(self) -> None:
        c = client(tokens_per_day=1000)
        self.redis.answer = [0, 0]
        held = self.reserve(c, estimate=100, prompt=100)
        held.settle(30)
        (_, keys, args) = self.redis.calls[-1]
        self.assertEqual(keys[0], "p:budget:{alice}:day:2026-12-03")
        self.assertEqual(args, [-70, round((30 - 100) * 1.0 * 1000)])
        self.assertEqual(self.store.spent(c)["day"].tokens, 30)
        # Nothing to add: no call.
        held = self.reserve(c, estimate=50, prompt=50)
        calls = len(self.redis.calls)
        held.settle(50)
        self.assertEqual(len(self.redis.calls), calls)

    def test_refusal_names_the_budget(self) -> None:
        """
        The script's answer (the month's key, its dollar budget) becomes
        the refusal naming C{usd_per_month} and its reset; nothing is
        reserved locally.
        """
        c = client(tokens_per_day=1000, usd_per_month=2.5)
        self.redis.answer = [2, 2]
        refused = self.reserve(c)
        self.assertIsInstance(refused, Exhausted)
        self.assertEqual((refused.budget, refused.resets), ("usd_per_month", MONTH_END))
        self.assertIn("2027-01-01T00:00:00Z", refused.message)
        self.assertEqual(self.store.spent(c)["day"].tokens, 0)

    def test_fallback_without_ledger_takes_the_share(self) -> None:
        """
        Redis not answering within the deadline: each call decided
        locally (the link stays up: a miss decides only that call), on
        this process's own spend, at 1 / instances of the budget; counted.
        """
        c = client(tokens_per_day=1000)
        self.redis.answer = None

        def late() -> Any:
            pending = self.store.reserve(c, "gpt-4o", 20, 100)
            self.clock.advance(0.05)
            return self.successResultOf(pending)

        first = late()
        self.assertIsInstance(first, BudgetHold)
        self.assertNotIsInstance(first, SharedBudgetHold)
        self.assertTrue(self.link.up)
        more = [late() for _ in range(10)]
        self.assertEqual(sum(isinstance(m, BudgetHold) for m in more), 4)
        self.assertIsInstance(more[-1], Exhausted)
        self.assertEqual(self.store.fallback_admitted, 5)

    def test_fallback_with_ledger_takes_the_whole_budget(self) -> None:
        """
        With a ledger (the others' spend read every second), the fallback
        decides on the whole budget.
        """
        store = self.make(ledger=True)
        c = client(tokens_per_day=1000)
        store.seed(c, [("2026-12-03", 300, 0.0)])
        self.link.stopService()
        results = [self.reserve(c, store=store) for _ in range(10)]
        self.assertEqual(sum(isinstance(r, BudgetHold) for r in results), 7)

    def test_current_reads_redis(self) -> None:
        """
        The group's totals come from Redis; a period whose key is absent,
        or Redis down, answers with the local totals.
        """
        c = client(tokens_per_day=1000)
        self.store.seed(c, [("2026-12-03", 42, 0.0)])
        self.redis.answer = [1, 900, 1_500_000_000, 0, 0, 0]
        spent = self.successResultOf(self.store.current(c))
        self.assertEqual((spent["day"].tokens, spent["day"].usd), (900, 1.5))
        self.assertEqual(spent["month"].tokens, 42)
        self.link.stopService()
        self.assertEqual(self.successResultOf(self.store.current(c))["day"].tokens, 42)

    def calls_to(self, name: str, redis: Any = None) -> list[list[str]]:
        return [keys for (body, keys, _) in (redis or self.redis).calls if body == script(name)]

    def test_late_admission_is_released(self) -> None:
        """
        An admission whose reply misses the deadline is decided locally,
        and a release of the same keys (its marker) follows, so what
        Redis reserved for it when it ran does not stay charged.
        """
        c = client(tokens_per_day=1000)
        self.redis.answer = None
        pending = self.store.reserve(c, "gpt-4o", 20, 100)
        self.clock.advance(0.05)
        held = self.successResultOf(pending)
        self.assertNotIsInstance(held, SharedBudgetHold)
        [admitted] = self.calls_to("budget_admit")
        self.assertEqual(self.calls_to("budget_release"), [admitted])

    def test_cancelled_admission_is_released_not_held(self) -> None:
        """
        A caller that cancels gets C{CancelledError} at once, no local
        hold is taken, no traceback is logged, and the reply, when it
        comes, is given back in Redis.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        c = client(tokens_per_day=1000)
        self.redis.answer = None
        pending = self.store.reserve(c, "gpt-4o", 20, 100)
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        self.clock.advance(0.05)
        self.assertEqual(len(self.calls_to("budget_release")), 1)
        self.assertEqual(self.store.spent(c)["day"].tokens, 0)
        self.assertEqual(self.store.fallback_admitted, 0)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])

    def test_cancelled_then_reserved_is_released(self) -> None:
        """
        The reply arrives after the caller cancelled, with a reservation:
        released, and nothing held locally.
        """
        c = client(tokens_per_day=1000)
        reply: Deferred = Deferred()
        self.redis.eval = lambda body, keys, args: (self.redis.calls.append((body, keys, args)), reply)[1]
        pending = self.store.reserve(c, "gpt-4o", 20, 100)
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        self.redis.answer = [1]
        reply.callback([0, 0])
        self.assertEqual(len(self.calls_to("budget_release")), 1)
        self.assertEqual(self.store.spent(c)["day"].tokens, 0)

    def test_settlement_and_answered_admission_send_no_release(self) -> None:
        c = client(tokens_per_day=1000)
        self.redis.answer = [0, 0]
        held = self.reserve(c)
        held.settle(30)
        [admitted] = self.calls_to("budget_admit")
        self.assertEqual(self.calls_to("budget_settle"), [admitted])
        self.assertEqual(self.calls_to("budget_release"), [])

    def test_spend_decided_while_down_reaches_redis_on_return(self) -> None:
        """
        A request decided locally while Redis was unreachable: what it
        cost is added to Redis once the link is back up (with the release
        of the admission that went unanswered).
        """
        c = client(tokens_per_day=1000)
        self.redis.answer = None
        pending = self.store.reserve(c, "gpt-4o", 20, 100)
        self.clock.advance(0.05)
        held = self.successResultOf(pending)
        self.clock.advance(self.link.silence)
        self.assertFalse(self.link.up)
        held.settle(30)
        self.assertEqual(self.store.lost_settles, 0)
        self.clock.advance(1.0)
        self.assertTrue(self.link.up)
        back = self.connector.connections[-1]
        [(_, keys, args)] = [call for call in back.calls if call[0] == script("budget_settle")]
        self.assertEqual(keys[:2], ["p:budget:{alice}:day:2026-12-03", "p:budget:{alice}:month:2026-12"])
        self.assertEqual(args, [30, round(30 * 1.0 * 1000)])  # no record: all at the input price
        self.assertEqual(len(self.calls_to("budget_release", back)), 1)

    def test_unconfirmed_settlements_counted_and_warned_once(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        c = client(tokens_per_day=1000)
        self.redis.answer = [0, 0]
        holds = [self.reserve(c), self.reserve(c)]
        self.redis.answer = None
        for held in holds:
            held.settle(30)
        self.clock.advance(0.05)
        self.assertEqual(self.store.lost_settles, 2)
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "settlements" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(self.successResultOf(holds[0].settled), None)

    def test_gauge_reads_one_in_flight_per_client(self) -> None:
        """
        The per-second gauge refresh does not pile reads up on a slow
        Redis: one read per client at a time.
        """
        c = client(tokens_per_day=1000)
        refresh = BudgetRefresh(self.store, lambda: [c], self.clock, registry=CollectorRegistry())
        self.redis.answer = None
        refresh.tick()
        refresh.tick()
        self.assertEqual(len(self.calls_to("budget_read")), 1)
        self.clock.advance(0.05)  # that read missed its deadline: the next is sent
        refresh.tick()
        self.assertEqual(len(self.calls_to("budget_read")), 2)

    def test_gauge_read_failure_logged_once(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        c = client(tokens_per_day=1000)
        self.store.current = lambda _: fail(RuntimeError("boom"))  # type: ignore[method-assign]
        refresh = BudgetRefresh(self.store, lambda: [c], self.clock, registry=CollectorRegistry())
        refresh.tick()
        refresh.tick()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
