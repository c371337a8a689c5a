# -*- test-case-name: tests.server.test_dashboard -*-
"""
The dashboard: C{GET /dashboard/}, a static page (HTML, one script of
ours, its CSS and the vendored uPlot charting library, shipped in
C{oaiproxy/server/static/}), and below it C{live}, the live figures it
charts (L{oaiproxy.routes.live}, for the admin key only).

The page itself holds no data, so it is public; everything it shows comes
from endpoints that need the admin key (C{/dashboard/live}, C{/usage}),
sent by its script as C{Authorization: Bearer} (kept in the tab's
C{sessionStorage}: no cookie, so no cross-site request can carry it).
Every answer below C{/dashboard} carries a strict Content-Security-Policy
(only our own script and styles, no inline code, no framing, no form
posting elsewhere), C{X-Frame-Options: DENY}, C{Referrer-Policy:
no-referrer} and C{X-Content-Type-Options: nosniff}.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Callable, Optional

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from oaiproxy.access.clients import Credentials
from oaiproxy.routes.live import Dashboard, LiveResource, secure
from oaiproxy.web import Endpoint, JSONResource, NotFound

__all__ = ["ASSETS", "Asset", "DashboardResource", "load_assets", "mount"]

#: The page's files: name under /dashboard/, file, content type.
ASSETS: tuple[tuple[bytes, str, bytes], ...] = (
    (b"", "index.html", b"text/html; charset=utf-8"),
    (b"dashboard.js", "dashboard.js", b"text/javascript; charset=utf-8"),
    (b"dashboard.css", "dashboard.css", b"text/css; charset=utf-8"),
    (b"uPlot.iife.min.js", "uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
    (b"uPlot.min.css", "uPlot.min.css", b"text/css; charset=utf-8"),
    (b"uPlot.LICENSE", "uPlot.LICENSE", b"text/plain; charset=utf-8"),
)


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
        secure(request)
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
        secure(request)
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [b"dashboard/"])
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        return b"The dashboard is at dashboard/\n"


def mount(root: Resource, dashboard: Dashboard, credentials: Credentials) -> None:
    """
    Put C{/dashboard} into the tree at C{root}.
    """
    root.putChild(b"dashboard", DashboardResource(LiveResource(dashboard, credentials)))
