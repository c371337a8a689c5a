"""
What an operator sees of a pool, through the daemon's own wiring in
memory: per-upstream metrics and C{GET /health/upstreams} moving as
requests fail over.  Two fake upstreams, told apart by host.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional

import treq
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, Harness, SiteAgent, chat_body, harness_config, pool_harness, registry
from oaiproxy.upstream.client import http_client
from oaiproxy.upstream.pool import Upstream

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


def upstream(name: str, **fields: Any) -> Upstream:
    return Upstream(name, f"http://{name}.test/v1", Secret(f"sk-proj-KEY{name.upper()}".encode()), **fields)


class PoolViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        # "a" is tried first (priority 0); "b" is its fallback.
        self.h, self.fakes = pool_harness(upstream("a"), upstream("b", priority=1))
        self.fakes["a"].set_mode({"mode": "status", "status": 503})

    def sample(self, name: str, **labels: str) -> Optional[float]:
        value: Optional[float] = self.h.metrics.registry.get_sample_value(name, labels)
        return value

    def call(self, stream: bool = False) -> int:
        response = self.successResultOf(self.h.post(chat_body(stream=stream), headers=BEARER))
        self.successResultOf(treq.content(response))
        return int(response.code)

    def get(self, path: str, headers: Any = BEARER) -> tuple[int, bytes]:
        d = self.h.proxy.get("http://proxy.test" + path, headers=headers)
        self.h.pump()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(treq.content(response))

    def test_failover_in_the_metrics(self) -> None:
        """
        A request that fails over counts one attempt per upstream under
        its outcome, one failover under the upstream it left, and its
        latency under the upstream that answered.
        """
        self.assertEqual(self.call(), 200)
        self.assertEqual(self.sample("oaiproxy_upstream_requests_total", upstream="a", outcome="server_error"), 1)
        self.assertEqual(self.sample("oaiproxy_upstream_requests_total", upstream="b", outcome="ok"), 1)
        self.assertEqual(self.sample("oaiproxy_upstream_failovers_total", upstream="a", reason="server_error"), 1)
        self.assertIsNone(self.sample("oaiproxy_upstream_failovers_total", upstream="b", reason="server_error"))
        latency = "oaiproxy_upstream_response_seconds_count"
        self.assertEqual(self.sample(latency, route="chat_completions", upstream="b"), 1)
        self.assertIsNone(self.sample(latency, route="chat_completions", upstream="a"))
        self.assertEqual(self.call(stream=True), 200)
        first_chunk = "oaiproxy_time_to_first_chunk_seconds_count"
        self.assertEqual(self.sample(first_chunk, route="chat_completions", upstream="b"), 1)

    def test_breaker_gauge_and_health(self) -> None:
        """
        Five failures in a row open "a": the gauge shows 2 and
        /health/upstreams says why, while every request is still answered
        (by "b"); /metrics shows the same.
        """
        self.assertEqual(self.sample("oaiproxy_upstream_breaker_state", upstream="a"), 0)
        for _ in range(5):
            self.assertEqual(self.call(), 200)
        self.assertEqual(self.sample("oaiproxy_upstream_breaker_state", upstream="a"), 2)
        self.assertEqual(self.sample("oaiproxy_upstream_breaker_state", upstream="b"), 0)
        self.assertEqual(self.sample("oaiproxy_upstream_in_flight_requests", upstream="b"), 0)
        self.assertEqual(self.call(), 200)
        self.assertEqual(len(self.fakes["a"].requests), 5)
        status, body = self.get("/health/upstreams")
        self.assertEqual(status, 200)
        document = json.loads(body)
        self.assertEqual(document["status"], "degraded")
        a, b = document["upstreams"]
        self.assertEqual((a["name"], a["state"], a["last_failure"]), ("a", "open", "status 503"))
        self.assertGreater(a["cooldown_left"], 4)
        self.assertEqual((b["name"], b["state"], b["in_flight"]), ("b", "closed", 0))
        self.assertNotIn(b"KEYA", body)
        status, metrics = self.get("/metrics")
        self.assertIn(b'oaiproxy_upstream_breaker_state{upstream="a"} 2.0', metrics)

    def test_reload_shows_the_new_members(self) -> None:
        """
        After a reload, the gauges and /health/upstreams show the new list:
        the entry that stays keeps its breaker's state, a removed one is
        gone, a new one starts closed.
        """
        for _ in range(5):
            self.call()
        self.h.built.upstreams.replace([upstream("a"), upstream("c", priority=1)])
        _, body = self.get("/health/upstreams")
        self.assertEqual(
            [(u["name"], u["state"]) for u in json.loads(body)["upstreams"]], [("a", "open"), ("c", "closed")]
        )
        self.assertEqual(self.sample("oaiproxy_upstream_breaker_state", upstream="a"), 2)
        self.assertEqual(self.sample("oaiproxy_upstream_breaker_state", upstream="c"), 0)
        self.assertIsNone(self.sample("oaiproxy_upstream_breaker_state", upstream="b"))

    def test_health_upstreams_needs_a_key(self) -> None:
        """
        Like /metrics: a request without a client key (or the metrics key)
        is refused.
        """
        self.assertEqual(self.get("/health/upstreams", headers={})[0], 401)


class SingleUpstreamViewTests(SynchronousTestCase):
    def test_pool_of_one_is_named_default(self) -> None:
        """
        With the single-upstream options, the metrics and
        /health/upstreams show one upstream, C{default}.
        """
        h = Harness(client_keys=[CLIENT_KEY])
        response = self.successResultOf(h.post(chat_body(), headers=BEARER))
        self.successResultOf(treq.content(response))
        get = h.metrics.registry.get_sample_value
        self.assertEqual(get("oaiproxy_upstream_requests_total", {"upstream": "default", "outcome": "ok"}), 1)
        self.assertEqual(get("oaiproxy_upstream_breaker_state", {"upstream": "default"}), 0)
        d = h.proxy.get("http://proxy.test/health/upstreams", headers=BEARER)
        h.pump()
        document = json.loads(self.successResultOf(treq.content(self.successResultOf(d))))
        self.assertEqual([u["name"] for u in document["upstreams"]], ["default"])


class MetricsPortTests(SynchronousTestCase):
    def get(self, h: Harness, token: Optional[bytes]) -> int:
        assert h.built.metrics_site is not None
        agent = SiteAgent(h.built.metrics_site)
        client = http_client(agent, h.clock)
        headers = {b"authorization": [b"Bearer " + token]} if token else {}
        d = client.get("http://metrics.test/health/upstreams", headers=headers)
        agent.flush()
        response = self.successResultOf(d)
        return int(response.code)

    def test_on_the_metrics_port(self) -> None:
        """
        With C{--metrics-port}, /health/upstreams is served there under
        /metrics' rule: open without a metrics key; with one, a request
        needs it (or a client key).
        """
        base = harness_config(clients=registry(CLIENT_KEY))
        open_port = Harness(config=replace(base, metrics_port="tcp:9108"))
        self.assertEqual(self.get(open_port, None), 200)
        keyed = Harness(config=replace(base, metrics_port="tcp:9108", metrics_key=Secret(b"scraper-key")))
        self.assertEqual(
            [self.get(keyed, t) for t in (None, b"wrong", CLIENT_KEY, b"scraper-key")], [401, 401, 200, 200]
        )
