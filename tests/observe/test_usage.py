"""
Tests for L{oaiproxy.observe.usage}: what a response really cost, read from the
relayed bytes.

They cover event streams (usage read from the final chunk however the bytes
are split between reads, generated text counted for the estimate, junk
lines ignored), the fallback estimate for a stream without usage or cut
short, and plain JSON bodies (read only once complete, whole up to
L{PLAIN_BODY_LIMIT} and from their last bytes beyond).  What a broken or
hostile upstream sends (lines without end, absurd nesting) costs bounded
memory and linear time, and never makes the meter raise.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.observe import usage as usage_module
from oaiproxy.observe.usage import (
    MAX_LINE,
    PLAIN_BODY_LIMIT,
    TAIL_BYTES,
    UsageEventFilter,
    UsageMeter,
    inject_include_usage,
)


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


def usage_chunk(total: int) -> bytes:
    """
    The final chunk of a stream with C{include_usage}: no choices, usage
    (C{total} tokens, at most 10 of them the prompt's).
    """
    prompt = min(10, total)
    usage = {"prompt_tokens": prompt, "completion_tokens": total - prompt, "total_tokens": total}
    return event({"object": "chat.completion.chunk", "choices": [], "usage": usage})


DONE = b"data: [DONE]\n\n"

#: A stream of 11 characters of text (one of them two bytes in UTF-8) and
#: its usage report.
STREAM = chunk(role="assistant", content="") + chunk(content="Héllo") + chunk(content=" world") + usage_chunk(42) + DONE


def meter(
    pieces: Sequence[bytes], event_stream: bool = True, finish: bool = True, text_keys: Optional[tuple[str, ...]] = None
) -> UsageMeter:
    """
    A meter fed C{pieces} one read at a time, then finished.
    """
    result = UsageMeter(event_stream) if text_keys is None else UsageMeter(event_stream, text_keys)
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
        self.assertEqual(result.usage(1000).total, 42)
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
        self.assertEqual(result.usage(10).total, 12)

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
            self.assertEqual(result.usage(30).total, 30 + output, text)

    def test_cancelled_before_usage(self) -> None:
        """
        A stream cut off before its usage chunk is charged on its text,
        and a half-received event is not counted.
        """
        cut = STREAM.index(b"data: ", STREAM.index(b" world")) + 10
        result = meter([STREAM[:cut]], finish=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.usage(20).total, 20 + 3)  # ceil(11 / 4)

    def test_zero_usage_is_a_report(self) -> None:
        """
        A reported total of zero is used as reported, not replaced by the
        estimate.
        """
        self.assertEqual(meter([chunk(content="abcdefgh"), usage_chunk(0)]).usage(50).total, 0)

    def test_hostile_counts_are_not_a_report(self) -> None:
        """
        A usage whose total is a count but whose prompt or completion is
        not one (a float, a string, negative, or more tokens than any
        request can use, which no 64-bit ledger column holds) is not a
        report: the request is charged the estimate, marked inexact,
        rather than nothing or a figure that stops the ledger's writes.
        """
        for usage in [
            {"prompt_tokens": 50.0, "completion_tokens": 50.0, "total_tokens": 100},
            {"prompt_tokens": "50", "completion_tokens": 5, "total_tokens": 55},
            {"prompt_tokens": 5, "completion_tokens": -5, "total_tokens": 1},
            {"prompt_tokens": 2**64 - 1, "completion_tokens": 5, "total_tokens": 2**64 - 1},
            {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 2**64 - 1},
            {"total_tokens": 100},
        ]:
            result = meter([chunk(content="abcdefgh"), event({"choices": [], "usage": usage})])
            self.assertIsNone(result.reported, usage)
            self.assertEqual((result.usage(30).total, result.usage(30).exact), (32, False), usage)

    def test_embeddings_usage_without_completion_is_a_report(self) -> None:
        """
        An embeddings answer reports only prompt tokens: that is a report.
        """
        result = meter([json.dumps({"usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()], event_stream=False)
        self.assertEqual((result.usage(30).total, result.usage(30).exact), (8, True))


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
        self.assertEqual(result.usage(5).total, 5)
        result.finish()
        self.assertEqual(result.total_tokens, 42)
        self.assertEqual(result.usage(5).total, 42)

    def test_content_is_not_streamed_text(self) -> None:
        """
        Without usage, a plain body is charged the prompt estimate: its
        content is not mistaken for streamed text.
        """
        result = meter([plain_body(None, padding=400)], event_stream=False)
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.streamed_chars, 0)
        self.assertEqual(result.usage(25).total, 25)

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
        self.assertEqual(meter(split(body, 100, 5000), event_stream=False).usage(5).total, 42)

    def test_over_the_limit(self) -> None:
        """
        A body larger than L{PLAIN_BODY_LIMIT} is not held: only its last
        L{TAIL_BYTES} are, where its usage is, which is read from there.
        (It used to be charged the prompt estimate: a client asking for a
        long answer without streaming paid nothing for it.)
        """
        body = plain_body(42, padding=3 * PLAIN_BODY_LIMIT)
        result = UsageMeter(False)
        held = []
        for piece in split(body, *range(65536, len(body), 65536)):
            result.feed(piece)
            held.append(result.buffered)
        self.assertLessEqual(max(held), PLAIN_BODY_LIMIT + 65536)
        self.assertLessEqual(held[-1], 2 * TAIL_BYTES)
        result.finish()
        self.assertEqual(result.usage(5).total, 42)
        assert result.reported is not None
        self.assertEqual((result.reported.prompt, result.reported.completion, result.reported.exact), (10, 32, True))

    def test_over_the_limit_in_one_read(self) -> None:
        """
        A large body delivered in one piece, or in pieces of one byte, is
        read the same way.
        """
        body = plain_body(42, padding=PLAIN_BODY_LIMIT)
        self.assertEqual(meter([body], event_stream=False).usage(5).total, 42)
        tail = body[-3000:]
        pieces = [body[:-3000]] + [tail[i : i + 1] for i in range(len(tail))]
        self.assertEqual(meter(pieces, event_stream=False).usage(5).total, 42)

    def test_tail_finds_the_answers_own_usage(self) -> None:
        """
        In the tail of a large body, the usage read is the last C{"usage"}
        member holding an object: not a schema's C{usage} property echoed
        before it, nor text that quotes a usage object (its quotes are
        escaped), nor members after it (a Responses object's metadata).
        """
        document = {
            "object": "response",
            "text": {"format": {"schema": {"properties": {"usage": {"type": "object"}}}}},
            "output": [{"content": [{"text": "x" * (2 * PLAIN_BODY_LIMIT) + '"usage": {"total_tokens": 1}'}]}],
            "usage": {"input_tokens": 7, "output_tokens": 900000, "total_tokens": 900007},
            "user": None,
            "metadata": {"note": 'fake "usage": {"total_tokens": 2}', "k" * 64: "v" * 512},
        }
        result = meter([json.dumps(document).encode()], event_stream=False)
        self.assertEqual(result.usage(5).total, 900007)
        # The decoy alone is not taken for usage either.
        del document["usage"]
        self.assertIsNone(meter([json.dumps(document).encode()], event_stream=False).total_tokens)

    def test_deep_nesting(self) -> None:
        """
        A body nested 200,000 levels deep (which makes the JSON parser raise
        RecursionError) is charged the estimate, without error, small or
        large.
        """
        for depth in (200_000, PLAIN_BODY_LIMIT):
            body = b'{"usage": ' + b"[" * depth + b"]" * depth + b"}"
            result = meter(split(body, 1000), event_stream=False)
            self.assertIsNone(result.failed)
            self.assertEqual(result.usage(5).total, 5)
        body = b'{"a": 1, "usage": {"total_tokens": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
        self.assertEqual(meter([b"x" * PLAIN_BODY_LIMIT, body], event_stream=False).usage(5).total, 5)

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
            self.assertEqual(result.usage(5).total, 5, body)


class InjectionEdgeTests(SynchronousTestCase):
    def test_stream_options_without_usage_are_overridden(self) -> None:
        """
        A client cannot turn metering off: a body whose C{stream_options}
        is null, or does not set C{"include_usage": true} (sets it false,
        to be charged an estimate), is re-serialised with it on, its other
        options kept, and means what it meant otherwise.
        """
        for options in (None, {}, {"include_usage": False}, {"include_usage": "true"}, {"continuous": True}):
            document = {"model": "m", "stream": True, "stream_options": options, "messages": [{"content": "\ud800é"}]}
            body = json.dumps(document).encode()
            injected = inject_include_usage(body, json.loads(body))
            assert injected is not None
            sent = json.loads(injected)
            expected = dict(options or {}, include_usage=True)
            self.assertEqual(sent, dict(document, stream_options=expected), options)
            self.assertEqual(list(sent), list(document))
        plain = b' {"model": "m", "stream": true}'
        self.assertEqual(
            inject_include_usage(plain, json.loads(plain)),
            b' {"stream_options":{"include_usage":true},"model": "m", "stream": true}',
        )

    def test_nothing_to_do(self) -> None:
        """
        A client that asked for usage keeps its body byte for byte, and a
        C{stream_options} that is not an object (upstream refuses it) is
        left alone.
        """
        for options in ({"include_usage": True}, "yes", [1], 3):
            body = json.dumps({"model": "m", "stream": True, "stream_options": options}).encode()
            self.assertIsNone(inject_include_usage(body, json.loads(body)), options)

    def test_filter_removes_null_usage_members(self) -> None:
        """
        The filter removes the "usage": null member OpenAI adds to every
        chunk, wherever it stands, and the usage-only event.
        """
        self.assertEqual(UsageEventFilter()(FILTER_INPUT), FILTER_OUTPUT)

    def test_filter_any_split(self) -> None:
        """
        However the stream is cut between reads (inside an event, between
        the CR and LF of a boundary), the filter gives out the same bytes.
        """
        for stream, expected in (
            (FILTER_INPUT, FILTER_OUTPUT),
            (FILTER_INPUT.replace(b"\n", b"\r\n"), FILTER_OUTPUT.replace(b"\n", b"\r\n")),
        ):
            for at in range(1, len(stream)):
                for more in (at + 1, at + 3, at + 60):
                    strip = UsageEventFilter()
                    out = b"".join(strip(piece) for piece in split(stream, *sorted({at, min(more, len(stream))})))
                    self.assertEqual(out + strip.flush(), expected, (at, more))


FILTER_INPUT = (
    b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    b'data: {"usage": null, "id":"b","choices":[]}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"total_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)
FILTER_OUTPUT = (
    b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}]}\n\ndata: { "id":"b","choices":[]}\n\ndata: [DONE]\n\n'
)


def tool_call_chunk(arguments: str, name: Optional[str] = None) -> bytes:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    call = {"index": 0, "id": "call_1", "type": "function", "function": function}
    return event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})


class GeneratedFieldTests(SynchronousTestCase):
    """
    Without a usage report, every field a stream generates counts, not just
    its text: a client could otherwise ask for its output as tool calls.
    """

    def test_tool_calls(self) -> None:
        """
        288,000 characters of tool-call arguments (the attack that was
        charged 40 tokens) are charged 72,000 tokens of output.
        """
        pieces = [tool_call_chunk("", name="lookup")] + [tool_call_chunk('{"q": "' + "x" * 991 + '"}')] * 288
        result = meter(pieces)
        self.assertEqual(result.streamed_chars, len("lookup") + 288 * 1000)
        self.assertGreaterEqual(result.usage(0).total, 72_000)

    def test_every_chat_field(self) -> None:
        """
        Legacy function calls, reasoning under either name, refusals and
        the transcript of generated audio count too (the audio itself,
        base64, does not: its transcript is the estimate).
        """
        result = meter(
            [
                event({"choices": [{"delta": {"function_call": {"name": "f", "arguments": "abcd"}}}]}),
                chunk(reasoning="think"),
                chunk(reasoning_content="more"),
                event({"choices": [{"delta": {"audio": {"id": "a1", "data": "QUJD" * 100, "transcript": "spoken"}}}]}),
            ]
        )
        self.assertEqual(result.streamed_chars, 1 + 4 + 5 + 4 + 6)

    def test_responses_and_completions(self) -> None:
        """
        The Responses API's deltas (text, function-call arguments,
        reasoning summaries) count once, not again in their C{done} events;
        legacy completions count their C{text}.
        """
        responses = meter(
            [
                event({"type": "response.output_text.delta", "delta": "abcd"}),
                event({"type": "response.function_call_arguments.delta", "delta": "efgh"}),
                event({"type": "response.reasoning_summary_text.delta", "delta": "ij"}),
                event({"type": "response.output_text.done", "text": "abcd"}),
                event({"type": "response.function_call_arguments.done", "arguments": "efgh"}),
            ],
            text_keys=("delta",),
        )
        self.assertEqual(responses.streamed_chars, 10)
        completions = meter([event({"choices": [{"text": "hello"}]})], text_keys=("text",))
        self.assertEqual(completions.streamed_chars, 5)


class EndOfStreamTests(SynchronousTestCase):
    """
    L{UsageMeter.ended}: the client has been sent the stream's end event,
    its blank line included.
    """

    def test_done(self) -> None:
        """
        C{data: [DONE]} and its blank line end a chat stream, however the
        reads are cut; not before the blank line.
        """
        for at in range(1, len(STREAM)):
            result = meter(split(STREAM, at), finish=False)
            self.assertTrue(result.ended, at)
        self.assertFalse(meter([STREAM[:-1]], finish=False).ended)
        self.assertFalse(meter([STREAM[: -len(DONE)]], finish=False).ended)
        self.assertTrue(meter([STREAM.replace(b"\n", b"\r\n")], finish=False).ended)

    def test_responses_end_events(self) -> None:
        """
        A Responses stream ends with C{response.completed} (or
        C{.incomplete}, C{.failed}), named on its C{event:} line or in its
        data; a transcription with C{transcript.text.done}.
        """
        for kind in ("response.completed", "response.incomplete", "response.failed"):
            named = b"event: " + kind.encode() + b"\n" + event({"type": kind, "response": {"usage": None}})
            self.assertTrue(meter([named], finish=False).ended, kind)
            self.assertFalse(meter([named[:-1]], finish=False).ended, kind)
        data_only = event({"type": "response.completed", "response": {"usage": {"total_tokens": 4}}})
        self.assertTrue(meter([data_only], finish=False).ended)
        done = event({"type": "transcript.text.done", "text": "hi", "usage": {"total_tokens": 3}})
        self.assertTrue(meter([done], finish=False).ended)

    def test_other_events_do_not_end(self) -> None:
        """
        Nothing else ends a stream: text that mentions [DONE], other event
        types.
        """
        result = meter(
            [
                chunk(content="data: [DONE]\n\n"),
                b"event: response.output_text.done\n" + event({"type": "response.output_text.done"}),
                usage_chunk(5),
            ],
            finish=False,
        )
        self.assertFalse(result.ended)


class HostileUpstreamTests(SynchronousTestCase):
    """
    What a broken or malicious upstream sends costs bounded memory and
    linear time, and the meter never raises.
    """

    def test_line_without_newline(self) -> None:
        """
        A 17 MB C{data:} line without a newline, in 16 KiB reads, is never
        held whole (at most L{MAX_LINE}, then only its last bytes); the
        meter gives up on it, notes that part of the stream went unread,
        and reads the events after it as usual.
        """
        result = UsageMeter(True)
        result.feed(chunk(content="abcd"))
        line = b"data: " + b"x" * 17_000_000
        held = 0
        for piece in split(line, *range(16384, len(line), 16384)):
            result.feed(piece)
            held = max(held, result.buffered)
        self.assertLessEqual(held, MAX_LINE + 16384)
        self.assertLessEqual(result.buffered, 2 * TAIL_BYTES)
        result.feed(b"\n\n" + chunk(content="efgh") + DONE)
        self.assertEqual(result.buffered, 0)
        self.assertTrue(result.incomplete)
        self.assertTrue(result.ended)
        self.assertEqual(result.streamed_chars, 8)
        self.assertIsNone(result.failed)

    def test_long_line_usage_still_read(self) -> None:
        """
        A Responses C{response.completed} event longer than L{MAX_LINE}
        (it echoes a long prompt) still gives its usage, read from its end.
        """
        completed = event(
            {
                "type": "response.completed",
                "response": {
                    "instructions": "i" * (2 * MAX_LINE),
                    "usage": {"input_tokens": 7, "output_tokens": 70, "total_tokens": 77},
                    "metadata": {},
                },
            }
        )
        for pieces in ([completed], split(completed, *range(4096, len(completed), 4096))):
            result = meter(pieces, text_keys=("delta",))
            self.assertEqual(result.total_tokens, 77)

    def test_deeply_nested_event(self) -> None:
        """
        An event nested 200,000 levels deep, with a usage member, is
        skipped without error.
        """
        deep = b'data: {"usage": {"total_tokens": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}\n\n"
        result = meter([chunk(content="abcd"), deep, DONE])
        self.assertIsNone(result.failed)
        self.assertEqual(result.usage(1).total, 2)

    def test_a_bug_is_kept_not_raised(self) -> None:
        """
        Whatever the meter raises is kept in C{failed}, and it meters no
        more: the relay and the settlement go on.
        """

        def broken(raw: bytes) -> int:
            raise RuntimeError("bug")

        self.patch(usage_module, "_json_string_length", broken)
        result = meter([chunk(content="abcd"), usage_chunk(5)])
        assert result.failed is not None
        self.assertTrue(result.failed.check(RuntimeError))
        self.assertIsNone(result.total_tokens)
        self.assertEqual(result.buffered, 0)

    def test_filter_event_without_end(self) -> None:
        """
        The usage filter holds at most L{MAX_LINE} of an event without a
        boundary, then lets it through as it comes, byte for byte; the
        events after it are filtered again.
        """
        strip = UsageEventFilter()
        line = b"data: " + b"x" * 17_000_000
        out, held = [], 0
        for piece in split(line, *range(16384, len(line), 16384)):
            out.append(strip(piece))
            held = max(held, strip.buffered)
        self.assertLessEqual(held, MAX_LINE + 16384)
        self.assertEqual(b"".join(out), line)
        self.assertEqual(strip(b"\r\n\r\n" + FILTER_INPUT[:30]), b"\r\n\r\n")
        self.assertEqual(strip(FILTER_INPUT[30:]) + strip.flush(), FILTER_OUTPUT)
        self.assertEqual(strip.buffered, 0)
