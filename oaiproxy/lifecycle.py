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

L{Lifecycle} is the state they share with the Resource tree: whether the
proxy is draining, and which requests are in flight.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from oaiproxy.sdnotify import Notifier

__all__ = ["Lifecycle", "DrainService", "ReadinessService", "ReloadService", "Drainable"]

log = Logger()


class Drainable(Protocol):
    """
    A request as the drain sees it.
    """

    def cut_off_for_shutdown(self) -> None:
        """
        End the response now, as clearly as its framing allows.
        """


class Closable(Protocol):
    """
    A client connection as the drain sees it.
    """

    def close_gracefully(self) -> None:
        """
        Close once everything written so far has been sent; calling it
        again does nothing more.
        """


#: After the last request (or the drain deadline), how long connections get
#: to send what is still buffered and close before shutdown drops them.
CLOSE_GRACE_SECONDS = 2.0


class Lifecycle:
    """
    Serving or draining; the requests in flight and the open connections.

    A drain ends in two steps.  First the requests in flight finish (or are
    cut off at the deadline).  Then every connection is closed gracefully
    and the drain waits for them to go: the end of a response may still sit
    in a send buffer, and reactor shutdown would drop it unsent.
    """

    def __init__(self) -> None:
        self.draining = False
        self._active: set[Drainable] = set()
        self._connections: set[Closable] = set()
        self._drained: Optional[Deferred[None]] = None
        self._closing = False
        self._timer: Optional[IDelayedCall] = None

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def started(self, request: Drainable) -> None:
        self._active.add(request)

    def ended(self, request: Drainable) -> None:
        self._active.discard(request)
        self._progress()

    def opened(self, connection: Closable) -> None:
        self._connections.add(connection)

    def closed(self, connection: Closable) -> None:
        self._connections.discard(connection)
        self._progress()

    def drain(self, clock: IReactorTime, timeout: float) -> "Deferred[None]":
        """
        Start draining; fire once every request has ended and every
        connection has closed, cutting off what still runs after
        C{timeout} seconds.
        """
        self.draining = True
        self._clock = clock
        self._drained = Deferred()
        self._timer = clock.callLater(timeout, self._deadline)
        drained = self._drained
        self._progress()
        return drained

    def _deadline(self) -> None:
        log.warn("drain timeout: cutting off {count} request(s) still in flight", count=len(self._active))
        for request in list(self._active):
            request.cut_off_for_shutdown()
        # A client that stopped reading would hold its connection open.
        self._active.clear()
        self._progress()

    def _progress(self) -> None:
        if self._drained is None or self._active:
            return
        if not self._closing:
            self._closing = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self._clock.callLater(CLOSE_GRACE_SECONDS, self._finish)
            for connection in list(self._connections):
                connection.close_gracefully()
        if not self._connections:
            self._finish()

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)


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
    Say C{READY=1} once every listener is bound.

    @param listening: one Deferred per listener, fired once it is bound.
    @param status: the human-readable C{STATUS=} line.
    """

    def __init__(self, notifier: Notifier, listening: Sequence["Deferred[Any]"], status: Callable[[], str]) -> None:
        self._notifier = notifier
        self._listening = list(listening)
        self._status = status

    def startService(self) -> None:
        super().startService()

        def ready(_: object) -> None:
            self._notifier.ready(self._status())

        # A listener that fails to bind stops startup before this matters.
        gatherResults(self._listening).addCallback(ready)


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
