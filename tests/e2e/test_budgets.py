"""
Budgets end to end, through the real daemon (C{twistd -n oaiproxy}) on
loopback: a restart keeps the period's totals (a SQLite file), alone and
with C{--workers}, and a budget changed in the clients file takes effect
on SIGHUP; two daemons on one ledger (a SQLite file, a real PostgreSQL)
share one budget; and with C{--shared-state} on a real redis-server, 30
concurrent requests against a budget that fits 10 admit at most 10 across
two processes.

What is read is what a user sees: the answers (C{insufficient_quota}),
C{oaiproxy_budget_remaining} in C{/metrics}, and the usage report.  Every
wait is bounded and polls an outcome; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Limits, file_entry, mint_key
from oaiproxy.access.limits import estimate_tokens
from oaiproxy.fake.processes import Process, RedisServer, postgres_bindir, start_fake_upstream, start_proxy
from tests.e2e.test_ledger import HAVE_PSYCOPG2, report, shared_postgres
from tests.e2e.test_shared_limits import metrics
from tests.support import temp_dir

KEY = "sk-proj-BUDGETS0000000001"
BUDGET = "tokens_per_day"


def body(words: int = 3, **more: Any) -> dict[str, Any]:
    # The fake upstream echoes the prompt; max_tokens bounds the reservation.
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": " ".join(["hi"] * words)}],
        "max_tokens": 50,
        **more,
    }


def request(base: str, key: str, document: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    host, port = base.split("://")[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(document),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def remaining(base: str, key: str, client: str = "team", budget: str = BUDGET) -> Optional[float]:
    """
    C{oaiproxy_budget_remaining} of a client's budget, as C{/metrics}
    shows it (C{None}: no such series).
    """
    for line in metrics(base, key).splitlines():
        if line.startswith("oaiproxy_budget_remaining{") and f'client="{client}"' in line and f'"{budget}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> float:
    """
    Poll C{condition} until it holds (bounded); return the seconds taken.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        threading.Event().wait(0.05)
    return time.monotonic() - started


def spent_in_ledger(cwd: str, *db: str) -> int:
    """
    The tokens the usage report shows (prompt + completion).
    """
    total = report(cwd, "--db", *db)["total"]
    return int(total["prompt_tokens"]) + int(total["completion_tokens"])


def assert_quota_refusal(case: SynchronousTestCase, status: int, headers: dict[str, str], data: bytes) -> None:
    case.assertEqual(status, 429)
    error = json.loads(data)["error"]
    case.assertEqual((error["type"], error["code"]), ("insufficient_quota", "insufficient_quota"))
    case.assertIn(BUDGET, error["message"])
    case.assertEqual(headers.get("x-should-retry"), "false")


class BudgetCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.key = mint_key()
        self.clients_file = os.path.join(self.cwd, "clients.toml")

    def budget(self, tokens_per_day: int) -> None:
        """
        (Re)write the clients file: one client, C{team}, with a day budget.
        """
        with open(self.clients_file + ".new", "w") as f:
            f.write(file_entry("team", self.key) + f"{BUDGET} = {tokens_per_day}\n")
        os.replace(self.clients_file + ".new", self.clients_file)

    def proxy(self, *args: str, env: Optional[dict[str, str]] = None) -> tuple[Process, str]:
        process, base = start_proxy(
            self.cwd, ["--client-keys-file", self.clients_file, *args], env if env is not None else {}
        )
        self.addCleanup(process.stop)
        return process, base


class RestartTests(BudgetCase):
    """
    A restart keeps the period's totals; SIGHUP applies a changed budget.
    """

    def restart_keeps_totals(self, *more: str) -> None:
        path = os.path.join(self.cwd, "usage.sqlite3")
        args = ("--mock-upstream", "--usage-db", path, *more)
        self.budget(100_000)
        process, base = self.proxy(*args)
        if "--workers" in more:
            process.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        for _ in range(3):
            self.assertEqual(request(base, self.key, body())[0], 200)
        self.assertIn(process.stop(), (0, -15))  # twistd re-raises SIGTERM
        spent = spent_in_ledger(self.cwd, path)
        self.assertGreater(spent, 0)

        process, base = self.proxy(*args)
        if "--workers" in more:
            process.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
            self.assertEqual(process.output.count("budgets: totals of 1 client(s) read"), 2)
        until(lambda: remaining(base, self.key) == 100_000 - spent, what=f"remaining {100_000 - spent}")
        # A budget lowered to what is spent plus one token: on SIGHUP the
        # next request no longer fits, in every process.
        self.budget(spent + 1)
        process.send_signal(1)
        until(lambda: remaining(base, self.key) == 1, what="remaining 1 after SIGHUP")
        for _ in range(3):
            assert_quota_refusal(self, *request(base, self.key, body()))
        # And raised again: admitted.
        self.budget(100_000)
        process.send_signal(1)
        until(lambda: remaining(base, self.key) == 100_000 - spent, what="the raised budget")
        self.assertEqual(request(base, self.key, body())[0], 200)

    def test_restart_keeps_the_periods_totals(self) -> None:
        """
        One process: what the first run spent is what the second starts
        from (the gauge shows the budget less it), and SIGHUP changes the
        budget on those totals.
        """
        self.restart_keeps_totals()

    def test_restart_keeps_the_periods_totals_with_workers(self) -> None:
        """
        --workers 2: every worker reads the totals at its start.
        """
        self.restart_keeps_totals("--workers", "2")


class SharedLedgerTests(BudgetCase):
    """
    Two daemons on one ledger, no --shared-state: each sees the other's
    settled spend within a couple of seconds.
    """

    def two_share_one_budget(self, *ledger: str, env: Optional[dict[str, str]] = None) -> None:
        self.budget(100_000)
        (one, a), (two, b) = (self.proxy("--mock-upstream", *ledger, env=env) for _ in range(2))
        for _ in range(3):
            self.assertEqual(request(a, self.key, body())[0], 200)
        until(lambda: (remaining(a, self.key) or 100_000) < 100_000, what="A's spend in its gauge")
        taken = until(lambda: remaining(b, self.key) == remaining(a, self.key), timeout=10, what="A's spend seen by B")
        self.assertLess(taken, 5)
        left = remaining(b, self.key)
        assert left is not None
        # What B adds, A sees in turn.
        self.assertEqual(request(b, self.key, body())[0], 200)
        until(lambda: (remaining(a, self.key) or 0) < left, timeout=10, what="B's spend seen by A")
        # Exhausted on A: within seconds B refuses too, having admitted
        # at most what was left.
        self.budget(int(100_000 - left) + 100)
        for process in (one, two):
            process.send_signal(1)
        until(lambda: (remaining(a, self.key) or 0) <= 100, what="the lowered budget on A")
        statuses = []
        while len(statuses) < 20:
            status, headers, data = request(a, self.key, body())
            statuses.append(status)
            if status == 429:
                assert_quota_refusal(self, status, headers, data)
                break
        self.assertEqual(statuses[-1], 429)
        until(lambda: request(b, self.key, body())[0] == 429, timeout=10, what="B refusing")
        one.stop()
        two.stop()

    def test_two_daemons_one_sqlite_file(self) -> None:
        path = os.path.join(self.cwd, "shared.sqlite3")
        self.two_share_one_budget("--usage-db", path)

    def test_two_daemons_one_postgresql_database(self) -> None:
        if postgres_bindir() is None:
            raise self.skipTest("PostgreSQL's server is not installed (Debian package postgresql)")
        if not HAVE_PSYCOPG2:
            raise self.skipTest("psycopg2 is not installed (pip install '.[postgres]')")
        server = shared_postgres()
        url = server.create_database(f"budgets{os.getpid()}")
        password = os.path.join(self.cwd, "pw")
        with open(password, "w") as f:
            f.write(server.password + "\n")
        self.two_share_one_budget("--usage-db", url, "--usage-db-password-file", password)


SERVER = shutil.which("redis-server")


class SharedStateBudgetTests(BudgetCase):
    """
    --shared-state on a real redis-server: the budget's totals are the
    group's, exact.
    """

    if SERVER is None:
        skip = "redis-server is not on PATH (Debian package redis-server)"

    def test_thirty_concurrent_for_ten_over_two_processes(self) -> None:
        """
        A budget that fits 10 reservations, 30 concurrent streams spread
        over two processes: at most 10 admitted, the rest
        C{insufficient_quota}; no fallback.
        """
        redis = RedisServer().start()
        self.addCleanup(redis.remove)
        upstream, url = start_fake_upstream(self.cwd, KEY, "--chunk-interval", "0.2")
        self.addCleanup(upstream.stop)
        stream = body(words=20, stream=True)
        _, estimate = estimate_tokens(json.dumps(stream).encode(), stream, Limits())
        self.budget(10 * estimate)
        shared: Sequence[str] = (
            "--upstream",
            url,
            "--shared-state",
            f"redis://127.0.0.1:{redis.port}/0",
            "--shared-state-instances",
            "2",
            "--shared-state-deadline",
            "500",
        )
        processes = [self.proxy(*shared, env={"OPENAI_API_KEY": KEY}) for _ in range(2)]
        for process, _ in processes:
            process.wait_for(r"shared state at 127\.0\.0\.1:\d+ connected")
        results: list[Any] = [None] * 30

        def send(i: int) -> None:
            try:
                results[i] = request(processes[i % 2][1], self.key, stream)
            except Exception as e:  # reported below
                results[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        statuses = [r[0] if isinstance(r, tuple) else r for r in results]
        admitted = statuses.count(200)
        self.assertEqual(admitted + statuses.count(429), 30, statuses)
        self.assertLessEqual(admitted, 10)
        self.assertGreaterEqual(admitted, 1)
        for result in results:
            if result[0] == 429:
                assert_quota_refusal(self, *result)
        for _, base in processes:
            text = metrics(base, self.key)
            self.assertRegex(text, r"(?m)^oaiproxy_shared_state_budget_fallback_admitted_total 0\.0$")
            self.assertRegex(text, r"(?m)^oaiproxy_shared_state_budget_lost_settles_total 0\.0$")
        # Every stream is over: the settlements gave back what they did not
        # use, and both processes show the group's one figure.
        (_, a), (_, b) = processes
        until(
            lambda: 0 < (remaining(a, self.key) or 0) == remaining(b, self.key),
            what="the settled total, the same on both",
        )
