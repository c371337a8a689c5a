"""
One /metrics for a group of workers (--workers 2), end to end: scrapes
during traffic see the group's counters, never going backwards, equal at
the end to the requests sent, whichever worker answers; --metrics-port
works with --workers; a worker killed with SIGKILL and started again takes
its gauges with it but not its counts.  (The same, in memory, is in
C{tests.observe.test_metrics} and C{tests.daemon.test_workers}.)

The kernel chooses which worker accepts a connection; where a test needs a
particular worker, it stops the other (L{only_running}).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake.processes import Process, start_fake_upstream, start_proxy
from tests.e2e.test_workers import only_running, workers_of
from tests.support import temp_dir

KEY = "sk-proj-WORKERMETRICS0000"
CHAT = (
    "oaiproxy_requests_total",
    (("client", "-"), ("model", "gpt-4o"), ("route", "chat_completions"), ("status_class", "2xx")),
)

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[Series, Series]:
    """
    One scrape of C{url}: its counter and histogram samples (which may
    only grow), and its gauges.
    """
    with urllib.request.urlopen(url, timeout=20) as response:
        text = response.read().decode("utf-8")
    growing: Series = {}
    gauges: Series = {}
    for family in text_string_to_metric_families(text):
        into = gauges if family.type == "gauge" else growing
        for sample in family.samples:
            into[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return growing, gauges


def chat(host: str, port: int, model: str = "gpt-4o") -> int:
    connection = http.client.HTTPConnection(host, port, timeout=20)
    try:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return int(response.status)
    finally:
        connection.close()


class WorkerMetricsTests(SynchronousTestCase):
    def start(self, *args: str) -> tuple[Process, str, str, int]:
        cwd = temp_dir(self)
        upstream, url = start_fake_upstream(cwd, "")
        self.addCleanup(upstream.stop)
        proxy, base = start_proxy(cwd, ["--upstream", url, "--workers", "2", *args], {"OPENAI_API_KEY": KEY})
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        host, port = base.split("://")[1].split(":")
        return proxy, base, host, int(port)

    def test_scrapes_during_traffic(self) -> None:
        """
        Six threads send 120 requests; twenty scrapes are spread over the
        traffic (each after another twentieth of it): every
        counter and histogram series only grows from one scrape to the
        next, and at the end the request counter is exactly the number of
        requests sent, in a scrape answered by either worker.
        """
        proxy, base, host, port = self.start()
        total, threads_count = 120, 6
        progress = threading.Condition()
        outcomes: list[Any] = []

        def send(count: int) -> None:
            for _ in range(count):
                try:
                    outcome: Any = chat(host, port)
                except Exception as e:
                    outcome = e
                with progress:
                    outcomes.append(outcome)
                    progress.notify_all()

        threads = [threading.Thread(target=send, args=(total // threads_count,)) for _ in range(threads_count)]
        for thread in threads:
            thread.start()
        scrapes: list[Series] = []
        for i in range(20):
            with progress:
                progress.wait_for(lambda i=i: len(outcomes) >= i * total // 20, timeout=60)
            scrapes.append(scrape(base + "/metrics")[0])
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(outcomes, [200] * total)
        for before, after in zip(scrapes, scrapes[1:]):
            went_back = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1.0) < v}
            self.assertEqual(went_back, {})
        self.assertLessEqual(scrapes[-1].get(CHAT, 0.0), total)
        # The last access lines may trail the answers by a moment.
        final: dict[int, float] = {}
        for worker in workers_of(proxy.pid):
            with only_running(worker, workers_of(proxy.pid)):
                final[worker] = self.settled(base + "/metrics", total)
        self.assertEqual(list(final.values()), [total, total])

    def settled(self, url: str, expected: float) -> float:
        """
        The request counter once it has reached C{expected} (or the last
        value seen, after a few scrapes); the scrapes in between are not
        waited for by time but by count.
        """
        value = 0.0
        for _ in range(200):
            value = scrape(url)[0].get(CHAT, 0.0)
            if value >= expected:
                break
        return value

    def test_metrics_port_with_workers(self) -> None:
        """
        --metrics-port with --workers: the supervisor opens it and both
        workers serve it; a scrape there counts the requests both workers
        answered, whichever answers it; the API port no longer serves
        /metrics, and the scraper's own requests are not counted.
        """
        proxy, base, host, port = self.start("--metrics-port", "tcp:0:interface=127.0.0.1")
        proxy.wait_until(lambda out: len(re.findall(r"metrics at http://127\.0\.0\.1:\d+/metrics", out)) == 2)
        [metrics_url] = set(re.findall(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", proxy.output))
        first, second = workers_of(proxy.pid)
        with only_running(first, [first, second]):
            self.assertEqual([chat(host, port) for _ in range(3)], [200] * 3)
        with only_running(second, [first, second]):
            self.assertEqual([chat(host, port) for _ in range(2)], [200] * 2)
        for worker in (first, second):
            with only_running(worker, [first, second]):
                self.assertEqual(self.settled(metrics_url, 5), 5)
        with self.assertRaises(urllib.error.HTTPError) as refused:
            scrape(base + "/metrics")
        self.assertEqual(refused.exception.code, 404)
        refused.exception.close()
        # As with one process, the scraper's own requests are not counted
        # (nor do they overwrite the counts of the API port's requests).
        growing, _ = scrape(metrics_url)
        self.assertEqual([k for k in growing if ("route", "metrics") in k[1] and ("status_class", "2xx") in k[1]], [])
        self.assertEqual(
            growing[
                (
                    "oaiproxy_requests_total",
                    (("client", "-"), ("model", "-"), ("route", "metrics"), ("status_class", "4xx")),
                )
            ],
            1,
        )

    def test_killed_worker(self) -> None:
        """
        A worker holding an open stream is killed with SIGKILL and started
        again: the stream leaves the group's gauge, and no counter goes
        below what it was before the kill; requests after it add up.
        """
        proxy, base, host, port = self.start()
        first, second = workers_of(proxy.pid)
        streamed: list[Optional[Exception]] = []
        holding = threading.Event()

        def stream() -> None:
            # Head and one chunk, then silence until the worker dies.
            connection = http.client.HTTPConnection(host, port, timeout=60)
            try:
                body = json.dumps(
                    {"model": "fake-stall", "stream": True, "messages": [{"role": "user", "content": "x"}]}
                )
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                with connection.getresponse() as response:
                    response.read(1)
                    holding.set()
                    response.read()
                streamed.append(None)
            except Exception as e:
                holding.set()
                streamed.append(e)
            finally:
                connection.close()

        holder = threading.Thread(target=stream, daemon=True)
        with only_running(first, [first, second]):
            self.assertEqual([chat(host, port) for _ in range(4)], [200] * 4)
            holder.start()
            self.assertTrue(holding.wait(30), "the stream never started")
        self.assertEqual([chat(host, port) for _ in range(3)], [200] * 3)
        self.assertEqual(self.settled(base + "/metrics", 7), 7)
        before, gauges = scrape(base + "/metrics")
        self.assertEqual(gauges[("oaiproxy_open_streams", ())], 1)

        os.kill(first, signal.SIGKILL)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 3)
        holder.join(timeout=30)
        self.assertIsInstance(streamed[0], Exception)
        for worker in workers_of(proxy.pid):
            with only_running(worker, workers_of(proxy.pid)):
                after, gauges = scrape(base + "/metrics")
            went_back = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1.0) < v}
            self.assertEqual(went_back, {})
            self.assertEqual(gauges[("oaiproxy_open_streams", ())], 0)
        self.assertEqual([chat(host, port) for _ in range(2)], [200] * 2)
        self.assertEqual(self.settled(base + "/metrics", 9), 9)
