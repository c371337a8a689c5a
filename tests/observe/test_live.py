# -*- test-case-name: tests.observe.test_live -*-
"""
The dashboard's live figures: snapshots of the metrics, rates and
percentiles from their deltas, the recent refusals, and a group's
per-worker files.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.observe.live import LiveStats, Refusals, WorkerFiles, merge_upstreams, quantile, snapshot_of
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord
from tests.support import temp_dir


def finished(status: int, client: str = "alice", attempts: int = 0, code: str = "x", at: float = 0.0) -> RequestRecord:
    record = RequestRecord("req_1", at)
    record.status, record.client, record.attempts, record.error_code = status, client, attempts, code
    record.route = "chat/completions"
    record.ended_at = at + 0.002
    return record


class QuantileTests(SynchronousTestCase):
    """
    L{quantile} reads a histogram's bucket deltas as Prometheus does.
    """

    def test_interpolated_inside_the_bucket(self) -> None:
        """
        Of 100 observations between two snapshots, 50 at most 1 ms and 50
        in (1 ms, 2 ms]: p50 is 1 ms, p99 near 2 ms; what was there before
        the first snapshot does not count.
        """
        before = ((0.001, 1000.0), (0.002, 1000.0), (float("inf"), 1000.0))
        after = ((0.001, 1050.0), (0.002, 1100.0), (float("inf"), 1100.0))
        self.assertAlmostEqual(quantile(0.5, before, after) or 0, 0.001)
        self.assertAlmostEqual(quantile(0.99, before, after) or 0, 0.00198)

    def test_nothing_observed(self) -> None:
        """
        No observation between the snapshots: no percentile (a gap in the
        chart, not a zero).
        """
        same = ((0.001, 5.0), (float("inf"), 5.0))
        self.assertIsNone(quantile(0.5, same, same))
        self.assertIsNone(quantile(0.5, (), ()))

    def test_above_the_last_bound(self) -> None:
        """
        Observations beyond the last finite bound read as that bound.
        """
        after = ((0.5, 0.0), (1.0, 0.0), (float("inf"), 10.0))
        self.assertEqual(quantile(0.99, (), after), 1.0)


class LiveStatsTests(SynchronousTestCase):
    """
    L{LiveStats} over a real L{Metrics} on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.stats = LiveStats(self.metrics.registry.collect, self.clock, interval=5.0, window=60.0)

    def observe(self, status: int, proxy_seconds: float = 0.0005, ttft: float = 0.0) -> None:
        record = finished(status, attempts=1, at=self.clock.seconds())
        record.upstream_status = status
        record.upstream_head = record.started
        record.head_sent = record.started + proxy_seconds
        record.ended_at = record.started + proxy_seconds
        if ttft:
            record.stream = True
            record.first_chunk = record.started + ttft
        self.metrics.observe(record)

    def test_rates_by_status_class(self) -> None:
        """
        Ten 200s and five 429s in 5 seconds are 2 and 1 per second; the
        next interval, with none, is 0 for both.
        """
        self.stats.sample()
        for _ in range(10):
            self.observe(200)
        for _ in range(5):
            self.observe(429)
        self.clock.advance(5)
        self.stats.sample()
        self.clock.advance(5)
        self.stats.sample()
        series = self.stats.series()
        self.assertEqual(series["t"], [1_000_005.0, 1_000_010.0])
        self.assertEqual(series["requests_per_second"], {"2xx": [2.0, 0.0], "4xx": [1.0, 0.0]})

    def test_percentiles_and_gauges(self) -> None:
        """
        Overhead and time to first token come from the interval's own
        observations; in flight and open streams are the gauges at the
        interval's end; upstream errors by kind per second.
        """
        self.stats.sample()
        for _ in range(100):
            self.observe(200, proxy_seconds=0.0004, ttft=0.3)
        self.metrics.request_started()
        self.metrics.stream_started()
        errored = finished(502, attempts=1)
        errored.upstream_error = "connect"
        self.metrics.observe(errored)
        self.clock.advance(5)
        self.stats.sample()
        series = self.stats.series()
        self.assertEqual(series["in_flight"], [1.0])
        self.assertEqual(series["open_streams"], [1.0])
        self.assertEqual(series["upstream_errors_per_second"], {"connect": [0.2]})
        p50 = series["overhead_p50"][0]
        self.assertTrue(0.00025 < p50 <= 0.0005, p50)
        self.assertTrue(0.25 < series["ttft_p99"][0] <= 0.5, series["ttft_p99"])
        self.clock.advance(5)
        self.stats.sample()
        self.assertEqual(self.stats.series()["ttft_p50"][1], None)

    def test_window(self) -> None:
        """
        Only the window's snapshots are kept: 60 seconds at 5 is 12 points.
        """
        for _ in range(30):
            self.stats.sample()
            self.clock.advance(5)
        series = self.stats.series()
        self.assertEqual(len(series["t"]), 12)
        self.assertEqual(series["t"][-1], self.clock.seconds() - 5)

    def test_group_snapshot_sums_labels(self) -> None:
        """
        Labels other than the status class are summed away.
        """
        self.metrics.requests.labels("alice", "m", "chat/completions", "2xx").inc(3)
        self.metrics.requests.labels("bob", "n", "embeddings", "2xx").inc(4)
        snapshot = snapshot_of(self.metrics.registry.collect(), 1.0)
        self.assertEqual(snapshot.requests, {"2xx": 7.0})


class RefusalsTests(SynchronousTestCase):
    """
    L{Refusals}: what the proxy answered itself with an error.
    """

    def test_only_the_proxys_own_errors(self) -> None:
        """
        A 401 without an upstream attempt is a refusal; an upstream's 429,
        or a 200, is not.  Newest first; bounded.
        """
        refusals = Refusals(size=2)
        refusals(finished(401, code="invalid_api_key", at=1.0))
        refusals(finished(429, attempts=1, at=2.0))
        refusals(finished(200, at=3.0))
        refusals(finished(429, client="bob", code="rate_limit_exceeded", at=4.0))
        self.assertEqual(
            refusals.recent(),
            [
                {"at": 4.0, "client": "bob", "route": "chat/completions", "status": 429, "code": "rate_limit_exceeded"},
                {"at": 1.0, "client": "alice", "route": "chat/completions", "status": 401, "code": "invalid_api_key"},
            ],
        )
        refusals(finished(403, at=5.0))
        self.assertEqual([r["at"] for r in refusals.recent()], [5.0, 4.0])


def health(name: str, state: int, in_flight: int, failure_at: float | None = None, cooldown: float = 0.0) -> dict:
    return {
        "name": name,
        "state": ["closed", "half-open", "open"][state],
        "state_value": state,
        "in_flight": in_flight,
        "last_failure": None if failure_at is None else "connect",
        "last_failure_at": failure_at,
        "cooldown_left": cooldown,
    }


class GroupTests(SynchronousTestCase):
    """
    A group's upstreams and refusals, from every worker's file.
    """

    def test_merge(self) -> None:
        """
        The worst state, in flight summed, the latest failure, the longest
        cooldown, and how many workers see it not closed.
        """
        merged = merge_upstreams(
            [[health("a", 0, 1), health("b", 0, 0)], [health("a", 2, 2, failure_at=7.0, cooldown=12.0)]]
        )
        self.assertEqual(
            merged[0],
            dict(health("a", 2, 3, failure_at=7.0, cooldown=12.0), workers=2, not_closed=1),
        )
        self.assertEqual(merged[1]["workers"], 1)

    def test_files(self) -> None:
        """
        Each worker's file is read by any worker; a worker silent for
        three ticks no longer counts for the upstreams, but its refusals
        stay for the window.
        """
        directory = temp_dir(self)
        clock = Clock()
        clock.advance(100)
        one = WorkerFiles(directory, 11, clock, 5.0, 60.0)
        two = WorkerFiles(directory, 22, clock, 5.0, 60.0)
        one.write({"upstreams": [health("a", 0, 1)], "refusals": [{"at": 90.0, "client": "x"}]})
        clock.advance(10)
        two.write({"upstreams": [health("a", 2, 0)], "refusals": [{"at": 95.0, "client": "y"}]})
        upstreams, refusals, workers = two.read()
        self.assertEqual((len(upstreams), workers), (2, 2))
        self.assertEqual([r["client"] for r in refusals], ["y", "x"])
        clock.advance(10)
        upstreams, refusals, workers = one.read()
        self.assertEqual((upstreams, workers), ([[health("a", 2, 0)]], 1))
        self.assertEqual(len(refusals), 2)
        clock.advance(60)
        self.assertEqual(one.read(), ([], [], 0))
        self.assertEqual(sorted(os.listdir(directory)), ["dashboard-11.json", "dashboard-22.json"])
