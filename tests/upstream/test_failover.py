"""
Tests for failover in the request path (L{oaiproxy.upstream.exchange} over
L{oaiproxy.upstream.upstreams}): the daemon's wiring in memory, on a
C{Clock}, with one scripted upstream per host.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from oaiproxy.access.clients import ClientRegistry, Credentials
from oaiproxy.config import Secret
from oaiproxy.drain import Lifecycle
from oaiproxy.fake.harness import Harness, chat_body, harness_config
from oaiproxy.observe.accesslog import TextAccessLog
from oaiproxy.observe.metrics import Metrics
from oaiproxy.routetable import ROUTES
from oaiproxy.server.build import build_site
from oaiproxy.upstream.breaker import State
from oaiproxy.upstream.client import http_client
from oaiproxy.upstream.pool import Upstream
from tests.support import form


def answer(name: str) -> bytes:
    """
    A chat completion saying which upstream made it.
    """
    return json.dumps(
        {
            "id": "chatcmpl-" + name,
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": name}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


def event(name: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": name}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class Scripted(Resource):
    """
    One upstream: answers as told (C{status}, C{headers}), or holds the
    request (C{hang}: no head; C{head}: a stream's head and nothing more),
    and records what it received.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.status = 200
        self.headers: dict[bytes, bytes] = {}
        self.mode = "answer"
        self.bodies: list[bytes] = []
        self.held: list[Request] = []
        self.gone = 0

    def render(self, request: Request) -> Any:
        assert request.content is not None
        self.bodies.append(request.content.read())
        request.notifyFinish().addErrback(lambda _: setattr(self, "gone", self.gone + 1))
        if self.mode == "hang":
            self.held.append(request)
            return NOT_DONE_YET
        if self.mode == "head":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"")
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.mode == "stream":
            request.setHeader(b"content-type", b"text/event-stream")
            return event(self.name) + b"data: [DONE]\n\n"
        request.setHeader(b"content-type", b"application/json")
        if self.status != 200:
            return json.dumps({"error": {"message": f"{self.name} says {self.status}", "type": "x"}}).encode()
        return answer(self.name)


class ByHost(Resource):
    def __init__(self, hosts: dict[bytes, Resource]) -> None:
        super().__init__()
        self.hosts = hosts

    def getChild(self, path: bytes, request: Any) -> Resource:
        return self.hosts[request.getRequestHostname()]


@implementer(IAgent)
class Refusing:
    """
    An agent whose connections to the hosts in C{refused} are refused.
    """

    def __init__(self, agent: IAgent, refused: set[str]) -> None:
        self._agent = agent
        self.refused = refused
        self.tried: list[str] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Optional[IBodyProducer] = None
    ) -> "Deferred[IResponse]":
        host = urlsplit(uri).hostname
        assert isinstance(host, (str, bytes))
        host = (host.decode() if isinstance(host, bytes) else host).removesuffix(".test")
        self.tried.append(host)
        if host in self.refused:
            return fail(ConnectionRefusedError())
        return self._agent.request(method, uri, headers, bodyProducer)


def member(name: str, **more: Any) -> Upstream:
    return Upstream(name, f"http://{name}.test/v1", Secret(b"sk-" + name.encode()), **more)


class Pooled:
    """
    The proxy in memory over the upstreams C{members}, each a L{Scripted}
    at its own host; by default tried in their order (priorities 0, 1...).
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        *names: str,
        members: Sequence[Upstream] = (),
        refused: Sequence[str] = (),
        **settings: Any,
    ) -> None:
        self.case = case
        members = list(members) or [member(name, priority=i) for i, name in enumerate(names)]
        self.up = {m.name: Scripted(m.name) for m in members}
        agent = RequestTraversalAgent(ByHost({f"{n}.test".encode(): s for n, s in self.up.items()}))
        self.agent = Refusing(agent, set(refused))
        routes = settings.pop("routes", None)
        config = replace(harness_config(clients=ClientRegistry()), upstreams=tuple(members), **settings)
        if routes is not None:
            config = replace(config, routes=frozenset(routes))
        clock = Clock()
        self.h = Harness(config=config, clock=clock, http=http_client(self.agent, clock))
        self.h.upstream_agent = agent
        self.pool = self.h.built.upstreams.pool

    def post(self, body: Optional[bytes] = None, **kw: Any) -> "Deferred[IResponse]":
        return self.h.post(body if body is not None else chat_body(), **kw)

    def answer(self, body: Optional[bytes] = None) -> tuple[IResponse, bytes]:
        response = self.case.successResultOf(self.post(body))
        content = treq.content(response)
        self.h.pump()
        return response, self.case.successResultOf(content)

    def in_flight(self) -> dict[str, int]:
        return {m.name: m.in_flight for m in self.pool.members}

    def idle(self) -> None:
        """
        Nothing is counted in flight, and no probe is held.
        """
        self.case.assertEqual(set(self.in_flight().values()), {0})
        self.case.assertFalse(any(m.breaker.probing for m in self.pool.members))


class FailoverTests(SynchronousTestCase):
    def test_refused_connection_fails_over(self) -> None:
        """
        A refused connection goes to the next upstream: the client gets its
        answer, and the record and the JSON log say which and after how
        many attempts.
        """
        p = Pooled(self, "a", "b", refused=["a"])
        response, body = p.answer()
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "b")
        self.assertEqual(p.agent.tried, ["a", "b"])
        record = p.h.records[-1]
        self.assertEqual((record.upstream, record.attempts), ("b", 2))
        self.assertEqual(p.pool["a"].breaker.last_failure, "connect")
        p.idle()

    def test_failover_statuses(self) -> None:
        """
        A 500, 502, 503, 504 or 429 fails over: the client sees only the
        next upstream's answer.
        """
        for status in (500, 502, 503, 504, 429):
            p = Pooled(self, "a", "b")
            p.up["a"].status = status
            response, body = p.answer()
            self.assertEqual((response.code, json.loads(body)["id"]), (200, "chatcmpl-b"), status)
            self.assertEqual((len(p.up["a"].bodies), len(p.up["b"].bodies)), (1, 1), status)
            p.idle()

    def test_request_errors_pass_through(self) -> None:
        """
        A 400, 404, 413 or 422 is the request's fault: it goes to the
        client as it came, and no other upstream is asked.
        """
        for status in (400, 404, 413, 422):
            p = Pooled(self, "a", "b")
            p.up["a"].status = status
            response, body = p.answer()
            self.assertEqual(response.code, status)
            self.assertEqual(json.loads(body)["error"]["message"], f"a says {status}")
            self.assertEqual(p.up["b"].bodies, [], status)
            self.assertIs(p.pool["a"].breaker.state, State.CLOSED)
            p.idle()

    def test_last_answer_is_relayed(self) -> None:
        """
        When every attempt fails, the client gets the last upstream's own
        answer: its 429 with its retry-after.
        """
        p = Pooled(self, "a", "b")
        p.up["a"].status = 503
        p.up["b"].status = 429
        p.up["b"].headers = {b"retry-after": b"7"}
        response, body = p.answer()
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"7"])
        self.assertEqual(json.loads(body)["error"]["message"], "b says 429")
        p.idle()

    def test_retry_after_honoured(self) -> None:
        """
        An upstream's 429 with retry-after: 2 gets nothing for 2 seconds
        (the others take its traffic), then one probe, whose success
        brings it back.
        """
        p = Pooled(self, "a", "b")
        p.up["a"].status = 429
        p.up["a"].headers = {b"retry-after": b"2"}
        self.assertEqual(p.answer()[0].code, 200)
        self.assertEqual(len(p.up["a"].bodies), 1)
        for _ in range(3):
            p.h.clock.advance(0.6)
            self.assertEqual(json.loads(p.answer()[1])["id"], "chatcmpl-b")
        self.assertEqual(len(p.up["a"].bodies), 1)
        p.up["a"].status, p.up["a"].headers = 200, {}
        p.h.clock.advance(0.3)
        self.assertEqual(json.loads(p.answer()[1])["id"], "chatcmpl-a")
        self.assertEqual(len(p.up["a"].bodies), 2)
        self.assertIs(p.pool["a"].breaker.state, State.CLOSED)
        p.idle()

    def test_attempts_bound(self) -> None:
        """
        Four upstreams all failing: three are asked (--max-attempts), each
        once, and the client gets the third's answer.
        """
        p = Pooled(self, "a", "b", "c", "d")
        for scripted in p.up.values():
            scripted.status = 503
        response, body = p.answer()
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body)["error"]["message"], "c says 503")
        self.assertEqual([len(s.bodies) for s in p.up.values()], [1, 1, 1, 0])
        self.assertEqual(p.h.records[-1].attempts, 3)
        p.idle()

    def test_max_attempts_setting(self) -> None:
        """
        --max-attempts 1: no failover at all.
        """
        p = Pooled(self, "a", "b", max_attempts=1, refused=["a"])
        response, body = p.answer()
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"))
        self.assertEqual(p.agent.tried, ["a"])
        p.idle()

    def test_all_refused_is_todays_502(self) -> None:
        """
        No upstream answered: today's 502, after trying each.
        """
        p = Pooled(self, "a", "b", refused=["a", "b"])
        response, body = p.answer()
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"))
        self.assertEqual(p.agent.tried, ["a", "b"])
        p.idle()

    def test_retry_advice(self) -> None:
        """
        When every attempt failed and every breaker is open, the client is
        told when the first admits again (retry-after); while one is still
        closed, nothing is added (the SDK's own backoff).
        """
        p = Pooled(self, "a", "b", refused=["a", "b"])
        for _ in range(4):
            response, _ = p.answer()
            self.assertEqual(response.code, 502)
            self.assertIsNone(response.headers.getRawHeaders(b"retry-after"))
        response, _ = p.answer()
        self.assertEqual({m.breaker.state for m in p.pool.members}, {State.OPEN})
        [after] = response.headers.getRawHeaders(b"retry-after")
        self.assertTrue(1 <= int(after) <= 5, after)
        self.assertIsNone(response.headers.getRawHeaders(b"x-should-retry"))

    def test_retry_advice_on_a_relayed_answer(self) -> None:
        """
        The last upstream's own answer, relayed, gains the retry-after of
        the first breaker to admit again once every one is open.
        """
        p = Pooled(self, "a", "b")
        for scripted in p.up.values():
            scripted.status = 503
        for _ in range(4):
            self.assertIsNone(p.answer()[0].headers.getRawHeaders(b"retry-after"))
        response, body = p.answer()
        self.assertEqual(json.loads(body)["error"]["message"], "b says 503")
        [after] = response.headers.getRawHeaders(b"retry-after")
        self.assertTrue(1 <= int(after) <= 5, after)

    def test_access_log_names_the_upstream(self) -> None:
        """
        The access log's text line says which upstream answered, and after
        how many attempts; its event has both as fields.
        """
        p = Pooled(self, "a", "b", refused=["a"])
        record = None
        with capturedLogs() as logged:
            p.answer()
            record = p.h.records[-1]
            TextAccessLog()(record)
        [line] = [e for e in logged if e.get("log_namespace") == "oaiproxy.access"]
        self.assertIn(" via b, 2 attempts", formatEvent(line))
        self.assertEqual((line["upstream"], line["attempts"]), ("b", 2))
        single = Harness()
        self.successResultOf(single.post(chat_body()))
        single.pump()
        with capturedLogs() as logged:
            TextAccessLog()(single.records[-1])
        self.assertEqual(single.records[-1].upstream, "default")
        self.assertNotIn(" via ", formatEvent(logged[0]))

    def test_model_nobody_serves(self) -> None:
        """
        A model no upstream serves is OpenAI's 404, and nothing is sent.
        """
        p = Pooled(self, members=[member("a", models=("gpt-4o*",))])
        response, body = p.answer(chat_body(model="o3"))
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (404, "model_not_found"))
        self.assertEqual(p.agent.tried, [])

    def test_key_refused(self) -> None:
        """
        An upstream that refuses its key (401) is skipped from then on (its
        breaker opens for long) and logged critical; the client gets the
        next upstream's answer.  When it is the last, the client gets
        today's 502 upstream_auth_failed, never the 401.
        """
        p = Pooled(self, "a", "b")
        p.up["a"].status = 401
        with capturedLogs() as logged:
            response, body = p.answer()
        self.assertEqual(json.loads(body)["id"], "chatcmpl-b")
        self.assertIs(p.pool["a"].breaker.state, State.OPEN)
        critical = [e for e in logged if e["log_level"] is LogLevel.critical]
        self.assertTrue(any(e.get("upstream") == "a" for e in critical), critical)
        p.h.clock.advance(60)
        p.answer()
        self.assertEqual(len(p.up["a"].bodies), 1)
        p.idle()

        last = Pooled(self, "a")
        last.up["a"].status = 401
        response, body = last.answer()
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (502, "upstream_auth_failed"))
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])

    def test_key_refused_single_upstream(self) -> None:
        """
        With the single-upstream options, a refused key is today's: a 502
        upstream_auth_failed and a critical line naming the key options,
        every time (its breaker never opens: nothing to fail over to).
        """
        h = Harness()
        h.credentials.replace(Secret(b"sk-wrong"), h.credentials.clients)
        for _ in range(2):
            with capturedLogs() as logged:
                response = self.successResultOf(h.post(chat_body()))
            self.assertEqual(response.code, 502)
            critical = [formatEvent(e) for e in logged if e["log_level"] is LogLevel.critical]
            self.assertEqual(len(critical), 1, critical)
            self.assertIn("check --api-key-file", critical[0])
        self.assertEqual(len(h.fake.requests), 2)

    def test_all_open(self) -> None:
        """
        When every upstream is out (each failed five times in a row), one
        request goes to the first to come back as its early probe; the
        others meanwhile get a 503 upstreams_unavailable with retry-after.
        """
        p = Pooled(self, "a", "b")
        for scripted in p.up.values():
            scripted.status = 500
        for _ in range(5):
            self.assertEqual(p.answer()[0].code, 500)
        self.assertEqual({m.breaker.state for m in p.pool.members}, {State.OPEN})
        p.up["a"].mode = p.up["b"].mode = "hang"
        probe = p.post()
        self.assertNoResult(probe)
        response, body = p.answer()
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (503, "upstreams_unavailable"))
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        self.assertEqual(sum(len(s.bodies) for s in p.up.values()), 11)

    def test_model_map(self) -> None:
        """
        An upstream's model_map renames the body's model for it alone; the
        next upstream gets the client's bytes unchanged.
        """
        p = Pooled(
            self,
            members=[member("a", priority=0, model_map={"gpt-4o-mini": "mini-2024"}), member("b", priority=1)],
        )
        p.up["a"].status = 503
        sent = chat_body() + b"  "
        self.assertEqual(p.answer(sent)[0].code, 200)
        self.assertEqual(json.loads(p.up["a"].bodies[0])["model"], "mini-2024")
        self.assertEqual(p.up["b"].bodies[0], sent)


class StreamTests(SynchronousTestCase):
    def cut_first(self, deadline: float, read_timeout: float, second: str) -> tuple[Pooled, "Deferred[IResponse]"]:
        """
        A stream whose first upstream sends its head and no byte, cut at
        C{deadline}: the second (doing C{second}) has the request.
        """
        p = Pooled(self, "a", "b", first_byte_timeout=deadline, read_timeout=read_timeout)
        p.up["a"].mode, p.up["b"].mode = "head", second
        d = p.post(chat_body(stream=True))
        p.h.clock.advance(deadline + 0.1)
        p.h.pump()
        self.assertEqual(len(p.up["b"].bodies), 1)
        return p, d

    def test_never_after_first_byte(self) -> None:
        """
        An upstream that fails after its stream started is not retried:
        the client gets today's in-band error, and the breaker counts it.
        """
        p = Pooled(self, "a", "b", read_timeout=5)
        p.up["a"].mode = "head"
        response = self.successResultOf(p.post(chat_body(stream=True)))
        p.up["a"].held[0].write(event("a"))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        p.h.pump()
        p.h.clock.advance(6)
        p.h.pump()
        self.failureResultOf(done)
        self.assertIn(b"no data for 5 seconds", b"".join(received))
        self.assertEqual(p.up["b"].bodies, [])
        self.assertEqual(p.pool["a"].breaker.last_failure, "broken")
        p.idle()

    def test_first_byte_deadline(self) -> None:
        """
        With --first-byte-timeout 2, a stream whose first byte is late is
        cut at 2 seconds and comes from the next upstream.
        """
        p = Pooled(self, "a", "b", first_byte_timeout=2.0)
        p.up["a"].mode = "head"
        p.up["b"].mode = "stream"
        d = p.post(chat_body(stream=True))
        p.h.clock.advance(1.9)
        p.h.pump()
        self.assertNoResult(d)
        self.assertEqual(p.up["b"].bodies, [])
        p.h.clock.advance(0.2)
        p.h.pump()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertIn(b'"content": "b"', body)
        self.assertEqual(p.up["a"].gone, 1)
        self.assertEqual(p.pool["a"].breaker.last_failure, "first_byte")
        p.idle()

    def test_first_byte_deadline_spares_the_last(self) -> None:
        """
        The last candidate is never cut by the first-byte deadline: it runs
        to its read timeout.
        """
        p, d = self.cut_first(2.0, 30, "head")
        p.h.clock.advance(20)
        p.h.pump()
        self.assertEqual(p.up["b"].gone, 0)
        response = self.successResultOf(d)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        p.up["b"].held[0].write(event("b") + b"data: [DONE]\n\n")
        p.up["b"].held[0].finish()
        p.h.pump()
        self.successResultOf(done)
        self.assertIn(b'"content": "b"', b"".join(received))
        p.idle()

    def test_held_head_of_an_empty_stream(self) -> None:
        """
        A stream held for its first byte that ends with none still gets its
        head (status and content type) to the client.
        """
        p = Pooled(self, "a", "b", first_byte_timeout=2.0)
        p.up["a"].mode = "head"
        d = p.post(chat_body(stream=True))
        p.up["a"].held[0].finish()
        p.h.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(self.successResultOf(treq.content(response)), b"")
        self.assertEqual(p.up["b"].bodies, [])
        p.idle()

    def test_within_the_read_timeout_overall(self) -> None:
        """
        A later attempt waits for its head only as long as is left of the
        read timeout, counted from the first attempt: a stream cut at 4 s
        gives the next upstream 6 s of a 10 s read timeout, then a 504.
        """
        p, d = self.cut_first(4.0, 10, "hang")
        p.h.clock.advance(5.8)
        p.h.pump()
        self.assertNoResult(d)
        p.h.clock.advance(0.2)
        p.h.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        p.idle()

    def test_no_attempt_after_the_read_timeout(self) -> None:
        """
        An upstream silent for the whole read timeout leaves no time for
        another: the client gets today's 504.
        """
        p = Pooled(self, "a", "b", read_timeout=10)
        p.up["a"].mode = "hang"
        d = p.post()
        p.h.clock.advance(10.1)
        p.h.pump()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (504, "upstream_timeout"))
        self.assertEqual(p.up["b"].bodies, [])
        self.assertEqual(p.pool["a"].breaker.last_failure, "no_head")
        p.idle()

    def test_deadline_is_for_streams_only(self) -> None:
        """
        A request that does not stream is never cut by the first-byte
        deadline.
        """
        p = Pooled(self, "a", "b", first_byte_timeout=2.0)
        p.up["a"].mode = "hang"
        d = p.post()
        p.h.clock.advance(10)
        p.h.pump()
        self.assertNoResult(d)
        self.assertEqual(p.up["b"].bodies, [])


class InFlightTests(SynchronousTestCase):
    def test_released_when_the_client_leaves(self) -> None:
        """
        A client that leaves while its upstream is silent releases the
        upstream's in-flight count, and its breaker hears nothing against
        it.
        """
        p = Pooled(self, "a", "b")
        p.up["a"].mode = "hang"
        d = p.post()
        self.assertEqual(p.in_flight(), {"a": 1, "b": 0})
        d.cancel()
        p.h.pump()
        self.failureResultOf(d)
        p.idle()
        self.assertIsNone(p.pool["a"].breaker.last_failure)
        self.assertEqual(p.up["b"].bodies, [])

    def test_released_when_the_client_leaves_mid_stream(self) -> None:
        p = Pooled(self, "a", "b")
        p.up["a"].mode = "head"
        response = self.successResultOf(p.post(chat_body(stream=True)))
        p.up["a"].held[0].write(event("a"))

        def leave(data: bytes) -> None:
            raise RuntimeError("client leaves")

        done = treq.collect(response, leave)
        p.h.pump()
        self.failureResultOf(done, RuntimeError)
        p.idle()


class UploadTests(SynchronousTestCase):
    def upload(self, p: Pooled) -> IResponse:
        body, content_type = form([("model", "whisper-1"), ("file", b"RIFF" + b"\0" * 64)])
        headers = {b"content-type": [content_type]}
        response = self.successResultOf(p.h.post(body, "/v1/audio/transcriptions", headers))
        p.h.pump()
        return response

    def test_retried_when_nothing_was_sent(self) -> None:
        """
        A streamed upload whose connection was refused goes to the next
        upstream whole.
        """
        p = Pooled(self, "a", "b", refused=["a"], routes=[r.name for r in ROUTES])
        response = self.upload(p)
        self.assertEqual(response.code, 200)
        self.assertIn(b"RIFF", p.up["b"].bodies[0])
        p.idle()

    def test_not_retried_once_sent(self) -> None:
        """
        A streamed upload upstream has taken is not sent again: its 503 is
        the answer.
        """
        p = Pooled(self, "a", "b", routes=[r.name for r in ROUTES])
        p.up["a"].status = 503
        response = self.upload(p)
        self.assertEqual(response.code, 503)
        self.assertEqual(p.up["b"].bodies, [])
        p.idle()


class ReloadTests(SynchronousTestCase):
    def test_replace_keeps_breakers(self) -> None:
        """
        A reload keeps the breaker of a name that stays (still open: no
        request reaches it), and a new name starts closed and takes
        traffic.
        """
        p = Pooled(self, "a", "b")
        p.up["a"].status = 429
        p.up["a"].headers = {b"retry-after": b"60"}
        p.answer()
        upstreams = p.h.built.upstreams
        upstreams.replace([member("a", priority=0), member("c", priority=1)])
        self.assertIs(p.pool["a"].breaker.state, State.OPEN)
        p.up["c"] = Scripted("c")
        p.h.upstream_agent = RequestTraversalAgent(ByHost({f"{n}.test".encode(): s for n, s in p.up.items()}))
        p.agent._agent = p.h.upstream_agent
        self.assertEqual(json.loads(p.answer()[1])["id"], "chatcmpl-c")
        self.assertEqual(len(p.up["a"].bodies), 1)
        self.assertEqual(sorted(upstreams.clients), ["a", "c"])


class HookTests(SynchronousTestCase):
    def test_attempts_and_transitions_are_told(self) -> None:
        """
        Whoever watches the pool (the metrics) hears of every attempt's end,
        with whether it failed over, and of every breaker transition.
        """
        p = Pooled(self, "a", "b")
        upstreams = p.h.built.upstreams
        attempts: list[tuple[str, str, bool]] = []
        transitions: list[tuple[str, str]] = []
        upstreams.listen(lambda name, outcome, decision: attempts.append((name, outcome.reason, decision.fail_over)))
        upstreams.observe(lambda t: transitions.append((t.upstream, t.new.label)))
        p.up["a"].status = 429
        p.up["a"].headers = {b"retry-after": b"3"}
        p.answer()
        self.assertEqual(attempts, [("a", "status 429", True), ("b", "status 200", False)])
        self.assertEqual(transitions, [("a", "open")])

    def test_a_watchers_bug_fails_no_request(self) -> None:
        """
        A listener or observer that raises is logged; the request it
        watched is answered all the same.
        """
        p = Pooled(self, "a", "b")
        upstreams = p.h.built.upstreams

        def broken(*args: Any) -> None:
            raise ZeroDivisionError()

        upstreams.listen(broken)
        upstreams.observe(broken)
        p.up["a"].status = 429
        p.up["a"].headers = {b"retry-after": b"3"}
        self.assertEqual(p.answer()[0].code, 200)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 3)


class MemberClientTests(SynchronousTestCase):
    def test_each_member_its_own_client(self) -> None:
        """
        Each member's client has its own URL, style, read timeout and, for
        an entry with its own connect_timeout, its own HTTP client (the
        timeout is the agent's).
        """
        made: list[float] = []

        def http_for(timeout: float) -> str:
            made.append(timeout)
            return f"agent-{timeout:g}"

        members = (
            member("a"),
            replace(member("b", connect_timeout=2.0, read_timeout=7.0), style="azure", url="https://b.test"),
        )
        built = build_site(
            replace(harness_config(clients=ClientRegistry()), upstreams=members),
            http="shared",
            credentials=Credentials(Secret(b"unused"), ClientRegistry()),
            clock=Clock(),
            lifecycle=Lifecycle(),
            metrics=Metrics(),
            access_log=lambda record: None,
            http_for=http_for,
        )
        a, b = built.upstreams.client("a"), built.upstreams.client("b")
        self.assertEqual(
            (a.base_url, a.style.name, a.read_timeout, a._http), ("http://a.test/v1", "openai", 30.0, "shared")
        )
        self.assertEqual(
            (b.base_url, b.style.name, b.read_timeout, b._http), ("https://b.test", "azure", 7.0, "agent-2")
        )
        self.assertEqual(made, [2.0])
