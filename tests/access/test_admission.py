"""
What a client must pass before the proxy holds anything for it, on an
upload route (whose body goes upstream as it arrives): the key checked on
the headers, a chunk size checked as it is declared, and a body deadline;
and the process's room for connections (its open-file limit).  Then
L{Admission.answer}: the allow-list at once, the limits as their store
answers.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestGenerationFailed
from twisted.web.http import HTTPChannel, Request

from oaiproxy.access.admission import Admission, admission_gate, authenticate
from oaiproxy.access.clients import Credentials, Limits
from oaiproxy.access.limits import Limiter, LocalLimitStore, Reservation
from oaiproxy.config import Secret
from oaiproxy.daemon.tap import Options
from oaiproxy.errors import ApiError
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, registry
from oaiproxy.routes.jsonapi import api_resources, streamed_paths
from oaiproxy.routetable import BY_NAME
from oaiproxy.server import site as site_module
from oaiproxy.server.site import _FD_RESERVE, STREAMS_WANTED, ProxySite, check_open_files
from oaiproxy.server.tree import build_tree
from oaiproxy.upstream.client import UpstreamClient
from tests.e2e.test_systemd import unit_settings
from tests.routes.test_pending_admission import RATE_HEADERS, HandStore, refusal
from tests.routes.test_uploads import AUDIO, ROUTES, _Consumer, _Upstream
from tests.support import form
from tests.upstream.test_headers import REAL_KEY

UNIT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "systemd", "oaiproxy.service"
)


class UploadAdmissionTests(SynchronousTestCase):
    """
    On an upload route, fed raw bytes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = _Upstream()
        credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))
        self.upstream = UpstreamClient(self.http, "http://upstream.test/v1", credentials, self.clock, 3600.0)
        routes = [BY_NAME[name] for name in ROUTES]
        self.site = ProxySite(
            build_tree(api_resources(routes, self.upstream, self.clock, credentials)),
            max_body_bytes=2 * len(AUDIO),
            idle_timeout=3600,
            body_timeout=60,
            gate=admission_gate(credentials),
            streamed_paths=streamed_paths(routes),
            access_log=lambda record: None,
            reactor=self.clock,
        )
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "10.1.1.1", 5000))
        self.channel.makeConnection(self.transport)
        self.body, self.content_type = form([("model", "whisper-1"), ("file", AUDIO)])

    def head(self, length: Optional[int], key: bytes = CLIENT_KEY) -> bytes:
        framing = b"Content-Length: %d" % (length,) if length is not None else b"Transfer-Encoding: chunked"
        return (
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer " + key + b"\r\n"
            b"Content-Type: " + self.content_type + b"\r\n" + framing + b"\r\n\r\n"
        )

    def test_wrong_key_refused_on_the_headers(self) -> None:
        """
        An upload with a wrong key is answered by the site itself, before
        any upstream request and without holding a byte of the file.
        """
        self.channel.dataReceived(self.head(len(self.body), key=b"oai-wrong") + self.body[:500_000])
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.http.requests, [])
        [request] = self.channel.requests
        self.assertIsNone(request.body_pipe)
        self.assertEqual(request.body_held, 0)

    def test_slow_upload_gets_a_408_and_closes(self) -> None:
        """
        An upload already on its way upstream that stops arriving fails its
        upstream request and is answered 408; the connection closes at once.
        """
        self.channel.dataReceived(self.head(len(self.body)) + self.body[:1000])
        producer = self.http.requests[0][2]
        done = producer.startProducing(_Consumer())
        self.clock.advance(59)
        self.assertNoResult(done)
        self.clock.advance(1.1)
        failure = self.failureResultOf(done)
        self.http.requests[0][3].errback(RequestGenerationFailed([failure]))
        self.assertIn(b"HTTP/1.1 408 ", self.transport.value())
        self.assertIn(b"request_timeout", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_held_upload_is_not_timed_out(self) -> None:
        """
        An upload the proxy holds back (its upstream is behind) is not cut
        off by the body timeout while held.
        """
        self.channel.dataReceived(self.head(len(self.body)))
        producer = self.http.requests[0][2]
        producer.startProducing(_Consumer())
        producer.pauseProducing()
        self.channel.dataReceived(self.body[:600_000])
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(3000)
        self.assertNotIn(b"HTTP/1.1 408", self.transport.value())
        producer.resumeProducing()
        self.channel.dataReceived(self.body[600_000:])
        self.assertNotIn(b"HTTP/1.1 408", self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def test_oversized_chunk_declared_fails_the_upload_at_once(self) -> None:
        """
        A chunk the limit has no room for fails the upload as soon as its
        size line is in: nothing of it goes upstream.
        """
        self.channel.dataReceived(self.head(None))
        producer = self.http.requests[0][2]
        consumer = _Consumer()
        done = producer.startProducing(consumer)
        self.channel.dataReceived(b"%x\r\n" % (2 * len(AUDIO) + 1,) + b"x" * 1000)
        failure = self.failureResultOf(done)
        self.assertEqual(consumer.data, [])
        self.http.requests[0][3].errback(RequestGenerationFailed([failure]))
        self.assertIn(b"HTTP/1.1 413 ", self.transport.value())


class AuthenticateTwiceTests(SynchronousTestCase):
    """
    The site's gate and the route both ask L{authenticate} about a request;
    the second answer is the first's unless something changed meanwhile.
    """

    def setUp(self) -> None:
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.request = Request(channel)
        self.request.uri = b"/v1/chat/completions"
        self.request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + CLIENT_KEY])
        self.credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))

    def test_reload_between_the_two_is_seen(self) -> None:
        """
        A client key removed by a reload after the gate let its request in
        is refused by the route.
        """
        client = authenticate(self.request, self.credentials)
        self.assertEqual(getattr(client, "name", None), "client-1")
        self.credentials.replace(Secret(UPSTREAM_KEY), registry(b"another-key"))
        refused = authenticate(self.request, self.credentials)
        self.assertIsInstance(refused, ApiError)
        self.assertEqual(getattr(refused, "code", None), "invalid_api_key")

    def test_key_in_the_url_after_the_gate_is_refused(self) -> None:
        """
        The gate may see the headers before the URL is known: a real
        OpenAI key in the URL is refused the second time.
        """
        self.request.uri = b""
        self.assertNotIsInstance(authenticate(self.request, self.credentials), ApiError)
        self.request.uri = b"/v1/chat/completions?api_key=" + REAL_KEY
        refused = authenticate(self.request, self.credentials)
        self.assertIsInstance(refused, ApiError)
        self.assertEqual(getattr(refused, "code", None), "openai_key_not_accepted")


class ReserveTests(SynchronousTestCase):
    """
    L{Admission.answer} on a request whose client is known.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        # (reserve only sets the error on it.)
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.request = Request(channel)
        [self.client] = registry(CLIENT_KEY, limits=Limits(requests_per_minute=1), models=["gpt-4o"])
        self.store = HandStore()
        self.credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))
        self.admission = Admission(self.credentials, self.clock, None, self.store)

    def test_allow_list_is_checked_before_the_store(self) -> None:
        """
        A model outside the client's allow-list is refused at once, and
        the store is not asked (nothing is taken from the limits).
        """
        body = self.successResultOf(maybeDeferred(self.admission.answer, self.request, self.client, "o3", 10))
        self.assertEqual(self.request.code, 403)
        self.assertIn(b"model_not_allowed", body)
        self.assertEqual(self.store.asked, [])

    def test_store_is_asked_for_the_estimate(self) -> None:
        d = maybeDeferred(self.admission.answer, self.request, self.client, "gpt-4o", 1234)
        [(client, estimate, _)] = self.store.asked
        self.assertEqual((client.name, estimate), ("client-1", 1234))
        self.assertNoResult(d)
        hold = Reservation(None, 1234)
        self.store.answer(hold)
        self.assertIs(self.successResultOf(d), hold)

    def test_refusal_carries_the_store_headers(self) -> None:
        """
        A refusal is the 429 with the rate headers the store answered with
        (a shared store's, from the same round trip), and its retry time.
        """
        d = maybeDeferred(self.admission.answer, self.request, self.client, "gpt-4o", 10)
        self.store.answer(refusal())
        body = self.successResultOf(d)
        self.assertEqual(self.request.code, 429)
        self.assertIn(b"rate_limit_exceeded", body)
        for name, value in RATE_HEADERS:
            self.assertEqual(self.request.responseHeaders.getRawHeaders(name), [value])
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"retry-after"), [b"6"])

    def test_default_store_answers_at_once(self) -> None:
        """
        Without a store, the limits are a fresh in-process limiter, and
        its answers are there when C{reserve} returns: the client's one
        request per minute is admitted, the next one refused with the
        limiter's headers.
        """
        admission = Admission(self.credentials, self.clock)
        held = self.successResultOf(maybeDeferred(admission.answer, self.request, self.client, "gpt-4o", 10))
        self.assertIsInstance(held, Reservation)
        refused = self.successResultOf(maybeDeferred(admission.answer, self.request, self.client, "gpt-4o", 10))
        self.assertIsInstance(refused, bytes)
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"])

    def test_local_store_headers_are_the_limiters(self) -> None:
        """
        The in-process store's refusal carries the limiter's own headers,
        as before the store existed.
        """
        limiter = Limiter(self.clock)
        admission = Admission(self.credentials, self.clock, None, LocalLimitStore(limiter))
        self.successResultOf(maybeDeferred(admission.answer, self.request, self.client, "gpt-4o", 10))
        self.clock.advance(30)
        self.successResultOf(maybeDeferred(admission.answer, self.request, self.client, "gpt-4o", 10))
        expected = dict(limiter.headers(self.client))
        headers = self.request.responseHeaders
        self.assertEqual({n: headers.getRawHeaders(n)[0] for n in expected}, expected)
        self.assertIn(b"x-ratelimit-reset-requests", expected)


class _Limits:
    """
    A stand-in for the C{resource} module.
    """

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: list[Any] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append(limits)
        self.soft, self.hard = limits


class OpenFilesTests(SynchronousTestCase):
    def check(self, limits: _Limits, per_address: int = 4096) -> tuple[int, list[str]]:
        with capturedLogs() as events:
            streams = check_open_files(per_address, limits)
        return streams, [formatEvent(e) for e in events]

    def test_soft_limit_raised_to_the_hard_limit(self) -> None:
        """
        The usual soft limit (1,024, about 480 streams) is raised to the
        hard limit, and that is logged; then there is nothing to warn of.
        """
        limits = _Limits(1024, 524288)
        streams, lines = self.check(limits)
        self.assertEqual(limits.set, [(524288, 524288)])
        self.assertEqual(streams, (524288 - _FD_RESERVE) // 2)
        self.assertEqual(lines, ["raised the open-file limit from 1024 to 524288"])

    def test_too_few_files_is_warned_about(self) -> None:
        """
        A hard limit too low for 2,000 streams, or a refusal to raise the
        soft one, is warned about, naming what to change.
        """
        for limits in (_Limits(1024, 1024), _Limits(1024, 65536, refuse=True)):
            streams, lines = self.check(limits)
            self.assertLess(streams, STREAMS_WANTED)
            self.assertIn("LimitNOFILE=", lines[-1])
        self.assertIn("could not raise", lines[0])

    def test_small_per_address_cap_is_warned_about(self) -> None:
        _, lines = self.check(_Limits(65536, 65536), per_address=1024)
        self.assertEqual(len(lines), 1)
        self.assertIn("--max-connections-per-ip", lines[0])

    def test_infinite_hard_limit(self) -> None:
        limits = _Limits(1024, _Limits.RLIM_INFINITY)
        streams, _ = self.check(limits)
        self.assertEqual(limits.set, [(1 << 20, _Limits.RLIM_INFINITY)])
        self.assertGreater(streams, STREAMS_WANTED)

    def test_checked_once_when_listening_starts(self) -> None:
        """
        The site checks when its first listener starts, once per process.
        """
        calls: list[int] = []
        self.patch(site_module, "check_open_files", calls.append)
        self.patch(site_module, "_open_files_checked", False)
        site = ProxySite(build_tree({}), max_body_bytes=10, idle_timeout=1, reactor=Clock())
        site.doStart()
        site.doStop()
        ProxySite(build_tree({}), max_body_bytes=10, idle_timeout=1, reactor=Clock()).doStart()
        self.assertEqual(calls, [256 * 16])

    def test_unit_file_has_room_for_the_streams(self) -> None:
        """
        The systemd unit sets LimitNOFILE= high enough for 2,000 streams
        (systemd's default soft limit is 1,024).
        """
        [value] = unit_settings(UNIT)["LimitNOFILE"]
        self.assertGreaterEqual(int(value.split(":")[0]), 2 * STREAMS_WANTED + _FD_RESERVE)


class SettingTests(SynchronousTestCase):
    def test_body_timeout_option_and_environment(self) -> None:
        """
        --body-timeout wins over OAIPROXY_BODY_TIMEOUT, which wins over the
        default of 60 seconds; it must be a positive number.
        """
        environ = {"OPENAI_API_KEY": "sk-test"}

        def parsed(argv: list[str], **more: str) -> float:
            options = Options(environ={**environ, **more})
            options.parseOptions(argv)
            return options.config.body_timeout

        self.assertEqual(parsed([]), 60.0)
        self.assertEqual(parsed([], OAIPROXY_BODY_TIMEOUT="300"), 300.0)
        self.assertEqual(parsed(["--body-timeout", "5"], OAIPROXY_BODY_TIMEOUT="300"), 5.0)
        with self.assertRaises(SystemExit):
            parsed(["--body-timeout", "0"])
