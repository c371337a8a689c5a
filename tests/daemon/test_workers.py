"""
Several worker processes on the same listeners (--workers), in memory: the
arguments a supervisor gives its workers, the split of client limits, and
the configuration it hands them (at start, on reload, to a restarted
worker).  The group as real processes is in C{tests.e2e.test_workers}.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IFileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent, jsonFileLogObserver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oaiproxy.access.clients import Limits
from oaiproxy.config import Secret
from oaiproxy.daemon.lifecycle import StartupReport
from oaiproxy.daemon.sdnotify import Notifier
from oaiproxy.daemon.workers import GroupSecrets, SecretsReader, Supervisor, read_secrets, worker_argv
from oaiproxy.fake.harness import registry
from oaiproxy.observe.metrics import MULTIPROC_ENV, GroupDirectory
from tests.support import temp_dir


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


@implementer(IFileDescriptor)  # the supervisor hands its fileno() to workers
class _Port:
    """
    A bound port as the supervisor sees it.
    """

    def __init__(self) -> None:
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def stopListening(self) -> None:
        self.listening = False


class _Endpoint:
    def __init__(self) -> None:
        self.port = _Port()

    def listen(self, factory: Any) -> Any:
        from twisted.internet.defer import succeed

        return succeed(self.port)


class _Transport:
    pid = None

    def __init__(self) -> None:
        self.written = b""
        self.descriptors: set[int] = set()

    def writeToChild(self, fd: int, data: bytes) -> None:
        # Kept for the test to check: an assert here would run inside the
        # supervisor's callbacks.
        self.descriptors.add(fd)
        self.written += data


def frames(data: bytes) -> list[GroupSecrets]:
    """
    Every configuration in what a worker's stdin received.
    """
    read, write = os.pipe()
    try:
        os.write(write, data)
        os.close(write)
        first, rest = read_secrets(read, timeout=0)
    finally:
        os.close(read)
    received: list[GroupSecrets] = [first]
    reader_read, reader_write = os.pipe()
    try:
        SecretsReader(reader_read, received.append).dataReceived(rest)
    finally:
        os.close(reader_read)
        os.close(reader_write)
    return received


class HandoverTests(SynchronousTestCase):
    """
    The supervisor's configuration reaches every worker: at start, on each
    reload it accepted, and to a worker started again later.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawned: list[tuple[Any, _Transport]] = []
        self.out: list[bytes] = []
        self.err: list[bytes] = []

        def spawn(
            protocol: Any, executable: str, argv: list[str], env: Any, childFDs: Any, path: Any = None
        ) -> _Transport:
            transport = _Transport()
            protocol.makeConnection(transport)
            self.spawned.append((protocol, transport))
            return transport

        self.first = GroupSecrets(Secret(b"sk-first"), registry(b"key-one"))
        self.supervisor = Supervisor(
            self.reactor,
            [("tcp:8080:interface=127.0.0.1", _Endpoint())],
            ["--port", "tcp:8080:interface=127.0.0.1", "--workers", "2"],
            2,
            Notifier(None),
            {},
            self.out.append,
            self.first,
            StartupReport(self.reactor),
            spawn=spawn,
            error_output=self.err.append,
        )

    def test_each_worker_gets_the_group_configuration(self) -> None:
        self.supervisor.privilegedStartService()
        self.supervisor.startService()
        self.assertEqual(len(self.spawned), 2)
        for _, transport in self.spawned:
            [received] = frames(transport.written)
            self.assertEqual(received.api_key, Secret(b"sk-first"))
            self.assertIsNotNone(received.clients.identify(b"key-one"))

        second = GroupSecrets(Secret(b"sk-second"), registry(b"key-two"))
        self.assertEqual(self.supervisor.hand_over(second), 2)
        for _, transport in self.spawned:
            self.assertEqual(
                [f.api_key for f in frames(transport.written)], [Secret(b"sk-first"), Secret(b"sk-second")]
            )

        # Worker 0 had served, then died: the one started in its place gets
        # what the group runs with now, not what it started with.
        worker, _ = self.spawned[0]
        worker.ready = True
        worker.processEnded(None)
        self.reactor.advance(5)
        self.assertEqual(len(self.spawned), 3)
        [received] = frames(self.spawned[2][1].written)
        self.assertEqual(received.api_key, Secret(b"sk-second"))
        self.assertIsNotNone(received.clients.identify(b"key-two"))
        self.assertIsNone(received.clients.identify(b"key-one"))
        # All of it on the worker's standard input, which it reads.
        self.assertEqual([t.descriptors for _, t in self.spawned], [{0}, {0}, {0}])

    def test_output_and_errors_relayed_apart(self) -> None:
        """
        A worker's standard output goes to the supervisor's, its standard
        error to the supervisor's standard error, in whole lines.
        """
        self.supervisor.privilegedStartService()
        self.supervisor.startService()
        worker, _ = self.spawned[0]
        worker.outReceived(b'{"a": 1}\n{"b"')
        worker.errReceived(b"Traceback...\n")
        worker.outReceived(b": 2}\n")
        self.assertEqual(self.out, [b'{"a": 1}\n', b'{"b": 2}\n'])
        self.assertEqual(self.err, [b"Traceback...\n"])


def record(format: str, **fields: Any) -> bytes:
    """
    One log event as a relaying worker writes it (L{relay.observer}: the
    JSON record twisted's own observer makes).
    """
    stream = io.StringIO()
    Logger(namespace="oaiproxy.example", observer=jsonFileLogObserver(stream)).info(format, **fields)
    return stream.getvalue().encode("utf-8")


class RelayTests(SynchronousTestCase):
    """
    Where the supervisor's log is not its standard output (daemonised,
    --logfile), the workers log as JSON records and the supervisor
    publishes their events to its own log.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.argvs: list[list[str]] = []
        self.spawned: list[Any] = []
        self.out: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.paths: list[Any] = []
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        self.terminal = read
        self.report = StartupReport(self.reactor, write)

    def start(self, relay: bool) -> None:
        def spawn(
            protocol: Any, executable: str, argv: list[str], env: Any, childFDs: Any, path: Any = None
        ) -> _Transport:
            transport = _Transport()
            protocol.makeConnection(transport)
            self.argvs.append(argv)
            self.paths.append(path)
            self.spawned.append(protocol)
            return transport

        supervisor = Supervisor(
            self.reactor,
            [("tcp:8080:interface=127.0.0.1", _Endpoint())],
            ["--port", "tcp:8080:interface=127.0.0.1", "--workers", "2"],
            2,
            Notifier(None),
            {},
            self.out.append,
            GroupSecrets(Secret(b"sk-first"), registry(b"key-one")),
            self.report,
            spawn=spawn,
            error_output=self.out.append,
            relay=self.events.append if relay else None,
            cwd="/where/it/was/started",
        )
        supervisor.privilegedStartService()
        supervisor.startService()

    def test_workers_log_as_records(self) -> None:
        """
        Relaying, each worker's twistd logs through the relay observer;
        otherwise as twistd would.
        """
        self.start(relay=True)
        for argv in self.argvs:
            self.assertEqual(argv[argv.index("oaiproxy") - 1], "--logger=oaiproxy.observe.relay.observer")
        self.argvs.clear()
        self.start(relay=False)
        self.assertFalse([a for argv in self.argvs for a in argv if a.startswith("--logger")])

    def test_workers_start_where_the_supervisor_did(self) -> None:
        """
        Workers start in the directory the supervisor was started in (where
        it resolved the configuration's relative paths), not the --rundir
        twistd moved it to.
        """
        self.start(relay=False)
        self.assertEqual(self.paths, ["/where/it/was/started"] * 2)

    def test_cut_off_record_dropped(self) -> None:
        """
        A record a dying worker left half written is not written raw where
        the access entries go: one warning says it was dropped.
        """
        self.start(relay=True)
        worker = self.spawned[0]
        worker.outReceived(record("a long line {n}", n=1)[:30])
        worker.processEnded(None)
        self.assertEqual(self.out, [])
        self.assertEqual(
            [formatEvent(e) for e in self.events], ["worker 0: an unreadable log record (30 bytes) dropped"]
        )

    def test_plain_output_logged(self) -> None:
        """
        A plain line on a relaying worker's standard output (twistd prints
        a usage error there, before logging begins) is logged, where a
        daemon's own standard output would lose it, and is the reason given
        if the worker then fails.
        """
        self.start(relay=True)
        self.spawned[0].outReceived(b"twistd oaiproxy: error: bad option\n")
        self.assertEqual([formatEvent(e) for e in self.events], ["worker 0: twistd oaiproxy: error: bad option"])
        self.assertEqual(self.out, [])
        self.assertEqual(self.spawned[0].last_error, "twistd oaiproxy: error: bad option")

    def test_failure_before_ready_told_on_the_terminal(self) -> None:
        """
        A worker that fails before it listens stops the group with status
        1 through the startup report: its reason reaches the standard error
        the daemon was started from (a daemonised group's terminal) and the
        log.
        """
        self.start(relay=True)
        self.reactor.running = True
        worker = self.spawned[1]
        worker.errReceived(b"Traceback...\ntwistd oaiproxy: error: the upstreams file given does not exist\n")
        worker.processEnded(None)
        with capturedLogs() as logged:
            self.reactor.advance(0)
        line = (
            "twistd oaiproxy: error: worker 1 failed before it was ready, stopping: "
            "the upstreams file given does not exist"
        )
        self.assertEqual(os.read(self.terminal, 4096).decode(), line + "\n")
        self.assertEqual([formatEvent(e) for e in logged if e["log_level"] == LogLevel.critical], [line])
        self.assertFalse(self.reactor.running)

    def test_records_published_other_lines_passed_on(self) -> None:
        """
        A record, even split across reads, reaches the supervisor's log as
        the worker's event (same text, namespace, level, time); a line that
        is not one (a JSON access entry) goes on to standard output; what
        the worker writes to standard error is logged as an error naming
        the worker; a record saying the worker listens makes it ready.
        """
        self.start(relay=True)
        worker = self.spawned[1]
        line = record("oaiproxy listening on {base}", base="http://127.0.0.1:8080")
        worker.outReceived(line[:20])
        self.assertEqual(self.events, [])
        worker.outReceived(line[20:] + b'{"request_id":"req_1","status":200}\n')
        worker.errReceived(b"Fatal Python error: Aborted\n")
        [listening, error] = self.events
        self.assertEqual(formatEvent(listening), "oaiproxy listening on http://127.0.0.1:8080")
        self.assertEqual(
            (listening["log_namespace"], listening["log_level"], listening["oaiproxy_worker"]),
            ("oaiproxy.example", LogLevel.info, 1),
        )
        self.assertIsInstance(listening["log_time"], float)
        self.assertTrue(worker.ready)
        self.assertEqual(self.out, [b'{"request_id":"req_1","status":200}\n'])
        self.assertEqual(formatEvent(error), "worker 1: Fatal Python error: Aborted")
        self.assertEqual(error["log_level"], LogLevel.error)


class GroupMetricsTests(SynchronousTestCase):
    """
    The supervisor's part in the group's one /metrics: the directory every
    worker writes to, the metrics port handed over like the API's, a dead
    worker's gauges dropped, the directory gone once the group stopped.
    """

    def test_directory_and_metrics_port_for_every_worker(self) -> None:
        reactor = MemoryReactorClock()
        spawned: list[tuple[Any, dict[str, str], list[str], dict[int, Any]]] = []

        def spawn(
            protocol: Any, executable: str, argv: list[str], env: Any, childFDs: Any, path: Any = None
        ) -> _Transport:
            transport = _Transport()
            transport.pid = 4000 + len(spawned)  # type: ignore[assignment]
            protocol.makeConnection(transport)
            spawned.append((protocol, env, argv, childFDs))
            return transport

        directory = GroupDirectory({"RUNTIME_DIRECTORY": temp_dir(self)})
        supervisor = Supervisor(
            reactor,
            [("tcp:8080:interface=127.0.0.1", _Endpoint())],
            ["--port", "tcp:8080:interface=127.0.0.1", "--workers", "2", "--metrics-port", "tcp:9108"],
            2,
            Notifier(None),
            {MULTIPROC_ENV: "/somewhere/else"},
            lambda data: None,
            GroupSecrets(Secret(b"sk-first"), registry(b"key-one")),
            StartupReport(reactor),
            spawn=spawn,
            metrics_listener=("tcp:9108", _Endpoint()),
            metrics_dir=directory,
        )
        supervisor.privilegedStartService()
        supervisor.startService()
        path = directory.path
        assert path is not None
        self.assertEqual({env[MULTIPROC_ENV] for _, env, _, _ in spawned}, {path})
        for _, _, argv, fds in spawned:
            self.assertEqual(argv[argv.index("--worker-metrics-listener") + 1], "4:INET")
            self.assertEqual(argv[argv.index("--metrics-port") + 1], "tcp:9108")
            self.assertEqual(sorted(fds), [0, 1, 2, 3, 4])

        # Worker 0 dies: its live gauges go before its successor starts,
        # its counters stay.
        for name in ("counter_4000.db", "gauge_livesum_4000.db", "gauge_livesum_4001.db"):
            with open(os.path.join(path, name), "w"):
                pass
        worker = spawned[0][0]
        worker.ready = True
        worker.processEnded(None)
        self.assertEqual(sorted(os.listdir(path)), ["counter_4000.db", "gauge_livesum_4001.db"])
        reactor.advance(5)
        self.assertEqual(spawned[2][1][MULTIPROC_ENV], path)

        stopped = supervisor.stopService()
        self.assertTrue(os.path.isdir(path), "removed while workers still drain")
        for protocol, _, _, _ in spawned[1:]:
            protocol.processEnded(None)
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(path))
