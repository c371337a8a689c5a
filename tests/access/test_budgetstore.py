"""
Tests for L{oaiproxy.access.budgetstore} and budgets at admission
(L{oaiproxy.access.admission.Admission.reserve} with a
L{BudgetedLimits}): reserve-then-settle under concurrency, the
C{insufficient_quota} answer, unpriced models under a dollar budget, the
period reset on a fake clock, and the totals seeded from the ledger.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request

from oaiproxy.access.admission import Admission
from oaiproxy.access.budgetstore import BudgetedLimits, BudgetStore, spent_cost
from oaiproxy.access.clients import Budgets, Client, Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, registry
from oaiproxy.ledger.prices import Price, PriceBook, Prices
from oaiproxy.observe.records import RequestRecord, Usage, record_of
from tests.routes.test_pending_admission import HandStore, Hold

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
        return request, self.admission.reserve(request, client, model, estimate, prompt_estimate=prompt)

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
