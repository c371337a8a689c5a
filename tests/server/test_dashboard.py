# -*- test-case-name: tests.server.test_dashboard -*-
"""
The dashboard's resources through the whole site, in memory: the page and
its files are public, with strict security headers; the live figures need
the admin key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import Any, Optional

import treq
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Secret
from oaiproxy.fake.harness import Harness, SiteAgent, chat_body, harness_config, registry
from oaiproxy.observe.records import RequestRecord
from oaiproxy.routes.live import CSP, Dashboard
from oaiproxy.upstream.client import http_client
from tests.support import exchange, temp_dir

ADMIN = b"oaiproxy-admin-0123456789abcdefghij"
CLIENT = b"client-key-alice"

HEADERS = {
    b"content-security-policy": CSP.encode("ascii"),
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"x-content-type-options": b"nosniff",
}


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(client_keys=[CLIENT])
        self.h.credentials.admin_key = Secret(ADMIN)
        self.h.clock.advance(1_000_000)

    def get(self, path: str, token: Optional[bytes] = None, **more: list[bytes]) -> tuple[Any, bytes]:
        headers = {name.encode().replace(b"_", b"-"): value for name, value in more.items()}
        if token is not None:
            headers[b"authorization"] = [b"Bearer " + token]
        return exchange(self, self.h, "GET", path, headers=headers)

    def assertSecured(self, response: Any) -> None:
        for name, value in HEADERS.items():
            self.assertEqual(response.headers.getRawHeaders(name), [value], name)

    def test_page_and_files_are_public_with_security_headers(self) -> None:
        """
        The page, its script and styles and uPlot need no key (they hold no
        data), each with its type, revalidated on every use, and every one
        with the security headers.  The page has no inline script or style.
        """
        for path, kind in [
            ("/dashboard/", b"text/html; charset=utf-8"),
            ("/dashboard/dashboard.js", b"text/javascript; charset=utf-8"),
            ("/dashboard/dashboard.css", b"text/css; charset=utf-8"),
            ("/dashboard/uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
            ("/dashboard/uPlot.min.css", b"text/css; charset=utf-8"),
        ]:
            response, body = self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [kind], path)
            self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-cache"], path)
            self.assertSecured(response)
            self.assertTrue(body)
        _, page = self.get("/dashboard/")
        self.assertNotIn(b"<script>", page)
        self.assertNotIn(b"<style", page)
        self.assertNotIn(b" style=", page)
        self.assertIsNone(re.search(rb"\son[a-z]+=", page))

    def test_revalidation(self) -> None:
        """
        An unchanged file is a 304 for the ETag the browser holds.
        """
        response, _ = self.get("/dashboard/dashboard.js")
        (etag,) = response.headers.getRawHeaders(b"etag")
        again, body = self.get("/dashboard/dashboard.js", if_none_match=[etag])
        self.assertEqual((again.code, body), (304, b""))
        changed, body = self.get("/dashboard/dashboard.js", if_none_match=[b'"other"'])
        self.assertEqual(changed.code, 200)

    def test_redirect_and_unknown_files(self) -> None:
        """
        C{/dashboard} sends the browser to C{/dashboard/} (relative, so a
        path prefix in front of the proxy works); anything else below it
        is the JSON 404.
        """
        response, _ = self.get("/dashboard")
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"dashboard/"])
        missing, body = self.get("/dashboard/../../etc/passwd")
        self.assertEqual(missing.code, 404)
        missing, body = self.get("/dashboard/secrets.py")
        self.assertEqual(missing.code, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "unknown_url")

    def test_live_needs_the_admin_key(self) -> None:
        """
        No key, a client's key or a wrong key: 401 invalid_api_key, with the
        security headers; the admin key: 200 JSON, never cached.
        """
        for token in (None, CLIENT, b"oaiproxy-admin-wrong-key-0123456789"):
            response, body = self.get("/dashboard/live", token)
            self.assertEqual(response.code, 401, token)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
            self.assertNotIn(ADMIN, body)
            self.assertSecured(response)
        response, body = self.get("/dashboard/live", ADMIN)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertSecured(response)
        self.assertEqual(json.loads(body)["object"], "dashboard.live")

    def test_no_admin_key_configured(self) -> None:
        """
        Without an admin key nobody reads it, and the refusal says what to set.
        """
        self.h.credentials.admin_key = None
        response, body = self.get("/dashboard/live", ADMIN)
        self.assertEqual(response.code, 401)
        self.assertIn("--admin-key-file", json.loads(body)["error"]["message"])

    def test_live_figures_of_traffic(self) -> None:
        """
        Traffic between two ticks shows as requests per second by status
        class; the refusals (a wrong key, a client's key on the live
        figures) are listed with their code, never a key; the upstream
        with its breaker.
        """
        dashboard = self.h.built.dashboard
        dashboard.tick()
        for _ in range(5):
            d = self.h.post(chat_body(), headers={b"authorization": [b"Bearer " + CLIENT]})
            self.assertEqual(self.successResultOf(d).code, 200)
        refused = self.h.post(chat_body(), headers={b"authorization": [b"Bearer not-a-key"]})
        self.assertEqual(self.successResultOf(refused).code, 401)
        self.h.clock.advance(5)
        dashboard.tick()
        response, body = self.get("/dashboard/live", ADMIN)
        live = json.loads(body)
        self.assertEqual(live["series"]["requests_per_second"], {"2xx": [1.0], "4xx": [0.2]})
        self.assertEqual(live["series"]["t"], [1_000_005.0])
        self.assertEqual([u["name"] for u in live["upstreams"]], ["default"])
        self.assertEqual(live["upstreams"][0]["state"], "closed")
        self.assertEqual(
            [(r["client"], r["status"], r["code"]) for r in live["refusals"]],
            [("-", 401, "invalid_api_key")],
        )
        self.assertNotIn(b"not-a-key", body)
        self.assertNotIn(CLIENT, body)
        self.assertEqual((live["group"], live["workers"]), (False, 1))


class MetricsPortTests(SynchronousTestCase):
    """
    With C{--metrics-port}, the dashboard and the usage it reads are on
    that listener too, with the same admin key.
    """

    def test_on_the_metrics_port(self) -> None:
        config = replace(harness_config(clients=registry(CLIENT)), metrics_port="tcp:0:interface=127.0.0.1")
        h = Harness(config=config)
        h.credentials.admin_key = Secret(ADMIN)
        assert h.built.metrics_site is not None
        agent = SiteAgent(h.built.metrics_site)
        client = http_client(agent, h.clock)

        def get(path: str, token: Optional[bytes]) -> tuple[int, bytes]:
            headers = {b"authorization": [b"Bearer " + token]} if token else {}
            d = client.get("http://metrics.test" + path, headers=headers, allow_redirects=False)
            agent.flush()
            response = self.successResultOf(d)
            body = treq.content(response)
            agent.flush()
            return response.code, self.successResultOf(body)

        self.assertEqual(get("/dashboard/", None)[0], 200)
        self.assertEqual(get("/dashboard/live", None)[0], 401)
        self.assertEqual(get("/dashboard/live", CLIENT)[0], 401)
        code, body = get("/dashboard/live", ADMIN)
        self.assertEqual((code, json.loads(body)["object"]), (200, "dashboard.live"))
        code, body = get("/usage", ADMIN)
        self.assertEqual((code, json.loads(body)["object"]), (200, "usage"))


class GroupDashboardTests(SynchronousTestCase):
    """
    L{Dashboard} in a worker of a group: its own file, every worker's read.
    """

    def test_every_workers_file(self) -> None:
        """
        Two workers' dashboards over one directory: either answers with
        both workers, the upstream seen by both, the refusals of each.
        """
        h = Harness(client_keys=[CLIENT])
        directory = temp_dir(self)
        pool = h.built.upstreams.pool
        one = Dashboard(h.metrics, pool, h.clock, directory, pid=1)
        two = Dashboard(h.metrics, pool, h.clock, directory, pid=2)
        refused = RequestRecord("req_x", 3.0)
        refused.status, refused.client, refused.error_code = 429, "alice", "rate_limit_exceeded"
        one.refusals(refused)
        one.tick()
        two.tick()
        document = two.document()
        self.assertEqual((document["group"], document["workers"]), (True, 2))
        self.assertEqual(document["upstreams"][0]["workers"], 2)
        self.assertEqual([(r["client"], r["code"]) for r in document["refusals"]], [("alice", "rate_limit_exceeded")])

    def test_a_file_that_cannot_be_written(self) -> None:
        """
        A directory gone (the group stopping) does not stop the sampler:
        the tick samples, and says so once.
        """
        h = Harness(client_keys=[CLIENT])
        missing = os.path.join(temp_dir(self), "gone")
        dashboard = Dashboard(h.metrics, h.built.upstreams.pool, h.clock, missing, pid=1)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(3):
            dashboard.tick()
            h.clock.advance(5)
        self.assertEqual(len(dashboard.stats.series()["t"]), 2)
        self.assertEqual(len([e for e in logged if "dashboard's file" in e.get("log_format", "")]), 1)
