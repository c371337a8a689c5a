"""
The chat completions endpoint, end to end in memory: client -> proxy ->
fake upstream and back, through real twisted.web requests and treq
responses (C{StubTreq}), with a fake clock for every timeout.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any, Optional, TypeVar

import treq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from oaiproxy.access.clients import Limits
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, chat_body, registry
from oaiproxy.observe.usage import MAX_LINE, UsageMeter
from oaiproxy.server.site import ProxyRequest
from oaiproxy.upstream.client import http_client
from oaiproxy.upstream.exchange import Exchange, classify_upstream_failure

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


def events(data: bytes) -> list[Any]:
    """
    The JSON payloads of the C{data:} events in an SSE body.
    """
    out: list[Any] = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(json.loads(block[len(b"data: ") :]))
    return out


class PlainCompletionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_answer_passes_through(self) -> None:
        """
        The upstream's status, JSON body and API headers reach the client
        unchanged.
        """
        response = self.successResultOf(self.h.post(chat_body()))
        body = self.successResultOf(treq.content(response))
        self.assertEqual(response.code, 200)
        answer = json.loads(body)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["choices"][0]["message"]["content"], "This is a mock reply to: hello proxy")
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"req_fake_1"])
        self.assertEqual(response.headers.getRawHeaders(b"openai-processing-ms"), [b"7"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        # Twisted's client keeps Content-Length out of .headers; .length is
        # what the proxy announced.
        self.assertEqual(response.length, len(body))

    def test_upstream_cookie_is_not_relayed(self) -> None:
        """
        An upstream session cookie would be shared by every proxy user; it
        never reaches a client, and is not replayed upstream either.
        """
        first = self.successResultOf(self.h.post(chat_body()))
        self.assertIsNone(first.headers.getRawHeaders(b"set-cookie"))
        self.successResultOf(self.h.post(chat_body()))
        self.assertNotIn("cookie", self.h.fake.requests[1].headers)

    def test_body_forwarded_byte_for_byte(self) -> None:
        """
        The body upstream receives is exactly what the client sent: key
        order, spacing and unknown fields survive.
        """
        body = b'{  "messages":[{"role":"user","content":"x"}],\n "model" : "gpt-4o",  "new_field_2027": [1,2]}'
        self.successResultOf(self.h.post(body))
        self.assertEqual(self.h.fake.requests[0].body, body)

    def test_upstream_gets_proxy_key_not_client_credentials(self) -> None:
        """
        The upstream sees the proxy's key; the client's Authorization,
        api-key and cookies stay on the proxy, while SDK headers pass.
        """
        self.successResultOf(
            self.h.post(
                chat_body(),
                headers={
                    b"authorization": [b"Bearer client-supplied"],
                    b"api-key": [b"client-azure-key"],
                    b"cookie": [b"session=abc"],
                    b"openai-organization": [b"org-123"],
                    b"openai-project": [b"proj_456"],
                    b"x-stainless-lang": [b"python"],
                },
            )
        )
        seen = self.h.fake.requests[0].headers
        self.assertEqual(seen["authorization"], ["Bearer " + UPSTREAM_KEY.decode()])
        self.assertNotIn("api-key", seen)
        self.assertNotIn("cookie", seen)
        self.assertEqual(seen["openai-organization"], ["org-123"])
        self.assertEqual(seen["openai-project"], ["proj_456"])
        self.assertEqual(seen["x-stainless-lang"], ["python"])
        self.assertEqual(self.h.fake.requests[0].path, "/v1/chat/completions")

    def test_path_without_v1(self) -> None:
        """
        An SDK whose base URL lacks /v1 posts to /chat/completions; it is
        served the same way.
        """
        response = self.successResultOf(self.h.post(chat_body(), path="/chat/completions"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.requests[0].path, "/v1/chat/completions")

    def test_upstream_errors_pass_through(self) -> None:
        """
        A 429 keeps its status, body and retry headers, so the SDK raises
        RateLimitError and waits as told.
        """
        response = self.successResultOf(self.h.post(chat_body(model="fake-429")))
        body = json.loads(self.successResultOf(treq.content(response)))
        self.assertEqual(response.code, 429)
        self.assertEqual(body["error"]["code"], "rate_limit_exceeded")
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"])

    def test_upstream_500_passes_through(self) -> None:
        """
        An upstream server error is the client's to see and retry.
        """
        response = self.successResultOf(self.h.post(chat_body(model="fake-500")))
        self.assertEqual(response.code, 500)
        body = json.loads(self.successResultOf(treq.content(response)))
        self.assertEqual(body["error"]["type"], "server_error")

    def test_redirect_not_followed(self) -> None:
        """
        A redirect from upstream is returned, not followed: following it
        would send the key wherever the Location points.
        """
        response = self.successResultOf(self.h.post(chat_body(model="fake-redirect")))
        self.assertEqual(response.code, 307)
        self.assertEqual(len(self.h.fake.requests), 1)


@implementer(IAgent)
class _Lingering:
    """
    An agent that keeps each request's body producer, response and body
    protocol, as a C{_newclient} connection does while upstream is still
    reading a body it has already answered (nginx's C{return}, any early
    error).
    """

    agent: IAgent

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        self.kept.append(bodyProducer)

        def keep(response: IResponse) -> IResponse:
            deliver = response.deliverBody

            def deliverBody(protocol: Any) -> None:
                self.kept.append(protocol)
                deliver(protocol)

            response.deliverBody = deliverBody  # type: ignore[method-assign]
            self.kept.append(response)
            return response

        return self.agent.request(method, uri, headers, bodyProducer).addCallback(keep)


def _large_values(roots: list[Any], depth: int) -> list[int]:
    """
    The sizes of the bytes and strings of 100 KB or more within C{depth}
    references of C{roots}.
    """
    seen: set[int] = set()
    found: list[int] = []
    level = list(roots)
    for _ in range(depth):
        following: list[Any] = []
        for value in level:
            if id(value) in seen or isinstance(value, type):
                continue
            seen.add(id(value))
            if isinstance(value, (bytes, str)):
                if len(value) >= 100_000:
                    found.append(len(value))
                continue
            following.extend(gc.get_referents(value))
        level = following
    return found


class LargeBodyTests(SynchronousTestCase):
    """
    A large JSON body goes upstream byte for byte, and once the client has
    its answer the proxy holds neither the body nor its parsed document,
    even while the upstream connection is kept (issue 17: at 8 concurrent
    1 MB bodies, 27 of each were alive at the peak).
    """

    def test_large_body_forwarded_and_let_go(self) -> None:
        agent = _Lingering()
        clock = Clock()
        h = Harness(clock=clock, http=http_client(agent, clock))
        agent.agent = h.upstream_agent
        body = chat_body(messages=[{"role": "user", "content": "x" * 1_000_000}])
        response = self.successResultOf(h.post(body))
        self.assertEqual(response.code, 200)
        self.assertEqual(h.fake.requests[0].body, body)
        del h.fake.requests[:]
        exchanges = _alive(Exchange)
        self.assertTrue(exchanges)
        self.assertEqual(_large_values([_fields(e) for e in exchanges] + agent.kept, 4), [])

    def test_open_stream_lets_go_of_its_body(self) -> None:
        """
        A stream still open after its head holds neither its request body
        (twisted.web's C{content}) nor its variants nor the parsed
        document: no attempt follows once the client has the head, and a
        stream may stay open for minutes.
        """
        h = Harness(chunk_interval=1.0)
        body = chat_body(stream=True, messages=[{"role": "user", "content": "x" * 1_000_000}])
        response = self.successResultOf(h.post(body))
        self.assertEqual(response.code, 200)
        # (With the proxy's usage request in front.)
        self.assertEqual(h.fake.requests[0].body, b'{"stream_options":{"include_usage":true},' + body[1:])
        del h.fake.requests[:]
        [exchange] = [kept for kept in _alive(Exchange) if kept._clock is h.clock]
        roots = [value for name, value in _fields(exchange).items() if name != "_request"]
        self.assertEqual(_large_values(roots, 4), [])
        [request] = [kept for kept in _alive(ProxyRequest) if kept._clock is h.clock]
        self.assertFalse(request.finished)
        # (A BytesIO's buffer is no referent for gc; its size counts it.)
        self.assertLess(sys.getsizeof(request.content), 100_000)
        self.assertEqual(_large_values(list(_fields(request).values()), 2), [])
        h.clock.advance(60)
        h.pump()

    def test_open_stream_objects_have_slots(self) -> None:
        """
        What an open stream keeps for its minutes has its attributes in
        slots, not in instance dictionaries: CPython 3.11 gives an object
        whose attributes outgrow its class's shared keys a dictionary of
        its own (0.8 to 1.6 KB each for the request, its channel and the
        exchange: most of what issue 17 cut from an idle stream).  Only
        twisted.web's C{content} and the channel's C{callLater} stay out.
        """
        h = Harness(chunk_interval=1.0)
        response = self.successResultOf(h.post(chat_body(stream=True)))
        self.assertEqual(response.code, 200)
        [exchange] = [kept for kept in _alive(Exchange) if kept._clock is h.clock]
        [request] = [kept for kept in _alive(ProxyRequest) if kept._clock is h.clock]
        self.assertFalse(request.finished)
        self.assertFalse(hasattr(exchange, "__dict__"))
        self.assertLessEqual(set(vars(request)), {"content"})
        self.assertLessEqual(set(vars(request.channel)), {"callLater"})
        h.clock.advance(60)
        h.pump()


T = TypeVar("T")


def _fields(kept: object) -> dict[str, Any]:
    """
    What C{kept} holds by attribute name: its slots (of every class of
    its type) and its instance dictionary, if any.
    """
    fields = dict(getattr(kept, "__dict__", {}))
    for kind in type(kept).__mro__:
        for name in getattr(kind, "__slots__", ()):
            if name != "__dict__" and hasattr(kept, name):
                fields[name] = getattr(kept, name)
    return fields


def _alive(kind: type[T]) -> list[T]:
    """
    The live objects of exactly C{kind}.  By C{type()}, not
    C{isinstance}: the latter asks each object its C{__class__}, and some
    libraries' lazy proxies (openai's, for pandas) import on that.
    """
    return [kept for kept in gc.get_objects() if type(kept) is kind]


class ValidationTests(SynchronousTestCase):
    def test_bad_body_never_reaches_upstream(self) -> None:
        """
        A body without messages is answered 400 by the proxy, OpenAI-shaped,
        and costs no upstream call.
        """
        h = Harness()
        response = self.successResultOf(h.post(b'{"model": "gpt-4o"}'))
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual(response.code, 400)
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(error["param"], "messages")
        self.assertEqual(h.fake.requests, [])


class CountValidationTests(SynchronousTestCase):
    def test_counts_an_upstream_could_misread_are_refused(self) -> None:
        """
        A C{max_tokens}, C{max_completion_tokens} or C{n} that is a
        boolean, a fraction, a non-numeric string or negative is a 400
        naming the member, before any upstream call: the reservation must
        read the number upstream reads, and these it cannot be sure of.
        """
        h = Harness()
        for name, value, code in [
            ("max_tokens", True, "invalid_type"),
            ("max_completion_tokens", 2.5, "invalid_type"),
            ("max_tokens", "1e5", "invalid_type"),
            ("max_tokens", -1, "invalid_value"),
            ("n", 0, "invalid_value"),
            ("n", [2], "invalid_type"),
        ]:
            response = self.successResultOf(h.post(chat_body(**{name: value})))
            error = json.loads(self.successResultOf(treq.content(response)))["error"]
            self.assertEqual((response.code, error["param"], error["code"]), (400, name, code), (name, value))
        self.assertEqual(h.fake.requests, [])

    def test_numeric_forms_are_forwarded_as_sent(self) -> None:
        """
        C{"100"}, C{100.0} and C{1e2} pass, unchanged, for upstream to
        judge (vLLM takes them).
        """
        h = Harness()
        for value in ("100", 100.0, 1e2):
            body = chat_body(max_tokens=value, n=1.0)
            response = self.successResultOf(h.post(body))
            self.assertEqual(response.code, 200, value)
            self.successResultOf(treq.content(response))
            self.assertEqual(h.fake.requests[-1].body, body)


class ClientKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(client_keys=[b"other-key", CLIENT_KEY])

    def test_missing_key_is_refused(self) -> None:
        """
        With client keys configured, a request without one gets 401 and
        nothing goes upstream.
        """
        response = self.successResultOf(self.h.post(chat_body()))
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual(response.code, 401)
        self.assertEqual(error["code"], "invalid_api_key")
        self.assertEqual(self.h.fake.requests, [])

    def test_wrong_key_is_refused(self) -> None:
        """
        An unknown key is refused, and the answer does not echo it.
        """
        response = self.successResultOf(self.h.post(chat_body(), headers={b"authorization": [b"Bearer guess-123"]}))
        body = self.successResultOf(treq.content(response))
        self.assertEqual(response.code, 401)
        self.assertNotIn(b"guess-123", body)

    def test_known_key_is_served(self) -> None:
        """
        Any configured key is accepted, and it is replaced by the upstream
        key on the way out.
        """
        response = self.successResultOf(self.h.post(chat_body(), headers={b"authorization": [b"Bearer " + CLIENT_KEY]}))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.requests[0].headers["authorization"], ["Bearer " + UPSTREAM_KEY.decode()])


class StreamingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(chunk_interval=1.0, read_timeout=30.0)

    def test_chunks_arrive_as_upstream_sends_them(self) -> None:
        """
        Each event reaches the client when upstream sends it, not when the
        stream ends: after one upstream chunk the client has one event.
        """
        response = self.successResultOf(self.h.post(chat_body(stream=True)))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        self.h.pump()
        self.assertEqual(len(events(b"".join(received))), 1)
        self.assertNoResult(done)

        self.h.clock.advance(1.0)
        self.h.pump()
        self.assertEqual(len(events(b"".join(received))), 2)
        self.assertNoResult(done)

        for _ in range(20):
            self.h.clock.advance(1.0)
            self.h.pump()
        self.successResultOf(done)
        body = b"".join(received)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events(body))
        self.assertEqual(text, "This is a mock reply to: hello proxy")

    def test_stream_ends_with_done(self) -> None:
        """
        The fake upstream ends its body right after C{data: [DONE]}, as
        OpenAI does, not one chunk interval later: an SDK that hangs up
        after it finds the stream complete.
        """
        response = self.successResultOf(self.h.post(chat_body(stream=True)))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        for _ in range(30):
            self.h.clock.advance(1.0)
            self.h.pump()
            if b"data: [DONE]" in b"".join(received):
                break
        self.successResultOf(done)

    def test_upstream_crash_mid_stream_ends_with_error_event(self) -> None:
        """
        When upstream drops the connection mid-stream, the client gets a
        final error event (the SDK raises APIError on it) and the response
        is not completed, so it cannot pass for a whole answer.
        """
        h = Harness(chunk_interval=0.0)
        response = self.successResultOf(h.post(chat_body(model="fake-crash", stream=True)))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        h.pump()
        self.failureResultOf(done)
        got = events(b"".join(received))
        self.assertEqual(len(got), 3)
        self.assertEqual(got[-1]["error"]["code"], "upstream_stream_interrupted")
        self.assertEqual(got[-1]["error"]["type"], "api_error")

    def test_upstream_crash_mid_body_is_not_passed_off_as_complete(self) -> None:
        """
        When upstream dies in the middle of a plain JSON body, the client's
        response is cut off too, rather than finished: it fails instead of
        parsing half an answer.
        """
        h = Harness()
        response = self.successResultOf(h.post(chat_body(model="fake-crash")))
        self.assertEqual(response.code, 200)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        h.pump()
        self.failureResultOf(done, ResponseFailed)
        body = b"".join(received)
        self.assertTrue(body.startswith(b'{"id": "chatcmpl-fake'))
        self.assertNotIn(b"data: ", body)

    def test_silent_stream_times_out_with_error_event(self) -> None:
        """
        A stream that goes quiet for the read timeout is ended with an
        error event, and the upstream connection is closed.
        """
        h = Harness(chunk_interval=0.0, read_timeout=5.0)
        response = self.successResultOf(h.post(chat_body(model="fake-stall", stream=True)))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        h.pump()
        h.clock.advance(4.9)
        h.pump()
        self.assertNoResult(done)
        h.clock.advance(0.2)
        h.pump()
        self.failureResultOf(done)
        got = events(b"".join(received))
        self.assertIn("no data for 5 seconds", got[-1]["error"]["message"])
        self.assertEqual(h.fake.disconnects, 1)


class DisconnectTests(SynchronousTestCase):
    def test_disconnect_before_head_cancels_upstream(self) -> None:
        """
        A client that gives up before the answer starts takes the upstream
        request down with it: no tokens are spent for nobody.
        """
        h = Harness()
        d = h.post(chat_body(model="fake-silent"))
        self.assertNoResult(d)
        self.assertEqual(len(h.fake.requests), 1)
        d.cancel()
        h.pump()
        self.failureResultOf(d)
        self.assertEqual(h.fake.disconnects, 1)

    def test_disconnect_mid_stream_closes_upstream(self) -> None:
        """
        A client that leaves mid-stream makes the proxy close the upstream
        connection at once, and the fake upstream stops sending.
        """
        h = Harness(chunk_interval=1.0)
        response = self.successResultOf(h.post(chat_body(stream=True)))
        received: list[bytes] = []

        def leave_after_first_event(data: bytes) -> None:
            # treq.collect closes the connection when its collector raises:
            # the client walks away after one event.
            received.append(data)
            raise RuntimeError("client leaves")

        with capturedLogs() as logged:
            done = treq.collect(response, leave_after_first_event)
            h.pump()
        self.failureResultOf(done, RuntimeError)
        self.assertEqual(len(events(b"".join(received))), 1)
        self.assertEqual(h.fake.disconnects, 1)
        # Nothing more is scheduled for the abandoned stream: no idle timer
        # in the proxy, no pending chunk upstream.
        self.assertEqual(h.clock.getDelayedCalls(), [])
        # One info line and no error: a client leaving is not a failure (and
        # the proxy did not call finish() on the dead request, which would
        # have raised and been logged).
        self.assertEqual(
            [(e["log_level"], e["log_format"]) for e in logged if e["log_level"] > LogLevel.debug],
            [(LogLevel.info, "client went away during {method} {path}; upstream request cancelled")],
        )


class UpstreamFailureTests(SynchronousTestCase):
    def error_for(self, h: Harness, model: str = "gpt-4o") -> tuple[int, dict[str, Any]]:
        response = self.successResultOf(h.post(chat_body(model=model)))
        return response.code, json.loads(self.successResultOf(treq.content(response)))["error"]

    def test_silent_upstream_is_504(self) -> None:
        """
        An upstream that sends no response head within the read timeout
        gives a 504, and its connection is closed.
        """
        h = Harness(read_timeout=7.0)
        d = h.post(chat_body(model="fake-silent"))
        h.clock.advance(6.9)
        h.pump()
        self.assertNoResult(d)
        h.clock.advance(0.2)
        h.pump()
        response = self.successResultOf(d)
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual(response.code, 504)
        self.assertEqual(error["code"], "upstream_timeout")
        self.assertEqual(h.fake.disconnects, 1)

    def test_refused_connection_is_502(self) -> None:
        """
        An upstream that cannot be reached gives a 502 the SDK retries.
        """

        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                return fail(ConnectionRefusedError())

        status, error = self.error_for(Harness(http=Refusing()))
        self.assertEqual(status, 502)
        self.assertEqual(error["type"], "api_error")
        self.assertEqual(error["code"], "upstream_unreachable")
        self.assertIn("ConnectionRefusedError", error["message"])

    def test_connect_timeout_is_502(self) -> None:
        """
        An upstream that does not accept a connection in time cannot be
        reached: 502, naming the connect timeout.
        """

        class Slow:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                return fail(TimeoutError())

        status, error = self.error_for(Harness(http=Slow()))
        self.assertEqual(status, 502)
        self.assertEqual(error["code"], "upstream_unreachable")
        self.assertIn("no connection within 10 seconds", error["message"])

    def test_failure_reasons_are_named_without_details(self) -> None:
        """
        A lost connection is reported by exception class only: the
        exception's text could quote a URL or header.
        """
        failure = Failure(ResponseNeverReceived([Failure(ConnectionLost("secret detail"))]))
        error = classify_upstream_failure(failure, 10)
        self.assertEqual(error.status, 502)
        self.assertIn("ConnectionLost", error.message)
        self.assertNotIn("secret detail", error.message)


class UpstreamKeyRejectedTests(SynchronousTestCase):
    def test_rejected_proxy_key_is_not_blamed_on_the_client(self) -> None:
        """
        When upstream refuses the proxy's own key, the client gets a 502
        saying the operator must fix it (not a 401 about its own key), the
        upstream's message (which quotes the end of the key) is dropped,
        and the operator gets a critical log line.
        """
        h = Harness()
        h.fake._api_key = b"sk-some-other-key"
        with capturedLogs() as logged:
            response = self.successResultOf(h.post(chat_body()))
            body = self.successResultOf(treq.content(response))
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_auth_failed")
        self.assertNotIn(UPSTREAM_KEY[-4:], body)
        self.assertNotIn(b"Incorrect API key", body)
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logged))


class Canned(Resource):
    """
    An upstream that answers every request with C{pieces}, written one by
    one, under C{content_type}.
    """

    isLeaf = True

    def __init__(self, content_type: bytes, pieces: list[bytes]) -> None:
        super().__init__()
        self.content_type = content_type
        self.pieces = pieces
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> int:
        self.bodies.append(request.content.read())  # type: ignore[union-attr]
        request.setHeader(b"content-type", self.content_type)
        for piece in self.pieces:
            request.write(piece)
        request.finish()
        return NOT_DONE_YET


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class MeteringTests(SynchronousTestCase):
    """
    Token limits cannot be escaped by the shape of the answer: a large
    plain answer, a stream without usage, tool calls, numbers in strings.
    """

    def harness(self, upstream: Optional[Resource] = None, **limits: Any) -> Harness:
        limits.setdefault("tokens_per_minute", 10_000_000)
        return Harness(clients=registry(CLIENT_KEY, limits=Limits(**limits)), upstream_resource=upstream)

    def complete(self, h: Harness, body: bytes) -> tuple[int, bytes]:
        response = self.successResultOf(h.post(body, headers=BEARER))
        content = treq.content(response)
        h.pump()
        return response.code, self.successResultOf(content)

    def remaining_tokens(self, h: Harness) -> int:
        client = h.credentials.clients.identify(CLIENT_KEY)
        assert client is not None
        headers = dict(h.limiter.headers(client))
        return int(headers[b"x-ratelimit-remaining-tokens"])

    def test_plain_answer_over_a_megabyte(self) -> None:
        """
        A 3 MB plain answer is charged the usage at its end (it used to be
        charged the prompt estimate: a client could ask for long answers
        for free), and reaches the client whole.
        """
        answer = json.dumps(
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 3_000_000}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 750_000, "total_tokens": 750_009},
                "system_fingerprint": "fp_1",
            }
        ).encode()
        upstream = Canned(b"application/json", [answer[i : i + 65536] for i in range(0, len(answer), 65536)])
        h = self.harness(upstream)
        self.assertEqual(self.complete(h, chat_body(max_tokens=10)), (200, answer))
        usage = h.records[-1].usage
        assert usage is not None
        self.assertEqual((usage.total, usage.exact), (750_009, True))
        self.assertEqual(self.remaining_tokens(h), 10_000_000 - 750_009)

    def test_include_usage_false_is_still_metered(self) -> None:
        """
        A client that sets C{"stream_options": {"include_usage": false}}
        is metered exactly all the same: upstream is asked for usage, and
        the client's stream has none, as it asked.
        """
        h = self.harness()
        body = chat_body(stream=True, stream_options={"include_usage": False})
        code, data = self.complete(h, body)
        self.assertEqual(code, 200)
        self.assertNotIn(b'"usage"', data)
        self.assertTrue(data.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(json.loads(h.fake.requests[0].body)["stream_options"], {"include_usage": True})
        usage = h.records[-1].usage
        assert usage is not None
        self.assertTrue(usage.exact)
        self.assertEqual((usage.prompt, usage.completion), (2, 8))

    def test_tool_calls_without_usage(self) -> None:
        """
        An upstream that reports no usage (as some do whatever is asked)
        and streams 288,000 characters of tool-call arguments: the client
        is charged 72,000 tokens of output for them (it was charged 40).
        """
        arguments = '{"q": "' + "x" * 991 + '"}'
        call = {"index": 0, "function": {"arguments": arguments}}
        pieces = [sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}) for _ in range(288)]
        h = self.harness(Canned(b"text/event-stream", pieces + [b"data: [DONE]\n\n"]))
        code, data = self.complete(h, chat_body(stream=True, stream_options={"include_usage": False}))
        self.assertEqual(code, 200)
        self.assertEqual(data, b"".join(pieces) + b"data: [DONE]\n\n")
        usage = h.records[-1].usage
        assert usage is not None
        self.assertFalse(usage.exact)
        self.assertEqual(usage.completion, 72_000)

    def test_numbers_in_other_forms_are_reserved(self) -> None:
        """
        C{"max_tokens": "100000"}, C{100000.0}, C{1e5}, and C{"n": 128.0}
        reserve what upstream will take them for: over a client's 50,000
        tokens per minute they are refused as too large (they used to be
        admitted on the default reservation).
        """
        h = self.harness(tokens_per_minute=50_000)
        for more in ({"max_tokens": "100000"}, {"max_tokens": 100000.0}, {"max_completion_tokens": 1e5}):
            code, data = self.complete(h, chat_body(**more))
            self.assertEqual(code, 429, more)
            self.assertIn(b"it may use up to 100", data)
        code, data = self.complete(h, chat_body(max_tokens=1000, n=128.0))
        self.assertEqual(code, 429)
        self.assertIn(b"128", data)
        self.assertEqual(h.fake.requests, [])
        self.assertEqual(self.complete(h, chat_body(max_tokens="100"))[0], 200)


class HostileUpstreamTests(SynchronousTestCase):
    """
    A broken or malicious upstream cannot leak a client's concurrency slot
    or stop an answer from being relayed.
    """

    def harness(self, upstream: Optional[Resource] = None) -> Harness:
        limits = Limits(concurrent_requests=1, tokens_per_minute=1_000_000)
        return Harness(clients=registry(CLIENT_KEY, limits=limits), upstream_resource=upstream)

    def complete(self, h: Harness, body: bytes) -> tuple[int, bytes]:
        response = self.successResultOf(h.post(body, headers=BEARER))
        content = treq.content(response)
        h.pump()
        return response.code, self.successResultOf(content)

    def test_deeply_nested_answer(self) -> None:
        """
        A JSON answer nested 200,000 levels deep (the usage meter's parser
        raised RecursionError on it before the reservation was settled)
        reaches the client unchanged, and the client's only concurrency
        slot is free again.
        """
        answer = b"[" * 200_000 + b"]" * 200_000
        h = self.harness(Canned(b"application/json", [answer]))
        with capturedLogs() as logged:
            self.assertEqual(self.complete(h, chat_body()), (200, answer))
            self.assertEqual(self.complete(h, chat_body())[0], 200)
        self.assertEqual([e for e in logged if e["log_level"] >= LogLevel.error], [])

    def test_a_meter_bug_still_settles(self) -> None:
        """
        Whatever the meter raises, the answer is relayed whole, the failure
        is logged once, and the reservation is settled (charged whole: the
        output could not be counted).
        """

        def broken(self: UsageMeter, payload: bytes) -> None:
            raise RuntimeError("meter bug")

        self.patch(UsageMeter, "_event", broken)
        h = self.harness()
        with capturedLogs() as logged:
            code, data = self.complete(h, chat_body(stream=True, max_tokens=100))
        self.assertEqual(code, 200)
        self.assertTrue(data.endswith(b"data: [DONE]\n\n"))
        failures = [e for e in logged if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        client = h.credentials.clients.identify(CLIENT_KEY)
        assert client is not None
        remaining = int(dict(h.limiter.headers(client))[b"x-ratelimit-remaining-tokens"])
        self.assertEqual(remaining, 1_000_000 - h.records[-1].usage.prompt - 100)  # type: ignore[union-attr]
        self.assertEqual(self.complete(h, chat_body())[0], 200)

    def test_a_settlement_bug_still_settles(self) -> None:
        """
        A bug past the meter, while working out the charge at the end of a
        stream, is logged once; the reservation is still settled (charged
        whole) and the answer finished.
        """

        def broken(self: UsageMeter, prompt_estimate: int) -> None:
            raise RuntimeError("settlement bug")

        self.patch(UsageMeter, "usage", broken)
        limits = Limits(concurrent_requests=1, tokens_per_minute=1_000_000)
        h = Harness(clients=registry(CLIENT_KEY, limits=limits), chunk_interval=1.0)
        with capturedLogs() as logged:
            response = self.successResultOf(h.post(chat_body(stream=True), headers=BEARER))
            content = treq.content(response)
            for _ in range(30):
                h.clock.advance(1)
                h.pump()
            self.assertTrue(self.successResultOf(content).endswith(b"data: [DONE]\n\n"))
        self.assertEqual(len([e for e in logged if e.get("log_failure") is not None]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.complete(h, chat_body())[0], 200)
        self.flushLoggedErrors(RuntimeError)

    def test_line_without_newline_is_relayed(self) -> None:
        """
        A 3 MB C{data:} line without a newline (longer than the meter and
        the usage filter hold) reaches the client byte for byte, and the
        stream after it too.
        """
        line = b"data: " + b"x" * (3 * MAX_LINE)
        pieces = [line[i : i + 16384] for i in range(0, len(line), 16384)] + [b"\n\ndata: [DONE]\n\n"]
        h = self.harness(Canned(b"text/event-stream", pieces))
        self.assertEqual(self.complete(h, chat_body(stream=True)), (200, b"".join(pieces)))
        self.assertEqual(self.complete(h, chat_body())[0], 200)
