"""
Tests for L{oaiproxy.access.budgets}: the calendar periods of a budget in
UTC and in a zone with daylight saving time, what a request reserves, and
the decision with its message.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.budgets import Cost, decide, period_of, reservation_cost
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.ledger.prices import Price

UTC = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")


def at(text: str) -> float:
    """
    The Unix time of an ISO 8601 time with its offset.
    """
    return datetime.datetime.fromisoformat(text).timestamp()


class PeriodTests(SynchronousTestCase):
    """
    A day ends at local midnight and a month on the 1st, in the budget's
    zone, whatever the length of the day.
    """

    def test_utc_day_boundary(self) -> None:
        """
        On a fake clock, the last second of a UTC day is in that day and
        the next second in the next one, which begins where the first ends.
        """
        clock = Clock()
        clock.advance(at("2026-12-03T23:59:59+00:00"))
        before = period_of(clock.seconds(), UTC, "day")
        clock.advance(1)
        after = period_of(clock.seconds(), UTC, "day")
        self.assertEqual((before.key, after.key), ("2026-12-03", "2026-12-04"))
        self.assertEqual(before.ends, after.begins)
        self.assertEqual(after.begins, at("2026-12-04T00:00:00+00:00"))
        self.assertEqual(after.ends - after.begins, 86400)
        self.assertEqual(after.previous(UTC), before)

    def test_utc_month_boundary(self) -> None:
        """
        A month runs from the 1st to the 1st, across a year's end, and
        February is as long as it is.
        """
        december = period_of(at("2026-12-31T23:59:59+00:00"), UTC, "month")
        january = period_of(at("2027-01-01T00:00:00+00:00"), UTC, "month")
        self.assertEqual((december.key, january.key), ("2026-12", "2027-01"))
        self.assertEqual(december.ends, january.begins)
        february = period_of(at("2028-02-15T12:00:00+00:00"), UTC, "month")
        self.assertEqual(february.ends - february.begins, 29 * 86400)

    def test_other_zone(self) -> None:
        """
        In Europe/Paris, 23:30 UTC on 3 December is already the 4th, whose
        day began at 23:00 UTC on the 3rd.
        """
        day = period_of(at("2026-12-03T23:30:00+00:00"), PARIS, "day")
        self.assertEqual(day.key, "2026-12-04")
        self.assertEqual(day.begins, at("2026-12-03T23:00:00+00:00"))
        self.assertEqual(day.utc_days(), (datetime.date(2026, 12, 3), datetime.date(2026, 12, 4)))
        month = period_of(at("2026-11-30T23:30:00+00:00"), PARIS, "month")
        self.assertEqual(month.key, "2026-12")

    def test_dst_days(self) -> None:
        """
        The day clocks go forward lasts 23 hours and the day they go back
        25; each ends at the next local midnight.
        """
        spring = period_of(at("2026-03-29T12:00:00+02:00"), PARIS, "day")
        self.assertEqual(spring.ends - spring.begins, 23 * 3600)
        self.assertEqual(spring.ends, at("2026-03-30T00:00:00+02:00"))
        autumn = period_of(at("2026-10-25T12:00:00+01:00"), PARIS, "day")
        self.assertEqual(autumn.ends - autumn.begins, 25 * 3600)
        self.assertEqual(period_of(autumn.ends, PARIS, "day").key, "2026-10-26")
        self.assertEqual(period_of(autumn.ends - 1, PARIS, "day").key, "2026-10-25")


class ReservationTests(SynchronousTestCase):
    """
    A request reserves its prompt estimate plus allowed output, in tokens,
    and in dollars at its model's input and output prices.
    """

    def test_priced(self) -> None:
        cost = reservation_cost(1000, 5000, Price(input=2.0, cached_input=1.0, output=10.0))
        self.assertEqual(cost.tokens, 5000)
        self.assertAlmostEqual(cost.usd or 0, (1000 * 2.0 + 4000 * 10.0) / 1e6)

    def test_unpriced(self) -> None:
        self.assertEqual(reservation_cost(1000, 5000, None), Cost(5000, None))


class DecideTests(SynchronousTestCase):
    """
    A request fits when every budget can take it; otherwise the refusal
    names the budget and when it resets.
    """

    def setUp(self) -> None:
        self.now = at("2026-12-03T10:00:00+00:00")
        self.periods = {kind: period_of(self.now, PARIS, kind) for kind in ("day", "month")}

    def client(self, **budgets: object) -> Client:
        return Client("alice", b"\0" * 32, budgets=Budgets(budget_timezone="Europe/Paris", **budgets))  # type: ignore[arg-type]

    def test_fits_exactly(self) -> None:
        client = self.client(tokens_per_day=100)
        self.assertIsNone(decide(client, {"day": Cost(60, 0.0)}, self.periods, Cost(40, None)))
        refused = decide(client, {"day": Cost(61, 0.0)}, self.periods, Cost(40, None))
        assert refused is not None
        self.assertEqual(refused.budget, "tokens_per_day")
        self.assertEqual(refused.resets, at("2026-12-04T00:00:00+01:00"))
        self.assertIn("tokens_per_day", refused.message)
        self.assertIn("100 tokens per day", refused.message)
        self.assertIn("2026-12-04T00:00:00+01:00", refused.message)
        self.assertIn("2026-12-03T23:00:00Z", refused.message)

    def test_monthly_dollars(self) -> None:
        client = self.client(tokens_per_day=10**9, usd_per_month=5)
        refused = decide(client, {"month": Cost(10, 4.99)}, self.periods, Cost(10, 0.02))
        assert refused is not None
        self.assertEqual(refused.budget, "usd_per_month")
        self.assertIn("$5.00 per month", refused.message)
        self.assertEqual(refused.resets, at("2027-01-01T00:00:00+01:00"))
        self.assertIsNone(decide(client, {"month": Cost(10, 4.98)}, self.periods, Cost(10, 0.02)))

    def test_small_dollar_budget_named_as_it_is(self) -> None:
        """
        A budget under a dollar is named with its digits, never "$0.00".
        """
        client = self.client(usd_per_day=0.001)
        refused = decide(client, {"day": Cost(10, 0.001)}, self.periods, Cost(10, 0.0001))
        assert refused is not None
        self.assertIn("budget of $0.001 per day", refused.message)

    def test_no_budgets(self) -> None:
        self.assertIsNone(decide(Client("bob", b"\0" * 32), {}, self.periods, Cost(10**12, 10**6)))
