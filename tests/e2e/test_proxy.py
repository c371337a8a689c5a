"""
End to end, as a user runs it: the real daemon (C{twistd -n oaiproxy}) on
127.0.0.1, in front of the fake upstream running as a real HTTP server,
driven by the official C{openai} Python SDK.

Nothing here sleeps: readiness is read from the processes' output, and the
streaming test proves the absence of buffering with a gate, not a timer.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry, mint_key
from oaiproxy.fake.processes import Process, child_env, start_fake_upstream, start_proxy, twistd
from tests.support import self_signed_pem, temp_dir

UPSTREAM_KEY = "sk-proj-E2EUPSTREAMSECRET987654321"
CLIENT_KEY = "oaiproxy-client-E2ECLIENTSECRET"
MESSAGES = [{"role": "user", "content": "hello proxy"}]
REPLY = "This is a mock reply to: hello proxy"


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, Mapping[str, str], bytes]:
    """
    One plain HTTP request, whatever its status.
    """
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class E2ETestCase(SynchronousTestCase):
    """
    Starts a fake upstream and a proxy in front of it for each test.
    """

    proxy_args: Sequence[str] = ("--read-timeout", "3")
    proxy_env: Mapping[str, str] = {"OAIPROXY_CLIENT_KEYS": CLIENT_KEY}

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.upstream, self.upstream_url = start_fake_upstream(self.cwd, UPSTREAM_KEY)
        self.addCleanup(self.upstream.stop)
        self.proxy, self.base = self.start_proxy(["--upstream", self.upstream_url, *self.proxy_args])

    def start_proxy(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[Process, str]:
        full_env = {"OPENAI_API_KEY": UPSTREAM_KEY, **(self.proxy_env if env is None else env)}
        proxy, base = start_proxy(self.cwd, args, full_env)
        self.addCleanup(proxy.stop)
        return proxy, base

    def client(self, base_url: str | None = None, **kwargs: Any) -> openai.OpenAI:
        options: dict[str, Any] = {"api_key": CLIENT_KEY, "max_retries": 0, "timeout": 20.0}
        options.update(kwargs)
        return openai.OpenAI(base_url=base_url or self.base + "/v1", **options)

    def upstream_requests(self) -> list[dict[str, Any]]:
        status, _, body = http("GET", self.upstream_url.rsplit("/v1", 1)[0] + "/_fake/requests")
        assert status == 200
        recorded: list[dict[str, Any]] = json.loads(body)
        return recorded


class ForwardingTests(E2ETestCase):
    def test_plain_completion(self) -> None:
        """
        A plain completion through the SDK comes back as upstream sent it,
        upstream headers included.
        """
        raw = self.client().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        completion = raw.parse()
        self.assertEqual(completion.choices[0].message.content, REPLY)
        self.assertEqual(raw.headers["x-request-id"], "req_fake_1")
        [seen] = self.upstream_requests()
        self.assertEqual(seen["headers"]["authorization"], ["Bearer " + UPSTREAM_KEY])
        self.assertEqual(seen["headers"]["x-stainless-lang"], ["python"])

    def test_streaming_is_not_buffered(self) -> None:
        """
        The first streamed chunk reaches the SDK while upstream is still
        holding the rest back: the proxy buffers nothing.  (With buffering,
        the first next() would wait for a stream that never ends.)
        """
        stream = self.client().chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        second = next(chunks)
        self.assertEqual(first.choices[0].delta.role, "assistant")
        self.assertEqual(second.choices[0].delta.content, "This")
        status, _, body = http("POST", self.upstream_url.rsplit("/v1", 1)[0] + "/_fake/release")
        self.assertEqual(json.loads(body), {"released": 1})
        rest = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual("This" + rest, REPLY)

    def test_models_list(self) -> None:
        """
        client.models.list() (what Open WebUI and friends call at startup)
        returns upstream's models through the proxy.
        """
        models = [m.id for m in self.client().models.list()]
        self.assertEqual(models, ["gpt-4o", "gpt-4o-mini", "o3"])
        self.assertEqual(self.client().models.retrieve("o3").id, "o3")

    def test_base_url_without_v1(self) -> None:
        """
        An SDK configured with the bare proxy URL (no /v1) works too.
        """
        completion = self.client(base_url=self.base).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)

    def test_rate_limit_passes_through(self) -> None:
        """
        An upstream 429 reaches the SDK as RateLimitError with its message
        and retry-after.
        """
        with self.assertRaises(openai.RateLimitError) as caught:
            self.client().chat.completions.create(model="fake-429", messages=MESSAGES)
        self.assertEqual(caught.exception.response.headers["retry-after"], "1")
        self.assertEqual(caught.exception.code, "rate_limit_exceeded")

    def test_sdk_retries_through_the_proxy(self) -> None:
        """
        The SDK's own retry, paced by retry-after-ms, works through the
        proxy: a 429 then a success.
        """
        completion = self.client(max_retries=2).chat.completions.create(model="fake-429-once", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        self.assertEqual(len(self.upstream_requests()), 2)

    def test_mid_stream_crash_raises(self) -> None:
        """
        When upstream dies mid-stream, the SDK's iteration ends with an
        error instead of hanging or ending as if complete.
        """
        stream = self.client().chat.completions.create(model="fake-crash", messages=MESSAGES, stream=True)
        received = []
        with self.assertRaises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk)
        self.assertEqual(len(received), 2)
        self.assertIn("upstream API failed during the response", str(caught.exception))

    def test_silent_upstream_is_504(self) -> None:
        """
        An upstream that never answers gives the SDK a 504 after the read
        timeout (3 s here).
        """
        with self.assertRaises(openai.APIStatusError) as caught:
            self.client().chat.completions.create(model="fake-silent", messages=MESSAGES)
        self.assertEqual(caught.exception.status_code, 504)
        self.assertEqual(caught.exception.code, "upstream_timeout")

    def test_client_keys(self) -> None:
        """
        With client keys set, a wrong key is refused with 401 before any
        upstream call; the right key works.
        """
        with self.assertRaises(openai.AuthenticationError):
            self.client(api_key="wrong").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(self.upstream_requests(), [])
        completion = self.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)

    def test_bad_body(self) -> None:
        """
        An invalid request is a BadRequestError naming the parameter, and
        costs no upstream call.
        """
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client().chat.completions.create(model="gpt-4o", messages=[])
        self.assertEqual(caught.exception.param, "messages")
        self.assertEqual(self.upstream_requests(), [])

    def test_health_and_wrong_method(self) -> None:
        """
        /health answers without upstream; a wrong method gets 405 + Allow;
        an unknown path a 404 with the /v1 hint.
        """
        status, _, body = http("GET", self.base + "/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "healthy"}))
        status, headers, body = http("GET", self.base + "/v1/chat/completions")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
        status, _, body = http("POST", self.base + "/v1/v1/chat/completions", b"{}")
        self.assertEqual(status, 404)
        self.assertIn("/v1", json.loads(body)["error"]["message"])
        self.assertEqual(self.upstream_requests(), [])

    def test_secrets_never_in_daemon_output(self) -> None:
        """
        After successes and every kind of failure, neither the upstream key
        nor a client key appears anywhere in the daemon's output.
        """
        client = self.client()
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        for model in ("fake-429", "fake-500", "fake-silent"):
            with self.assertRaises(openai.APIStatusError):
                client.chat.completions.create(model=model, messages=MESSAGES)
        with self.assertRaises(openai.APIError):
            list(client.chat.completions.create(model="fake-crash", messages=MESSAGES, stream=True))
        with self.assertRaises(openai.AuthenticationError):
            self.client(api_key="sk-WRONGCLIENTKEY").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.proxy.stop()
        output = self.proxy.output
        self.assertIn("POST /v1/chat/completions 200", output)
        for secret in (UPSTREAM_KEY, CLIENT_KEY, "WRONGCLIENTKEY", "E2EUPSTREAMSECRET", "E2ECLIENTSECRET"):
            self.assertNotIn(secret, output)


class BodyLimitTests(E2ETestCase):
    proxy_args = ("--max-body-bytes", "100000")

    def test_oversized_body_then_good_request(self) -> None:
        """
        A body over the limit is a 413 the SDK reports, nothing goes
        upstream, and the next request is served normally.
        """
        client = self.client()
        big = [{"role": "user", "content": "x" * 300000}]
        with self.assertRaises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=big)
        self.assertEqual(caught.exception.status_code, 413)
        self.assertEqual(caught.exception.code, "request_too_large")
        completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        self.assertEqual(len(self.upstream_requests()), 1)


class UpstreamDownTests(E2ETestCase):
    def test_unreachable_upstream_is_502(self) -> None:
        """
        An upstream that refuses connections gives the SDK a 502 (which it
        would retry), and the proxy keeps serving.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        _, base = self.start_proxy(["--upstream", f"http://127.0.0.1:{closed_port}/v1"])
        client = self.client(base_url=base + "/v1")
        for _ in range(2):
            with self.assertRaises(openai.InternalServerError) as caught:
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            self.assertEqual(caught.exception.status_code, 502)
            self.assertEqual(caught.exception.code, "upstream_unreachable")
        status, _, _ = http("GET", base + "/health")
        self.assertEqual(status, 200)


class MockUpstreamTests(SynchronousTestCase):
    def test_try_without_a_key(self) -> None:
        """
        The README's first command, twistd -n oaiproxy --mock-upstream,
        serves plain and streamed answers with no key at all.
        """
        cwd = temp_dir(self)
        proxy, base = start_proxy(cwd, ["--mock-upstream"], {})
        self.addCleanup(proxy.stop)
        client = openai.OpenAI(base_url=base + "/v1", api_key="anything", max_retries=0, timeout=20)
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        self.assertEqual(text, REPLY)


class ConnectionTests(E2ETestCase):
    def control(self, path: str) -> Any:
        status, _, body = http("GET", self.upstream_url.rsplit("/v1", 1)[0] + path)
        assert status == 200
        return json.loads(body)

    def test_upstream_connection_is_reused(self) -> None:
        """
        Consecutive requests share one pooled upstream connection instead
        of paying a new TCP (and TLS) handshake each.
        """
        client = self.client()
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        ports = {r["peer_port"] for r in self.upstream_requests()}
        self.assertEqual(len(ports), 1)

    def test_client_leaving_mid_stream_closes_upstream_within_a_second(self) -> None:
        """
        When the SDK closes a stream early, the proxy closes the upstream
        connection within a second, so no more tokens are generated.
        """
        stream = self.client().chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        # The fake upstream answers as soon as it sees the disconnect, and
        # gives up after one second.
        self.assertEqual(self.control("/_fake/disconnects?at_least=1&within=1"), {"disconnects": 1})


class StreamEndTests(E2ETestCase):
    def test_sdk_stream_is_not_a_disconnect(self) -> None:
        """
        The openai SDK hangs up as soon as it has read C{data: [DONE]},
        before upstream's last bytes (here held back a second and a half):
        that is a complete stream, logged and counted as such.  A stream
        the SDK closes before its end still counts as a disconnect.
        """
        client = self.client()
        raw = client.chat.completions.with_raw_response.create(model="fake-linger", messages=MESSAGES, stream=True)
        request_id = raw.headers["x-oaiproxy-request-id"]
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        self.assertEqual(text, REPLY)
        line = self.proxy.wait_for(r".*" + re.escape(request_id) + r".*").group(0)
        self.assertIn("POST /v1/chat/completions 200", line)
        self.assertNotIn("disconnected", line)

        early = client.chat.completions.create(model="fake-gated", messages=MESSAGES, stream=True)
        next(iter(early))
        early.close()
        self.proxy.wait_for(r"\(client disconnected\)")

        request = urllib.request.Request(self.base + "/metrics", headers={"Authorization": "Bearer " + CLIENT_KEY})
        with urllib.request.urlopen(request, timeout=20) as response:
            metrics = response.read().decode()
        self.assertIn('oaiproxy_client_disconnects_total{route="chat_completions"} 1.0', metrics)
        self.assertEqual(self.proxy.output.count("client went away"), 1)


class UpstreamTLSTests(E2ETestCase):
    def test_untrusted_certificate_is_refused(self) -> None:
        """
        The proxy verifies the upstream's certificate: an https upstream
        with a self-signed one gets no request (and no key), and the SDK
        sees a 502 that says why.
        """
        pem = self_signed_pem(self.cwd)
        upstream, url = start_fake_upstream(self.cwd, UPSTREAM_KEY, "--tls-pem", pem)
        self.addCleanup(upstream.stop)
        self.assertTrue(url.startswith("https://"))
        _, base = self.start_proxy(["--upstream", url])
        with self.assertRaises(openai.InternalServerError) as caught:
            self.client(base_url=base + "/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn("TLS handshake failed", str(caught.exception))


class StartupTests(SynchronousTestCase):
    def run_daemon(self, args: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
        process = Process([twistd(), "--nodaemon", "--pidfile=", "oaiproxy", *args], child_env(env), temp_dir(self))
        self.addCleanup(process.stop)
        return process.wait(), process.output

    def test_missing_key(self) -> None:
        """
        Without a key the daemon exits 1 with one line saying how to give
        one, and no traceback.
        """
        status, output = self.run_daemon([], {})
        self.assertEqual(status, 1)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("no upstream API key", lines[0])

    def test_busy_port(self) -> None:
        """
        A port already in use makes the daemon exit 1 with a line naming
        it, so systemd sees the failure; the key is not printed.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            status, output = self.run_daemon(
                ["--port", f"tcp:{port}:interface=127.0.0.1"], {"OPENAI_API_KEY": UPSTREAM_KEY}
            )
        self.assertEqual(status, 1)
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(UPSTREAM_KEY, output)


class SlowlorisTests(E2ETestCase):
    proxy_args = ("--header-timeout", "4", "--max-connections-per-ip", "50")

    def test_trickling_clients_cannot_starve_others(self) -> None:
        """
        A slowloris client on another address (127.0.0.2) opens many
        connections and trickles header bytes: normal requests are served
        all along, connections past its per-address share are closed at
        once, and the rest are cut off at the header deadline with a 408.
        """
        host, port = self.base.split("://")[1].split(":")
        attackers = []
        for _ in range(80):
            s = socket.socket()
            self.addCleanup(s.close)
            s.bind(("127.0.0.2", 0))
            s.connect((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
            attackers.append(s)

        client = self.client()
        reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(reply.choices[0].message.content, REPLY)

        # The connections past the share are closed right away: wait (on the
        # sockets, at most a second) until they show it.
        closed = set()
        with selectors.DefaultSelector() as selector:
            for s in attackers:
                selector.register(s, selectors.EVENT_READ)
            deadline = time.monotonic() + 1.0
            while len(closed) < 30 and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    closed.add(key.fileobj)
                    selector.unregister(key.fileobj)
        self.assertEqual(len(closed), 30)
        for s in closed:
            try:
                self.assertEqual(s.recv(100), b"")
            except ConnectionResetError:
                pass
        survivors = [s for s in attackers if s not in closed]
        for s in survivors:
            s.sendall(b"s")  # never idle: one more byte each

        reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(reply.choices[0].message.content, REPLY)
        for s in survivors:
            s.settimeout(10)
            self.assertTrue(s.recv(200).startswith(b"HTTP/1.1 408 "))


class ClientFileTests(E2ETestCase):
    proxy_env: Mapping[str, str] = {}

    def setUp(self) -> None:
        self.cwd_for_keys = temp_dir(self)
        self.alice = mint_key()
        self.keys_file = os.path.join(self.cwd_for_keys, "clients.toml")
        with open(self.keys_file, "w") as f:
            f.write("[defaults]\nrequests_per_minute = 2\n")
            f.write(file_entry("alice", self.alice, ["gpt-4o-mini"]))
        self.proxy_args = ("--client-keys-file", self.keys_file)
        super().setUp()

    def test_keys_file_clients_with_the_sdk(self) -> None:
        """
        A client from the keys file is served with its key; its allow-list
        gives the SDK a PermissionDeniedError, its limit a RateLimitError
        with retry-after; the access log names the client and never shows
        the key.
        """
        client = self.client(api_key=self.alice)
        self.assertEqual([m.id for m in client.models.list()], ["gpt-4o-mini"])
        with self.assertRaises(openai.NotFoundError):
            client.models.retrieve("o3")
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        with self.assertRaises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(denied.exception.param, "model")
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with self.assertRaises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        self.assertEqual(limited.exception.response.headers["x-ratelimit-limit-requests"], "2")
        self.assertIn("retry-after", limited.exception.response.headers)
        with self.assertRaises(openai.AuthenticationError) as refused:
            self.client(api_key="sk-proj-" + "x" * 58 + "T3Blbk" + "FJ" + "y" * 58).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
        self.assertEqual(refused.exception.code, "openai_key_not_accepted")
        self.assertEqual([r["method"] for r in self.upstream_requests()], ["GET", "POST", "POST"])
        self.proxy.stop()
        self.assertIn("alice POST /v1/chat/completions 200", self.proxy.output)
        self.assertNotIn(self.alice, self.proxy.output)


class ObservabilityTests(E2ETestCase):
    proxy_args = ("--log-format", "json", "--sse-keepalive", "0.5")

    def test_json_log_metrics_and_keepalive(self) -> None:
        """
        With --log-format json the daemon writes one JSON object per request
        (no key in it); /metrics answers a client key; a stream that pauses
        upstream gets keepalive comments, which the SDK parses through.
        """
        client = self.client()
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        request_id = raw.headers["x-oaiproxy-request-id"]

        stream = client.chat.completions.create(model="fake-pause", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        self.assertEqual(text, REPLY)
        request = urllib.request.Request(
            self.base + "/v1/chat/completions",
            data=json.dumps({"model": "fake-pause", "stream": True, "messages": MESSAGES}).encode(),
            headers={"Authorization": "Bearer " + CLIENT_KEY, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=20) as response:
            self.assertIn(b"\n\n: keepalive\n\n", response.read())

        request = urllib.request.Request(self.base + "/metrics", headers={"Authorization": "Bearer " + CLIENT_KEY})
        with urllib.request.urlopen(request, timeout=20) as response:
            metrics = response.read().decode()
        self.assertIn('oaiproxy_requests_total{client="env-1",model="gpt-4o",route="chat_completions"', metrics)
        status, _, _ = http("GET", self.base + "/metrics")
        self.assertEqual(status, 401)

        self.proxy.stop()
        # Access entries, among the daemon's other lines (JSON too).
        entries = [e for e in map(json.loads, self.proxy.output.splitlines()) if "request_id" in e]
        first = next(e for e in entries if e["request_id"] == request_id)
        self.assertEqual((first["client"], first["model"], first["status"]), ("env-1", "gpt-4o", 200))
        self.assertEqual((first["prompt_tokens"], first["completion_tokens"]), (2, 8))
        # Both fake-pause streams (the SDK's and the keepalive one), each
        # with its exact usage: all() of no entry at all would pass.
        streamed = [(e["stream"], e["usage_exact"]) for e in entries if e["model"] == "fake-pause"]
        self.assertEqual(streamed, [(True, True), (True, True)])
        self.assertNotIn(UPSTREAM_KEY, self.proxy.output)
        self.assertNotIn(CLIENT_KEY, self.proxy.output)
