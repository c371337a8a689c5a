# -*- test-case-name: tests.test_workers -*-
"""
Several processes serving the same listening sockets (C{--workers N}).

CPython runs one thread of Python at a time, so one proxy process uses one
core.  With C{--workers N} the process started by twistd (by systemd) becomes
a supervisor: it opens the listeners exactly as a single process would (any
endpoint, C{systemd:} socket activation included), never accepts on them,
and starts N worker processes that inherit the listening sockets and accept
from them; the kernel spreads connections among them.

The supervisor keeps the systemd contract for the group: C{READY=1} once
every worker listens, SIGHUP forwarded to every worker (each reloads), and
on SIGTERM C{STOPPING=1}, then SIGTERM to every worker, each of which
drains, and the supervisor exits when the last one has.  A worker that dies
unexpectedly is started again.  Workers' output (their logs, and JSON access
lines) passes through the supervisor's standard output unchanged.

Per-client limits are split: each worker enforces 1/N of each limit
(rounded down, at least 1), which keeps the group within the limit without
a shared store.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.config import unix_listener
from oaiproxy.sdnotify import Notifier

__all__ = ["Supervisor", "worker_argv", "family_name", "FAMILIES", "die_with_parent"]

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


def family_name(address: Any) -> str:
    if isinstance(address, IPv6Address):
        return "INET6"
    if isinstance(address, UNIXAddress):
        return "UNIX"
    if isinstance(address, IPv4Address):
        return "INET"
    raise ValueError(f"cannot hand a {type(address).__name__} listener to workers")


def worker_argv(argv: Sequence[str], listeners: Sequence[str], workers: int) -> list[str]:
    """
    The plugin arguments for a worker: the supervisor's own, without the
    options that only the supervisor acts on (C{--workers}, C{--port}),
    plus the inherited listeners (C{fd:family}) and the share of limits.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port", "--metrics-port"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=", "--metrics-port=")):
            continue
        out.append(arg)
    for listener in listeners:
        out += ["--worker-listener", listener]
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


class _WorkerProcess(ProcessProtocol):
    """
    One worker: relays its output, spots its readiness, reports its end.
    """

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.ready = False
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        # Whole lines only, so that the lines of two workers (JSON access
        # entries above all) never interleave mid-line.
        lines, _, self._partial = (self._partial + data).rpartition(b"\n")
        if not lines and not _:
            return
        lines += b"\n"
        self._supervisor.output(lines)
        if not self.ready and READY_MARKER in lines:
            self.ready = True
            self._supervisor.worker_ready(self)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._supervisor.output(self._partial + b"\n")
            self._partial = b""
        self.ended.callback(None)
        self._supervisor.worker_ended(self, reason)


class Supervisor(Service):
    """
    Opens the listeners, runs N workers on them, and speaks for the group.

    @param descriptions: the C{--port} endpoint descriptions.
    @param plugin_argv: the plugin arguments the supervisor was given.
    @param spawn: C{reactor.spawnProcess}, injected for tests.
    """

    def __init__(
        self,
        reactor: Any,
        descriptions: Sequence[str],
        plugin_argv: Sequence[str],
        workers: int,
        notifier: Notifier,
        environ: dict[str, str],
        output: Callable[[bytes], None],
        spawn: Optional[Callable[..., Any]] = None,
    ) -> None:
        self._reactor = reactor
        self._descriptions = list(descriptions)
        self._plugin_argv = list(plugin_argv)
        self._count = workers
        self._notifier = notifier
        self._environ = {
            k: v for k, v in environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        }
        self.output = output
        self._spawn = spawn or reactor.spawnProcess
        self._ports: list[IListeningPort] = []
        self._listeners: list[str] = []
        self._fds: dict[int, int] = {}
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._respawns: dict[int, Any] = {}
        self.all_ready: Deferred[None] = Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for number, description in enumerate(self._descriptions):
            endpoint = endpoints.serverFromString(self._reactor, unix_listener(description))
            failures: list[Failure] = []
            ports: list[IListeningPort] = []
            endpoint.listen(Factory.forProtocol(_Refuse)).addCallbacks(ports.append, failures.append)
            if failures:
                failures[0].trap(CannotListenError)
                raise SystemExit(
                    f"twistd oaiproxy: error: cannot listen on {description}: {failures[0].value.socketError}"
                )
            [port] = ports
            # The workers accept; the supervisor only holds the socket open.
            port.stopReading()  # type: ignore[attr-defined]
            child_fd = FIRST_FD + number
            self._fds[child_fd] = port.fileno()  # type: ignore[attr-defined]
            self._listeners.append(f"{child_fd}:{family_name(port.getHost())}")
            self._ports.append(port)
            log.info("supervisor holds {endpoint} for {count} workers", endpoint=description, count=self._count)

    def startService(self) -> None:
        if not self._ports:
            self.privilegedStartService()
        super().startService()
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
            "oaiproxy",
            *worker_argv(self._plugin_argv, self._listeners, self._count),
        ]
        worker = _WorkerProcess(self, index)
        self.workers[index] = worker
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", **self._fds}
        env = {**self._environ, WORKER_INDEX: str(index)}
        self._spawn(worker, sys.executable, argv, env=env, childFDs=child_fds)

    def worker_ready(self, worker: _WorkerProcess) -> None:
        if all(w.ready for w in self.workers.values()) and len(self.workers) == self._count:
            if not self.all_ready.called:
                self.all_ready.callback(None)

    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if self._stopping:
            return
        if not worker.ready:
            # It never got as far as listening: a configuration or startup
            # problem that starting it again will not fix.  Stop the group
            # with a failure status, which systemd reports.
            log.critical(
                "worker {index} failed before it was ready; stopping (see its output above)", index=worker.index
            )
            self.failed = True
            self._reactor.callLater(0, self._reactor.stop)
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

    def reload(self) -> bool:
        """
        SIGHUP: every worker reloads its own configuration.
        """
        self.signal_workers(signal.SIGHUP)
        return True

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
            return DeferredList([succeed(p.stopListening()) for p in self._ports])

        return DeferredList(waiting).addCallback(close)
