"""
Tests for L{oaiproxy.ledger.writer} and L{oaiproxy.ledger.recorder}: the
totals added up in memory, flushed on a clock or a batch size through a
threadless adbapi pool over a real SQLite file; a slow or failing
database; the record read into rows and the spend metrics.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Optional

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.ledger.prices import Price, PriceBook, Prices
from oaiproxy.ledger.recorder import UsageRecorder, day_of
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord, Usage
from tests.ledger.fakes import read_rows, threadless_writer
from tests.support import temp_dir

DAY = "1970-01-01"
ONE = [1, 0, 0, 10, 5, 2, 1, 0.5, 0]


def logged(events: list[dict[str, Any]], word: str) -> list[dict[str, Any]]:
    return [e for e in events if word in e.get("log_format", "")]


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.writer, self.clock, self.thread, self.registry, self.engine = threadless_writer(temp_dir(self), batch=3)
        self.writer.startService()

    def metric(self, name: str) -> Optional[float]:
        return self.registry.get_sample_value(name)

    def test_flushed_every_second_added_up(self) -> None:
        """
        Records add up in memory by row; nothing is written before the
        second is up, and then one row holds both records' sums.
        """
        self.writer.add((DAY, "alice", "m", "up"), ONE)
        self.writer.add((DAY, "alice", "m", "up"), ONE)
        self.clock.advance(0.9)
        self.assertEqual(read_rows(self.engine), [])
        self.assertEqual(self.writer.held, 2)
        self.clock.advance(0.1)
        self.clock.advance(0)
        self.assertEqual(read_rows(self.engine), [(DAY, "alice", "m", "up", 2, 0, 0, 20, 10, 4, 2, 1.0, 0)])
        self.assertEqual(self.metric("oaiproxy_ledger_written_records_total"), 2)
        self.assertEqual(self.metric("oaiproxy_ledger_pending_records"), 0)

    def test_flushed_every_n_records(self) -> None:
        """
        The batch size flushes at once, without waiting for the second.
        """
        for client in ("a", "b", "c"):
            self.writer.add((DAY, client, "m", "up"), ONE)
        self.clock.advance(0)
        self.assertEqual([r[1] for r in read_rows(self.engine)], ["a", "b", "c"])

    def test_later_flushes_add_to_the_rows(self) -> None:
        """
        A second flush adds to the row the first one wrote (the upsert).
        """
        self.writer.add((DAY, "a", "m", "up"), ONE)
        self.clock.advance(1)
        self.clock.advance(0)
        self.writer.add((DAY, "a", "m", "up"), [1, 1, 1, 1, 1, 0, 0, 0.25, 1])
        self.clock.advance(1)
        self.clock.advance(0)
        self.assertEqual(read_rows(self.engine), [(DAY, "a", "m", "up", 2, 1, 1, 11, 6, 2, 1, 0.75, 1)])

    def test_slow_database_one_flush_at_a_time(self) -> None:
        """
        While a flush is in flight (a slow database), records keep adding
        up beside it and no second flush starts; the next goes once the
        first is done.
        """
        self.thread.held = True
        self.writer.add((DAY, "a", "m", "up"), ONE)
        self.clock.advance(1)
        for _ in range(5):
            self.writer.add((DAY, "b", "m", "up"), ONE)
            self.clock.advance(1)
        self.assertEqual(len(self.thread.queued), 1)
        self.assertEqual(self.metric("oaiproxy_ledger_pending_records"), 6)
        self.thread.release()
        self.clock.advance(1)
        self.clock.advance(0)
        self.assertEqual([(r[1], r[4]) for r in read_rows(self.engine)], [("a", 1), ("b", 5)])
        self.assertEqual(self.thread.jobs, 2)

    def test_outage_held_logged_once_and_recovered(self) -> None:
        """
        While the database fails, the totals are held (nothing lost), the
        failures are counted, the gauge says down, and the outage is
        logged once; when it works again everything held is written and
        that is logged once.
        """
        self.thread.error = sqlite3.OperationalError("disk I/O error")
        with capturedLogs() as events:
            for _ in range(4):
                self.writer.add((DAY, "a", "m", "up"), ONE)
                self.clock.advance(1)
                self.clock.advance(0)
            self.assertEqual(self.metric("oaiproxy_ledger_up"), 0)
            self.assertEqual(self.metric("oaiproxy_ledger_write_failures_total"), 4)
            self.assertEqual(self.metric("oaiproxy_ledger_pending_records"), 4)
            self.thread.error = None
            self.clock.advance(1)
            self.clock.advance(0)
        self.assertEqual(len(logged(events, "cannot write")), 1)
        self.assertIn("disk I/O error", logged(events, "cannot write")[0]["why"])
        self.assertEqual(len(logged(events, "again")), 1)
        self.assertEqual(read_rows(self.engine)[0][4], 4)
        self.assertEqual(self.metric("oaiproxy_ledger_up"), 1)
        self.assertEqual(self.metric("oaiproxy_ledger_dropped_records_total"), 0)

    def test_bounded_buffer_drops_and_counts(self) -> None:
        """
        Past its bound in rows, the buffer drops records of new rows
        (counted, logged once) and keeps adding to the rows it holds.
        """
        writer, clock, thread, registry, engine = threadless_writer(temp_dir(self), max_rows=2, batch=100)
        thread.error = sqlite3.OperationalError("database is locked")
        with capturedLogs() as events:
            for client in ("a", "b", "c", "d", "a"):
                writer.add((DAY, client, "m", "up"), ONE)
        self.assertEqual(registry.get_sample_value("oaiproxy_ledger_dropped_records_total"), 2)
        self.assertEqual(writer.held, 3)
        self.assertEqual(len(logged(events, "buffer full")), 1)
        self.assertEqual(sorted(writer.pending_rows()), [(DAY, "a", "m", "up"), (DAY, "b", "m", "up")])

    def test_pending_rows_include_the_flush_in_flight(self) -> None:
        """
        What a flush is writing is not in the database yet: a reader that
        adds the pending rows to what it read (the budgets) still sees it,
        once, and the records that arrived meanwhile beside it.
        """
        self.thread.held = True
        self.writer.add((DAY, "alice", "m", "up"), ONE)
        self.clock.advance(1)
        self.writer.add((DAY, "alice", "m", "up"), ONE)
        self.writer.add((DAY, "bob", "m", "up"), ONE)
        rows = self.writer.pending_rows()
        self.assertEqual(rows[(DAY, "alice", "m", "up")][:4], (2, 0, 0, 20))
        self.assertEqual(rows[(DAY, "bob", "m", "up")][:4], (1, 0, 0, 10))
        self.thread.release()
        self.assertEqual(list(self.writer.pending_rows()), [(DAY, "alice", "m", "up"), (DAY, "bob", "m", "up")])
        self.assertEqual(self.writer.pending_rows()[(DAY, "alice", "m", "up")][0], 1)

    def test_stop_flushes_what_is_held(self) -> None:
        """
        Stopping writes what is held (a crash loses at most what the last
        second added).
        """
        self.writer.add((DAY, "a", "m", "up"), ONE)
        d = self.writer.stopService()
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(read_rows(self.engine)[0][4], 1)

    def test_stop_waits_for_the_drain(self) -> None:
        """
        The last flush waits for what it is told to (the daemon's drain),
        so records of requests finishing during the drain are written.
        """
        from twisted.internet.defer import Deferred

        drained: Deferred[None] = Deferred()
        writer, clock, thread, registry, engine = threadless_writer(temp_dir(self), wait=lambda: drained)
        writer.startService()
        d = writer.stopService()
        writer.add((DAY, "late", "m", "up"), ONE)
        clock.advance(0)
        self.assertNoResult(d)
        drained.callback(None)
        clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(read_rows(engine)[0][1], "late")

    def test_stop_while_down_counts_the_loss(self) -> None:
        """
        What cannot be written at shutdown is counted as dropped and
        logged, never lost silently.
        """
        self.thread.error = sqlite3.OperationalError("unable to open database file")
        self.writer.add((DAY, "a", "m", "up"), ONE)
        self.writer.add((DAY, "b", "m", "up"), ONE)
        with capturedLogs() as events:
            d = self.writer.stopService()
            self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.metric("oaiproxy_ledger_dropped_records_total"), 2)
        self.assertEqual(len(logged(events, "at shutdown")), 1)

    def test_reads_rows(self) -> None:
        """
        What is written can be read back by period and client (what budgets
        and /usage will read).
        """
        self.writer.add(("2026-12-01", "a", "m", "up"), ONE)
        self.writer.add(("2026-12-02", "a", "m", "up"), ONE)
        self.writer.add(("2026-12-02", "b", "m", "up"), ONE)
        self.clock.advance(0)
        d = self.writer.rows("2026-12-02", "2026-12-31", "a")
        self.clock.advance(0)
        rows = self.successResultOf(d)
        self.assertEqual([(r.day, r.client, r.requests, r.cost_usd) for r in rows], [("2026-12-02", "a", 1, 0.5)])


def finished(
    model: Optional[str] = "gpt-4o-mini",
    usage: Optional[Usage] = None,
    status: int = 200,
    attempts: int = 1,
    client: str = "alice",
    ended: str = "complete",
) -> RequestRecord:
    record = RequestRecord("req_1", 0.0)
    record.client = client
    record.model = model
    record.status = status
    record.upstream_status = status if attempts else None
    record.attempts = attempts
    record.upstream = "openai" if attempts else None
    record.usage = usage
    record.ended = ended
    return record


class Collected:
    """
    A writer stand-in that keeps what it is given.
    """

    def __init__(self) -> None:
        self.added: list[tuple[Any, list[Any]]] = []

    def add(self, key: Any, totals: list[Any]) -> None:
        self.added.append((key, totals))


class RecorderTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.clock.advance(86400 * 365)
        self.metrics = Metrics()
        book = PriceBook({"gpt-4o-mini": Price(0.15, 0.075, 0.60)}, "prices.toml")
        self.writer = Collected()
        self.recorder = UsageRecorder(self.clock, self.metrics, Prices(book), self.writer)  # type: ignore[arg-type]

    def sample(self, name: str, **labels: str) -> Optional[float]:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_a_priced_request(self) -> None:
        """
        A request's row: its UTC day, client, model, upstream, tokens and
        cost at the file's prices (cached part at the cached price,
        reasoning within completion); the cost metric counts it.
        """
        self.metrics.model_label("gpt-4o-mini")
        usage = Usage(prompt=1000, completion=500, reasoning=200, cached=400)
        self.recorder(finished(usage=usage))
        cost = (600 * 0.15 + 400 * 0.075 + 500 * 0.60) / 1e6
        key, totals = self.writer.added[0]
        self.assertEqual(key, (day_of(self.clock.seconds()), "alice", "gpt-4o-mini", "openai"))
        self.assertEqual(totals[:7], [1, 0, 0, 1000, 500, 400, 200])
        self.assertAlmostEqual(totals[7], cost)
        self.assertEqual(totals[8], 0)
        self.assertAlmostEqual(self.sample("oaiproxy_cost_usd_total", client="alice", model="gpt-4o-mini"), cost)
        self.assertEqual(key[0], "1971-01-01")

    def test_an_unpriced_model_is_counted_and_warned_once(self) -> None:
        """
        A model without a price has cost unknown: the row counts it
        unpriced, its tokens go to oaiproxy_unpriced_tokens_total, and it
        is warned about once, naming the prices file.
        """
        self.metrics.model_label("gpt-4o")
        with capturedLogs() as events:
            for _ in range(3):
                self.recorder(finished(model="gpt-4o", usage=Usage(prompt=10, completion=5)))
        self.assertEqual([t[8] for _, t in self.writer.added], [1, 1, 1])
        self.assertEqual([t[7] for _, t in self.writer.added], [0.0, 0.0, 0.0])
        self.assertEqual(self.sample("oaiproxy_unpriced_tokens_total", model="gpt-4o"), 45)
        warnings = logged(events, "no price")
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["model"], warnings[0]["path"]), ("gpt-4o", "prices.toml"))

    def test_estimates_and_errors(self) -> None:
        """
        An estimated usage (a stream cut short) is counted as estimated;
        an upstream error or a cut-off answer as an error; a client that
        left is not an error.
        """
        self.recorder(finished(usage=Usage(prompt=1, completion=1, exact=False), ended="client_disconnected"))
        self.recorder(finished(status=502))
        self.recorder(finished(usage=Usage(prompt=1, completion=1), ended="cut_off"))
        self.assertEqual([t[:3] for _, t in self.writer.added], [[1, 0, 1], [1, 1, 0], [1, 1, 0]])

    def test_requests_not_sent_upstream_are_not_recorded(self) -> None:
        """
        A request the proxy answered itself (a refused key, a limit)
        cost nothing and adds no row.
        """
        self.recorder(finished(status=401, attempts=0, client="-"))
        self.assertEqual(self.writer.added, [])

    def test_names_upstream_never_accepted_are_other(self) -> None:
        """
        A model name upstream refused is recorded as C{other} (junk names
        cannot grow the ledger a row each), until upstream accepts it.
        """
        self.recorder(finished(model="no-such-model-1", status=404))
        self.recorder(finished(model="gpt-4o-mini", usage=Usage(prompt=1, completion=1)))
        self.recorder(finished(model="gpt-4o-mini", status=429))
        self.recorder(finished(model=None, status=400))
        self.assertEqual([k[2] for k, _ in self.writer.added], ["other", "gpt-4o-mini", "gpt-4o-mini", "-"])

    def test_without_a_ledger_the_metrics_still_count(self) -> None:
        """
        With prices and no ledger, the spend metrics count all the same.
        """
        metrics = Metrics()
        metrics.model_label("gpt-4o-mini")
        recorder = UsageRecorder(self.clock, metrics, self.recorder.prices)
        recorder(finished(usage=Usage(prompt=1_000_000, completion=0)))
        self.assertAlmostEqual(
            metrics.registry.get_sample_value("oaiproxy_cost_usd_total", {"client": "alice", "model": "gpt-4o-mini"}),
            0.15,
        )
