"""
One /metrics for a group of workers, in memory: several L{Metrics} in this
process, each writing as its own worker would (its own pid's files in one
directory, prometheus_client's multiprocess mode), and the scrape any of
them answers.  The real group (twistd processes, a worker killed) is in
C{tests.e2e.test_worker_metrics}.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import values
from prometheus_client.values import MultiProcessValue
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.budgetstore import BudgetRefresh, BudgetStore
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.ledger.prices import EMPTY, Prices
from oaiproxy.observe.metrics import MULTIPROC_ENV, GroupDirectory, Metrics, MetricsResource, UpstreamGauges
from oaiproxy.observe.records import RequestRecord
from oaiproxy.server.tree import build_root
from tests.support import temp_dir


def record(client: str = "alice", status: int = 200) -> RequestRecord:
    finished = RequestRecord("req_1", 0.0)
    finished.client, finished.route, finished.status, finished.bytes_out = client, "chat_completions", status, 10
    return finished


class Group:
    """
    Workers of one group inside this process.  prometheus_client picks its
    value class at import, from the environment; here each worker gets a
    multiprocess one of its own (its own pid, so its own files), swapped in
    while that worker acts (L{as_worker}).
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = GroupDirectory({"RUNTIME_DIRECTORY": temp_dir(case)})
        self.path = self.directory.create()
        case.addCleanup(self.directory.remove)
        self._classes: dict[int, Any] = {}
        case.addCleanup(self._close)
        self.workers: dict[int, Metrics] = {}

    def _close(self) -> None:
        """
        Close the workers' memory-mapped files (C{close_all_files} came in
        prometheus_client 0.20; before it, they close with the process).
        """
        for value_class in self._classes.values():
            close = getattr(value_class, "close_all_files", None)
            if close is not None:
                close()

    @contextlib.contextmanager
    def as_worker(self, pid: int) -> Iterator[None]:
        value_class = self._classes.setdefault(pid, MultiProcessValue(lambda: pid))
        saved, saved_env = values.ValueClass, os.environ.get(MULTIPROC_ENV)
        values.ValueClass = value_class
        os.environ[MULTIPROC_ENV] = self.path
        try:
            yield
        finally:
            values.ValueClass = saved
            if saved_env is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = saved_env

    def start(self, pid: int, index: int) -> Metrics:
        with self.as_worker(pid):
            metrics = Metrics(group_dir=self.path, worker=index)
        self.workers[pid] = metrics
        return metrics

    def serve(self, pid: int, count: int, client: str = "alice") -> None:
        """
        Worker C{pid} answers C{count} requests (each in flight for a moment).
        """
        metrics = self.workers[pid]
        with self.as_worker(pid):
            for _ in range(count):
                metrics.request_started()
                metrics.request_finished()
                metrics.observe(record(client))

    def sample(self, pid: int, name: str, **labels: str) -> Optional[float]:
        """
        A scrape answered by worker C{pid}.
        """
        with self.as_worker(pid):
            value: Optional[float] = self.workers[pid].registry.get_sample_value(name, labels)
        return value


REQUESTS = "oaiproxy_requests_total"
CHAT = {"client": "alice", "model": "-", "route": "chat_completions", "status_class": "2xx"}


class GroupScrapeTests(SynchronousTestCase):
    def test_every_worker_answers_with_the_group_totals(self) -> None:
        """
        Requests served by two workers are counted once each, and the
        scrape shows the same totals whichever worker answers it.
        """
        group = Group(self)
        group.start(1001, 0)
        group.start(1002, 1)
        group.serve(1001, 3)
        group.serve(1002, 4)
        self.assertEqual([group.sample(pid, REQUESTS, **CHAT) for pid in (1001, 1002)], [7, 7])
        self.assertEqual(group.sample(1002, "oaiproxy_response_bytes_total", route="chat_completions"), 70)
        self.assertEqual(
            group.sample(1001, "oaiproxy_proxy_overhead_seconds_count", route="chat_completions"),
            7,
        )

    def test_dead_worker_counts_stay_and_its_gauges_go(self) -> None:
        """
        A worker dies holding two requests: once the supervisor has marked
        it dead, the group's in-flight gauge drops them, while its counters
        stay in the totals, so they never go backwards; the worker started
        in its place adds to them.
        """
        group = Group(self)
        first = group.start(1001, 0)
        group.start(1002, 1)
        group.serve(1001, 5)
        group.serve(1002, 1)
        with group.as_worker(1001):
            first.request_started()
            first.request_started()
            first.stream_started()
        self.assertEqual(group.sample(1002, "oaiproxy_in_flight_requests"), 2)
        self.assertEqual(group.sample(1002, "oaiproxy_open_streams"), 1)
        group.directory.process_dead(1001)
        self.assertEqual(group.sample(1002, "oaiproxy_in_flight_requests"), 0)
        self.assertEqual(group.sample(1002, "oaiproxy_open_streams"), 0)
        self.assertEqual(group.sample(1002, REQUESTS, **CHAT), 6)
        group.start(1003, 0)
        group.serve(1003, 2)
        self.assertEqual(group.sample(1003, REQUESTS, **CHAT), 8)

    def test_per_upstream_gauges_per_worker(self) -> None:
        """
        Each worker's breakers are its own: the scrape shows each worker's
        state under its C{worker} label, and the requests in flight to an
        upstream summed over the workers.  A worker writes them every so
        often and just before it answers a scrape; an upstream its pool no
        longer has (a reload, which every worker gets) leaves the gauges.
        """
        group = Group(self)
        first, second = group.start(1001, 0), group.start(1002, 1)
        pools = {
            1001: [UpstreamGauges("a", 2, 1), UpstreamGauges("b", 0, 3)],
            1002: [UpstreamGauges("a", 0, 2), UpstreamGauges("b", 0, 0)],
        }
        for pid, metrics in ((1001, first), (1002, second)):
            with group.as_worker(pid):
                metrics.watch_upstreams(lambda pid=pid: pools[pid])
        state = "oaiproxy_upstream_breaker_state"
        self.assertEqual(group.sample(1002, state, upstream="a", worker="0"), 2)
        self.assertEqual(group.sample(1002, state, upstream="a", worker="1"), 0)
        self.assertEqual(group.sample(1001, "oaiproxy_upstream_in_flight_requests", upstream="a"), 3)
        # The first worker's breaker on "a" closes; its next refresh says so.
        pools[1001] = [UpstreamGauges("a", 0, 0), UpstreamGauges("b", 0, 3)]
        self.assertEqual(group.sample(1002, state, upstream="a", worker="0"), 2)
        with group.as_worker(1001):
            first.refresh_upstreams()
        self.assertEqual(group.sample(1002, state, upstream="a", worker="0"), 0)
        # A reload removes "b" from every worker's pool.
        pools[1001], pools[1002] = pools[1001][:1], pools[1002][:1]
        self.assertIsNone(group.sample(1002, state, upstream="b", worker="0"))
        self.assertIsNone(group.sample(1002, "oaiproxy_upstream_in_flight_requests", upstream="b"))

    def test_scrape_refreshes_the_answering_worker(self) -> None:
        """
        GET /metrics served by a worker shows its own pool as it is at that
        moment, not as of its last periodic refresh.
        """
        group = Group(self)
        metrics = group.start(1001, 0)
        pool = [UpstreamGauges("a", 0, 0)]
        with group.as_worker(1001):
            metrics.watch_upstreams(lambda: pool)
            pool = [UpstreamGauges("a", 1, 4)]
            response = self.successResultOf(
                StubTreq(build_root(None, None, MetricsResource(metrics))).get("http://p/metrics")
            )
            body = self.successResultOf(response.content())
        self.assertIn(b'oaiproxy_upstream_breaker_state{upstream="a",worker="0"} 1.0', body)
        self.assertIn(b'oaiproxy_upstream_in_flight_requests{upstream="a"} 4.0', body)

    def test_group_needs_the_environment_at_import(self) -> None:
        """
        A worker whose prometheus_client was imported without the
        directory in its environment would keep its samples to itself:
        refused rather than serving a scrape that misses its own counts.
        """
        self.patch(values, "ValueClass", values.MutexValue)
        with self.assertRaises(ValueError) as raised:
            Metrics(group_dir=temp_dir(self))
        self.assertIn(MULTIPROC_ENV, str(raised.exception))


class GroupDirectoryTests(SynchronousTestCase):
    def test_private_fresh_and_removed(self) -> None:
        """
        The directory is inside the service's runtime directory when
        systemd gives one, new and empty, readable by this user only, and
        gone with every file in it once the group stops.
        """
        runtime = temp_dir(self)
        with open(os.path.join(runtime, "counter_99.db"), "w"):
            pass
        directory = GroupDirectory({"RUNTIME_DIRECTORY": runtime})
        path = directory.create()
        self.assertEqual(os.path.dirname(path), runtime)
        self.assertEqual(os.listdir(path), [])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        self.assertEqual(directory.environ(), {MULTIPROC_ENV: path})
        with open(os.path.join(path, "counter_1.db"), "w"):
            pass
        directory.remove()
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.listdir(runtime), ["counter_99.db"])

    def test_elsewhere_in_the_temporary_directory(self) -> None:
        """
        Without systemd, a fresh directory in the temporary directory.
        """
        directory = GroupDirectory({})
        path = directory.create()
        self.addCleanup(directory.remove)
        self.assertTrue(os.path.basename(path).startswith("oaiproxy-metrics-"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_a_dead_process_keeps_its_counters(self) -> None:
        """
        Marking a worker dead removes only its live gauges' files.
        """
        directory = GroupDirectory({"RUNTIME_DIRECTORY": temp_dir(self)})
        path = directory.create()
        self.addCleanup(directory.remove)
        names = ["counter_7.db", "histogram_7.db", "gauge_livesum_7.db", "gauge_livemax_7.db", "counter_8.db"]
        for name in names:
            with open(os.path.join(path, name), "w"):
                pass
        directory.process_dead(7)
        self.assertEqual(sorted(os.listdir(path)), ["counter_7.db", "counter_8.db", "histogram_7.db"])


class GroupBudgetGaugeTests(SynchronousTestCase):
    def test_lowest_of_the_workers_and_only_current_budgets(self) -> None:
        """
        Over a group, a client's remaining budget is the lowest any live
        worker sees (the most spent it knows of); a budget a reload took
        away leaves the scrape, though the workers' files keep its last
        value.
        """
        group = Group(self)
        clock = Clock()
        clients = [Client("alice", b"", budgets=Budgets(tokens_per_day=1000, tokens_per_month=5000))]
        refreshes = {}
        for pid, index in ((1001, 0), (1002, 1)):
            metrics = group.start(pid, index)
            store = BudgetStore(clock, Prices(EMPTY))
            refresh = BudgetRefresh(store, lambda: clients, clock, registry=metrics.series_registry)
            metrics.watch_budgets(lambda refresh=refresh: refresh.shown)
            refreshes[pid] = (store, refresh)
        store, _ = refreshes[1001]
        store.admit(clients[0], None, 0, 300)
        for pid, (_, refresh) in refreshes.items():
            with group.as_worker(pid):
                refresh.tick()
        day = {"client": "alice", "budget": "tokens_per_day"}
        month = {"client": "alice", "budget": "tokens_per_month"}
        self.assertEqual(group.sample(1002, "oaiproxy_budget_remaining", **day), 700)
        self.assertEqual(group.sample(1002, "oaiproxy_budget_remaining", **month), 4700)
        clients[:] = [Client("alice", b"", budgets=Budgets(tokens_per_day=1000))]
        for pid, (_, refresh) in refreshes.items():
            with group.as_worker(pid):
                refresh.tick()
        self.assertIsNone(group.sample(1001, "oaiproxy_budget_remaining", **month))
        self.assertEqual(group.sample(1001, "oaiproxy_budget_remaining", **day), 700)
