"""
The Resource tree's answers outside chat completions: the health check,
unknown paths and wrong methods, all as OpenAI-shaped JSON.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake.harness import Harness


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
