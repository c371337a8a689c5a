"""
The daemon as systemd runs it, end to end on 127.0.0.1: socket activation
through Debian's real C{systemd-socket-activate}, readiness and stopping
notifications on a real datagram socket, the graceful drain on SIGTERM,
reload on SIGHUP, a key passed as a credential file staying out of
C{ps}, logs and error bodies, startup failures with and without
C{--nodaemon}, and C{--log-format json}.  The daemon is the real C{twistd -n oaiproxy};
the client is the openai SDK; the upstream is the fake, as a real server.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import Process, child_env, start_fake_upstream, start_proxy, twistd
from tests.support import self_signed_pem, temp_dir

UPSTREAM_KEY = "sk-proj-SYSTEMDSECRET5551234"
MESSAGES = [{"role": "user", "content": "hello proxy"}]
REPLY = "This is a mock reply to: hello proxy"
#: Exit statuses systemd counts as a clean stop: 0, or death by the SIGTERM
#: that twistd re-raises after shutting down cleanly.
CLEAN_EXIT = (0, -signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is missing: install Debian's systemd package (apt-get install systemd)")
    return path


class Deployment(SynchronousTestCase):
    """
    A fake upstream (accepting any key unless told otherwise) and helpers to
    start the daemon in front of it.
    """

    upstream_key = ""

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.upstream, self.upstream_url = start_fake_upstream(self.cwd, self.upstream_key)
        self.addCleanup(self.upstream.stop)
        self.control = self.upstream_url.rsplit("/v1", 1)[0]

    def proxy(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> tuple[Process, str]:
        environment = {"OPENAI_API_KEY": UPSTREAM_KEY} if env is None else dict(env)
        process, base = start_proxy(self.cwd, ["--upstream", self.upstream_url, *args], environment)
        self.addCleanup(process.stop)
        return process, base

    def client(self, base: str, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=20.0, **options)

    def fake(self, method: str, path: str) -> Any:
        url = self.control.split("://", 1)[1]
        host, port = url.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        connection.request(method, path)
        body = connection.getresponse().read()
        connection.close()
        return json.loads(body)

    def authorizations(self) -> list[str]:
        return [r["headers"]["authorization"][0] for r in self.fake("GET", "/_fake/requests")]


class SocketActivationTests(Deployment):
    def activated(self, endpoint: str, fdname: str) -> tuple[Process, int]:
        port = free_port()
        argv = [
            tool("systemd-socket-activate"),
            "--listen",
            f"127.0.0.1:{port}",
            f"--fdname={fdname}",
            # The activator passes on only the variables it is told to.
            *("-E", "PYTHONPATH", "-E", "PYTHONUNBUFFERED", "-E", "OPENAI_API_KEY"),
            twistd(),
            "--nodaemon",
            "--pidfile=",
            "oaiproxy",
            "--upstream",
            self.upstream_url,
            "--port",
            endpoint,
        ]
        process = Process(argv, child_env({"OPENAI_API_KEY": UPSTREAM_KEY}), self.cwd)
        self.addCleanup(process.stop)
        process.wait_for(rf"Listening on 127\.0\.0\.1:{port}")
        return process, port

    def test_serves_on_the_inherited_socket_by_name(self) -> None:
        """
        Started by systemd-socket-activate as a .socket unit would, the
        daemon serves on the socket it inherits, found by name; the first
        connection, made before the daemon even runs, is queued and
        answered, not refused.
        """
        process, port = self.activated("systemd:domain=INET:name=oaiproxy", "oaiproxy")
        completion = self.client(f"http://127.0.0.1:{port}").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        self.assertIn(f"oaiproxy listening on http://127.0.0.1:{port}", process.output)

    def test_serves_on_the_inherited_socket_by_index(self) -> None:
        """
        index=0 works as well as name=.
        """
        _, port = self.activated("systemd:domain=INET:index=0", "whatever")
        completion = self.client(f"http://127.0.0.1:{port}").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)


class NotifyTests(Deployment):
    def test_ready_after_listening_and_stopping_on_sigterm(self) -> None:
        """
        With NOTIFY_SOCKET set, systemd hears READY=1 only once the port
        accepts connections, and STOPPING=1 when SIGTERM starts the drain.
        """
        address = os.path.join(self.cwd, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notify.close)
        notify.bind(address)
        notify.settimeout(30)
        process, base = self.proxy(env={"OPENAI_API_KEY": UPSTREAM_KEY, "NOTIFY_SOCKET": address})
        ready = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        self.assertEqual(ready["READY"], "1")
        self.assertIn("forwarding to http://127.0.0.1:", ready["STATUS"])
        host, port = base.split("://")[1].split(":")
        socket.create_connection((host, int(port)), timeout=5).close()
        process.send_signal(signal.SIGTERM)
        stopping = notify.recv(4096).decode()
        self.assertIn("STOPPING=1", stopping)
        self.assertIn(process.wait(), CLEAN_EXIT)


class DrainTests(Deployment):
    def test_stream_in_flight_completes_during_drain(self) -> None:
        """
        SIGTERM during a stream: the stream completes intact, /health on an
        open connection says draining, a new connection is refused, and the
        daemon exits cleanly.
        """
        process, base = self.proxy(["--drain-timeout", "20"])
        host, port = base.split("://")[1].split(":")
        probe = http.client.HTTPConnection(host, int(port), timeout=20)
        probe.request("GET", "/health")
        self.assertEqual(probe.getresponse().read(), b'{"status": "healthy"}')

        stream = self.client(base).chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        received = [next(chunks), next(chunks)]
        process.send_signal(signal.SIGTERM)
        process.wait_for("draining: no new connections; 1 request")

        probe.request("GET", "/health")
        response = probe.getresponse()
        self.assertEqual((response.status, response.read()), (503, b'{"status": "draining"}'))
        self.assertEqual(response.getheader("connection"), "close")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5)

        self.assertEqual(self.fake("POST", "/_fake/release"), {"released": 1})
        received.extend(chunks)
        text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
        self.assertEqual(text, REPLY)
        self.assertIn(process.wait(), CLEAN_EXIT)
        self.assertIn("drained; shutting down", process.output)

    def test_stream_still_open_at_deadline_is_cut_cleanly(self) -> None:
        """
        A stream that outlives the drain timeout ends with an error the SDK
        raises, and the daemon still exits cleanly, soon after the deadline.
        """
        process, base = self.proxy(["--drain-timeout", "1"])
        stream = self.client(base).chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        with self.assertRaises(openai.APIError) as caught:
            list(chunks)
        self.assertIn("shut down before this response was complete", str(caught.exception))
        self.assertIn(process.wait(timeout=15), CLEAN_EXIT)
        self.assertIn("drain timeout: cutting off 1 request(s)", process.output)


class ReloadTests(Deployment):
    def setUp(self) -> None:
        super().setUp()
        self.key_file = os.path.join(self.cwd, "openai_api_key")
        self.write_key("sk-proj-FIRSTKEY")

    def write_key(self, text: str) -> None:
        # Replace atomically, as an operator's editor or install(1) would.
        with open(self.key_file + ".new", "w") as f:
            f.write(text)
        os.replace(self.key_file + ".new", self.key_file)

    def reload(self, process: Process, base: str, expect: str) -> None:
        # "listening on" is logged while twistd binds, before the services
        # start and the SIGHUP handler is in place; an answer proves the
        # reactor runs, so they have.
        host, port = base.split("://")[1].split(":")
        probe = http.client.HTTPConnection(host, int(port), timeout=20)
        probe.request("GET", "/health")
        self.assertEqual(probe.getresponse().status, 200)
        probe.close()
        marker = len(process.output)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while expect not in process.output[marker:]:
            process.wait_for(expect, timeout=max(0.0, deadline - time.monotonic()))

    def test_new_key_used_after_sighup_while_old_stream_completes(self) -> None:
        """
        After the key file changes and SIGHUP arrives, the next request
        upstream carries the new key, while a stream started before the
        reload completes intact.
        """
        process, base = self.proxy(["--api-key-file", self.key_file], env={})
        client = self.client(base)
        stream = client.chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        received = [next(chunks)]

        self.write_key("sk-proj-SECONDKEY\n")
        self.reload(process, base, "reloaded: upstream key changed")
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(self.authorizations(), ["Bearer sk-proj-FIRSTKEY", "Bearer sk-proj-SECONDKEY"])

        self.fake("POST", "/_fake/release")
        received.extend(chunks)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in received if c.choices), REPLY)
        self.assertNotIn("SECONDKEY", process.output)

    def test_broken_key_file_keeps_old_key(self) -> None:
        """
        A reload that cannot read a usable key keeps the key in use and
        says why.
        """
        process, base = self.proxy(["--api-key-file", self.key_file], env={})
        self.write_key("")
        self.reload(process, base, "reload failed, keeping the credentials in use")
        self.client(base).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(self.authorizations(), ["Bearer sk-proj-FIRSTKEY"])


class CredentialTests(Deployment):
    upstream_key = UPSTREAM_KEY

    def test_credential_key_stays_secret(self) -> None:
        """
        A key passed as a systemd credential is used, and appears neither in
        ps, nor in the daemon's output, nor in any error body.
        """
        credentials = os.path.join(self.cwd, "credentials")
        os.makedirs(credentials)
        with open(os.path.join(credentials, "openai_api_key"), "w") as f:
            f.write(UPSTREAM_KEY + "\n")
        process, base = self.proxy(env={"CREDENTIALS_DIRECTORY": credentials})
        client = self.client(base)
        self.assertEqual(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content, REPLY
        )
        bodies = []
        for model in ("fake-429", "fake-500", "fake-crash"):
            # Each must fail: a call that succeeded would leave no body here
            # to check, and the test would pass on less than it says.
            with self.assertRaises(openai.APIError) as failed:
                client.chat.completions.create(model=model, messages=MESSAGES)
            bodies.append(repr(failed.exception.body) + str(failed.exception))
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=[])
        bodies.append(repr(caught.exception.body))
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
        self.assertIn(str(process.pid), ps)
        process.stop()
        for place in (ps, process.output, *bodies):
            self.assertNotIn(UPSTREAM_KEY, place)


UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "systemd")

#: Turns on the kernel's memory-deny-write-execute for itself (what
#: MemoryDenyWriteExecute=yes enforces), then becomes the given command.
MDWE_WRAPPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
    "    sys.exit('PR_SET_MDWE failed: ' + os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class HardeningTests(SynchronousTestCase):
    def test_unit_memory_setting_keeps_tls_working(self) -> None:
        """
        Under the unit's MemoryDenyWriteExecute= setting the daemon still
        speaks TLS to a trusted upstream.  The kernel enforces the setting
        directly here (prctl PR_SET_MDWE, Linux 6.3+); SSL_CERT_FILE makes
        the test upstream's certificate trusted.  (With it on, pyOpenSSL's
        cffi verify callback cannot be created and TLS breaks.)
        """
        [setting] = unit_settings(os.path.join(UNITS, "oaiproxy.service"))["MemoryDenyWriteExecute"]
        cwd = temp_dir(self)
        pem = self_signed_pem(cwd)
        upstream, url = start_fake_upstream(cwd, UPSTREAM_KEY, "--tls-pem", pem)
        self.addCleanup(upstream.stop)
        enforce = [sys.executable, "-c", MDWE_WRAPPER] if setting == "yes" else []
        proxy, base = start_proxy(
            cwd, ["--upstream", url], {"OPENAI_API_KEY": UPSTREAM_KEY, "SSL_CERT_FILE": pem}, prefix=enforce
        )
        self.addCleanup(proxy.stop)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=20.0)
        completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)


def unit_settings(path: str) -> dict[str, list[str]]:
    """
    The assignments in a unit file, by key.
    """
    settings: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, value = line.split("=", 1)
                settings.setdefault(key, []).append(value)
    return settings


class UnitCommandTests(Deployment):
    upstream_key = UPSTREAM_KEY

    def test_unit_command_serves_on_the_unit_socket(self) -> None:
        """
        The service unit's own ExecStart, run the way systemd would run it
        (the .socket unit's address and FileDescriptorName, the credential
        directory, NOTIFY_SOCKET), starts, says READY=1 and serves.
        """
        service = unit_settings(os.path.join(UNITS, "oaiproxy.service"))
        sock = unit_settings(os.path.join(UNITS, "oaiproxy.socket"))
        [exec_start] = service["ExecStart"]
        argv = exec_start.split()
        self.assertTrue(argv[0].endswith("/twistd"))
        [listen] = sock["ListenStream"]
        self.assertEqual(listen, "127.0.0.1:8080")
        [fdname] = sock["FileDescriptorName"]
        # Every credential as systemd would place it: the name before the
        # colon is the file name under $CREDENTIALS_DIRECTORY.
        names = [c.split(":", 1)[0] for c in service["LoadCredential"]]
        self.assertEqual(sorted(names), ["client_keys", "openai_api_key"])
        credentials = os.path.join(self.cwd, "credentials")
        os.makedirs(credentials)
        with open(os.path.join(credentials, "openai_api_key"), "w") as f:
            f.write(UPSTREAM_KEY)
        with open(os.path.join(credentials, "client_keys"), "w") as f:
            f.write(file_entry("unit-test", "oaiproxy-UNITCLIENTKEY"))
        notify_path = os.path.join(self.cwd, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notify.close)
        notify.bind(notify_path)
        notify.settimeout(30)

        [state_directory] = service["StateDirectory"]
        self.assertEqual(state_directory, "oaiproxy")
        state = os.path.join(self.cwd, "state")
        os.makedirs(state)
        port = free_port()
        process = Process(
            [
                tool("systemd-socket-activate"),
                "--listen",
                f"127.0.0.1:{port}",
                f"--fdname={fdname}",
                *("-E", "PYTHONPATH", "-E", "PYTHONUNBUFFERED", "-E", "CREDENTIALS_DIRECTORY"),
                *("-E", "NOTIFY_SOCKET", "-E", "OPENAI_BASE_URL", "-E", "STATE_DIRECTORY"),
                twistd(),
                *argv[1:],
            ],
            child_env(
                {
                    "CREDENTIALS_DIRECTORY": credentials,
                    "NOTIFY_SOCKET": notify_path,
                    # What /etc/oaiproxy/oaiproxy.env would say.
                    "OPENAI_BASE_URL": self.upstream_url,
                    # StateDirectory=oaiproxy: the usage ledger's home.
                    "STATE_DIRECTORY": state,
                }
            ),
            self.cwd,
        )
        self.addCleanup(process.stop)
        process.wait_for(rf"Listening on 127\.0\.0\.1:{port}")
        unit_client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="oaiproxy-UNITCLIENTKEY", max_retries=0, timeout=20.0
        )
        completion = unit_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        with self.assertRaises(openai.AuthenticationError):
            self.client(f"http://127.0.0.1:{port}").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertIn(b"READY=1", notify.recv(4096))
        process.send_signal(signal.SIGTERM)
        self.assertIn(process.wait(), CLEAN_EXIT)
        # The ledger is $STATE_DIRECTORY/usage.sqlite3, and has the request.
        ledger = sqlite3.connect(os.path.join(state, "usage.sqlite3"))
        self.addCleanup(ledger.close)
        self.assertEqual(ledger.execute("SELECT client, requests FROM usage_daily").fetchall(), [("unit-test", 1)])


class StartupFailureTests(Deployment):
    """
    A daemon that cannot start says why on the terminal and exits 1, with
    or without --nodaemon; it never waits forever.
    """

    def twistd(self, twistd_options: Sequence[str], args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [twistd(), *twistd_options, "oaiproxy", "--upstream", self.upstream_url, *args],
            env=child_env({"OPENAI_API_KEY": UPSTREAM_KEY}),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            # Bounded: before the fix, the daemon's parent waited forever.
            timeout=60,
        )
        pidfile = os.path.join(self.cwd, "twistd.pid")
        if os.path.exists(pidfile):
            # It started after all: stop the daemon we started, by its pid.
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        return result

    def daemon_options(self) -> list[str]:
        return [
            f"--pidfile={os.path.join(self.cwd, 'twistd.pid')}",
            f"--logfile={os.path.join(self.cwd, 'twistd.log')}",
        ]

    def busy_port(self) -> int:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port: int = busy.getsockname()[1]
        return port

    def test_busy_port_without_nodaemon(self) -> None:
        """
        Daemonizing, a busy port ends with status 1 and the reason on
        standard error, where it pointed when twistd started (the terminal),
        not only in twistd.log.
        """
        port = self.busy_port()
        result = self.twistd(self.daemon_options(), ["--port", f"tcp:{port}:interface=127.0.0.1"])
        self.assertEqual(result.returncode, 1, result.stderr)
        reason = f"twistd oaiproxy: error: cannot listen on tcp:{port}:interface=127.0.0.1: [Errno 98]"
        self.assertIn(reason, result.stderr)
        self.assertIn("choose another port with --port (or PORT)", result.stderr)
        with open(os.path.join(self.cwd, "twistd.log")) as f:
            self.assertIn(reason, f.read())
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "twistd.pid")))

    def test_busy_port_with_nodaemon_is_on_stderr(self) -> None:
        """
        Under --nodaemon the reason is on standard error too, not among the
        log lines on standard output.
        """
        port = self.busy_port()
        result = self.twistd(["--nodaemon", "--pidfile="], ["--port", f"tcp:{port}:interface=127.0.0.1"])
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("cannot listen on"), 1, result.stderr)
        self.assertIn("--port (or PORT)", result.stderr)
        self.assertNotIn("cannot listen", result.stdout)

    def test_open_relay_refused_without_nodaemon(self) -> None:
        """
        The open-relay refusal, daemonizing: decided before binding, status
        1, the reason on the terminal.
        """
        result = self.twistd(self.daemon_options(), ["--port", "tcp:0"])
        self.assertEqual(result.returncode, 1)
        self.assertIn("refusing to start: http://0.0.0.0:0 is reachable from other hosts", result.stderr)


class JsonLogTests(Deployment):
    def test_every_line_on_stdout_is_json(self) -> None:
        """
        With --log-format json, one process or a group of workers: every
        line on standard output is a JSON object (startup, Twisted's own
        lines, access entries, shutdown), and nothing is left for standard
        error.
        """
        for extra in ([], ["--workers", "2"]):
            errors = os.path.join(self.cwd, f"stderr{len(extra)}")
            # The shell sends standard error to a file, so standard output
            # is all the Process reader sees.
            process, base = start_proxy(
                self.cwd,
                ["--upstream", self.upstream_url, "--log-format", "json", *extra],
                {"OPENAI_API_KEY": UPSTREAM_KEY},
                prefix=["sh", "-c", 'exec "$@" 2>"$0"', errors],
            )
            self.addCleanup(process.stop)
            if extra:
                process.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
            self.client(base).chat.completions.create(model="gpt-4o", messages=MESSAGES)
            process.send_signal(signal.SIGTERM)
            self.assertIn(process.wait(), CLEAN_EXIT)
            records = [json.loads(line) for line in process.output.splitlines()]
            messages = [r.get("message", "") for r in records]
            self.assertTrue(any("oaiproxy listening on" in m for m in messages), messages)
            self.assertTrue(any("starting up" in m for m in messages), messages)
            self.assertTrue(any("Main loop terminated" in m for m in messages), messages)
            self.assertEqual([r["status"] for r in records if "request_id" in r], [200])
            with open(errors) as f:
                self.assertEqual(f.read(), "")
