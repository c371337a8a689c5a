"""
Several worker processes on the same listeners (--workers), end to end:
connections spread over the workers; a reload reaches each one; SIGTERM
drains them all and the group exits cleanly; an open relay is refused
before any worker starts; a worker restarted after the keys file changed
serves the group's clients; workers do not outlive their supervisor.
(The supervisor's arguments, limits and hand-over, in memory, are in
C{tests.daemon.test_workers}.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any, Optional

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry, mint_key
from oaiproxy.fake.processes import child_env, start_fake_upstream, start_proxy, twistd
from tests.support import temp_dir

KEY = "sk-proj-WORKERSSECRET000"
MESSAGES = [{"role": "user", "content": "hello proxy"}]


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

        statuses: list[Any] = []

        def request() -> None:
            # The outcome goes to the main thread: an assert here could not
            # fail the test.
            try:
                connection = http.client.HTTPConnection(host, int(port), timeout=20)
                body = json.dumps({"model": "gpt-4o", "messages": MESSAGES})
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                statuses.append(connection.getresponse().status)
                connection.close()
            except Exception as e:
                statuses.append(e)

        threads = [threading.Thread(target=request) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.assertFalse([t for t in threads if t.is_alive()], "requests still running")
        self.assertEqual(statuses, [200] * 40)
        # Which worker the kernel hands a connection to is its choice; with
        # the other one stopped, each worker in turn must serve alone.
        for worker in workers_of(proxy.pid):
            marker = len(proxy.output)
            with only_running(worker, workers_of(proxy.pid)):
                request()
            self.assertEqual(statuses[-1], 200)
            proxy.wait_until(lambda out, since=marker: len(workers_answering(out[since:])) == 1)
        entries = [json.loads(line) for line in proxy.output.splitlines() if line.startswith("{")]
        self.assertEqual({e["worker"] for e in entries if "request_id" in e}, {0, 1})

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


def workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@contextlib.contextmanager
def only_running(worker: int, workers: list[int]) -> Iterator[None]:
    """
    Stop every other worker (SIGSTOP) for the duration, so that only
    C{worker} can accept from the shared listening socket; they continue
    afterwards, even if the body fails.
    """
    stopped = [pid for pid in workers if pid != worker]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def workers_answering(output: str) -> list[int]:
    """The worker index of each access-log entry in C{output}, in order."""
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [e["worker"] for e in entries if "request_id" in e]


class RefusalTests(SynchronousTestCase):
    def test_open_relay_refused_before_any_worker(self) -> None:
        """
        The reproduction from the issue: --workers 2 on all interfaces with
        no client keys.  The supervisor refuses at once, before binding and
        before any worker starts, with exit status 1 and the reason on
        standard error.
        """
        cwd = temp_dir(self)
        result = subprocess.run(
            [twistd(), "--nodaemon", "--pidfile=", "oaiproxy", "--mock-upstream", "--port", "tcp:0", "--workers", "2"],
            env=child_env({}),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("refusing to start: http://0.0.0.0:0 is reachable from other hosts", result.stderr)
        self.assertNotIn("listening on", result.stdout + result.stderr)
        self.assertNotIn("supervis", result.stdout + result.stderr)


class RestartTests(SynchronousTestCase):
    def test_restarted_worker_serves_the_group_clients(self) -> None:
        """
        The keys file is emptied (and not reloaded), then a worker dies: the
        worker started in its place still requires the group's client keys
        rather than reading the file, and so does every later connection.
        """
        cwd = temp_dir(self)
        upstream, url = start_fake_upstream(cwd, "")
        self.addCleanup(upstream.stop)
        key = mint_key()
        keys_file = os.path.join(cwd, "clients.toml")
        with open(keys_file, "w") as f:
            f.write(file_entry("alice", key))
        proxy, base = start_proxy(
            cwd,
            ["--upstream", url, "--workers", "2", "--client-keys-file", keys_file, "--log-format", "json"],
            {"OPENAI_API_KEY": KEY},
        )
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        open(keys_file, "w").close()
        first, survivor = workers_of(proxy.pid)
        os.kill(first, signal.SIGKILL)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 3)
        self.assertIn("starting it again", proxy.output)
        host, port = base.split("://")[1].split(":")

        def status(authorization: Optional[str]) -> int:
            connection = http.client.HTTPConnection(host, int(port), timeout=20)
            headers = {"Authorization": authorization} if authorization else {}
            connection.request("GET", "/v1/models", headers=headers)
            code = connection.getresponse().status
            connection.close()
            return code

        # With the surviving worker stopped, only the restarted one can
        # accept, so every answer below is the restarted worker's.
        restarted = [pid for pid in workers_of(proxy.pid) if pid != survivor]
        self.assertEqual(len(restarted), 1)
        marker = len(proxy.output)
        with only_running(restarted[0], workers_of(proxy.pid)):
            self.assertEqual([status(None) for _ in range(10)], [401] * 10)
            self.assertEqual({status(f"Bearer {key}") for _ in range(2)}, {200})
        # The access log may trail the answers; all twelve are one worker's.
        proxy.wait_until(lambda out: len(workers_answering(out[marker:])) == 12)
        self.assertEqual(len(set(workers_answering(proxy.output[marker:]))), 1)
        # And every later connection, whichever worker takes it.
        self.assertEqual([status(None) for _ in range(10)], [401] * 10)
        self.assertNotIn(key, proxy.output)


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
        # (A killed supervisor leaves its metrics directory, as systemd's
        # RuntimeDirectory= would not: here it is in this test's own.)
        runtime = {"RUNTIME_DIRECTORY": temp_dir(self)}
        proxy, base = start_proxy(cwd, ["--upstream", url, "--workers", "2"], {"OPENAI_API_KEY": KEY, **runtime})
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
        workers = workers_of(proxy.pid)
        self.assertEqual(len(workers), 2)
        proxy.send_signal(signal.SIGKILL)
        for pid in workers:
            self.assertTrue(wait_for_exit(pid, 30), f"worker {pid} outlived its supervisor")


class DaemonLogTests(SynchronousTestCase):
    def test_daemonised_group_logs_to_the_log_file(self) -> None:
        """
        Daemonised (no -n), the group's log is twistd's log file, as one
        process's is: each worker's startup lines, the access entry of a
        request it served and its shutdown are there as ordinary text
        lines, though twistd pointed the workers' standard output at
        /dev/null; the upstream key appears nowhere.
        """
        cwd = temp_dir(self)
        upstream, url = start_fake_upstream(cwd, "")
        self.addCleanup(upstream.stop)
        pidfile, logfile = os.path.join(cwd, "twistd.pid"), os.path.join(cwd, "twistd.log")
        started = subprocess.run(
            [
                twistd(),
                f"--pidfile={pidfile}",
                f"--logfile={logfile}",
                "oaiproxy",
                "--upstream",
                url,
                "--port",
                "tcp:0:interface=127.0.0.1",
                "--workers",
                "2",
            ],
            env=child_env({"OPENAI_API_KEY": KEY}),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        # twistd's parent returns once the group is ready: both workers listen.
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: wait_for_exit(pid, 0) or os.kill(pid, signal.SIGTERM))
        with open(logfile) as f:
            ready = [line for line in f if "oaiproxy listening on" in line]
        self.assertEqual(len(ready), 2, ready)
        listening = re.search(r"oaiproxy listening on (http://127\.[\d.]+:\d+)", ready[0])
        assert listening is not None
        client = openai.OpenAI(base_url=listening.group(1) + "/v1", api_key="unused")
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(wait_for_exit(pid, 60), "the daemon did not stop")
        with open(logfile) as f:
            text = f.read()
        self.assertIn("POST /v1/chat/completions 200", text)
        # Two workers' and the supervisor's.
        self.assertEqual(text.count("Main loop terminated."), 3, text)
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")
        self.assertNotIn("\x1e", text)
        self.assertNotIn(KEY, text)
