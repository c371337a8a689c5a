"""
Audio uploads (C{audio/transcriptions}, C{audio/translations}): forwarded
whole, checked against allow-lists, and streamed upstream as they arrive
rather than read whole first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestGenerationFailed, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from oaiproxy.access.clients import ClientRegistry, Credentials
from oaiproxy.config import Secret
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, registry
from oaiproxy.observe.records import RequestRecord
from oaiproxy.routes.jsonapi import api_resources, streamed_paths
from oaiproxy.routetable import BY_NAME
from oaiproxy.server.site import LINGER_SECONDS, ProxySite
from oaiproxy.server.tree import build_tree
from oaiproxy.upstream.client import UpstreamClient
from tests.support import exchange, form

ROUTES = ["audio/transcriptions", "audio/translations"]
AUDIO = bytes(range(256)) * 4096  # 1 MiB, larger than any read buffer


def upload(case: SynchronousTestCase, h: Harness, fields: Any, path: str = "/v1/audio/transcriptions") -> Any:
    body, content_type = form(fields)
    headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
    return exchange(case, h, "POST", path, body, headers)


class UploadTests(SynchronousTestCase):
    def test_forwarded_whole(self) -> None:
        """
        A 1 MiB upload arrives upstream byte for byte, on both routes, and
        the usage its answer reports is recorded.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ROUTES)
        digest = hashlib.sha256(AUDIO).hexdigest()
        for path in ("/v1/audio/transcriptions", "/audio/translations"):
            response, body = upload(self, h, [("model", "whisper-1"), ("file", AUDIO)], path)
            self.assertEqual(response.code, 200, body)
            self.assertEqual(json.loads(body)["text"], f"received {len(AUDIO)} bytes sha256 {digest} for whisper-1")
        record = h.records[-1]
        self.assertEqual((record.route, record.model), ("audio_translations", "whisper-1"))
        assert record.usage is not None
        self.assertTrue(record.usage.exact)

    def test_allow_list(self) -> None:
        """
        A client with an allow-list may upload only for its models,
        whether the model comes before or after the file; an upload
        naming no model is refused; nothing refused goes upstream.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["gpt-4o-transcribe"]), routes=ROUTES)
        response, body = upload(self, h, [("model", "whisper-1"), ("file", AUDIO)])
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (403, "model_not_allowed"))
        response, body = upload(self, h, [("file", AUDIO), ("language", "en")])
        self.assertEqual((response.code, json.loads(body)["error"]["param"]), (400, "model"))
        self.assertEqual(h.fake.requests, [])
        for fields in (
            [("model", "gpt-4o-transcribe"), ("file", AUDIO)],
            [("file", AUDIO), ("model", "gpt-4o-transcribe")],
        ):
            response, body = upload(self, h, fields)
            self.assertEqual(response.code, 200, body)
            self.assertIn(f"received {len(AUDIO)} bytes", json.loads(body)["text"])
        self.assertEqual(len(h.fake.requests), 2)

    def test_repeated_model_is_refused(self) -> None:
        """
        A second model field (upstream may read the last, the proxy checked
        the first) is refused, before or after the file: the upload, on its
        way upstream since the first model field, is stopped before its end
        goes upstream, so upstream never has a complete request.  A content
        type with two boundaries is refused too.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["whisper-1"]), routes=ROUTES)
        for fields in (
            [("model", "whisper-1"), ("model", "gpt-4o-transcribe"), ("file", AUDIO)],
            [("model", "whisper-1"), ("file", AUDIO), ("model", "gpt-4o-transcribe")],
        ):
            response, body = upload(self, h, fields)
            error = json.loads(body)["error"]
            self.assertEqual((response.code, error["param"], error["code"]), (400, "model", "invalid_value"))
        self.assertEqual(h.fake.requests, [])
        body, content_type = form([("model", "whisper-1"), ("file", AUDIO)])
        headers = {
            b"authorization": [b"Bearer " + CLIENT_KEY],
            b"content-type": [content_type + b"; boundary=other"],
        }
        response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", body, headers)
        self.assertEqual((response.code, json.loads(answer)["error"]["code"]), (400, "invalid_content_type"))

    def test_unreadable_last_part_is_refused(self) -> None:
        """
        A part whose name the proxy cannot read (unquoted, or RFC 2231
        encoded: a lenient upstream may read "model" there) makes an
        allow-listed upload a 400, even as the form's last part, before
        the body's end goes upstream.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["whisper-1"]), routes=ROUTES)
        body, content_type = form([("model", "whisper-1"), ("file", AUDIO)])
        for odd in (b"name=model", b"name*=UTF-8''model"):
            sneaky = body[: -len(b"--oaiproxy-test-boundary--\r\n")] + (
                b"--oaiproxy-test-boundary\r\nContent-Disposition: form-data; " + odd + b"\r\n\r\n"
                b"gpt-4o-transcribe\r\n--oaiproxy-test-boundary--\r\n"
            )
            headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
            response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", sneaky, headers)
            self.assertEqual((response.code, json.loads(answer)["error"]["param"]), (400, "model"), odd)
        self.assertEqual(h.fake.requests, [])

    def sneaky(self, disposition: bytes, value: bytes = b"gpt-4o-transcribe", head: bytes = b"") -> tuple[bytes, bytes]:
        """
        A form with a checked model (C{whisper-1}) and the audio, plus a
        part with C{disposition} (and more C{head} lines) holding C{value}.
        """
        body, content_type = form([("model", "whisper-1"), ("file", AUDIO)])
        extra = b"--oaiproxy-test-boundary\r\nContent-Disposition:" + disposition + head + b"\r\n\r\n" + value + b"\r\n"
        return body[: -len(b"--oaiproxy-test-boundary--\r\n")] + extra + b"--oaiproxy-test-boundary--\r\n", content_type

    def test_ambiguous_part_is_refused(self) -> None:
        """
        A part whose name parsers read differently is a 400, with or
        without an allow-list, before the body's end goes upstream: a
        repeated parameter (C{name="x"; name="model"} is C{model} to a
        last-match parser, C{x} to a first-match one), a C{name*} that
        differs from C{name} or stands alone, parameters without their
        semicolon, a name with a backslash escape, a disposition folded
        over two lines, or a malformed one.
        """
        for h in (
            Harness(clients=registry(CLIENT_KEY, models=["whisper-1"]), routes=ROUTES),
            Harness(client_keys=[CLIENT_KEY], routes=ROUTES),
        ):
            for disposition, head in [
                (b' form-data; name="language"; name="model"', b""),
                (b' form-data; name="model"; name="language"', b""),
                (b' form-data; NAME="language"; name="model"', b""),
                (b' form-data; name="language"; filename="a"; filename="b"', b""),
                (b" form-data; name=\"language\"; name*=UTF-8''model", b""),
                (b" form-data; name*=UTF-8''model", b""),
                (b' form-data; name="language" name="model"', b""),
                (b' form-data; name="mod\\el"', b""),
                (b" form-data;", b'\r\n name="model"'),
                (b' form-data; name="model', b""),
                (b' form-data; name="language"; junk', b""),
            ]:
                body, content_type = self.sneaky(disposition, head=head)
                headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
                response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", body, headers)
                error = json.loads(answer)["error"]
                self.assertEqual((response.code, error["param"]), (400, "model"), disposition + head)
            self.assertEqual(h.fake.requests, [])

    def test_model_part_with_a_filename_is_refused(self) -> None:
        """
        A C{model} part with a filename (the proxy would skip it as a file,
        a parser going by the name would read it as the model) is a 400,
        whether the filename is plain or RFC 5987 encoded.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["whisper-1"]), routes=ROUTES)
        for disposition in (
            b' form-data; name="model"; filename="model.txt"',
            b" form-data; name=\"model\"; filename*=UTF-8''model.txt",
        ):
            body, content_type = self.sneaky(disposition)
            headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
            response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", body, headers)
            self.assertEqual((response.code, json.loads(answer)["error"]["param"]), (400, "model"), disposition)
        self.assertEqual(h.fake.requests, [])

    def test_unusual_but_clear_forms_pass(self) -> None:
        """
        Forms that every parser reads the same way go upstream: a token
        name (C{name=model}), upper-case parameter names, spaces around the
        parts, a C{name*} that says what C{name} says, and a file name with
        Go's backslash escapes.  (The fake upstream's own parser takes only
        quoted names: what counts is that the proxy let them through.)
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["whisper-1"]), routes=ROUTES)
        for sent, (model_disposition, file_disposition) in enumerate(
            [
                (b" form-data; name=model", b' form-data; name="file"; filename="a.wav"'),
                (b' form-data ; NAME = "model" ;', b' form-data; Name="file"; FileName="a.wav"'),
                (
                    b" form-data; name=\"model\"; name*=UTF-8''model",
                    b' form-data; name="file"; filename="a \\"b\\".wav"',
                ),
            ],
            1,
        ):
            body = (
                b"--oaiproxy-test-boundary\r\nContent-Disposition:" + model_disposition + b"\r\n\r\nwhisper-1\r\n"
                b"--oaiproxy-test-boundary\r\nContent-Disposition:" + file_disposition + b"\r\n"
                b"Content-Type: audio/wav\r\n\r\n" + AUDIO + b"\r\n--oaiproxy-test-boundary--\r\n"
            )
            headers = {
                b"authorization": [b"Bearer " + CLIENT_KEY],
                b"content-type": [b"multipart/form-data; boundary=oaiproxy-test-boundary"],
            }
            exchange(self, h, "POST", "/v1/audio/transcriptions", body, headers)
            self.assertEqual(len(h.fake.requests), sent, model_disposition)
            self.assertEqual(h.fake.requests[-1].body, body)

    def test_not_multipart(self) -> None:
        """
        A JSON body on an upload route is a clear 400.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ROUTES)
        headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [b"application/json"]}
        response, body = exchange(self, h, "POST", "/v1/audio/transcriptions", b"{}", headers)
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (400, "invalid_content_type"))


class _Upstream:
    """
    A treq-like client that keeps each request for the test to answer.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any, Deferred[Any]]] = []

    def request(self, method: str, url: str, data: Any = None, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.requests.append((method, url, data, d))
        return d


class _Response:
    """
    Just enough of an IResponse for the relay.
    """

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code, self.phrase, self.headers, self.length = code, b"OK", headers, len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class StreamingTests(SynchronousTestCase):
    """
    On real HTTP framing (a L{ProxySite} fed raw bytes), an upload's body
    goes upstream while the client is still sending it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = _Upstream()
        self.credentials = Credentials(Secret(UPSTREAM_KEY), registry(CLIENT_KEY))
        self.upstream = UpstreamClient(self.http, "http://upstream.test/v1", self.credentials, self.clock, 30.0)
        routes = [BY_NAME[name] for name in ROUTES]
        api = api_resources(routes, self.upstream, self.clock, self.credentials)
        self.records: list[RequestRecord] = []
        self.site = ProxySite(
            build_tree(api),
            max_body_bytes=2 * len(AUDIO),
            idle_timeout=60,
            # Uploads here trickle for minutes on purpose.
            body_timeout=3600,
            streamed_paths=streamed_paths(routes),
            access_log=self.records.append,
            reactor=self.clock,
        )
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        self.channel.makeConnection(self.transport)

    def head(self, length: Optional[int], key: bytes = CLIENT_KEY, more: bytes = b"") -> bytes:
        body, content_type = form([("model", "whisper-1"), ("file", AUDIO)])
        framing = b"Content-Length: %d\r\n" % (len(body),) if length is not None else b"Transfer-Encoding: chunked\r\n"
        return (
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\n"
            b"Authorization: Bearer " + key + b"\r\nContent-Type: " + content_type + b"\r\n" + framing + more + b"\r\n"
        )

    def held(self) -> tuple[Any, _Consumer]:
        """
        An upload whose upstream stops taking it after the head: 600 kB
        arrive, more than the pipe holds, so the client is held.  Returns
        the upload's body producer and what upstream received.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body)))
        producer = self.http.requests[0][2]
        consumer = _Consumer()
        producer.startProducing(consumer)
        producer.pauseProducing()
        self.channel.dataReceived(body[:600_000])
        return producer, consumer

    def respond(self, index: int = 0) -> None:
        """
        Upstream answers request C{index} with a small JSON body.
        """
        response = _Response(200, Headers({b"content-type": [b"application/json"]}), b'{"text": "ok"}')
        self.http.requests[index][3].callback(response)

    def test_slow_upload_is_not_an_upstream_timeout(self) -> None:
        """
        The read timeout (30 s here) bounds upstream's silence, not the
        client's upload: a body trickling in for longer, which upstream
        keeps taking, does not time out; upstream silent for 30 s once
        the body is in does.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body)))
        producer = self.http.requests[0][2]
        done = producer.startProducing(_Consumer())
        step = len(body) // 8 + 1
        for start in range(0, len(body), step):
            self.clock.advance(20)
            self.channel.dataReceived(body[start : start + step])
        self.successResultOf(done)
        self.assertNotIn(b"HTTP/1.1 504", self.transport.value())
        self.clock.advance(30)
        self.assertIn(b"HTTP/1.1 504", self.transport.value())

    def test_paused_client_is_not_idle(self) -> None:
        """
        A client the proxy paused (upstream is behind, but within its read
        timeout) is not cut off by the idle timeout (60 s here); its idle
        clock runs again once it is read again.
        """
        self.upstream.read_timeout = 600.0
        producer, _ = self.held()
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(120)
        self.assertFalse(self.transport.disconnecting)
        producer.resumeProducing()
        self.clock.advance(61)
        self.assertTrue(self.transport.disconnecting)

    def test_upstream_not_taking_the_upload_times_out(self) -> None:
        """
        An upstream that stops taking the upload for the read timeout (30
        s here) is given up on: a 504, the client released.
        """
        self.held()
        self.clock.advance(29)
        self.assertNotIn(b"HTTP/1.1 504", self.transport.value())
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 504", self.transport.value())
        self.assertEqual(self.transport.producerState, "producing")

    def test_channel_resume_keeps_the_hold(self) -> None:
        """
        twisted.web resuming the channel (its send buffer drained) does not
        make it read a client held for its upstream.
        """
        self.held()
        self.channel.pauseProducing()
        self.channel.resumeProducing()
        self.assertEqual(self.transport.producerState, "paused")

    def test_drain_lets_a_refused_upload_linger(self) -> None:
        """
        The drain's closing of idle connections spares one still reading
        the rest of a refused upload; it closes once the body is in.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body), key=b"oai-wrong") + body[:1000])
        self.channel.close_gracefully()
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(body[1000:])
        self.assertTrue(self.transport.disconnecting)

    def test_client_leaving_while_held_leaves_no_timer(self) -> None:
        """
        A client that leaves while held for its upstream leaves nothing
        scheduled behind it: no idle timer, no upstream timer.
        """
        self.held()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oversized_before_upstream_connects(self) -> None:
        """
        An upload that outgrows the limit before upstream is even connected
        is answered 413, whatever then becomes of the connection attempt
        (not a 502 the SDK would retry).
        """
        self.channel.dataReceived(self.head(None))
        chunk = b"x" * 500_000
        for _ in range(5):
            self.channel.dataReceived(b"%x\r\n" % (len(chunk),) + chunk + b"\r\n")
        self.http.requests[0][3].errback(ConnectionRefusedError())
        self.assertIn(b"HTTP/1.1 413", self.transport.value())

    def test_refused_upload_with_bad_framing_gets_one_answer(self) -> None:
        """
        A chunked upload refused early whose rest is malformed gets no
        second (400) response after its answer: the connection just closes.
        """
        self.channel.dataReceived(self.head(None, key=b"oai-wrong") + b"10\r\nshort\r\nzz-not-chunked\r\n")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 "), 1)
        self.assertTrue(self.transport.disconnecting)

    def test_expect_continue_only_once_accepted(self) -> None:
        """
        A client waiting on "Expect: 100-continue" is invited to send its
        upload only if it is accepted: a refused one gets its refusal
        without a 100 first.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body), key=b"oai-wrong", more=b"Expect: 100-continue\r\n"))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401"), self.transport.value()[:40])
        self.setUp()
        self.channel.dataReceived(self.head(len(body), more=b"Expect: 100-continue\r\n"))
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_bytes_in_and_keep_alive(self) -> None:
        """
        The access record counts a streamed body's bytes, and a connection
        that carried an upload serves the next request.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body)) + body)
        self.http.requests[0][2].startProducing(_Consumer())
        self.respond()
        self.assertEqual(self.records[-1].bytes_in, len(body))
        self.assertIn(b"HTTP/1.1 200", self.transport.value())
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(self.head(len(body)) + body)
        self.assertEqual(len(self.http.requests), 2)

    def test_encoded_path_is_streamed(self) -> None:
        """
        A path with escapes reaches the upload route (twisted.web unquotes
        each segment), so its body must be streamed too.
        """
        self.assertTrue(self.site.streams_body(b"POST", b"/v1/audio/transcription%73"))
        self.assertFalse(self.site.streams_body(b"GET", b"/v1/audio/transcriptions"))

    def test_body_flows_before_it_is_complete(self) -> None:
        """
        The upstream request starts, and receives the first part of the
        body, before the client has sent the rest; the rest follows, and
        the body producer finishes only when the body is complete.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body)) + body[:100_000])
        self.assertEqual(len(self.http.requests), 1)
        method, url, producer, _ = self.http.requests[0]
        self.assertEqual((method, url), ("POST", "http://upstream.test/v1/audio/transcriptions"))
        self.assertTrue(IBodyProducer.providedBy(producer))
        self.assertEqual(producer.length, len(body))
        consumer = _Consumer()
        done = producer.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), body[:100_000])
        self.assertNoResult(done)
        self.channel.dataReceived(body[100_000:])
        self.assertEqual(b"".join(consumer.data), body)
        self.successResultOf(done)

    def test_upstream_backpressure_pauses_the_client(self) -> None:
        """
        While upstream cannot take more, what arrives is held only up to a
        bound, then the client connection stops being read; it is read
        again once upstream drains.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        producer, consumer = self.held()
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(consumer.data, [])
        producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(b"".join(consumer.data), body[:600_000])

    def test_chunked_upload_over_the_limit(self) -> None:
        """
        An upload without a length that grows past the body limit fails
        its upstream request and is answered 413; the connection closes
        once the client stops sending (or the linger runs out).
        """
        self.channel.dataReceived(self.head(None))
        producer = self.http.requests[0][2]
        done = producer.startProducing(_Consumer())
        chunk = b"x" * 500_000
        for _ in range(5):
            self.channel.dataReceived(b"%x\r\n" % (len(chunk),) + chunk + b"\r\n")
        failure = self.failureResultOf(done)
        # What the HTTP client makes of a failed body producer.
        self.http.requests[0][3].errback(RequestGenerationFailed([failure]))
        response = self.transport.value()
        self.assertIn(b"HTTP/1.1 413", response)
        self.assertIn(b'"code": "request_too_large"', response.replace(b'":"', b'": "'))
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(self.transport.disconnecting)

    def test_refused_before_the_body_is_read(self) -> None:
        """
        A refusal answered before the upload is complete (a bad key) is
        sent at once; the rest of the upload is read and discarded, never
        parsed as a next request, and then the connection closes.
        """
        body, _ = form([("model", "whisper-1"), ("file", AUDIO)])
        self.channel.dataReceived(self.head(len(body), key=b"oai-wrong") + body[:1000])
        self.assertIn(b"HTTP/1.1 401", self.transport.value())
        self.assertIn(b"connection: close", self.transport.value().lower())
        self.assertEqual(self.http.requests, [])
        self.transport.clear()
        # A client still sending is given time, 5 s from its last bytes.
        rest = body[1000:]
        for start in range(0, len(rest), len(rest) // 4 + 1):
            self.clock.advance(4)
            self.assertFalse(self.transport.disconnecting)
            self.channel.dataReceived(rest[start : start + len(rest) // 4 + 1])
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)


class NoWaitTests(SynchronousTestCase):
    def test_no_clients_no_wait(self) -> None:
        """
        Without client keys (and an OpenAI-style upstream) nothing depends
        on the model, so the upload goes upstream before any field is read.
        """
        clock = Clock()
        http = _Upstream()
        credentials = Credentials(Secret(UPSTREAM_KEY), ClientRegistry())
        upstream = UpstreamClient(http, "http://upstream.test/v1", credentials, clock, 30.0)
        routes = [BY_NAME["audio/transcriptions"]]
        site = ProxySite(
            build_tree(api_resources(routes, upstream, clock, credentials)),
            max_body_bytes=1 << 20,
            idle_timeout=60,
            streamed_paths=streamed_paths(routes),
            access_log=lambda record: None,
            reactor=clock,
        )
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        channel.makeConnection(StringTransport())
        channel.dataReceived(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        self.assertEqual(len(http.requests), 1)
