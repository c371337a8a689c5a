"""
Routes whose admission is still pending: a limit store a round trip away
(Redis) answers after the request is in, and what a client would notice
then.  The store here answers when the test fires its Deferred; the
requests are real HTTP framing on a L{ProxySite} fed raw bytes.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.access.clients import Client, Credentials, Limits
from oaiproxy.access.limits import Held, LocalLimitStore, Refusal
from oaiproxy.config import Secret
from oaiproxy.drain import Lifecycle
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, chat_body, registry
from oaiproxy.routes.jsonapi import api_resources, streamed_paths
from oaiproxy.routetable import BY_NAME
from oaiproxy.server.site import ProxySite
from oaiproxy.server.tree import build_tree
from oaiproxy.upstream.bodies import HOLD_BYTES
from oaiproxy.upstream.client import UpstreamClient
from tests.routes.test_uploads import AUDIO, _Consumer, _Response, _Upstream
from tests.support import form

RATE_HEADERS = (
    (b"x-ratelimit-limit-requests", b"10"),
    (b"x-ratelimit-remaining-requests", b"0"),
    (b"x-ratelimit-reset-requests", b"6s"),
)


class HandStore:
    """
    A L{oaiproxy.access.limits.LimitStore} that answers when the test says.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[Client, int, Deferred[Any]]] = []

    def admit(self, client: Client, estimate: int) -> "Deferred[Held | Refusal]":
        d: Deferred[Held | Refusal] = Deferred()
        self.asked.append((client, estimate, d))
        return d

    def answer(self, result: "Held | Refusal") -> None:
        [(_, _, d)] = self.asked
        d.callback(result)


class Hold:
    """
    A hold that remembers how it was settled.
    """

    def __init__(self, estimate: int = 0) -> None:
        self.estimate = estimate
        self.settled: list[int] = []

    def settle(self, used_tokens: int) -> None:
        self.settled.append(used_tokens)


def refusal() -> Refusal:
    return Refusal("requests", "Rate limit reached for client 'client-1': 10 requests per minute.", 5.2, RATE_HEADERS)


class PendingAdmissionCase(SynchronousTestCase):
    routes = ["chat/completions", "responses", "audio/transcriptions"]
    upstream_http = _Upstream

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = self.upstream_http()
        self.store = HandStore()
        self.lifecycle = Lifecycle()
        credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))
        upstream = UpstreamClient(self.http, "http://upstream.test/v1", credentials, self.clock, 30.0)
        routes = [BY_NAME[name] for name in self.routes]
        api = api_resources(routes, upstream, self.clock, credentials, self.lifecycle, store=self.store)
        self.site = ProxySite(
            build_tree(api),
            max_body_bytes=2 * len(AUDIO),
            idle_timeout=600,
            body_timeout=3600,
            streamed_paths=streamed_paths(routes),
            lifecycle=self.lifecycle,
            access_log=lambda record: None,
            reactor=self.clock,
        )
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        self.channel.makeConnection(self.transport)

    def send(self, method: bytes, path: bytes, body: bytes = b"", content_type: bytes = b"application/json") -> None:
        self.channel.dataReceived(
            method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + CLIENT_KEY + b"\r\n"
            b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % (len(body),) + body
        )

    def respond(self) -> None:
        [(_, _, _, d)] = self.http.requests
        d.callback(_Response(200, Headers({b"content-type": [b"application/json"]}), b'{"ok": true}'))

    def status(self) -> Optional[bytes]:
        wire = self.transport.value()
        return wire.split(b" ", 2)[1] if wire else None

    def client_leaves(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))

    def assert_grant_given_back(self) -> None:
        """
        The store now admits the request: its hold is settled with 0 at
        once, and nothing goes upstream.
        """
        hold = Hold(100)
        self.store.answer(hold)
        self.assertEqual(hold.settled, [0])
        self.assertEqual(self.http.requests, [])


class ChatTests(PendingAdmissionCase):
    def test_waits_for_admission_then_forwards(self) -> None:
        """
        Nothing goes upstream, and the client hears nothing, until the
        store admits the request; then it is forwarded, and its hold is
        settled when the answer is over.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        self.assertEqual(len(self.store.asked), 1)
        self.assertEqual(self.http.requests, [])
        self.assertEqual(self.transport.value(), b"")
        hold = Hold(100)
        self.store.answer(hold)
        [(method, url, body, _)] = self.http.requests
        self.assertEqual((method, url), ("POST", "http://upstream.test/v1/chat/completions"))
        self.assertEqual(hold.settled, [])
        self.respond()
        self.assertEqual(self.status(), b"200")
        self.assertEqual(len(hold.settled), 1)

    def test_refusal_is_a_429_with_the_rate_headers(self) -> None:
        """
        A refusal answered late is the same 429 as one answered at once:
        the OpenAI error, C{retry-after}, and the store's C{x-ratelimit-*}
        headers; nothing goes upstream.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        self.store.answer(refusal())
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 "), head)
        lines = head.lower().split(b"\r\n")
        for name, value in RATE_HEADERS:
            self.assertIn(name + b": " + value, lines)
        self.assertIn(b"retry-after: 6", lines)
        self.assertEqual(json.loads(body)["error"]["code"], "rate_limit_exceeded")
        self.assertEqual(self.http.requests, [])
        self.assertFalse(self.transport.disconnecting)

    def test_client_gone_while_pending_frees_the_hold(self) -> None:
        """
        A client that disconnects while its admission is pending costs
        nothing: the hold the store then grants is settled with 0 at once
        (its concurrency slot is free again), and nothing goes upstream.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        self.client_leaves()
        self.assert_grant_given_back()

    def test_client_gone_then_refused(self) -> None:
        """
        A refusal for a client that left is written nowhere.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        self.client_leaves()
        self.store.answer(refusal())
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.http.requests, [])

    def test_drain_waits_for_a_pending_admission(self) -> None:
        """
        A request whose admission is pending when the drain begins was
        already in flight: it is forwarded once admitted and answered, and
        the drain ends after it.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        drained = self.lifecycle.drain(self.clock, 30)
        self.store.answer(Hold())
        self.assertEqual(len(self.http.requests), 1)
        self.assertNoResult(drained)
        self.respond()
        self.assertEqual(self.status(), b"200")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(drained)

    def test_drain_deadline_while_pending(self) -> None:
        """
        An admission still pending at the drain's deadline is cut off with
        the rest; when the store answers, the hold is given back and
        nothing goes upstream.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        self.lifecycle.drain(self.clock, 30)
        self.clock.advance(30)
        self.assertTrue(self.transport.disconnecting)
        self.client_leaves()
        self.assert_grant_given_back()

    def test_stored_response_waits_for_admission(self) -> None:
        """
        Reading a stored response passes the limits too, and goes upstream
        only once admitted.
        """
        self.send(b"GET", b"/v1/responses/resp_123")
        self.assertEqual(self.http.requests, [])
        self.store.answer(Hold())
        [(method, url, _, _)] = self.http.requests
        self.assertEqual((method, url), ("GET", "http://upstream.test/v1/responses/resp_123"))


class UploadTests(PendingAdmissionCase):
    """
    An upload's body arrives while its admission is pending.
    """

    def setUp(self) -> None:
        super().setUp()
        self.body, self.content_type = form([("model", "whisper-1"), ("file", AUDIO)])

    def head(self) -> bytes:
        return (
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + CLIENT_KEY + b"\r\n"
            b"Content-Type: " + self.content_type + b"\r\nContent-Length: %d\r\n\r\n" % (len(self.body),)
        )

    def test_nothing_upstream_before_admission(self) -> None:
        """
        While admission is pending nothing goes upstream; what arrives is
        held (past the in-memory bound too, without stalling the client);
        once admitted, upstream gets the whole body, in order.
        """
        sent = 2 * HOLD_BYTES
        self.channel.dataReceived(self.head() + self.body[:sent])
        self.assertEqual(len(self.store.asked), 1)
        self.assertEqual(self.http.requests, [])
        self.assertEqual(self.transport.producerState, "producing")
        self.store.answer(Hold())
        [(_, url, producer, _)] = self.http.requests
        self.assertEqual(url, "http://upstream.test/v1/audio/transcriptions")
        consumer = _Consumer()
        done = producer.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), self.body[:sent])
        self.channel.dataReceived(self.body[sent:])
        self.assertEqual(b"".join(consumer.data), self.body)
        self.successResultOf(done)

    def test_complete_body_waits_for_admission(self) -> None:
        """
        A body that is complete before admission answers is not answered
        in its place ("missing model" or otherwise): it goes upstream once
        admitted.
        """
        self.channel.dataReceived(self.head() + self.body)
        self.assertEqual(self.transport.value(), b"")
        self.store.answer(Hold())
        [(_, _, producer, _)] = self.http.requests
        consumer = _Consumer()
        self.successResultOf(producer.startProducing(consumer))
        self.assertEqual(b"".join(consumer.data), self.body)

    def test_refused_upload(self) -> None:
        """
        A refusal answered while the body arrives is the 429, and nothing
        of the body goes upstream.
        """
        self.channel.dataReceived(self.head() + self.body[:100_000])
        self.store.answer(refusal())
        self.assertEqual(self.status(), b"429")
        self.assertIn(b"x-ratelimit-remaining-requests: 0", self.transport.value().lower())
        self.assertEqual(self.http.requests, [])

    def test_client_gone_while_pending(self) -> None:
        """
        An uploader that leaves while admission is pending frees its hold
        at once when the store answers, and nothing goes upstream.
        """
        self.channel.dataReceived(self.head() + self.body[:100_000])
        self.client_leaves()
        self.assert_grant_given_back()

    def test_body_refused_while_pending(self) -> None:
        """
        A form that turns suspect while admission is pending (a second
        C{model} field) is answered 400 at once; the hold granted later is
        given back.
        """
        body, content_type = form([("model", "whisper-1"), ("model", "gpt-4o"), ("file", AUDIO)])
        self.content_type, self.body = content_type, body
        first = body.index(b"whisper-1") + 20
        self.channel.dataReceived(self.head() + body[:first])
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(body[first:200_000])
        self.assertEqual(self.status(), b"400")
        self.assert_grant_given_back()

    def test_body_too_large_while_pending(self) -> None:
        """
        An upload that grows past the body limit while admission is
        pending is answered 413 at once, not after the store answers; the
        hold granted later is given back.
        """
        self.channel.dataReceived(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + CLIENT_KEY + b"\r\n"
            b"Content-Type: " + self.content_type + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = self.body[:500_000]
        for _ in range(5):
            self.channel.dataReceived(b"%x\r\n" % (len(chunk),) + chunk + b"\r\n")
        self.assertEqual(self.status(), b"413")
        self.assert_grant_given_back()


class _Broken(_Upstream):
    """
    A treq-like client with a bug.
    """

    def request(self, method: str, url: str, data: Any = None, **kwargs: Any) -> "Deferred[Any]":
        raise RuntimeError("a bug")


class BugTests(PendingAdmissionCase):
    routes = ["chat/completions"]
    upstream_http = _Broken

    def test_bug_going_upstream_after_a_late_admission(self) -> None:
        """
        A bug going upstream once a late admission answers is logged and
        answered 500 (not left hanging), and the hold is given back.
        """
        self.send(b"POST", b"/v1/chat/completions", chat_body())
        hold = Hold()
        self.store.answer(hold)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.status(), b"500")
        self.assertIn(b"internal_error", self.transport.value())
        # (Only the first settlement counts; the exchange settles again.)
        self.assertEqual(hold.settled[0], 0)


class WiringTests(SynchronousTestCase):
    def test_build_site_admits_through_the_limiter(self) -> None:
        """
        The site's store (C{Built.limit_store}) is the in-process one over
        C{Built.limiter}: what the routes admit counts there, and a client
        over its limit is refused at once.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(requests_per_minute=1)))
        store = h.built.limit_store
        assert isinstance(store, LocalLimitStore)
        self.assertIs(store.limiter, h.limiter)
        bearer = {b"authorization": [b"Bearer " + CLIENT_KEY]}
        self.assertEqual(self.successResultOf(h.post(chat_body(), headers=bearer)).code, 200)
        [client] = h.credentials.clients
        self.assertEqual(dict(h.limiter.headers(client))[b"x-ratelimit-remaining-requests"], b"0")
        self.assertEqual(self.successResultOf(h.post(chat_body(), headers=bearer)).code, 429)
