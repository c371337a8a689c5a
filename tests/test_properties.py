"""
Property-based tests: random bodies, JSON shapes, header values, methods
and paths thrown at the real Resource tree (in memory, in front of the
fake upstream).  Whatever comes in, the answer is a complete HTTP response
with an OpenAI-shaped error or a forwarded answer: never a hang, a
traceback, a logged failure, or a secret in the body.
"""

from __future__ import annotations

import json
import string
from typing import Any

import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.text(max_size=12), st.integers(), st.none()),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {}, optional={"role": st.one_of(st.text(max_size=8), st.integers()), "content": json_values}
                ),
                max_size=3,
            ),
            json_values,
        ),
        "stream": st.one_of(st.booleans(), json_values),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=10**9), json_values),
        "n": st.one_of(st.integers(min_value=-2, max_value=5), json_values),
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    chat_like.map(lambda v: json.dumps(v).encode()),
)
header_text = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/=+,;", max_size=40)
header_names = st.sampled_from(
    [b"authorization", b"content-type", b"accept", b"openai-organization", b"x-request-id", b"connection", b"x-custom"]
)
headers = st.dictionaries(header_names, header_text.map(lambda t: [t.encode()]), max_size=5)
paths = st.lists(st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=12), max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
FORWARDED_OR_ERROR = {200, 400, 401, 403, 404, 405, 429, 500, 502, 504, 307}


class ResourceTreeProperties(SynchronousTestCase):
    def exchange(
        self, h: Harness, method: str, path: str, body: bytes, sent: dict[bytes, list[bytes]]
    ) -> tuple[Any, bytes, list[Any]]:
        with capturedLogs() as events:
            d = h.proxy.request(method, "http://proxy.test" + path, data=body, headers=sent, allow_redirects=False)
            for _ in range(3):
                h.clock.advance(1)
                h.pump()
            response = self.successResultOf(d)  # no hang
            content = self.successResultOf(treq.content(response))
        return response, content, list(events)

    def check(self, response: Any, content: bytes, events: list[Any], forwarded: bool) -> None:
        self.assertIn(response.code, FORWARDED_OR_ERROR)
        self.assertNotIn(UPSTREAM_KEY, content)
        self.assertNotIn(b"Traceback", content)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.error], [])
        if response.code != 200 and not forwarded and content:
            error = json.loads(content)["error"]
            self.assertEqual(set(error), {"message", "type", "param", "code"})

    @SETTINGS
    @given(body=bodies, sent=headers)
    def test_any_body_to_chat(self, body: bytes, sent: dict[bytes, list[bytes]]) -> None:
        """
        Any body and header values posted to chat completions get a clean
        answer.
        """
        h = Harness()
        response, content, events = self.exchange(h, "POST", "/v1/chat/completions", body, sent)
        self.check(response, content, events, forwarded=bool(h.fake.requests))

    @SETTINGS
    @given(method=methods, path=paths, body=bodies)
    def test_any_method_and_path(self, method: str, path: str, body: bytes) -> None:
        """
        Any method on any path gets a clean answer: the endpoints, a 405,
        or a 404.
        """
        h = Harness()
        response, content, events = self.exchange(h, method, path, body, {})
        self.check(response, content, events, forwarded=bool(h.fake.requests))

    @SETTINGS
    @given(token=st.binary(max_size=60), body=bodies)
    def test_any_credential_with_client_keys(self, token: bytes, body: bytes) -> None:
        """
        With client keys on, no random credential gets through to upstream.
        """
        h = Harness(client_keys=[CLIENT_KEY])
        value = b"Bearer " + bytes(b for b in token if 0x21 <= b < 0x7F)
        response, content, events = self.exchange(h, "POST", "/v1/chat/completions", body, {b"authorization": [value]})
        self.check(response, content, events, forwarded=False)
        if value != b"Bearer " + CLIENT_KEY:
            self.assertEqual(h.fake.requests, [])
            self.assertEqual(response.code, 401)
