"""
Tests for L{oaiproxy.routes.validation}: the checks a chat completions body must
pass before the proxy spends an upstream call on it.

Valid bodies yield the model and whether the client asked to stream;
invalid ones yield a 400 C{invalid_request_error} naming the offending
field, and never quoting the body, which may hold private data.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import treq
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy import fastjson
from oaiproxy.errors import ApiError
from oaiproxy.fake.harness import CLIENT_KEY, Harness, registry
from oaiproxy.routes.validation import JsonRequest, parse_json_request
from oaiproxy.routetable import CHAT

#: A distinctive string standing for private data in a request body.
SECRET = "sk-live-DONOTLEAK-7f3a9c"

USER_MESSAGE = {"role": "user", "content": "hello"}


def parse_chat(data: bytes) -> "JsonRequest | ApiError":
    """
    The check a chat completions body passes, as the route runs it.
    """
    return parse_json_request(data, CHAT)


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
    Acceptable bodies yield a L{JsonRequest}.
    """

    def parse(self, data: bytes) -> JsonRequest:
        result = parse_chat(data)
        self.assertIsInstance(result, JsonRequest, f"rejected: {result!r}")
        assert isinstance(result, JsonRequest)
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
            "JsonRequest(model='m', stream=True)",
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
        result = parse_chat(data)
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
            result = parse_chat(b"[" * 100_000 + b"]" * 100_000)
        except RecursionError:
            self.fail("RecursionError escaped parse_json_request")
        self.assertIsInstance(result, ApiError)


class NoEchoTests(SynchronousTestCase):
    """
    Error messages never quote the request body.
    """

    def assertNotEchoed(self, data: bytes) -> None:
        result = parse_chat(data)
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


#: The members the proxy decides on, and a value of the right type for each.
DECIDING = {
    "model": '"gpt-4o"',
    "stream": "true",
    "stream_options": '{"include_usage": true}',
    "max_tokens": "10",
    "max_completion_tokens": "10",
    "max_output_tokens": "10",
    "n": "2",
    "prompt": '{"id": "pmpt_1"}',
}


def members(*pairs: tuple[str, str]) -> bytes:
    """
    A valid chat body with the raw C{(name, JSON value)} members added at
    the end, repeated names and odd spellings kept as written.
    """
    extra = "".join(f', "{name}": {value}' for name, value in pairs)
    return ('{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]' + extra + "}").encode()


class RepeatedMemberTests(SynchronousTestCase):
    """
    A member the proxy decides on, given twice or under two spellings, is
    refused: the proxy reads the last value, many parsers the first, and
    Go's (Ollama's) any case-insensitive match, so the model checked
    against an allow-list (or the stream flag, the token limits) might not
    be the one upstream uses.
    """

    def assertRepeated(self, data: bytes, param: str) -> None:
        result = parse_chat(data)
        self.assertIsInstance(result, ApiError, f"accepted: {data!r}")
        assert isinstance(result, ApiError)
        self.assertEqual((result.status, result.param, result.code), (400, param, "duplicate_parameter"), data)
        self.assertIn(param, result.message)

    def assertAccepted(self, data: bytes) -> None:
        self.assertIsInstance(parse_chat(data), JsonRequest, data)

    def test_exact_repeat(self) -> None:
        """
        Each deciding member given twice is refused, wherever the two are.
        """
        for name, value in DECIDING.items():
            self.assertRepeated(members((name, value), (name, value)), name)
        self.assertRepeated(members(("model", '"gpt-4o"')), "model")
        self.assertRepeated(b'{"model": "a", "model": "b", "messages": [{"role": "user"}]}', "model")

    def test_escaped_spelling(self) -> None:
        """
        A name spelled with escapes (every parser reads C{mod\\u0065l} as
        C{model}) counts as the same name.
        """
        for spelling in ["mod\\u0065l", "\\u006d\\u006f\\u0064\\u0065\\u006c", "mode\\u006C", "\\u006dodel"]:
            self.assertRepeated(members((spelling, '"gpt-4o"')), "model")
        self.assertRepeated(members(("max\\u005ftokens", "1"), ("max_tokens", "5")), "max_tokens")

    def test_other_case(self) -> None:
        """
        A name in another case, or with a character Go's case folding maps
        to an ASCII letter (the long s, the Kelvin sign), is refused, even
        alone: a case-insensitive upstream reads it as the member.
        """
        for spelling, name in [
            ("Model", "model"),
            ("MODEL", "model"),
            ("Stream", "stream"),
            ("\u017ftream", "stream"),
            ("max_to\u212aens", "max_tokens"),
            ("N", "n"),
        ]:
            self.assertRepeated(members((spelling, DECIDING[name])), name)
        self.assertRepeated(members(("Stream_Options", "{}")), "stream_options")

    def test_nested_include_usage(self) -> None:
        """
        C{stream_options.include_usage}, which decides whether a stream's
        usage is reported, is checked the same way.
        """
        for inner in (
            '{"include_usage": false, "include_usage": true}',
            '{"include_usage": false, "include_\\u0075sage": true}',
            '{"Include_Usage": true}',
        ):
            self.assertRepeated(members(("stream", "true"), ("stream_options", inner)), "stream_options.include_usage")

    def test_other_encodings(self) -> None:
        """
        A UTF-16 or UTF-32 body (which the standard library accepts) with
        a repeated model is refused too; byte counts would not see it.
        """
        for encoding in ("utf-16-le", "utf-16-be", "utf-32-le"):
            data = members(("model", '"gpt-4o"')).decode().encode(encoding)
            self.assertRepeated(data, "model")
            self.assertAccepted(valid().decode().encode(encoding))

    def test_nested_names_are_not_members(self) -> None:
        """
        The same names deeper in the body (a tool's parameters, a message's
        fields, values) are not the top-level members, and are accepted.
        """
        tool = {
            "type": "function",
            "function": {
                "name": "pick",
                "parameters": {
                    "type": "object",
                    "properties": {"model": {"type": "string"}, "n": {"type": "integer"}, "stream": {}},
                },
            },
        }
        messages = [
            {"role": "user", "content": "model", "name": "n"},
            {"role": "assistant", "content": '"model": "other"', "model": "x", "stream": True},
        ]
        self.assertAccepted(valid(tools=[tool, tool], messages=messages, stream=True, n=1))
        self.assertAccepted(valid(stream_options={"include_usage": True}, metadata={"include_usage": "model"}))

    def test_escapes_in_text_are_accepted(self) -> None:
        """
        Escapes in text (non-ASCII, HTML-safe encoders' C{\\u003c}, an
        escaped letter in a message) do not make a body refused.
        """
        self.assertAccepted(members(("user", '"\\u00e9\\u4f60\\u003cb\\u003e"')))
        self.assertAccepted(members(("user", '"he\\u006clo"')))
        self.assertAccepted(
            json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "héllo 你好"}]}).encode()
        )

    def test_other_repeats_left_to_upstream(self) -> None:
        """
        A repeated member the proxy does not decide on (C{temperature}) is
        upstream's to judge.
        """
        self.assertAccepted(members(("temperature", "1"), ("temperature", "0")))

    def test_through_the_proxy(self) -> None:
        """
        A client limited to one model cannot name another after it: the
        request is refused and nothing goes upstream.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["gpt-4o-mini"]))
        data = b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "model": "gpt-4o"}'
        response = self.successResultOf(h.post(data, headers={b"authorization": [b"Bearer " + CLIENT_KEY]}))
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual((response.code, error["param"], error["code"]), (400, "model", "duplicate_parameter"))
        self.assertEqual(h.fake.requests, [])


def padded(data: bytes, value: str) -> bytes:
    """
    C{data} with a C{"padding"} member of raw JSON C{value} first, so that
    it is large enough to be walked (L{fastjson.WALK_FROM}); a body that is
    not UTF-8 is left as it is.
    """
    if not json.detect_encoding(data).startswith("utf-8") or not data.startswith(b"{"):
        return data
    return b'{"padding": ' + value.encode() + b", " + data[1:]


#: A long string: the walk jumps over it.
LONG_STRING = json.dumps("x" * fastjson.WALK_FROM)
#: A long list of short strings and escapes: more quotes and backslashes
#: than the walk's budget, so the searches decide.
DENSE_STRINGS = json.dumps(['a"b', "mode", "x\ny"] * (fastjson.WALK_FROM // 16))


class LargeBodyRepeatedMemberTests(RepeatedMemberTests):
    """
    The same answers for a large body whose bulk is one long string (the
    walk from quote to quote decides).
    """

    padding = LONG_STRING

    def assertRepeated(self, data: bytes, param: str) -> None:
        super().assertRepeated(padded(data, self.padding), param)

    def assertAccepted(self, data: bytes) -> None:
        super().assertAccepted(padded(data, self.padding))

    def test_walk_decides(self) -> None:
        """
        The padding takes the path this class is for: the walk answers for
        a long string, and leaves a dense body to the searches.
        """
        walked = fastjson.RepeatedMembers(frozenset({"model"}))._walk(padded(members(), self.padding))
        self.assertEqual(walked, False if self.padding is LONG_STRING else None)


class DenseLargeBodyRepeatedMemberTests(LargeBodyRepeatedMemberTests):
    """
    The same answers for a large body dense with quotes and escapes (the
    walk gives up within its budget and the searches decide).
    """

    padding = DENSE_STRINGS


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


class RepeatedMemberProperties(SynchronousTestCase):
    """
    Properties over generated bodies.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(['"', "\\", "model", "n", '"model"', '"n"', "u0065", "\\u006d", '\\"', "x", " "]),
            max_size=30,
        ),
        st.booleans(),
    )
    @example(['"model"', "model", '"'], True)  # the closing quote of a name opens nothing
    @example(['"x', '"model"', '"model"'], False)
    def test_walk_answers_as_the_searches(self, pieces: list[str], first: bool) -> None:
        """
        The walk over a large body answers what the two searches answer
        for the same bytes (or leaves it to them), whatever the quotes and
        backslashes around the names: a quote that closes a name does not
        open another, one that closes anything else may.
        """
        repeated = fastjson.RepeatedMembers(frozenset({"model", "n"}))
        text = "".join(pieces).encode()
        spaces = b" " * fastjson.WALK_FROM
        walked = repeated._walk(text + spaces if first else spaces + text)
        self.assertEqual(walked, repeated._may_repeat(text), text)

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=5), st.booleans())
    def test_no_repeat_no_refusal(self, extra: dict[str, Any], ascii: bool) -> None:
        """
        A body serialised from a document (so without repeated members),
        escaped or not, is never refused as repeating one, unless a
        generated name is another spelling of a deciding member.
        """
        document = {"model": "gpt-4o-mini", "messages": [USER_MESSAGE]}
        document.update({k: v for k, v in extra.items() if k.casefold() not in DECIDING})
        data = json.dumps(document, ensure_ascii=ascii).encode()
        result = parse_chat(data)
        self.assertFalse(isinstance(result, ApiError) and result.code == "duplicate_parameter", data)

    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=5),
        st.sampled_from(sorted(DECIDING)),
        st.integers(min_value=0, max_value=10),
    )
    def test_repeat_always_refused(self, extra: dict[str, Any], name: str, where: int) -> None:
        """
        A deciding member repeated anywhere among the top-level members,
        whatever else the body holds, is refused.
        """
        document = {"model": "gpt-4o-mini", "messages": [USER_MESSAGE]}
        document.update({k: v for k, v in extra.items() if k.casefold() not in DECIDING})
        parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in document.items()]
        for _ in range(2 if name != "model" else 1):
            parts.insert(where % (len(parts) + 1), f'"{name}": {DECIDING[name]}')
        data = ("{" + ", ".join(parts) + "}").encode()
        result = parse_chat(data)
        assert isinstance(result, ApiError), data
        self.assertEqual((result.code, result.param), ("duplicate_parameter", name))
