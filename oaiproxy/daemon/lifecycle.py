# -*- test-case-name: tests.test_lifecycle -*-
"""
The daemon's life under a service manager: readiness, reload and drain.

 - L{ReadinessService} tells systemd C{READY=1} once every listener is bound
   (the configuration was loaded before any service started).
 - L{ReloadService} re-reads the secrets on SIGHUP, bracketed by
   C{RELOADING=1} / C{READY=1}; a failed reload keeps what was in use.
 - L{DrainService} turns SIGTERM into a graceful drain: the listeners stop
   (they are stopped by their own services at the same moment), requests
   already running may finish for up to the drain timeout, and new requests
   on connections that are still open get a 503 and C{Connection: close}.
   Whatever is still running at the deadline is cut off.

L{Lifecycle} (in L{oaiproxy.drain}, below every layer that reads it) is the
state they share with the site and the routes: whether the proxy is
draining, and which requests are in flight.

Startup has its own contract: a listener that cannot be bound, or may not
be served, ends the process with status 1 and one line saying why, on the
standard error the operator started it from (L{StartupReport},
L{ListenerService}), with or without C{--nodaemon}.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.daemon.sdnotify import Notifier
from oaiproxy.drain import Drainable, Lifecycle

__all__ = [
    "Lifecycle",
    "DrainService",
    "ReadinessService",
    "ReloadService",
    "Drainable",
    "StartupError",
    "freeze_startup_heap",
    "StartupReport",
    "ListenerService",
    "bind_now",
    "exit_after_shutdown",
]

log = Logger()


class DrainService(Service):
    """
    On stop, drain instead of dropping requests.

    @param timeout: the longest a stop may wait for requests in flight.
    """

    def __init__(self, lifecycle: Lifecycle, clock: IReactorTime, timeout: float, notifier: Notifier) -> None:
        self._lifecycle = lifecycle
        self._clock = clock
        self._timeout = timeout
        self._notifier = notifier

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        count = self._lifecycle.in_flight
        self._notifier.stopping(f"draining {count} request(s), at most {self._timeout:g}s")
        log.info(
            "draining: no new connections; {count} request(s) in flight may finish within {timeout:g}s",
            count=count,
            timeout=self._timeout,
        )
        d = self._lifecycle.drain(self._clock, self._timeout)

        def drained(_: None) -> None:
            log.info("drained; shutting down")

        return d.addCallback(drained)


class ReadinessService(Service):
    """
    Say C{READY=1} once every listener is bound and the reactor runs.

    Bound is not enough: twistd starts the services before the reactor
    installs its signal handlers, so a SIGTERM sent as soon as systemd
    (or a script watching C{NOTIFY_SOCKET}) hears READY would meet the
    default action and kill the process without its drain.  Waiting for
    C{callWhenRunning} puts READY after the handlers.

    @param listening: one Deferred per listener, fired once it is bound.
    @param status: the human-readable C{STATUS=} line.
    @param when_running: C{reactor.callWhenRunning}.
    """

    def __init__(
        self,
        notifier: Notifier,
        listening: Sequence["Deferred[Any]"],
        status: Callable[[], str],
        when_running: Callable[[Callable[[], None]], object],
    ) -> None:
        self._notifier = notifier
        self._listening = list(listening)
        self._status = status
        self._when_running = when_running

    def startService(self) -> None:
        super().startService()

        def ready() -> None:
            self._notifier.ready(self._status())

        # A listener that fails to bind stops startup before this matters.
        gatherResults(self._listening).addCallback(lambda _: self._when_running(ready))


def freeze_startup_heap() -> None:
    """
    Once startup is over, collect its garbage and move every object left
    (the modules, the configuration, the resource tree: some 100,000)
    out of the cyclic garbage collector's sight (C{gc.freeze}).

    Why: a full collection walks every tracked object, and the requests'
    own objects (Deferreds, closures, records) trigger one every few
    thousand requests; with the startup heap in it, each took 10 to 20 ms,
    some 30 to 70 µs a request spread over the requests (measured with
    the in-memory harness, CPython 3.11).  Frozen objects are still freed
    when their last reference goes, as every object is; only a cycle among
    them (an old configuration a reload replaced, say) is never collected.
    """
    gc.collect()
    gc.freeze()


class ReloadService(Service):
    """
    Reload on SIGHUP.

    @param reload: re-reads the configuration; returns whether it took
        effect.  It must leave the old configuration in place when not.
    @param call_from_signal: how to get from the signal handler back into
        the reactor (C{reactor.callFromThread}, which is signal-safe).
    @param install: C{signal.signal}, injected for tests.
    """

    def __init__(
        self,
        reload: Callable[[], bool],
        notifier: Notifier,
        status: Callable[[], str],
        call_from_signal: Callable[..., Any],
        install: Callable[[int, Any], Any] = signal.signal,
    ) -> None:
        self._reload = reload
        self._notifier = notifier
        self._status = status
        self._call_from_signal = call_from_signal
        self._install = install
        self._previous: Optional[Any] = None

    def startService(self) -> None:
        super().startService()
        self._previous = self._install(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        # Not the default action (which is to die): a SIGHUP from logrotate
        # or an operator during the drain must not drop the streams still
        # finishing.
        self._install(signal.SIGHUP, self._ignore)
        self._previous = None

    def _ignore(self, signum: int, frame: object) -> None:
        pass

    def _on_signal(self, signum: int, frame: object) -> None:
        self._call_from_signal(self.reload)

    def reload(self) -> bool:
        self._notifier.reloading()
        log.info("reloading credentials (SIGHUP)")
        try:
            ok = self._reload()
        finally:
            self._notifier.ready(self._status())
        return ok


class StartupError(SystemExit, Exception):
    """
    Startup cannot go on; L{StartupReport.fail} has already said why.

    Both kinds on purpose.  Once twistd has daemonized, it tells the parent
    waiting on the terminal how startup went only when startup raises an
    C{Exception} (C{UnixApplicationRunner.postApplication}); a bare
    C{SystemExit} left that parent waiting forever.  As a C{SystemExit}
    whose code is 1 it ends a C{--nodaemon} process with status 1 and no
    traceback.  Its text is what twistd's parent prints after "An error has
    occurred:", cut to 100 bytes, after the full reason.

    @ivar reason: the full line, as written to standard error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("oaiproxy did not start; the reason is above, and in the log")
        self.code = 1
        self.reason = reason


def exit_after_shutdown(reactor: Any, status: int) -> None:
    """
    Stop the reactor, and exit with C{status} once it has stopped: twistd
    exits 0 after any clean stop, which would tell systemd all went well.
    """

    def leave() -> None:
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if getattr(reactor, "running", False):
        reactor.stop()


#: How every startup failure's one line begins.
ERROR_PREFIX = "twistd oaiproxy: error: "


class StartupReport:
    """
    Where a startup failure is told: the standard error the daemon was
    started with.

    twistd points standard error at C{/dev/null} when it daemonizes, before
    the listeners bind, and under C{--nodaemon} it turns C{sys.stderr} into
    log lines on standard output.  So this keeps a duplicate of descriptor
    2, taken while the plugin builds its service (before daemonizing), and
    writes the reason there, once, as one line; when the process has
    daemonized since (descriptor 2 is no longer that file), the reason also
    goes to the log, which is then the only record.  L{done} closes the
    duplicate once every listener is bound, so a daemon does not keep the
    terminal open.

    @param reactor: to tell whether startup is still synchronous.
    @param fd: the descriptor to keep (2; a pipe in tests).
    """

    def __init__(self, reactor: Any, fd: int = 2) -> None:
        self._reactor = reactor
        self._watched = fd
        try:
            self._fd: Optional[int] = os.dup(fd)
        except OSError:
            self._fd = None

    def _moved(self) -> bool:
        if self._fd is None:
            return True
        try:
            now, then = os.fstat(self._watched), os.fstat(self._fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)

    def fail(self, reason: str) -> None:
        """
        Report C{reason} and end startup.  While twistd is still starting
        (the reactor is not running yet) this raises L{StartupError}, which
        twistd turns into exit status 1; later (an endpoint that bound
        asynchronously) it stops the reactor and exits 1.
        """
        line = ERROR_PREFIX + reason
        running = bool(getattr(self._reactor, "running", False))
        if self._moved() or running:
            log.critical("{line}", line=line)
        if self._fd is not None:
            try:
                os.write(self._fd, (line + "\n").encode("utf-8", "replace"))
            except OSError:
                pass
        self.done()
        if not running:
            raise StartupError(line)
        exit_after_shutdown(self._reactor, 1)

    def done(self) -> None:
        """
        Startup is over: let go of the original standard error.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def bind_failure(description: str, failure: Failure) -> str:
    """
    One line for a listener that could not be bound, with what to do.
    """
    if failure.check(CannotListenError):
        error = failure.value.socketError
        code = getattr(error, "errno", None)
        reason = f"cannot listen on {description}: {error}"
        if code == errno.EADDRINUSE:
            return f"{reason}; another process holds it: choose another port with --port (or PORT)"
        if code == errno.EACCES:
            return f"{reason}; ports below 1024 need privileges: choose a port above 1024 with --port (or PORT)"
        return f"{reason}; choose another endpoint with --port (or PORT)"
    return f"cannot listen on {description}: {failure.getErrorMessage()}"


def _listen(
    endpoint: IStreamServerEndpoint,
    factory: Any,
    description: str,
    report: StartupReport,
    bound: Callable[[IListeningPort], None],
) -> "Deferred[IListeningPort]":
    """
    Listen, run C{bound} on the port before anything is accepted, and turn
    any failure into L{StartupReport.fail}.
    """

    def check(port: IListeningPort) -> IListeningPort:
        try:
            bound(port)
        except StartupError:
            # Refused: nothing may be accepted on it, however long the
            # process takes to go.
            port.stopListening()
            raise
        return port

    def refused(failure: Failure) -> None:
        if failure.check(StartupError):
            return failure  # type: ignore[return-value]
        if failure.check(CancelledError):
            return None  # stopped before it bound
        report.fail(bind_failure(description, failure))
        return None

    d: Deferred[IListeningPort] = endpoint.listen(factory)
    d.addCallback(check).addErrback(refused)
    return d


def bind_now(
    endpoint: IStreamServerEndpoint,
    factory: Any,
    description: str,
    report: StartupReport,
    bound: Callable[[IListeningPort], None],
) -> IListeningPort:
    """
    Bind synchronously (during C{privilegedStartService}), or end startup
    with the reason (L{StartupError}).  For a listener whose socket must
    exist before anything else starts: the supervisor's, handed to workers.
    """
    outcome: list[Any] = []
    _listen(endpoint, factory, description, report, bound).addBoth(outcome.append)
    if not outcome:
        report.fail(f"cannot hand {description} to workers: its endpoint does not bind at once")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    port: IListeningPort = outcome[0]
    return port


class ListenerService(Service):
    """
    Serve C{factory} on one endpoint.

    What C{strports.service} does, since twistd relies on it: bind in
    C{privilegedStartService} (so a port below 1024 binds before twistd
    drops privileges), and let a failure stop twistd with status 1.  And
    what the daemon needs besides, for every listener alike (C{--port},
    C{systemd:} sockets, a worker's inherited sockets):

     - the reason goes through L{StartupReport}: on the terminal that
       started a daemon, on standard error under C{--nodaemon}, with what
       to do about it;
     - C{bound(port)} runs on the bound port before anything is accepted
       (the exposure check, then the startup report); it refuses the port
       by raising L{StartupError};
     - an endpoint that binds later and fails ends the process too, where
       a bare C{StreamServerEndpointService} only logs it and serves on
       without the listener.

    @param bound: called with the port once bound.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: Any,
        description: str,
        report: StartupReport,
        bound: Callable[[IListeningPort], None],
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self._report = report
        self._bound = bound
        self._waiting: Optional[Deferred[IListeningPort]] = None
        self._port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed: list[Failure] = []

        def settled(result: Any) -> None:
            if isinstance(result, Failure):
                failed.append(result)
            elif result is not None:
                self._port = result

        self._waiting = _listen(self.endpoint, self.factory, self.description, self._report, self._bound)
        self._waiting.addBoth(settled)
        if failed:
            failed[0].raiseException()

    def startService(self) -> None:
        if self._waiting is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> "Optional[Deferred[None]]":
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            stopped: Optional[Deferred[None]] = port.stopListening()
            return stopped
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        return None
