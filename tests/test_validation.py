"""
Tests for L{oaiproxy.validation}: the checks a chat completions body must
pass before the proxy spends an upstream call on it.

Valid bodies yield the model and whether the client asked to stream;
invalid ones yield a 400 C{invalid_request_error} naming the offending
field, and never quoting the body, which may hold private data.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.errors import ApiError
from oaiproxy.validation import ChatRequest, parse_chat_request

#: A distinctive string standing for private data in a request body.
SECRET = "sk-live-DONOTLEAK-7f3a9c"

USER_MESSAGE = {"role": "user", "content": "hello"}


def body(**document: Any) -> bytes:
    """
    A JSON request body holding C{document}.
    """
    return json.dumps(document).encode("utf-8")


def valid(**more: Any) -> bytes:
    """
    A valid body, with C{more} fields added or replaced.
    """
    document: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [USER_MESSAGE]}
    document.update(more)
    return body(**document)


def without(field: str) -> bytes:
    """
    A valid body with C{field} removed.
    """
    document = json.loads(valid())
    del document[field]
    return body(**document)


class ValidTests(SynchronousTestCase):
    """
    Acceptable bodies yield a L{ChatRequest}.
    """

    def parse(self, data: bytes) -> ChatRequest:
        result = parse_chat_request(data)
        self.assertIsInstance(result, ChatRequest, f"rejected: {result!r}")
        assert isinstance(result, ChatRequest)
        return result

    def test_plain(self) -> None:
        """
        A minimal body is accepted, reporting its model and no streaming.
        """
        result = self.parse(valid(model="gpt-4.1"))
        self.assertEqual((result.model, result.stream), ("gpt-4.1", False))

    def test_stream_true(self) -> None:
        """
        C{"stream": true} makes the proxy relay server-sent events.
        """
        self.assertIs(self.parse(valid(stream=True)).stream, True)

    def test_stream_must_be_exactly_true(self) -> None:
        """
        Only the JSON literal C{true} counts as streaming; truthy look-alikes
        do not switch the proxy into event-stream mode.
        """
        for value in [False, None, 1, "true", "yes", [True], {"a": 1}]:
            self.assertIs(self.parse(valid(stream=value)).stream, False, repr(value))

    def test_unknown_fields_accepted(self) -> None:
        """
        Fields the proxy does not know (new API features) are left for
        OpenAI to judge.
        """
        result = self.parse(
            valid(
                temperature=0.2,
                tools=[{"type": "function"}],
                brand_new_option={"x": 1},
                messages=[{"role": "system", "content": None}, {"role": "anything"}],
            )
        )
        self.assertEqual(result.model, "gpt-4o-mini")

    def test_whitespace_and_unicode(self) -> None:
        """
        Pretty-printed JSON with non-ASCII content is accepted.
        """
        data = json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "héllo 世界"}]},
            indent=2,
            ensure_ascii=False,
        ).encode("utf-8")
        self.assertEqual(self.parse(b"\n" + data + b"\n").model, "gpt-4o")

    def test_repr(self) -> None:
        """
        A request's repr shows model and stream, for logs.
        """
        self.assertEqual(
            repr(self.parse(valid(model="m", stream=True))),
            "ChatRequest(model='m', stream=True)",
        )


class RejectTests(SynchronousTestCase):
    """
    Unacceptable bodies yield a 400 naming the problem.
    """

    def rejected(self, data: bytes, param: Optional[str], code: Optional[str] = None) -> ApiError:
        """
        Assert C{data} is refused with a 400 C{invalid_request_error} for
        C{param} (and C{code}, when given), and return the error.
        """
        result = parse_chat_request(data)
        self.assertIsInstance(result, ApiError, f"accepted: {data!r}")
        assert isinstance(result, ApiError)
        self.assertEqual((result.status, result.type), (400, "invalid_request_error"))
        self.assertEqual(result.param, param)
        if code is not None:
            self.assertEqual(result.code, code)
        self.assertTrue(result.message)
        return result

    def test_not_json(self) -> None:
        """
        A body that is not JSON is refused as C{invalid_json}.
        """
        for data in [b"", b"not json", b'{"model": "m",', b"{'model': 'm'}"]:
            self.rejected(data, None, "invalid_json")

    def test_invalid_utf8(self) -> None:
        """
        A body that is not valid UTF-8 is a 400, not a crash.
        """
        data = b'{"model": "gpt\xff\xfe", "messages": [{"role": "user"}]}'
        self.rejected(data, None, "invalid_json")

    def test_not_an_object(self) -> None:
        """
        JSON that is not an object is refused with a message saying so.
        """
        for data in [b"[]", b'[{"model": "m"}]', b'"text"', b"42", b"null", b"true"]:
            error = self.rejected(data, None, "invalid_json")
            self.assertIn("JSON object", error.message)

    def test_model_missing(self) -> None:
        """
        A missing or null model is reported as a missing parameter.
        """
        self.rejected(without("model"), "model", "missing_required_parameter")
        self.rejected(valid(model=None), "model", "missing_required_parameter")

    def test_model_empty(self) -> None:
        """
        An empty model name is refused.
        """
        self.rejected(valid(model=""), "model")

    def test_model_not_a_string(self) -> None:
        """
        A model that is not a string is refused as the wrong type.
        """
        for value in [42, True, ["gpt-4o"], {"name": "gpt-4o"}]:
            self.rejected(valid(model=value), "model", "invalid_type")

    def test_messages_missing_or_empty(self) -> None:
        """
        A request without messages is refused.
        """
        self.rejected(without("messages"), "messages")
        self.rejected(valid(messages=[]), "messages")
        self.rejected(valid(messages=None), "messages")

    def test_messages_not_a_list(self) -> None:
        """
        Messages given as a string or a single object are refused.
        """
        for value in ["hello", USER_MESSAGE, 3]:
            self.rejected(valid(messages=value), "messages")

    def test_message_not_an_object(self) -> None:
        """
        A message that is not an object is refused, naming its index.
        """
        error = self.rejected(valid(messages=[USER_MESSAGE, "hello"]), "messages")
        self.assertIn("messages[1]", error.message)

    def test_role_missing(self) -> None:
        """
        A message without a role is refused, naming its index.
        """
        error = self.rejected(valid(messages=[USER_MESSAGE, USER_MESSAGE, {"content": "hi"}]), "messages")
        self.assertIn("messages[2].role", error.message)

    def test_role_not_a_string(self) -> None:
        """
        A role that is not a string is refused, naming its index.
        """
        for role in [None, 7, ["user"]]:
            error = self.rejected(valid(messages=[{"role": role, "content": "hi"}]), "messages")
            self.assertIn("messages[0].role", error.message)

    def test_deeply_nested_json(self) -> None:
        """
        Absurdly nested JSON is a client error, not a proxy crash.
        """
        try:
            result = parse_chat_request(b"[" * 100_000 + b"]" * 100_000)
        except RecursionError:
            self.fail("RecursionError escaped parse_chat_request")
        self.assertIsInstance(result, ApiError)


class NoEchoTests(SynchronousTestCase):
    """
    Error messages never quote the request body.
    """

    def assertNotEchoed(self, data: bytes) -> None:
        result = parse_chat_request(data)
        self.assertIsInstance(result, ApiError, f"accepted: {data!r}")
        assert isinstance(result, ApiError)
        self.assertNotIn(SECRET.encode(), result.body())
        self.assertNotIn(SECRET, result.message)

    def test_secret_not_in_any_error(self) -> None:
        """
        Private data in a rejected body (a prompt, a pasted key) never
        appears in the error sent back or logged.
        """
        secret_message = {"role": "user", "content": SECRET}
        cases = [
            b'{"model": "' + SECRET.encode() + b'", "messages": [',  # truncated JSON
            b'{"content": "' + SECRET.encode() + b'\xff"}',  # invalid UTF-8
            json.dumps([SECRET]).encode(),
            json.dumps(SECRET).encode(),
            body(messages=[secret_message]),
            body(model=[SECRET], messages=[secret_message]),
            body(model={SECRET: SECRET}),
            valid(messages=SECRET),
            valid(messages=[secret_message, SECRET]),
            valid(messages=[{"content": SECRET}]),
            valid(messages=[{"role": [SECRET], "content": SECRET}]),
        ]
        for data in cases:
            self.assertNotEchoed(data)
