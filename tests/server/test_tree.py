"""
The Resource tree's answers outside chat completions: the health check,
unknown paths and wrong methods, all as OpenAI-shaped JSON.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, Harness, registry
from oaiproxy.server.build import metrics_check
from oaiproxy.server.tree import HealthResource, UpstreamsHealthResource, build_root
from oaiproxy.upstream.pool import Choice, Kind, Outcome, Pool, Upstream


class TreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def request(self, method: str, path: str) -> tuple[Any, bytes]:
        d = self.h.proxy.request(method, "http://proxy.test" + path)
        self.h.pump()
        response = self.successResultOf(d)
        return response, self.successResultOf(treq.content(response))

    def test_health(self) -> None:
        """
        GET /health answers 200 healthy without calling upstream, so load
        balancer probes cost nothing.
        """
        response, body = self.request("GET", "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"status": "healthy"})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(self.h.fake.requests, [])

    def test_health_head(self) -> None:
        """
        HEAD /health answers 200 with no body.
        """
        response, body = self.request("HEAD", "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")

    def assertError(self, response: Any, body: bytes, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        error: dict[str, Any] = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["code"], code)
        return error

    def test_unknown_paths_are_404_with_a_hint(self) -> None:
        """
        An unknown path gets a JSON 404 that names it and points at the /v1
        base URL, the usual misconfiguration.
        """
        for path in [
            "/",
            "/v1",
            "/v1/nope",
            "/v1/v1/chat/completions",
            "/health/x",
            "/v1/chat/completions/extra",
            "/v1/chat",
        ]:
            response, body = self.request("POST", path)
            error = self.assertError(response, body, 404, "unknown_url")
            self.assertIn(f"POST {path}", error["message"])
            self.assertIn("/v1", error["message"])

    def test_dot_segments_in_the_tree_lead_nowhere(self) -> None:
        """
        twisted.web does not resolve C{.} and C{..}: it decodes each
        segment once (C{%2e} is C{.}, C{%252e} is C{%2e}) and looks each up
        as a child, and no node has such a child.  So a dot-segment above
        an endpoint is a 404, and never climbs to a sibling route.
        """
        for path in [
            "/v1/chat/../models",
            "/v1/./models",
            "/./v1/models",
            "/v1/%2e/models",
            "/v1/%2e%2e/v1/models",
            "/v1/%252e/models",
            "/health/../v1/models",
            "/v1/chat/completions/../../models",
        ]:
            response, body = self.request("GET", path)
            self.assertError(response, body, 404, "unknown_url")
        self.assertEqual(self.h.fake.requests, [])

    def test_query_string_not_echoed(self) -> None:
        """
        The 404 names the path but not the query string, which may carry a
        credential.
        """
        response, body = self.request("GET", "/nope?key=sk-LEAKED")
        self.assertError(response, body, 404, "unknown_url")
        self.assertNotIn(b"sk-LEAKED", body)

    def test_wrong_method_is_405_with_allow(self) -> None:
        """
        A wrong method on a known path gets 405 and an Allow header.
        """
        for method in ("GET", "HEAD", "PUT"):
            response, body = self.request(method, "/v1/chat/completions")
            self.assertEqual(response.code, 405)
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertError(*self.request("GET", "/v1/chat/completions"), 405, "method_not_allowed")
        response, body = self.request("DELETE", "/health")
        self.assertError(response, body, 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])


class UpstreamsHealthTests(SynchronousTestCase):
    """
    C{GET /health/upstreams}, over a pool on a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1800000000)
        key = Secret(b"sk-proj-POOLKEYSECRET")
        self.pool = Pool(
            [Upstream("a", "https://a.example/v1", key), Upstream("b", "https://b.example/v1", key)], self.clock
        )
        credentials = Credentials(Secret(b"sk-up"), registry(CLIENT_KEY))
        check = metrics_check(credentials, Secret(b"scraper-key"))
        health = HealthResource(upstreams=UpstreamsHealthResource(self.pool, check))
        self.stub = StubTreq(build_root(None, health))

    def get(self, path: str, token: Optional[bytes] = b"scraper-key") -> tuple[int, Any]:
        headers = {b"authorization": [b"Bearer " + token]} if token else {}
        response = self.successResultOf(self.stub.get("http://proxy.test" + path, headers=headers))
        body = self.successResultOf(treq.content(response))
        return response.code, json.loads(body)

    def test_every_upstream_with_its_state(self) -> None:
        """
        Each upstream in the pool's order: its state, in flight, the last
        failure's kind and time, the cooldown left; the summary says one is
        out.  No URL or key in it.
        """
        held = self.pool.choose("gpt-4o", exclude=["b"])
        assert isinstance(held, Choice)
        rate_limited = self.pool.choose("gpt-4o", exclude=["a"])
        assert isinstance(rate_limited, Choice)
        self.pool.finish(rate_limited, Outcome(Kind.ANSWERED, 429, retry_after=30))
        self.clock.advance(10)
        code, document = self.get("/health/upstreams")
        self.assertEqual(code, 200)
        self.assertEqual(
            document,
            {
                "status": "degraded",
                "upstreams": [
                    {
                        "name": "a",
                        "state": "closed",
                        "state_value": 0,
                        "in_flight": 1,
                        "last_failure": None,
                        "last_failure_at": None,
                        "cooldown_left": 0.0,
                    },
                    {
                        "name": "b",
                        "state": "open",
                        "state_value": 2,
                        "in_flight": 0,
                        "last_failure": "status 429",
                        "last_failure_at": 1800000000.0,
                        "cooldown_left": 20.0,
                    },
                ],
            },
        )
        raw = json.dumps(document)
        self.assertNotIn("example", raw)
        self.assertNotIn("POOLKEY", raw)

    def test_summary(self) -> None:
        """
        C{ok} while every breaker is closed; C{unavailable} when none is;
        a half-open one (cooldown over, probe not yet succeeded) is not
        closed.
        """
        self.assertEqual(self.get("/health/upstreams")[1]["status"], "ok")
        for name in ("a", "b"):
            choice = self.pool.choose("gpt-4o", exclude=[n for n in "ab" if n != name])
            assert isinstance(choice, Choice)
            self.pool.finish(choice, Outcome(Kind.ANSWERED, 503, retry_after=5))
        self.assertEqual(self.get("/health/upstreams")[1]["status"], "unavailable")
        self.clock.advance(5)
        _, document = self.get("/health/upstreams")
        self.assertEqual([u["state"] for u in document["upstreams"]], ["half-open", "half-open"])
        self.assertEqual(document["status"], "unavailable")

    def test_protected_like_metrics(self) -> None:
        """
        The metrics key or a client key reads it; anyone else gets the
        API's 401.  /health itself stays open and about the proxy.
        """
        self.assertEqual(self.get("/health/upstreams", None)[0], 401)
        self.assertEqual(self.get("/health/upstreams", b"wrong")[0], 401)
        self.assertEqual(self.get("/health/upstreams", CLIENT_KEY)[0], 200)
        self.assertEqual(self.get("/health", None), (200, {"status": "healthy"}))
        self.assertEqual(self.get("/health/other")[0], 404)
