"""
The usage ledger end to end, through the real daemon (C{twistd -n
oaiproxy --mock-upstream}) on 127.0.0.1: totals survive a restart; a
SQLite file locked by another process, or a PostgreSQL server stopped,
mid-run, and requests keep flowing while what could not be written is
held, counted and logged once, then written when the database is back;
two daemons writing one SQLite file add up exactly; and the schema's
migrations on a real PostgreSQL (from nothing, and an upgrade).

Nothing sleeps for a fixed time: readiness and outcomes are read from the
processes' output and from C{/metrics}, each wait with a deadline.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, Secret
from oaiproxy.fake.processes import (
    PostgresServer,
    Process,
    child_env,
    postgres_bindir,
    start_fake_upstream,
    start_proxy,
)
from oaiproxy.ledger.engines import Engine, PostgresEngine, load_db_password
from oaiproxy.ledger.schema import SCHEMA_VERSION, prepare
from oaiproxy.ledger.startup import migrate
from tests.ledger.test_schema import MigrationCases
from tests.support import temp_dir

try:
    import psycopg2
    import psycopg2.errors

    HAVE_PSYCOPG2 = True
except ImportError:
    HAVE_PSYCOPG2 = False

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def chat(base: str) -> int:
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=BODY, method="POST", headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        response.read()
        return int(response.status)


def metric(base: str, name: str) -> Optional[float]:
    with urllib.request.urlopen(base + "/metrics", timeout=20) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def wait_metric(base: str, name: str, value: float, timeout: float = 40.0) -> None:
    """
    Wait (with a deadline) until C{/metrics} shows C{name} at C{value}.
    """
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = metric(base, name)
        if seen == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} is {seen}, not {value}")


def report(cwd: str, *args: str) -> dict[str, Any]:
    """
    C{python -m oaiproxy usage --format json ...}, as a user runs it.
    """
    result = subprocess.run(
        [sys.executable, "-m", "oaiproxy", "usage", "--format", "json", "--since", "2d", *args],
        env=child_env({}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


class LedgerE2ETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cwd = temp_dir(self)

    def proxy(self, *args: str) -> tuple[Process, str]:
        process, base = start_proxy(self.cwd, ["--mock-upstream", *args], {})
        self.addCleanup(process.stop)
        return process, base

    def test_restart_keeps_totals(self) -> None:
        """
        A --mock-upstream run keeps its ledger in the current directory;
        a stop writes what it holds, and a second run adds to the same
        rows: the report shows every request of both runs.
        """
        for count in (3, 2):
            process, base = self.proxy()
            for _ in range(count):
                self.assertEqual(chat(base), 200)
            self.assertIn(process.stop(), (0, -15))  # twistd re-raises SIGTERM
        path = os.path.join(self.cwd, "oaiproxy-usage.sqlite3")
        document = report(self.cwd, "--db", path)
        self.assertEqual(document["total"]["requests"], 5)
        self.assertEqual([r["model"] for r in document["rows"]], ["gpt-4o-mini"])
        self.assertGreater(document["total"]["completion_tokens"], 0)

    def test_stream_finishing_during_the_drain_is_written(self) -> None:
        """
        A stream still running at SIGTERM ends during the drain: the
        ledger's last flush waits for it, so it is written.
        """
        path = os.path.join(self.cwd, "drain.sqlite3")
        upstream, url = start_fake_upstream(self.cwd, "")
        self.addCleanup(upstream.stop)
        process, base = start_proxy(self.cwd, ["--upstream", url, "--usage-db", path], {"OPENAI_API_KEY": "sk-x"})
        self.addCleanup(process.stop)
        host, port = base.split("://")[1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        body = json.dumps({"model": "fake-gated", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertTrue(response.readline().startswith(b"data: "))
        process.send_signal(signal.SIGTERM)
        process.wait_for("draining: no new connections; 1 request")
        control = url.rsplit("/v1", 1)[0].split("://")[1].split(":")
        release = http.client.HTTPConnection(control[0], int(control[1]), timeout=20)
        release.request("POST", "/_fake/release")
        release.getresponse().read()
        self.assertIn(b"[DONE]", response.read())
        process.wait()
        document = report(self.cwd, "--db", path)
        self.assertEqual([(r["model"], r["requests"]) for r in document["rows"]], [("fake-gated", 1)])

    def test_prices_reload_on_sighup(self) -> None:
        """
        A model without a price is warned about once and its tokens are
        counted unpriced; once the prices file gives it a price and SIGHUP
        arrives, its cost is counted.
        """
        prices = os.path.join(self.cwd, "prices.toml")
        with open(prices, "w") as f:
            f.write('[models."gpt-4o"]\ninput = 2.5\noutput = 10\n')
        process, base = self.proxy("--prices-file", prices)
        self.assertEqual(chat(base), 200)
        process.wait_for("no price for model gpt-4o-mini in the prices file")
        self.assertGreater(metric(base, 'oaiproxy_unpriced_tokens_total{model="gpt-4o-mini"}') or 0, 0)
        self.assertIsNone(metric(base, 'oaiproxy_cost_usd_total{client="-",model="gpt-4o-mini"}'))
        with open(prices, "a") as f:
            f.write('[models."gpt-4o-mini"]\ninput = 0.15\noutput = 0.6\n')
        marker = len(process.output)
        process.send_signal(signal.SIGHUP)
        process.wait_until(lambda out: "reloaded the prices file: 2 model(s)" in out[marker:])
        self.assertEqual(chat(base), 200)
        self.assertGreater(metric(base, 'oaiproxy_cost_usd_total{client="-",model="gpt-4o-mini"}') or 0, 0)
        self.assertEqual(process.output.count("no price for model gpt-4o-mini"), 1)

    def test_locked_sqlite_mid_run(self) -> None:
        """
        Another process holds the SQLite file's write lock: requests are
        answered all the same, their totals are held (the pending gauge),
        the failure is logged once, and once the lock goes everything is
        written.
        """
        path = os.path.join(self.cwd, "usage.sqlite3")
        process, base = self.proxy("--usage-db", path)
        self.assertEqual(chat(base), 200)
        wait_metric(base, "oaiproxy_ledger_written_records_total", 1)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(5):
                self.assertEqual(chat(base), 200)
            wait_metric(base, "oaiproxy_ledger_pending_records", 5)
            process.wait_for(r"usage ledger: cannot write to .*database is locked")
            self.assertEqual(metric(base, "oaiproxy_ledger_up"), 0)
            self.assertEqual(chat(base), 200)
        finally:
            holder.rollback()
            holder.close()
        wait_metric(base, "oaiproxy_ledger_written_records_total", 7)
        process.wait_for(r"usage ledger: writing to .* again")
        self.assertEqual(metric(base, "oaiproxy_ledger_up"), 1)
        self.assertEqual(metric(base, "oaiproxy_ledger_dropped_records_total"), 0)
        self.assertEqual(process.output.count("usage ledger: cannot write"), 1)
        process.stop()
        self.assertEqual(report(self.cwd, "--db", path)["total"]["requests"], 7)

    def test_two_daemons_one_sqlite_file(self) -> None:
        """
        Two processes write one SQLite ledger at once (WAL, busy timeout,
        additive upserts): the total is exactly the requests sent.
        """
        path = os.path.join(self.cwd, "shared.sqlite3")
        bases = [self.proxy("--usage-db", path)[1] for _ in range(2)]
        failures: list[BaseException] = []

        def send(base: str, count: int) -> None:
            try:
                for _ in range(count):
                    assert chat(base) == 200
            except BaseException as e:  # reported below
                failures.append(e)

        threads = [threading.Thread(target=send, args=(base, 40)) for base in bases for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(failures, [])
        for base in bases:
            wait_metric(base, "oaiproxy_ledger_written_records_total", 80)
        self.assertEqual(report(self.cwd, "--db", path)["total"]["requests"], 160)

    def test_workers_share_one_sqlite_file(self) -> None:
        """
        --workers 2: the supervisor migrates the ledger, both workers write
        it, and after the group's drain the total is the requests sent,
        whichever worker served each.
        """
        path = os.path.join(self.cwd, "workers.sqlite3")
        upstream, url = start_fake_upstream(self.cwd, "")
        self.addCleanup(upstream.stop)
        process, base = start_proxy(
            self.cwd, ["--upstream", url, "--workers", "2", "--usage-db", path], {"OPENAI_API_KEY": "sk-x"}
        )
        self.addCleanup(process.stop)
        process.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        self.assertEqual(process.output.count("schema version 0 -> 2"), 1)
        statuses: list[object] = []

        def send() -> None:
            for _ in range(10):
                try:
                    statuses.append(chat(base))
                except Exception as e:  # reported below
                    statuses.append(e)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(statuses, [200] * 40)
        process.stop()
        self.assertEqual(report(self.cwd, "--db", path)["total"]["requests"], 40)


class PostgresLedgerE2ETests(SynchronousTestCase):
    if postgres_bindir() is None:
        skip = "PostgreSQL's server is not installed (Debian package postgresql; .ci/run installs it)"
    elif not HAVE_PSYCOPG2:
        skip = "psycopg2 is not installed (pip install '.[postgres]')"

    def test_server_stopped_mid_run(self) -> None:
        """
        The PostgreSQL server stops mid-run: requests keep being answered,
        the outage is logged once and the totals held; when the server is
        back they are written, and the report (password from a file) has
        every request.
        """
        cwd = temp_dir(self)
        server = PostgresServer().start()
        self.addCleanup(server.remove)
        url = server.create_database("usage")
        password = os.path.join(cwd, "pw")
        with open(password, "w") as f:
            f.write(server.password + "\n")
        args: Sequence[str] = ("--usage-db", url, "--usage-db-password-file", password)
        process, base = start_proxy(cwd, ["--mock-upstream", *args], {})
        self.addCleanup(process.stop)
        self.assertNotIn(server.password, " ".join(process.argv))
        for _ in range(2):
            self.assertEqual(chat(base), 200)
        wait_metric(base, "oaiproxy_ledger_written_records_total", 2)
        server.stop()
        for _ in range(3):
            self.assertEqual(chat(base), 200)
        process.wait_for(r"usage ledger: cannot write to postgresql://oaiproxy@127\.0\.0\.1")
        wait_metric(base, "oaiproxy_ledger_pending_records", 3)
        server.start()
        wait_metric(base, "oaiproxy_ledger_written_records_total", 5)
        process.wait_for(r"usage ledger: writing to .* again")
        self.assertEqual(process.output.count("usage ledger: cannot write"), 1)
        self.assertNotIn(server.password, process.output)
        process.stop()
        document = report(cwd, "--db", url, "--db-password-file", password)
        self.assertEqual(document["total"]["requests"], 5)


_SHARED: list[PostgresServer] = []


def shared_postgres() -> PostgresServer:
    """
    The PostgreSQL cluster the migration tests share.
    """
    if not _SHARED:
        server = PostgresServer().start()
        atexit.register(server.remove)
        _SHARED.append(server)
    return _SHARED[0]


class PostgresMigrationTests(MigrationCases, SynchronousTestCase):
    if postgres_bindir() is None:
        skip = "PostgreSQL's server is not installed (Debian package postgresql; .ci/run installs it)"
    elif not HAVE_PSYCOPG2:
        skip = "psycopg2 is not installed (pip install '.[postgres]')"

    count = 0

    def setUp(self) -> None:
        # One cluster for the class, each test in a database of its own
        # (initdb takes seconds); started by the first test, stopped by
        # PID when the test process exits (trial's SynchronousTestCase has
        # no class-level hooks).
        self.server = shared_postgres()

    def fresh(self) -> Engine:
        PostgresMigrationTests.count += 1
        url = self.server.create_database(f"t{self.count}")
        return PostgresEngine(url, Secret(self.server.password.encode()))

    def indexes(self, engine: Engine) -> list[str]:
        return [r[0] for r in self.query(engine, "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_daily'")]

    def test_password_from_a_file(self) -> None:
        """
        The password comes from the file (the URL has none); without it,
        the server refuses and startup says so in one line without it.
        """
        url = self.server.create_database("pw")
        directory = temp_dir(self)
        path = os.path.join(directory, "pw")
        with open(path, "w") as f:
            f.write(self.server.password + "\n")
        self.assertEqual(migrate(url, load_db_password(path, {})), (0, SCHEMA_VERSION))
        error = self.assertRaises(ConfigError, migrate, url, Secret(b"wrong-password"))
        self.assertIn("127.0.0.1", str(error))
        self.assertNotIn("wrong-password", str(error))

    def test_two_migrations_at_once(self) -> None:
        """
        Two processes starting together apply each delta once (the
        advisory lock): the second waits, then finds nothing to do.
        """
        engine = self.fresh()
        first = engine.connect()
        cursor = first.cursor()
        engine.lock_for_migration(cursor)
        second = engine.connect()
        second_cursor = second.cursor()
        second_cursor.execute("SET lock_timeout = 200")
        self.assertRaises(psycopg2.errors.LockNotAvailable, engine.lock_for_migration, second_cursor)
        second.rollback()
        first.rollback()
        self.assertEqual(prepare(engine, first), (0, SCHEMA_VERSION))
        self.assertEqual(prepare(engine, second), (SCHEMA_VERSION, SCHEMA_VERSION))
        first.close()
        second.close()
