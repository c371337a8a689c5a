# -*- test-case-name: tests.daemon.test_workers,tests.e2e.test_workers -*-
"""
Several processes serving the same listening sockets (C{--workers N}).

CPython runs one thread of Python at a time, so one proxy process uses one
core.  With C{--workers N} the process started by twistd (by systemd) becomes
a supervisor: it opens the listeners exactly as a single process would (any
endpoint, C{systemd:} socket activation included), never accepts on them,
and starts N worker processes that inherit the listening sockets and accept
from them; the kernel spreads connections among them.

The supervisor keeps the systemd contract for the group: C{READY=1} once
every worker listens, a reload on SIGHUP, and on SIGTERM C{STOPPING=1},
then SIGTERM to every worker, each of which drains, and the supervisor
exits when the last one has.  A worker that dies unexpectedly is started
again.  Workers' standard output (their logs, and JSON access lines) and
standard error pass through the supervisor's own, unchanged, where the
supervisor logs to its standard output; where it logs anywhere else
(daemonised, C{--logfile}, C{--syslog}) their log events are relayed into
its log instead (L{oaiproxy.observe.relay}).

The configuration is the supervisor's: it reads and checks the secrets
(the upstream key, the clients, the metrics key) before binding, and hands
them to each worker on the worker's standard input (L{GroupSecrets}); a
worker never reads the key files itself.  On SIGHUP the supervisor reads
them again and, only if the result passes the same checks, hands it to
every worker.  So every worker serves the configuration the group runs
with, a restarted one included, whatever the files say meanwhile: a keys
file emptied since cannot turn a restarted worker into an open relay.

Per-client limits are split: each worker enforces 1/N of each limit
(rounded down, at least 1), which keeps the group within the limit without
a shared store.

Metrics are the group's: the supervisor makes a private directory
(L{oaiproxy.observe.metrics.GroupDirectory}) before the first worker
starts, names it in every worker's environment, so that each writes its
samples there and any of them answers a scrape with the group's totals,
marks each worker that exits as dead there (its gauges go, its counters
stay in the totals), and removes it when the group has stopped.  A
C{--metrics-port} listener is opened here and handed to the workers like
the others.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import fdesc
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IFileDescriptor, IListeningPort, IReadDescriptor, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from oaiproxy.access.clients import ClientRegistry
from oaiproxy.config import ConfigError, Secret
from oaiproxy.daemon.lifecycle import ERROR_PREFIX, StartupReport, bind_now
from oaiproxy.daemon.sdnotify import Notifier
from oaiproxy.observe.metrics import GroupDirectory
from oaiproxy.observe.relay import OBSERVER_NAME as RELAY_OBSERVER
from oaiproxy.observe.relay import RECORD_SEPARATOR, relayed_event

__all__ = [
    "Supervisor",
    "worker_argv",
    "family_name",
    "FAMILIES",
    "die_with_parent",
    "GroupSecrets",
    "encode_secrets",
    "read_secrets",
    "SecretsReader",
]

log = Logger()

#: The marker a worker prints once it listens (its startup report).
READY_MARKER = b"oaiproxy listening on "
#: Child descriptor numbers start after stdin, stdout and stderr.
FIRST_FD = 3
FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
#: The environment variable that tells a worker its index.
WORKER_INDEX = "OAIPROXY_WORKER_INDEX"
#: Seconds before a worker that died is started again.
RESPAWN_DELAY = 1.0
#: Seconds a starting worker waits for its configuration on standard input.
HANDOVER_SECONDS = 30.0
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class GroupSecrets:
    """
    What a worker must not read for itself: the secrets as the supervisor
    read and checked them.

    @ivar api_key: the upstream key (C{None} with C{--mock-upstream}).
    @ivar clients: the clients; empty only where that passed the
        open-relay check.
    @ivar metrics_key: the key that may read C{/metrics}, if any.
    @ivar shared_state_password: the Redis password of C{--shared-state},
        if any: the file may have changed since the group started.
    @ivar admin_key: the admin key, if any (read again on each reload).
    """

    api_key: Optional[Secret]
    clients: ClientRegistry
    metrics_key: Optional[Secret] = None
    shared_state_password: Optional[Secret] = None
    admin_key: Optional[Secret] = None


def encode_secrets(secrets: GroupSecrets) -> bytes:
    """
    One frame on a worker's standard input: a length, then the pickle.

    Pickle, as multiprocessing does between a parent and its child: the
    pipe has no name and only the supervisor holds its other end, and it
    carries whatever a client entry holds without a second schema here.
    """
    data = pickle.dumps(secrets, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _frames(buffer: bytearray) -> Iterator[GroupSecrets]:
    """
    Take every complete frame off the front of C{buffer}.
    """
    while len(buffer) >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buffer)
        if len(buffer) < _LENGTH.size + length:
            return
        data = bytes(buffer[_LENGTH.size : _LENGTH.size + length])
        del buffer[: _LENGTH.size + length]
        secrets = pickle.loads(data)
        if not isinstance(secrets, GroupSecrets):
            raise ConfigError("the supervisor sent something other than a configuration")
        yield secrets


def read_secrets(fd: int, timeout: float = HANDOVER_SECONDS) -> tuple[GroupSecrets, bytes]:
    """
    In a starting worker: wait for the supervisor's first frame on C{fd}.
    Returns it, and whatever was read past it (the start of a reload that
    followed at once), for L{SecretsReader}.

    @raise ConfigError: if none comes in C{timeout} seconds, or the pipe
        closes first: a worker serves only with its supervisor's secrets.
    """
    buffer = bytearray()
    while True:
        for secrets in _frames(buffer):
            return secrets, bytes(buffer)
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            raise ConfigError(f"no configuration from the supervisor within {timeout:g}s (a worker's stdin)")
        data = os.read(fd, 65536)
        if not data:
            raise ConfigError("the supervisor closed a worker's stdin before sending the configuration")
        buffer += data


@implementer(IReadDescriptor)
class SecretsReader:
    """
    In a running worker: the frames that follow the first (each reload the
    supervisor accepted), handed to C{receive} as they arrive.

    @param pending: bytes already read past the first frame.
    """

    def __init__(self, fd: int, receive: Callable[[GroupSecrets], None], pending: bytes = b"") -> None:
        self._fd = fd
        self._receive = receive
        self._buffer = bytearray(pending)
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, self.dataReceived)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        try:
            for secrets in _frames(self._buffer):
                self._receive(secrets)
        except Exception:
            log.failure("unreadable configuration from the supervisor; keeping the one in use")
            self._buffer.clear()

    def connectionLost(self, reason: Failure) -> None:
        # The supervisor is gone: die_with_parent's SIGTERM drains us.
        pass


def family_name(address: Any) -> str:
    if isinstance(address, IPv6Address):
        return "INET6"
    if isinstance(address, UNIXAddress):
        return "UNIX"
    if isinstance(address, IPv4Address):
        return "INET"
    raise ValueError(f"cannot hand a {type(address).__name__} listener to workers")


def worker_argv(
    argv: Sequence[str], listeners: Sequence[str], workers: int, metrics_listener: Optional[str] = None
) -> list[str]:
    """
    The plugin arguments for a worker: the supervisor's own, without the
    options that only the supervisor acts on (C{--workers}, C{--port}),
    plus the inherited listeners (C{fd:family}), the C{--metrics-port}
    one if any (C{--metrics-port} itself stays: it moves /metrics off the
    API port), and the share of limits.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=")):
            continue
        out.append(arg)
    for listener in listeners:
        out += ["--worker-listener", listener]
    if metrics_listener is not None:
        out += ["--worker-metrics-listener", metrics_listener]
    return out + ["--worker-share", str(workers)]


def die_with_parent() -> None:
    """
    In a worker: ask the kernel to send SIGTERM (a graceful drain) when the
    supervisor dies, however it dies, so no worker outlives it holding the
    port.  Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        # The supervisor died before the request took effect.
        os.kill(os.getpid(), signal.SIGTERM)


class _Refuse(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _Lines:
    """
    Whole lines only, so that the lines of two workers (JSON log and access
    entries above all) never interleave mid-line.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        lines, newline, self._partial = (self._partial + data).rpartition(b"\n")
        if not newline:
            return b""
        self._write(lines + b"\n")
        return lines

    def close(self) -> None:
        if self._partial:
            self._write(self._partial + b"\n")
            self._partial = b""


class _WorkerProcess(ProcessProtocol):
    """
    One worker: relays its output, spots its readiness, reports its end.
    """

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.pid: Optional[int] = None
        self.ready = False
        self.last_error = ""
        self.ended: Deferred[None] = Deferred()
        if supervisor.relay is None:
            self._out = _Lines(supervisor.output)
            self._err = _Lines(supervisor.error_output)
        else:
            self._out = _Lines(self._relay_output)
            self._err = _Lines(self._relay_errors)

    def connectionMade(self) -> None:
        # Kept for after its end, when the transport no longer has it.
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        lines = self._out.feed(data)
        if not self.ready and READY_MARKER in lines:
            self.ready = True
            self._supervisor.worker_ready(self)

    def errReceived(self, data: bytes) -> None:
        lines = self._err.feed(data)
        if lines and not self.ready:
            # The reason a worker gives for failing to start is its last
            # line on standard error.
            self.last_error = lines.rsplit(b"\n", 1)[-1].decode("utf-8", "replace").strip()

    def _relay_output(self, lines: bytes) -> None:
        """
        Publish each log record of the worker's to the supervisor's log,
        pass its JSON access entries on to standard output, and log any
        other line.
        """
        relay = self._supervisor.relay
        assert relay is not None
        others = []
        for line in lines.split(b"\n")[:-1]:
            event = relayed_event(line, self.index)
            if event is not None:
                relay(event)
            elif line.startswith(RECORD_SEPARATOR):
                # Cut off (the worker died mid-write) or not readable: said
                # once, not written raw where the JSON access entries go.
                self._supervisor.relay_log.warn(
                    "worker {worker}: an unreadable log record ({size} bytes) dropped",
                    worker=self.index,
                    size=len(line),
                )
            elif line.startswith(b"{"):
                # A JSON access entry (--log-format json under -n).
                others.append(line + b"\n")
            else:
                # Written before the worker's log began (twistd prints a
                # usage error to standard output): daemonised, the
                # supervisor's own standard output is /dev/null.
                text = line.decode("utf-8", "replace")
                self._supervisor.relay_log.warn("worker {worker}: {text}", worker=self.index, text=text)
                if not self.ready and text.strip():
                    self.last_error = text.strip()
        if others:
            self._supervisor.output(b"".join(others))

    def _relay_errors(self, lines: bytes) -> None:
        """
        What a worker writes to standard error before its log begins (a
        startup failure, a fatal error) goes into the supervisor's log.
        """
        for line in lines.split(b"\n")[:-1]:
            self._supervisor.relay_log.error(
                "worker {worker}: {text}", worker=self.index, text=line.decode("utf-8", "replace")
            )

    def hand_over(self, secrets: GroupSecrets) -> None:
        transport = self.transport
        if transport is not None and not self.ended.called:
            transport.writeToChild(0, encode_secrets(secrets))

    def processEnded(self, reason: Failure) -> None:
        self._out.close()
        self._err.close()
        self.ended.callback(None)
        self._supervisor.worker_ended(self, reason)


class Supervisor(Service):
    """
    Opens the listeners, runs N workers on them, and speaks for the group.

    @param listeners: the C{--port} descriptions and their endpoints.
    @param plugin_argv: the plugin arguments the supervisor was given.
    @param secrets: the checked configuration every worker gets.
    @param report: where a startup failure goes.
    @param bound: called with each listener's description and port once
        bound, before any worker starts: the exposure check, which refuses
        by raising L{oaiproxy.daemon.lifecycle.StartupError}.
    @param spawn: C{reactor.spawnProcess}, injected for tests.
    @param metrics_listener: the C{--metrics-port} description and
        endpoint, opened here and handed to the workers like the others.
    @param metrics_dir: the group's metrics directory, made before the
        first worker starts and removed once the last has stopped;
        C{None} leaves each worker's metrics its own.
    @param relay: where the workers' log events go when the supervisor's
        log is not its standard output (L{oaiproxy.observe.relay}): the
        workers then log as JSON records, decoded here.  C{None} passes
        their output through unchanged.
    @param cwd: the directory the workers start in: the one the supervisor
        was started in, where it read the configuration's relative paths,
        not the C{--rundir} twistd moved it to since.
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[tuple[str, IStreamServerEndpoint]],
        plugin_argv: Sequence[str],
        workers: int,
        notifier: Notifier,
        environ: dict[str, str],
        output: Callable[[bytes], None],
        secrets: GroupSecrets,
        report: StartupReport,
        bound: Callable[[str, IListeningPort], None] = lambda description, port: None,
        spawn: Optional[Callable[..., Any]] = None,
        error_output: Optional[Callable[[bytes], None]] = None,
        metrics_listener: Optional[tuple[str, IStreamServerEndpoint]] = None,
        metrics_dir: Optional[GroupDirectory] = None,
        relay: Optional[ILogObserver] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self._reactor = reactor
        self._cwd = cwd
        self.relay = relay
        self.relay_log = Logger(namespace=__name__, observer=relay)
        self._metrics_listener = metrics_listener
        self._metrics_inherited: Optional[str] = None
        self.metrics_dir = metrics_dir
        self._listeners = list(listeners)
        self._plugin_argv = list(plugin_argv)
        self._count = workers
        self._notifier = notifier
        self._environ = {
            k: v for k, v in environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        }
        self.output = output
        self.error_output = error_output if error_output is not None else output
        self.secrets = secrets
        self._report = report
        self._bound = bound
        self._spawn = spawn or reactor.spawnProcess
        self._ports: list[IListeningPort] = []
        self._inherited: list[str] = []
        self._fds: dict[int, int] = {}
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._respawns: dict[int, Any] = {}
        self.all_ready: Deferred[None] = Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for description, endpoint in self._listeners:

            def bound(port: IListeningPort, description: str = description) -> None:
                self._bound(description, port)

            self._inherited.append(self._hold(description, endpoint, bound))
        if self._metrics_listener is not None:
            self._metrics_inherited = self._hold(*self._metrics_listener, lambda port: None)

    def _hold(self, description: str, endpoint: IStreamServerEndpoint, bound: Callable[[IListeningPort], None]) -> str:
        """
        Bind a listener that only the workers accept on, to be a worker's
        next descriptor; its C{fd:family}.
        """
        port = bind_now(endpoint, Factory.forProtocol(_Refuse), description, self._report, bound)
        # The workers accept; the supervisor only holds the socket open.
        port.stopReading()  # type: ignore[attr-defined]
        child_fd = FIRST_FD + len(self._fds)
        # A listening port is a file descriptor (IFileDescriptor), though
        # IListeningPort does not say so: adapting says it publicly.
        self._fds[child_fd] = IFileDescriptor(port).fileno()
        self._ports.append(port)
        log.info("supervisor holds {endpoint} for {count} workers", endpoint=description, count=self._count)
        return f"{child_fd}:{family_name(port.getHost())}"

    def startService(self) -> None:
        if not self._ports:
            self.privilegedStartService()
        super().startService()
        if self.metrics_dir is not None:
            self.metrics_dir.create()
        for index in range(self._count):
            self._start(index)

    def _start(self, index: int) -> None:
        self._respawns.pop(index, None)
        if self._stopping:
            return
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            *([f"--logger={RELAY_OBSERVER}"] if self.relay is not None else []),
            "oaiproxy",
            *worker_argv(self._plugin_argv, self._inherited, self._count, self._metrics_inherited),
        ]
        worker = _WorkerProcess(self, index)
        self.workers[index] = worker
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", **self._fds}
        env = {**self._environ, WORKER_INDEX: str(index)}
        if self.metrics_dir is not None:
            env.update(self.metrics_dir.environ())
        self._spawn(worker, sys.executable, argv, env=env, childFDs=child_fds, path=self._cwd)
        # Its first read: the configuration the group runs with now, not
        # what the files say.
        worker.hand_over(self.secrets)

    def hand_over(self, secrets: GroupSecrets) -> int:
        """
        A reload the supervisor has checked: every worker serves it from
        now on, and so does every worker started later.  Returns how many
        workers it went to.
        """
        self.secrets = secrets
        running = [w for w in self.workers.values() if not w.ended.called]
        for worker in running:
            worker.hand_over(secrets)
        return len(running)

    def worker_ready(self, worker: _WorkerProcess) -> None:
        if all(w.ready for w in self.workers.values()) and len(self.workers) == self._count:
            if not self.all_ready.called:
                self.all_ready.callback(None)

    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if self.metrics_dir is not None and worker.pid is not None:
            # Before any replacement starts: its requests are not in flight.
            self.metrics_dir.process_dead(worker.pid)
        if self._stopping:
            return
        if not worker.ready:
            # It never got as far as listening: a configuration or startup
            # problem that starting it again will not fix.  Stop the group
            # with a failure status, which systemd reports.
            # Told through the startup report: daemonised, twistd's parent
            # has returned by now, and the terminal it kept open is the
            # only place the operator who started it still looks.
            self.failed = True
            told = worker.last_error.removeprefix(ERROR_PREFIX) or "see its output above"
            self._reactor.callLater(
                0, self._report.fail, f"worker {worker.index} failed before it was ready, stopping: {told}"
            )
            return
        log.warn("worker {index} exited unexpectedly; starting it again", index=worker.index)
        self._respawns[worker.index] = self._reactor.callLater(RESPAWN_DELAY, self._start, worker.index)

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            transport = worker.transport
            if transport is not None and getattr(transport, "pid", None):
                try:
                    os.kill(transport.pid, signum)
                except ProcessLookupError:
                    pass

    failed = False

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        self._stopping = True
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        self._notifier.stopping(f"draining {len(self.workers)} worker(s)")
        self.signal_workers(signal.SIGTERM)
        waiting = [w.ended for w in self.workers.values() if not w.ended.called]

        def close(_: object) -> "Deferred[Any]":
            if self.metrics_dir is not None:
                self.metrics_dir.remove()
            return DeferredList([succeed(p.stopListening()) for p in self._ports])

        return DeferredList(waiting).addCallback(close)
