# -*- test-case-name: tests.server.test_dashboard -*-
"""
C{GET /dashboard/live}: the live figures the dashboard charts, for the
admin key only, and the live state behind them.

L{Dashboard} holds that state: the sampler over the metrics
(L{oaiproxy.observe.live.LiveStats}), the recent refusals and, in a
group, the workers' files; L{Dashboard.tick} runs on a timer off the
request path.  The page's static files are served by
L{oaiproxy.server.dashboard}; both answer with L{SECURITY_HEADERS}.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from oaiproxy.access.admin import is_admin
from oaiproxy.access.clients import Credentials
from oaiproxy.errors import admin_key_required
from oaiproxy.observe.live import (
    LIVE_INTERVAL,
    LIVE_WINDOW,
    LiveStats,
    Refusals,
    WorkerFiles,
    merge_upstreams,
)
from oaiproxy.observe.metrics import Metrics
from oaiproxy.upstream.pool import Pool
from oaiproxy.web import Endpoint, error_response

__all__ = ["CSP", "Dashboard", "LiveResource", "SECURITY_HEADERS", "secure"]

#: Only our own script, styles and JSON; nothing inline, no framing.
#: uPlot sizes its elements through the CSSOM (element.style), which a
#: style-src without 'unsafe-inline' allows; img-src data: is for the
#: canvas' own images.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode("ascii")),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def secure(request: Request) -> None:
    """
    Set every header of L{SECURITY_HEADERS} on C{request}'s answer: each
    answer below C{/dashboard} has them, errors included.
    """
    headers = request.responseHeaders
    for name, value in SECURITY_HEADERS:
        headers.setRawHeaders(name, [value])


class Dashboard:
    """
    The live state the dashboard shows, for one worker or a group.

    @param metrics: whose registry is sampled (in a group, the group's).
    @param pool: this worker's upstreams.
    @param group_dir: a group's metrics directory, where each worker
        writes its own file (L{WorkerFiles}); C{None} for one process.
    """

    def __init__(
        self,
        metrics: Metrics,
        pool: Pool,
        clock: IReactorTime,
        group_dir: Optional[str] = None,
        interval: float = LIVE_INTERVAL,
        window: float = LIVE_WINDOW,
        pid: Optional[int] = None,
    ) -> None:
        self.stats = LiveStats(metrics.registry.collect, clock, interval, window)
        self._write_failed = False
        self.refusals = Refusals()
        self._pool = pool
        self._clock = clock
        self._files = (
            None
            if group_dir is None
            else WorkerFiles(group_dir, pid if pid is not None else os.getpid(), clock, interval, window)
        )

    log = Logger()

    @property
    def interval(self) -> float:
        return self.stats.interval

    def _upstreams(self) -> list[dict[str, Any]]:
        return [asdict(member.health()) for member in self._pool.members]

    def tick(self) -> None:
        """
        One sample of the metrics and, in a group, this worker's file.
        """
        if self._files is not None:
            try:
                self._files.write({"upstreams": self._upstreams(), "refusals": self.refusals.recent()})
            except OSError as error:
                # The directory went (the group stopping) or the disk is
                # full: the timer must keep running; said once a spell.
                if not self._write_failed:
                    self.log.warn(
                        "cannot write the dashboard's file in {directory}: {error}",
                        directory=self._files.directory,
                        error=error,
                    )
                self._write_failed = True
            else:
                self._write_failed = False
        self.stats.sample()

    def document(self) -> dict[str, Any]:
        """
        What C{GET /dashboard/live} answers.
        """
        if self._files is None:
            upstreams = merge_upstreams([self._upstreams()])
            refusals = self.refusals.recent()
            workers = 1
        else:
            reports, refusals, workers = self._files.read()
            upstreams = merge_upstreams(reports)
        return {
            "object": "dashboard.live",
            "generated_at": self._clock.seconds(),
            "group": self._files is not None,
            "workers": workers,
            "series": self.stats.series(),
            "upstreams": upstreams,
            "refusals": refusals,
        }


class LiveResource(Endpoint):
    """
    C{GET /dashboard/live}: the live figures as JSON, for the admin key
    only (a client key or none: C{401}, as for C{/usage}).
    """

    def __init__(self, dashboard: Dashboard, credentials: Credentials) -> None:
        super().__init__()
        self._dashboard = dashboard
        self._credentials = credentials

    def render_GET(self, request: Request) -> bytes:
        secure(request)
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        if not is_admin(self._credentials, request.requestHeaders):
            return error_response(request, admin_key_required(self._credentials.admin_key is not None))
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return json.dumps(self._dashboard.document()).encode("utf-8")
