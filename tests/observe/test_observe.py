"""
What an operator sees: request ids, the per-request record behind the
access log, the JSON access log, Prometheus metrics moving for the events
they count, exact token usage (including the include_usage injection that
leaves client streams byte-identical), and keepalive comments on silent
streams.  In memory, through the real Resource tree and ProxySite.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

import treq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, chat_body, registry
from oaiproxy.observe.accesslog import JsonAccessLog, TextAccessLog
from oaiproxy.observe.metrics import MODEL_LABEL_LIMIT, Metrics, MetricsResource, UpstreamGauges
from oaiproxy.observe.records import RequestRecord, Usage
from oaiproxy.server.build import metrics_check
from oaiproxy.server.tree import build_root
from oaiproxy.upstream.relay import KEEPALIVE

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


def sample(h: Harness, name: str, **labels: str) -> float:
    value: Optional[float] = h.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def run_stream(h: Harness, body: bytes, headers: Any = BEARER) -> bytes:
    response = h.post(body, headers=headers)
    received: list[bytes] = []
    done = treq.collect(h.proxy_result(response), received.append)
    for _ in range(60):
        h.clock.advance(1)
        h.pump()
    h.case.successResultOf(done)
    return b"".join(received)


class Keyed(Harness):
    def __init__(self, case: SynchronousTestCase, **kwargs: Any) -> None:
        super().__init__(client_keys=[CLIENT_KEY], **kwargs)
        self.case = case

    def proxy_result(self, d: Any) -> Any:
        return self.case.successResultOf(d)


class RequestIdTests(SynchronousTestCase):
    def test_every_response_has_a_request_id(self) -> None:
        """
        Answers, errors and health checks all carry x-oaiproxy-request-id,
        the id the access log uses.
        """
        h = Keyed(self)
        ok = self.successResultOf(h.post(chat_body(), headers=BEARER))
        refused = self.successResultOf(h.post(chat_body()))
        ids = [r.headers.getRawHeaders(b"x-oaiproxy-request-id")[0].decode() for r in (ok, refused)]
        self.assertTrue(all(i.startswith("req_") for i in ids))
        self.assertEqual(len(set(ids)), 2)
        self.assertEqual([r.request_id for r in h.records], ids)

    def test_client_request_id_kept_and_forwarded(self) -> None:
        """
        A client's own X-Request-Id becomes the request id and goes upstream.
        """
        h = Keyed(self)
        response = self.successResultOf(h.post(chat_body(), headers={**BEARER, b"x-request-id": [b"trace-42"]}))
        self.assertEqual(response.headers.getRawHeaders(b"x-oaiproxy-request-id"), [b"trace-42"])
        self.assertEqual(h.fake.requests[0].headers["x-request-id"], ["trace-42"])
        self.assertEqual(h.records[0].request_id, "trace-42")


class RecordTests(SynchronousTestCase):
    def test_plain_request_record(self) -> None:
        """
        The record of an answered request has the client's name, model,
        upstream status and id, sizes and the usage upstream reported.
        """
        h = Keyed(self)
        body = chat_body()
        self.successResultOf(treq.content(self.successResultOf(h.post(body, headers=BEARER))))
        [record] = h.records
        self.assertEqual(
            (record.client, record.model, record.route, record.status, record.upstream_status),
            ("client-1", "gpt-4o-mini", "chat_completions", 200, 200),
        )
        self.assertEqual(record.upstream_request_id, "req_fake_1")
        self.assertEqual(record.bytes_in, len(body))
        self.assertGreater(record.bytes_out, 100)
        assert record.usage is not None
        self.assertEqual((record.usage.prompt, record.usage.completion, record.usage.exact), (2, 8, True))
        self.assertEqual(record.ended, "complete")


class TextAccessLogTests(SynchronousTestCase):
    def test_the_line_and_the_fields_to_filter_on(self) -> None:
        """
        The text access line shows peer, client, method, path, status, bytes
        sent, duration (to the millisecond), request id and how it ended;
        the event also carries the fields worth filtering on.
        """
        record = RequestRecord("req-1", 100.0)
        record.peer, record.client, record.method = "10.0.0.7", "client-1", "POST"
        record.path, record.status, record.bytes_out = "/v1/chat/completions", 200, 1234
        record.ended_at, record.ended, record.model = 100.01234, "client_disconnected", "gpt-4o"
        with capturedLogs() as logged:
            TextAccessLog()(record)
        [event] = logged
        self.assertEqual(
            formatEvent(event),
            "10.0.0.7 client-1 POST /v1/chat/completions 200 1234 0.012s req-1 (client disconnected)",
        )
        self.assertEqual((event["log_namespace"], event["status"], event["model"]), ("oaiproxy.access", 200, "gpt-4o"))
        self.assertEqual(event["line"], formatEvent(event))

    def test_braces_in_the_path_are_shown_as_sent(self) -> None:
        """
        A path (or client name) with braces in it is shown as it is: the
        line is no format for the log's formatting to fill in.
        """
        record = RequestRecord("req-2", 100.0)
        record.client, record.method, record.path, record.status = "team-{a}", "GET", "/v1/{x}}/{0}", 404
        with capturedLogs() as logged:
            TextAccessLog()(record)
        [event] = logged
        self.assertEqual(formatEvent(event), "- team-{a} GET /v1/{x}}/{0} 404 0 0.000s req-2")


class JsonAccessLogTests(SynchronousTestCase):
    FIELDS = {
        "time", "request_id", "peer", "client", "method", "route", "path", "model", "stream", "status",
        "upstream", "attempts", "upstream_status", "upstream_request_id", "upstream_error", "bytes_in", "bytes_out",
        "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "usage_exact", "ttfb_ms",
        "upstream_ms", "proxy_ms", "duration_ms", "ended", "disconnected", "worker",
    }  # fmt: skip

    def test_one_object_per_request_with_every_field_and_no_secret(self) -> None:
        """
        The JSON log writes one object per line with every documented field,
        and neither key appears in it.
        """
        h = Keyed(self)
        stream = io.StringIO()
        write = JsonAccessLog(stream, now=lambda: 1800000000.0)
        self.successResultOf(treq.content(self.successResultOf(h.post(chat_body(), headers=BEARER))))
        self.successResultOf(h.post(chat_body(), headers={b"authorization": [b"Bearer wrong"]}))
        for record in h.records:
            write(record)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(set(first), self.FIELDS)
        self.assertEqual((first["status"], first["client"], first["time"]), (200, "client-1", 1800000000.0))
        self.assertEqual((second["status"], second["client"]), (401, "-"))
        for secret in (UPSTREAM_KEY, CLIENT_KEY):
            self.assertNotIn(secret.decode(), stream.getvalue())


class MetricsTests(SynchronousTestCase):
    def test_requests_latency_bytes_and_tokens(self) -> None:
        """
        An answered request counts once by client, model, route and status
        class, with upstream latency, proxy overhead, bytes and tokens.
        """
        h = Keyed(self)
        self.successResultOf(treq.content(self.successResultOf(h.post(chat_body(), headers=BEARER))))
        labels = {"client": "client-1", "model": "gpt-4o-mini"}
        self.assertEqual(
            sample(h, "oaiproxy_requests_total", route="chat_completions", status_class="2xx", **labels), 1
        )
        self.assertEqual(
            sample(h, "oaiproxy_upstream_response_seconds_count", route="chat_completions", upstream="default"), 1
        )
        self.assertEqual(sample(h, "oaiproxy_proxy_overhead_seconds_count", route="chat_completions"), 1)
        self.assertEqual(sample(h, "oaiproxy_request_bytes_total", route="chat_completions"), len(chat_body()))
        self.assertGreater(sample(h, "oaiproxy_response_bytes_total", route="chat_completions"), 100)
        self.assertEqual(sample(h, "oaiproxy_tokens_total", kind="prompt", exact="true", **labels), 2)
        self.assertEqual(sample(h, "oaiproxy_tokens_total", kind="completion", exact="true", **labels), 8)
        self.assertEqual(sample(h, "oaiproxy_in_flight_requests"), 0)

    def test_refusals_count_too(self) -> None:
        """
        A refused request counts under its status class, not as upstream
        traffic.
        """
        h = Keyed(self)
        self.successResultOf(h.post(chat_body()))
        self.assertEqual(
            sample(h, "oaiproxy_requests_total", client="-", model="-", route="chat_completions", status_class="4xx"), 1
        )
        self.assertEqual(
            sample(h, "oaiproxy_upstream_response_seconds_count", route="chat_completions", upstream="default"), 0
        )

    def test_stream_gauges_and_histograms(self) -> None:
        """
        An open stream shows in the open-streams and in-flight gauges; when
        it ends, time to first chunk and stream duration are observed.
        """
        h = Keyed(self, chunk_interval=1.0)
        response = self.successResultOf(h.post(chat_body(stream=True), headers=BEARER))
        self.assertEqual(sample(h, "oaiproxy_open_streams"), 1)
        self.assertEqual(sample(h, "oaiproxy_in_flight_requests"), 1)
        done = treq.collect(response, lambda data: None)
        for _ in range(30):
            h.clock.advance(1)
            h.pump()
        self.successResultOf(done)
        self.assertEqual(sample(h, "oaiproxy_open_streams"), 0)
        self.assertEqual(sample(h, "oaiproxy_in_flight_requests"), 0)
        self.assertEqual(
            sample(h, "oaiproxy_time_to_first_chunk_seconds_count", route="chat_completions", upstream="default"), 1
        )
        self.assertEqual(
            sample(h, "oaiproxy_stream_duration_seconds_count", route="chat_completions", upstream="default"), 1
        )
        self.assertGreaterEqual(
            sample(h, "oaiproxy_stream_duration_seconds_sum", route="chat_completions", upstream="default"), 10
        )

    def test_cancelled_stream(self) -> None:
        """
        A client leaving mid-stream counts as a disconnect, and its output
        is counted as an estimate (exact="false").
        """
        h = Keyed(self, chunk_interval=1.0)
        response = self.successResultOf(h.post(chat_body(stream=True), headers=BEARER))
        seen: list[bytes] = []

        def leave(data: bytes) -> None:
            seen.append(data)
            if len(b"".join(seen).split(b"\n\n")) > 4:
                raise RuntimeError("client leaves")

        done = treq.collect(response, leave)
        for _ in range(5):
            h.clock.advance(1)
            h.pump()
        self.failureResultOf(done, RuntimeError)
        self.assertEqual(sample(h, "oaiproxy_client_disconnects_total", route="chat_completions"), 1)
        labels = {"client": "client-1", "model": "gpt-4o-mini"}
        self.assertGreater(sample(h, "oaiproxy_tokens_total", kind="completion", exact="false", **labels), 0)
        self.assertEqual(sample(h, "oaiproxy_tokens_total", kind="completion", exact="true", **labels), 0)
        self.assertEqual(h.records[-1].ended, "client_disconnected")

    def leave_when(self, h: Keyed, model: str, seen_enough: Any) -> None:
        """
        Stream C{model}; the client hangs up as soon as what it has read
        satisfies C{seen_enough}.
        """
        response = self.successResultOf(h.post(chat_body(model=model, stream=True), headers=BEARER))
        seen: list[bytes] = []

        def leave(data: bytes) -> None:
            seen.append(data)
            if seen_enough(b"".join(seen)):
                raise RuntimeError("client leaves")

        done = treq.collect(response, leave)
        for _ in range(30):
            h.clock.advance(1)
            h.pump()
        self.failureResultOf(done, RuntimeError)

    def test_leaving_after_the_end_event_is_complete(self) -> None:
        """
        A client that hangs up right after reading C{data: [DONE]}, before
        upstream's last bytes (as every openai SDK stream does), has not
        left early: the request is recorded complete, with its exact usage,
        no disconnect is counted, and nothing is logged about it.
        """
        h = Keyed(self, chunk_interval=1.0)
        with capturedLogs() as logged:
            self.leave_when(h, "fake-linger", lambda data: data.endswith(b"data: [DONE]\n\n"))
        record = h.records[-1]
        self.assertEqual((record.ended, record.status), ("complete", 200))
        assert record.usage is not None
        self.assertTrue(record.usage.exact)
        self.assertEqual(sample(h, "oaiproxy_client_disconnects_total", route="chat_completions"), 0)
        self.assertEqual([e for e in logged if "went away" in e.get("log_format", "")], [])
        self.assertEqual(json.loads(json.dumps(record.fields()))["disconnected"], False)
        # The upstream request is closed all the same: its last bytes are
        # not worth a connection held open.
        self.assertEqual(h.fake.disconnects, 1)

    def test_leaving_before_the_end_event_is_a_disconnect(self) -> None:
        """
        A client that hangs up after the last text, but before C{[DONE]},
        still counts as a disconnect.
        """
        h = Keyed(self, chunk_interval=1.0)
        with capturedLogs() as logged:
            self.leave_when(h, "fake-linger", lambda data: b'"finish_reason": "stop"' in data)
        self.assertEqual(h.records[-1].ended, "client_disconnected")
        self.assertEqual(sample(h, "oaiproxy_client_disconnects_total", route="chat_completions"), 1)
        self.assertEqual(len([e for e in logged if "went away" in e.get("log_format", "")]), 1)

    def test_upstream_errors_by_kind(self) -> None:
        """
        Upstream failures are counted by kind: a silent upstream (timeout),
        a 5xx answer (status), a dropped stream (reset), a refused
        connection (connect).
        """
        h = Keyed(self, read_timeout=5)
        d = h.post(chat_body(model="fake-silent"), headers=BEARER)
        h.clock.advance(5)
        h.pump()
        self.successResultOf(d)
        self.successResultOf(h.post(chat_body(model="fake-500"), headers=BEARER))
        crash = self.successResultOf(h.post(chat_body(model="fake-crash", stream=True), headers=BEARER))
        self.failureResultOf(treq.collect(crash, lambda data: None))

        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                return fail(ConnectionRefusedError())

        refused = Keyed(self, http=Refusing())
        self.successResultOf(refused.post(chat_body(), headers=BEARER))
        counts = [sample(h, "oaiproxy_upstream_errors_total", kind=k) for k in ("timeout", "status", "reset")]
        self.assertEqual(counts, [1, 1, 1])
        self.assertEqual(sample(refused, "oaiproxy_upstream_errors_total", kind="connect"), 1)

    def test_model_labels_are_bounded(self) -> None:
        """
        A client cannot create unlimited series: past the first distinct
        model names, and for anything not shaped like a model name, the
        label is "other".
        """
        metrics = Metrics()
        names = [metrics.model_label(f"model-{i}") for i in range(MODEL_LABEL_LIMIT + 10)]
        self.assertEqual(names[:MODEL_LABEL_LIMIT], [f"model-{i}" for i in range(MODEL_LABEL_LIMIT)])
        self.assertEqual(set(names[MODEL_LABEL_LIMIT:]), {"other"})
        self.assertEqual(metrics.model_label("model-3"), "model-3")
        self.assertEqual(Metrics().model_label("gpt-4o\n{evil}"), "other")

    def test_metrics_endpoint(self) -> None:
        """
        GET /metrics serves the Prometheus text format, to a client key as
        in the daemon.
        """
        h = Keyed(self)
        self.successResultOf(h.post(chat_body(), headers=BEARER))
        d = h.proxy.get("http://proxy.test/metrics", headers=BEARER)
        h.pump()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIn(b'oaiproxy_requests_total{client="client-1"', body)


class UpstreamMetricsTests(SynchronousTestCase):
    def test_per_upstream_counters(self) -> None:
        """
        As the pool's observer, the metrics count attempts by upstream and
        outcome and failovers by upstream and reason.
        """
        metrics = Metrics()
        for upstream, outcome in [("a", "connect"), ("b", "ok"), ("b", "ok"), ("a", "rate_limited")]:
            metrics.attempt_finished(upstream, outcome)
        metrics.failed_over("a", "connect")
        get = metrics.registry.get_sample_value
        self.assertEqual(get("oaiproxy_upstream_requests_total", {"upstream": "b", "outcome": "ok"}), 2)
        self.assertEqual(get("oaiproxy_upstream_requests_total", {"upstream": "a", "outcome": "connect"}), 1)
        self.assertEqual(get("oaiproxy_upstream_requests_total", {"upstream": "a", "outcome": "rate_limited"}), 1)
        self.assertEqual(get("oaiproxy_upstream_failovers_total", {"upstream": "a", "reason": "connect"}), 1)
        self.assertIsNone(get("oaiproxy_upstream_failovers_total", {"upstream": "b", "reason": "connect"}))

    def test_gauges_read_at_scrape(self) -> None:
        """
        The breaker state and in-flight gauges show what the pool says at
        the moment of the scrape, and an upstream that left the pool (a
        reload) leaves the gauges.
        """
        metrics = Metrics()
        now = [UpstreamGauges("a", 0, 3), UpstreamGauges("b", 2, 0)]
        metrics.watch_upstreams(lambda: now)
        get = metrics.registry.get_sample_value
        self.assertEqual(get("oaiproxy_upstream_breaker_state", {"upstream": "b"}), 2)
        self.assertEqual(get("oaiproxy_upstream_in_flight_requests", {"upstream": "a"}), 3)
        now = [UpstreamGauges("a", 1, 0)]
        self.assertEqual(get("oaiproxy_upstream_breaker_state", {"upstream": "a"}), 1)
        self.assertIsNone(get("oaiproxy_upstream_breaker_state", {"upstream": "b"}))


class MetricsAccessTests(SynchronousTestCase):
    def get(self, check: Any, token: Optional[bytes]) -> int:
        from treq.testing import StubTreq

        stub = StubTreq(build_root(None, None, MetricsResource(Metrics(), check)))
        headers = {b"authorization": [b"Bearer " + token]} if token else {}
        response = self.successResultOf(stub.get("http://proxy.test/metrics", headers=headers))
        return int(response.code)

    def test_protected_like_the_api(self) -> None:
        """
        With client keys, /metrics needs a client key or the metrics key;
        with neither configured it is as open as the API itself.
        """
        keyed = Credentials(Secret(b"sk-up"), registry(CLIENT_KEY))
        check = metrics_check(keyed, Secret(b"scraper-key"))
        self.assertEqual(
            [self.get(check, t) for t in (None, b"wrong", CLIENT_KEY, b"scraper-key")], [401, 401, 200, 200]
        )
        only_key = metrics_check(Credentials(Secret(b"sk-up")), Secret(b"scraper-key"))
        self.assertEqual([self.get(only_key, t) for t in (None, b"scraper-key")], [401, 200])
        open_check = metrics_check(Credentials(Secret(b"sk-up")), None)
        self.assertEqual(self.get(open_check, None), 200)


class StreamUsageTests(SynchronousTestCase):
    def test_injection_is_invisible_to_the_client(self) -> None:
        """
        With injection on, upstream is asked for usage and the usage event
        is removed: the client's stream is byte for byte what it gets with
        injection off, while the proxy records exact usage.
        """
        on, off = Keyed(self, chunk_interval=1.0), Keyed(self, chunk_interval=1.0, stream_usage=False)
        body = chat_body(stream=True)
        with_injection, without = run_stream(on, body), run_stream(off, body)
        self.assertEqual(with_injection, without)
        self.assertNotIn(b'"usage"', with_injection)
        sent = json.loads(on.fake.requests[0].body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(off.fake.requests[0].body, body)
        # Only the inserted member differs from what the client sent.
        self.assertEqual(on.fake.requests[0].body.replace(b'"stream_options":{"include_usage":true},', b""), body)
        usage_on, usage_off = on.records[0].usage, off.records[0].usage
        assert usage_on is not None and usage_off is not None
        self.assertTrue(usage_on.exact)
        self.assertEqual((usage_on.prompt, usage_on.completion), (2, 8))
        self.assertFalse(usage_off.exact)

    def test_client_asking_for_usage_gets_it(self) -> None:
        """
        A client that asked for usage receives the usage event, untouched,
        and it is counted exactly.
        """
        h = Keyed(self, chunk_interval=1.0)
        body = chat_body(stream=True, stream_options={"include_usage": True})
        data = run_stream(h, body)
        self.assertIn(b'"choices": [], "usage"', data)
        self.assertEqual(h.fake.requests[0].body, body)
        usage = h.records[0].usage
        assert usage is not None
        self.assertTrue(usage.exact)


class KeepaliveTests(SynchronousTestCase):
    def test_silent_stream_gets_comments_between_events(self) -> None:
        """
        While upstream is silent mid-stream, an SSE comment goes out every
        keepalive interval (after a complete event, never inside one); the
        read timeout still ends the stream.
        """
        h = Keyed(self, sse_keepalive=5, read_timeout=12)
        response = self.successResultOf(h.post(chat_body(model="fake-stall", stream=True), headers=BEARER))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        h.pump()
        self.assertNotIn(KEEPALIVE, b"".join(received))
        h.clock.advance(5)
        h.pump()
        self.assertTrue(b"".join(received).endswith(b"\n\n" + KEEPALIVE))
        h.clock.advance(5)
        h.pump()
        self.assertEqual(b"".join(received).count(KEEPALIVE), 2)
        h.clock.advance(2)
        h.pump()
        self.failureResultOf(done)
        self.assertIn(b"no data for 12 seconds", b"".join(received))

    def test_off_when_zero(self) -> None:
        """
        --sse-keepalive 0 sends no comments.
        """
        h = Keyed(self, sse_keepalive=0, read_timeout=12)
        response = self.successResultOf(h.post(chat_body(model="fake-stall", stream=True), headers=BEARER))
        received: list[bytes] = []
        treq.collect(response, received.append)
        for _ in range(11):
            h.clock.advance(1)
            h.pump()
        self.assertNotIn(KEEPALIVE, b"".join(received))


class UsageObjectTests(SynchronousTestCase):
    def test_usage_total(self) -> None:
        """
        A usage's total is prompt plus completion (reasoning and cached are
        parts of those, not additions).
        """
        self.assertEqual(Usage(prompt=10, completion=5, reasoning=3, cached=4).total, 15)

    def test_record_times(self) -> None:
        """
        Proxy overhead excludes the upstream's own time.
        """
        record = RequestRecord("r", 100.0)
        record.upstream_sent, record.upstream_head, record.head_sent = 100.002, 101.0, 101.001
        # A stream whose first token came long after its head: upstream time.
        record.first_chunk, record.ended_at = 102.5, 103
        self.assertAlmostEqual(record.proxy_seconds, 0.003)
        self.assertAlmostEqual(record.upstream_seconds or 0, 0.998)
        self.assertAlmostEqual(record.duration, 3.0)


class ReviewedEdgesTests(SynchronousTestCase):
    def test_reasoning_and_cached_tokens(self) -> None:
        """
        Reasoning and cached tokens reported in the usage details are
        counted under their own kinds.
        """
        h = Keyed(self)
        self.successResultOf(treq.content(self.successResultOf(h.post(chat_body(), headers=BEARER))))
        labels = {"client": "client-1", "model": "gpt-4o-mini", "exact": "true"}
        self.assertEqual(sample(h, "oaiproxy_tokens_total", kind="reasoning", **labels), 3)
        self.assertEqual(sample(h, "oaiproxy_tokens_total", kind="cached", **labels), 1)

    def test_client_leaving_before_any_answer_is_499(self) -> None:
        """
        A client that gives up before the response head is recorded as 499,
        not as a 200 that never happened.
        """
        h = Keyed(self)
        d = h.post(chat_body(model="fake-silent"), headers=BEARER)
        d.cancel()
        h.pump()
        self.failureResultOf(d)
        self.assertEqual([r.status for r in h.records], [499])
        self.assertEqual(
            sample(
                h,
                "oaiproxy_requests_total",
                client="client-1",
                model="other",
                route="chat_completions",
                status_class="4xx",
            ),
            1,
        )

    def test_refused_models_do_not_take_label_slots(self) -> None:
        """
        Model names only take one of the bounded label slots once upstream
        accepted them: refused junk cannot crowd out real models.
        """
        metrics = Metrics()
        for i in range(MODEL_LABEL_LIMIT + 5):
            self.assertEqual(metrics.model_label(f"junk-{i}", claim=False), "other")
        self.assertEqual(metrics.model_label("gpt-4o"), "gpt-4o")
