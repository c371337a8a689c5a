# -*- test-case-name: tests.e2e.test_proxy -*-
"""
Real processes for end-to-end tests and benchmarks: the fake upstream
(C{python -m oaiproxy.fake.upstream}) and the daemon (C{twistd -n
oaiproxy}), both on 127.0.0.1 with ports chosen by the kernel.

Each process's output is read line by line by a thread, so a caller waits
for "listening on ..." with a condition variable and a deadline instead of
sleeping, and the daemon can never block on a full pipe.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from typing import Callable, Mapping, Optional, Sequence

#: The directory holding the C{oaiproxy} package in use (the checkout, or
#: site-packages), put first on the children's path so they run the same
#: code as their parent.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Upper bound for a process to start and for any one wait.
STARTUP_SECONDS = 30.0


def twistd() -> str:
    """
    The twistd script beside this Python, so the test drives the same
    installation it imports.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(beside):
        return beside
    found = shutil.which("twistd")
    if found is None:
        raise RuntimeError("twistd is not installed")
    return found


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """
    A clean environment: nothing of the caller's OpenAI or oaiproxy
    settings leaks in, and this copy of oaiproxy comes first on the path.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "OAIPROXY_")) and k not in ("PORT", "CREDENTIALS_DIRECTORY")
    }
    env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Process:
    """
    A child process and everything it has printed so far.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        self.argv = list(argv)
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float = STARTUP_SECONDS) -> "re.Match[str]":
        """
        Wait until a printed line matches C{pattern}; fail with the output
        if the process exits or the deadline passes first.
        """
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            for line in self._lines:
                match = regex.search(line)
                if match:
                    found.append(match)
                    return True
            return self._proc.poll() is not None and not self._reader.is_alive()

        with self._changed:
            self._changed.wait_for(seen, timeout)
        if not found:
            raise AssertionError(f"{self.argv[0]} never printed {pattern!r}; output:\n{self.output}")
        return found[0]

    def wait_until(self, condition: "Callable[[str], bool]", timeout: float = STARTUP_SECONDS) -> None:
        """
        Wait until C{condition(output)} holds; fail with the output if the
        process exits or the deadline passes first.
        """
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    condition("".join(self._lines)) or (self._proc.poll() is not None and not self._reader.is_alive())
                ),
                timeout,
            )
        if not condition(self.output):
            raise AssertionError(f"{self.argv[0]}: condition not met; output:\n{self.output}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send_signal(self, signum: int) -> None:
        """
        Signal this process (by its own PID: never anything else).
        """
        if self._proc.poll() is None:
            self._proc.send_signal(signum)

    def wait(self, timeout: float = STARTUP_SECONDS) -> int:
        """
        Wait for the process to exit by itself; return its exit status.
        """
        status = self._proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status

    def stop(self) -> Optional[int]:
        """
        Stop the process (by its own PID only) and return its exit status.
        """
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return self._proc.returncode


def start_fake_upstream(cwd: str, key: str, *args: str) -> tuple[Process, str]:
    """
    Start the fake upstream; return it and its base URL (ending in /v1,
    or in its C{--prefix}; the bare host with C{--azure}).
    """
    process = Process(
        [sys.executable, "-m", "oaiproxy.fake.upstream", "--port", "0", *args],
        child_env({"OPENAI_API_KEY": key}),
        cwd,
    )
    url = process.wait_for(r"listening on (https?://127\.0\.0\.1:\d+\S*)").group(1)
    return process, url


def start_proxy(
    cwd: str,
    args: Sequence[str],
    env: Mapping[str, str],
    prefix: Sequence[str] = (),
    port: str = "tcp:0:interface=127.0.0.1",
) -> tuple[Process, str]:
    """
    Start C{twistd -n oaiproxy} on a free loopback port; return it and its
    base URL (without /v1).

    @param prefix: a command to run twistd under, e.g. C{taskset -c 0}.
    @param port: the listening endpoint (port 0: any free one).
    """
    process = Process(
        [*prefix, twistd(), "--nodaemon", "--pidfile=", "oaiproxy", "--port", port, *args],
        child_env(env),
        cwd,
    )
    base = process.wait_for(r"oaiproxy listening on (http://127\.\d+\.\d+\.\d+:\d+)").group(1)
    return process, base


class RedisServer:
    """
    Debian's C{redis-server} on 127.0.0.1 and a free port, persistence off
    (C{--save '' --appendonly no}: limits need none), stopped by PID.  It
    can be stopped and started again on the same port (a Redis restart),
    and paused with C{SIGSTOP} (a Redis that does not answer).
    """

    def __init__(self, port: int = 0, password: str = "") -> None:
        import socket
        import tempfile

        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        self.port = port
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="oaiproxy-redis-")
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "RedisServer":
        import socket
        import time

        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        args = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir] + (["--requirepass", self.password] if self.password else [])
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def pause(self, paused: bool = True) -> None:
        import signal

        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        import signal

        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(STARTUP_SECONDS)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bindir() -> Optional[str]:
    """
    Where Debian's PostgreSQL server programs are (C{initdb}, C{pg_ctl}):
    on the path, else the newest C{/usr/lib/postgresql/N/bin}; C{None}
    when the server is not installed (Debian package postgresql).
    """
    import glob

    found = shutil.which("initdb")
    if found is not None and shutil.which("pg_ctl") is not None:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(candidates[-1]) if candidates else None


class PostgresServer:
    """
    A throwaway PostgreSQL cluster on 127.0.0.1 and a free port, in a
    temporary directory: user C{oaiproxy} with a password (TCP connections
    must give it), started with C{pg_ctl} and stopped by its PID.  It can
    be stopped and started again on the same port (a database restart).
    Run as root, the server runs as the C{postgres} user (PostgreSQL
    refuses root).
    """

    USER = "oaiproxy"

    def __init__(self, password: str = "pg-test-password") -> None:
        import socket
        import tempfile

        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.bindir = bindir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="oaiproxy-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = os.path.join(self.dir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        if self._as:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", self.data, "-U", self.USER, "--pwfile", pwfile, "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as, os.path.join(self.bindir, program), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout[-2000:]}")

    def start(self) -> "PostgresServer":
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.dir, "log"), "-w", "start")
        return self

    @property
    def pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """
        A new, empty database; its URL.
        """
        import psycopg2

        connection = psycopg2.connect(self.url(), password=self.password)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.url(name)

    def stop(self) -> None:
        """
        A fast shutdown (SIGINT to the postmaster, by its PID), waited for.
        """
        import signal
        import time

        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
