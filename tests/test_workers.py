"""
Several worker processes on the same listeners (--workers): the arguments
a supervisor gives its workers, the split of client limits, and the group
end to end (connections spread over workers; SIGHUP reaches each one;
SIGTERM drains them all and the group exits cleanly).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import threading

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.clients import Limits
from oaiproxy.testing import start_fake_upstream, start_proxy
from oaiproxy.workers import worker_argv
from tests.support import temp_dir

KEY = "sk-proj-WORKERSSECRET000"
MESSAGES = [{"role": "user", "content": "hello proxy"}]


class ArgumentTests(SynchronousTestCase):
    def test_worker_arguments(self) -> None:
        """
        Workers get the supervisor's options except those only the
        supervisor acts on, plus the inherited listeners and their share.
        """
        argv = ["--workers", "2", "--port", "tcp:8080", "--upstream", "http://u/v1", "--port=unix:/s", "--workers=3"]
        self.assertEqual(
            worker_argv(argv, ["3:INET", "4:UNIX"], 2),
            [
                "--upstream",
                "http://u/v1",
                "--worker-listener",
                "3:INET",
                "--worker-listener",
                "4:UNIX",
                "--worker-share",
                "2",
            ],
        )

    def test_limits_split(self) -> None:
        """
        Each of N workers enforces 1/N of each limit, rounded down so the
        group stays within the limit, and never zero.
        """
        limits = Limits(requests_per_minute=601, tokens_per_minute=1000, concurrent_requests=1, default_max_tokens=50)
        self.assertEqual(limits.split(2), Limits(300, 500, 1, 50))
        self.assertEqual(limits.split(1), limits)


class GroupTests(SynchronousTestCase):
    def test_workers_serve_reload_and_drain_together(self) -> None:
        """
        With --workers 2, concurrent connections are served by both workers;
        SIGHUP to the supervisor makes each worker reload; SIGTERM drains
        them and the whole group exits cleanly.
        """
        cwd = temp_dir(self)
        upstream, url = start_fake_upstream(cwd, "")
        self.addCleanup(upstream.stop)
        proxy, base = start_proxy(
            cwd, ["--upstream", url, "--workers", "2", "--log-format", "json"], {"OPENAI_API_KEY": KEY}
        )
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)  # both workers
        host, port = base.split("://")[1].split(":")

        def request() -> None:
            connection = http.client.HTTPConnection(host, int(port), timeout=20)
            body = json.dumps({"model": "gpt-4o", "messages": MESSAGES})
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            assert connection.getresponse().status == 200
            connection.close()

        threads = [threading.Thread(target=request) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        entries = [json.loads(line) for line in proxy.output.splitlines() if line.startswith("{")]
        self.assertEqual({e["worker"] for e in entries}, {0, 1})

        marker = len(proxy.output)
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_until(lambda out: out[marker:].count("reloaded: upstream key unchanged") == 2)

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=20)
        self.assertEqual(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content[:4], "This"
        )
        proxy.send_signal(signal.SIGTERM)
        self.assertIn(proxy.wait(), (0, -signal.SIGTERM))
        self.assertEqual(proxy.output.count("drained; shutting down"), 2)
        self.assertNotIn(KEY, proxy.output)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """
    Wait for a process that is not our child to end (a pidfd becomes
    readable when it does); whether it ended in time.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


class OrphanTests(SynchronousTestCase):
    def test_workers_do_not_outlive_the_supervisor(self) -> None:
        """
        If the supervisor is killed outright, its workers drain and exit
        instead of holding the port forever.
        """
        cwd = temp_dir(self)
        upstream, url = start_fake_upstream(cwd, "")
        self.addCleanup(upstream.stop)
        proxy, base = start_proxy(cwd, ["--upstream", url, "--workers", "2"], {"OPENAI_API_KEY": KEY})
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        self.assertEqual(len(workers), 2)
        proxy.send_signal(signal.SIGKILL)
        for pid in workers:
            self.assertTrue(wait_for_exit(pid, 30), f"worker {pid} outlived its supervisor")
