# -*- test-case-name: tests.daemon.test_lifecycle -*-
"""
Serving or draining: the state the daemon's drain (L{oaiproxy.daemon.lifecycle})
shares with the site, which counts requests and connections, and with
admission and C{/health}, which refuse once it drains.

It sits below every layer so that each of them reads it without reaching up
to the daemon.
"""

from __future__ import annotations

from typing import Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Lifecycle", "Drainable", "Closable", "CLOSE_GRACE_SECONDS"]

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
        self._waiters: list[Deferred[None]] = []

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

    def when_drained(self) -> "Deferred[None]":
        """
        Fire once a drain (started now or later) has ended: what must
        outlive every request (the usage ledger's last flush) waits here.
        """
        waiter: Deferred[None] = Deferred()
        if self.draining and self._drained is None and self._closing:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

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
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
