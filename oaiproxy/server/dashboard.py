# -*- test-case-name: tests.server.test_dashboard -*-
"""
The dashboard: C{GET /dashboard/}, a static page (HTML, one script of
ours, its CSS and the vendored uPlot charting library, shipped in
C{oaiproxy/server/static/}), and C{GET /dashboard/live}, the live figures
it charts, for the admin key only.

The page itself holds no data, so it is public; everything it shows comes
from endpoints that need the admin key (C{/dashboard/live}, C{/usage}),
sent by its script as C{Authorization: Bearer} (kept in the tab's
C{sessionStorage}: no cookie, so no cross-site request can carry it).
Every answer below C{/dashboard} carries a strict Content-Security-Policy
(only our own script and styles, no inline code, no framing, no form
posting elsewhere), C{X-Frame-Options: DENY}, C{Referrer-Policy:
no-referrer} and C{X-Content-Type-Options: nosniff}.

L{Dashboard} holds the live state: the sampler over the metrics
(L{oaiproxy.observe.live.LiveStats}), the recent refusals and, in a
group, the workers' files; L{Dashboard.tick} runs on a timer off the
request path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from importlib import resources
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
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
from oaiproxy.web import Endpoint, JSONResource, NotFound, error_response

__all__ = ["CSP", "Dashboard", "DashboardResource", "LiveResource", "SECURITY_HEADERS"]

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

#: The page's files: name under /dashboard/, file, content type.
ASSETS: tuple[tuple[bytes, str, bytes], ...] = (
    (b"", "index.html", b"text/html; charset=utf-8"),
    (b"dashboard.js", "dashboard.js", b"text/javascript; charset=utf-8"),
    (b"dashboard.css", "dashboard.css", b"text/css; charset=utf-8"),
    (b"uPlot.iife.min.js", "uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
    (b"uPlot.min.css", "uPlot.min.css", b"text/css; charset=utf-8"),
    (b"uPlot.LICENSE", "uPlot.LICENSE", b"text/plain; charset=utf-8"),
)


def _secure(request: Request) -> None:
    headers = request.responseHeaders
    for name, value in SECURITY_HEADERS:
        headers.setRawHeaders(name, [value])


class Asset(Endpoint):
    """
    One static file, read once at startup.  Revalidated at each use
    (C{no-cache} with an ETag: an upgrade's page never runs with the old
    script), answered C{304} when unchanged.
    """

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self._body = body
        self._type = content_type
        self._etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'

    def render_GET(self, request: Request) -> bytes:
        _secure(request)
        headers = request.responseHeaders
        headers.setRawHeaders(b"cache-control", [b"no-cache"])
        headers.setRawHeaders(b"etag", [self._etag])
        if self._etag in (request.getHeader(b"if-none-match") or b"").replace(b" ", b"").split(b","):
            request.setResponseCode(304)
            return b""
        headers.setRawHeaders(b"content-type", [self._type])
        return self._body


def load_assets() -> dict[bytes, Asset]:
    """
    The page's files, from the package.
    """
    static = resources.files("oaiproxy.server").joinpath("static")
    return {name: Asset(static.joinpath(file).read_bytes(), kind) for name, file, kind in ASSETS}


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
        _secure(request)
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        if not is_admin(self._credentials, request.requestHeaders):
            return error_response(request, admin_key_required(self._credentials.admin_key is not None))
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return json.dumps(self._dashboard.document()).encode("utf-8")


class DashboardResource(JSONResource):
    """
    C{/dashboard}: redirects to C{/dashboard/} (so that the page's
    relative links work behind a reverse proxy's path prefix too), which
    is the page; its files and C{live} below it.
    """

    def __init__(self, live: IResource, assets: Optional[Callable[[], dict[bytes, Asset]]] = None) -> None:
        super().__init__()
        for name, asset in (assets or load_assets)().items():
            self.putChild(name, asset)
        self.putChild(b"live", live)

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        _secure(request)
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [b"dashboard/"])
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        return b"The dashboard is at dashboard/\n"


def mount(root: Resource, dashboard: Dashboard, credentials: Credentials) -> None:
    """
    Put C{/dashboard} into the tree at C{root}.
    """
    root.putChild(b"dashboard", DashboardResource(LiveResource(dashboard, credentials)))
