"""
Tests for L{oaiproxy.usage}: what a response really cost, read from the
relayed bytes.

They cover event streams (usage read from the final chunk however the bytes
are split between reads, generated text counted for the estimate, junk
lines ignored), the fallback estimate for a stream without usage or cut
short, and plain JSON bodies (read only once complete, and only up to
L{PLAIN_BODY_LIMIT}).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.usage import PLAIN_BODY_LIMIT, UsageMeter


def event(payload: Any) -> bytes:
    """
    One server-sent event carrying C{payload} as JSON.
    """
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(**delta: str) -> bytes:
    """
    A streamed completion chunk whose delta holds C{delta}, with the
    C{usage: null} that C{include_usage} adds to every chunk but the last.
    """
    return event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}], "usage": None})


def usage_chunk(total: Any) -> bytes:
    """
    The final chunk of a stream with C{include_usage}: no choices, usage.
    """
    return event({"object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": total}})


DONE = b"data: [DONE]\n\n"

#: A stream of 11 characters of text (one of them two bytes in UTF-8) and
#: its usage report.
STREAM = chunk(role="assistant", content="") + chunk(content="Héllo") + chunk(content=" world") + usage_chunk(42) + DONE


def meter(pieces: Sequence[bytes], event_stream: bool = True, finish: bool = True) -> UsageMeter:
    """
    A meter fed C{pieces} one read at a time, then finished.
    """
    result = UsageMeter(event_stream)
    for piece in pieces:
        result.feed(piece)
    if finish:
        result.finish()
    return result


def split(data: bytes, *at: int) -> list[bytes]:
    """
    C{data} cut at the given offsets.
    """
    bounds = [0, *at, len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


def plain_body(total: Optional[int] = 42, padding: int = 0) -> bytes:
    """
    A non-streamed completion, with C{padding} more bytes of content.
    """
    document: dict[str, Any] = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello" + "x" * padding}}],
    }
    if total is not None:
        document["usage"] = {"prompt_tokens": 10, "completion_tokens": total - 10, "total_tokens": total}
    return json.dumps(document).encode()


class EventStreamTests(SynchronousTestCase):
    """
    Server-sent events, as C{stream: true} returns them.
    """

    def test_usage_from_final_chunk(self) -> None:
        """
        The usage in the final chunk is what the request is charged,
        whatever the estimate would be.
        """
        result = meter([STREAM])
        self.assertEqual(result.total_tokens, 42)
        self.assertEqual(result.used(1000), 42)
        self.assertEqual(result.streamed_chars, 11)

    def test_any_split(self) -> None:
        """
        Reads cut events at arbitrary bytes (inside C{data:}, inside the
        JSON, inside a two-byte character, between the two newlines): the
        usage and the text count come out the same for every cut.
        """
        for at in range(1, len(STREAM)):
            result = meter(split(STREAM, at))
            self.assertEqual((result.total_tokens, result.streamed_chars), (42, 11), at)
        for cuts in [(3, 40, 41, 150), (5, 6, 7, 8, 9), (len(STREAM) - 20, len(STREAM) - 1)]:
            result = meter(split(STREAM, *cuts))
            self.assertEqual((result.total_tokens, result.streamed_chars), (42, 11), cuts)

    def test_one_byte_at_a_time(self) -> None:
        """
        A stream delivered one byte per read is read correctly.
        """
        result = meter([STREAM[i : i + 1] for i in range(len(STREAM))])
        self.assertEqual((result.total_tokens, result.streamed_chars), (42, 11))

    def test_crlf_lines(self) -> None:
        """
        Events with CRLF line ends (which SSE allows) are read too.
        """
        result = meter([STREAM.replace(b"\n", b"\r\n")])
        self.assertEqual((result.total_tokens, result.streamed_chars), (42, 11))

    def test_counts_all_generated_text(self) -> None:
        """
        Content, reasoning and refusal text all count as output, and
        characters (not bytes) are counted.
        """
        result = meter(
            [
                chunk(reasoning_content="think"),
                chunk(content="ça"),
                chunk(refusal="no"),
                chunk(role="assistant"),
                event({"choices": [{"delta": {"content": "ab"}}, {"delta": {"content": "cd"}}]}),
            ]
        )
        self.assertEqual(result.streamed_chars, 5 + 2 + 2 + 4)
        self.assertIsNone(result.total_tokens)

    def test_junk_ignored(self) -> None:
        """
        C{[DONE]}, comments, other fields, empty data and lines that are
        not JSON objects are skipped without error, and the real events
        around them still count.
        """
        junk = (
            b": keep-alive\n\n"
            b"event: ping\n\n"
            b"data:\n\n"
            b"data: not json\n\n"
            b"data: [1, 2]\n\n"
            b'data: "text"\n\n'
            b"data: \xff\xfe\n\n"
            b"data: [DONE]\n\n"
            + event({"choices": ["not a choice", {"delta": "not a delta"}, {"delta": {"content": 7}}]})
            + event({"usage": "lots"})
            + event({"usage": {"total_tokens": True}})
            + event({"usage": {"total_tokens": -3}})
        )
        result = meter([chunk(content="abcd"), junk, chunk(content="efgh")])
        self.assertEqual(result.streamed_chars, 8)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.used(10), 12)

    def test_choices_not_a_list(self) -> None:
        """
        An event whose C{choices} is not a list is skipped too: metering
        must never break the relay of the stream.
        """
        result = meter([chunk(content="abcd"), event({"choices": 5}), usage_chunk(9)])
        self.assertEqual((result.total_tokens, result.streamed_chars), (9, 4))

    def test_estimate_without_usage(self) -> None:
        """
        A stream without a usage report (no C{include_usage}, or cancelled
        before the end) is charged the prompt estimate plus the text so
        far at four characters per token, rounded up.
        """
        for text, output in [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)]:
            result = meter([chunk(content=text)] if text else [])
            self.assertEqual(result.used(30), 30 + output, text)

    def test_cancelled_before_usage(self) -> None:
        """
        A stream cut off before its usage chunk is charged on its text,
        and a half-received event is not counted.
        """
        cut = STREAM.index(b"data: ", STREAM.index(b" world")) + 10
        result = meter([STREAM[:cut]], finish=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.used(20), 20 + 3)  # ceil(11 / 4)

    def test_zero_usage_is_a_report(self) -> None:
        """
        A reported total of zero is used as reported, not replaced by the
        estimate.
        """
        self.assertEqual(meter([chunk(content="abcdefgh"), usage_chunk(0)]).used(50), 0)


class PlainBodyTests(SynchronousTestCase):
    """
    Plain JSON answers, as C{stream: false} returns them.
    """

    def test_usage_after_finish(self) -> None:
        """
        The usage of a plain body is read once the body is complete, from
        pieces of any size.
        """
        body = plain_body(42)
        result = meter(split(body, 7, 30, len(body) - 3), event_stream=False, finish=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.used(5), 5)
        result.finish()
        self.assertEqual(result.total_tokens, 42)
        self.assertEqual(result.used(5), 42)

    def test_content_is_not_streamed_text(self) -> None:
        """
        Without usage, a plain body is charged the prompt estimate: its
        content is not mistaken for streamed text.
        """
        result = meter([plain_body(None, padding=400)], event_stream=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.streamed_chars, 0)
        self.assertEqual(result.used(25), 25)

    def test_event_lines_in_plain_body(self) -> None:
        """
        A plain body that happens to hold C{data:} lines is not read as a
        stream.
        """
        result = meter([chunk(content="abcd") + usage_chunk(9)], event_stream=False)
        self.assertEqual((result.total_tokens, result.streamed_chars), (None, 0))

    def test_at_the_limit(self) -> None:
        """
        A body of exactly L{PLAIN_BODY_LIMIT} bytes is still read.
        """
        body = plain_body(42)
        body = body[:-1] + b" " * (PLAIN_BODY_LIMIT - len(body)) + b"}"
        self.assertEqual(len(body), PLAIN_BODY_LIMIT)
        self.assertEqual(meter(split(body, 100, 5000), event_stream=False).used(5), 42)

    def test_over_the_limit(self) -> None:
        """
        A body larger than L{PLAIN_BODY_LIMIT} is not parsed (so the proxy's
        memory stays bounded): it is charged the estimate.
        """
        body = plain_body(42, padding=PLAIN_BODY_LIMIT)
        result = meter(split(body, 1000, PLAIN_BODY_LIMIT - 10), event_stream=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.used(5), 5)

    def test_not_json(self) -> None:
        """
        A body that is not JSON (a gateway's HTML error page, a cut-off
        answer, bad UTF-8) or not an object is charged the estimate,
        without error.
        """
        for body in (
            b"<html><body>502 Bad Gateway</body></html>",
            plain_body(42)[:-5],
            b"\xff\xfe{}",
            b"[1, 2]",
            b"",
            b'{"usage": {"total_tokens": "42"}}',
        ):
            result = meter([body], event_stream=False)
            self.assertIsNone(result.total_tokens, body)
            self.assertEqual(result.used(5), 5, body)


class InjectionEdgeTests(SynchronousTestCase):
    def test_stream_options_null_left_alone(self) -> None:
        """
        A body with "stream_options": null is not injected: a second member
        would be a duplicate key, and the client's null would win.
        """
        from oaiproxy.usage import inject_include_usage

        body = b'{"model": "m", "stream": true, "stream_options": null, "messages": []}'
        self.assertIsNone(inject_include_usage(body, json.loads(body)))
        plain = b' {"model": "m", "stream": true}'
        self.assertEqual(
            inject_include_usage(plain, json.loads(plain)),
            b' {"stream_options":{"include_usage":true},"model": "m", "stream": true}',
        )

    def test_filter_removes_null_usage_members(self) -> None:
        """
        The filter removes the "usage": null member OpenAI adds to every
        chunk, wherever it stands, and the usage-only event.
        """
        from oaiproxy.usage import UsageEventFilter

        stream = (
            b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
            b'data: {"usage": null, "id":"b","choices":[]}\n\n'
            b'data: {"id":"c","choices":[],"usage":{"total_tokens":3}}\n\n'
            b"data: [DONE]\n\n"
        )
        self.assertEqual(
            UsageEventFilter()(stream),
            b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}]}\n\n'
            b'data: { "id":"b","choices":[]}\n\n'
            b"data: [DONE]\n\n",
        )
