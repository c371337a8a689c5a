# -*- test-case-name: tests.test_usage -*-
"""
What a response really cost, read from the bytes on their way through.

Upstream reports token C{usage} at the end of a plain JSON answer, and in
the last event of a stream when the request asked for
C{stream_options.include_usage}.  L{UsageMeter} watches the relayed bytes
without delaying them: an event stream is split into events as it goes
(only the few bytes of an unfinished line are kept), a plain body is kept
up to a bound and parsed once at the end.  When no usage is reported, or a
stream is cut short, the output is estimated from the text streamed so far
at four characters per token, which is how a cancelled stream is charged.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Optional

from oaiproxy import fastjson
from oaiproxy.records import Usage

__all__ = ["UsageMeter", "inject_include_usage", "UsageEventFilter"]

#: Where a chat completion chunk carries generated text.
CHAT_TEXT_KEYS = ("content", "reasoning_content", "refusal")


@functools.lru_cache(maxsize=None)
def _text_pattern(keys: tuple[str, ...]) -> "re.Pattern[bytes]":
    """
    A regular expression for the string members C{keys} of an event, which
    finds the generated text without parsing the event.
    """
    names = b"|".join(re.escape(k.encode("ascii")) for k in keys)
    return re.compile(rb'"(?:' + names + rb')":\s*"((?:[^"\\]|\\.)*)"')


#: Plain bodies larger than this are not kept for the usage read.
PLAIN_BODY_LIMIT = 1024 * 1024


class UsageMeter:
    """
    Counts a response's tokens from its body.

    Usage is read where OpenAI puts it: a top-level C{usage} (chat,
    completions, embeddings, a Responses object), or the C{response.usage}
    of a Responses stream's C{response.completed} event; in either naming
    (C{prompt_tokens}/C{completion_tokens}, or the Responses API's
    C{input_tokens}/C{output_tokens}).

    @param event_stream: the body is server-sent events.
    @param text_keys: the event members that carry generated text.
    @param plain: keep a plain body to read its usage at the end (false
        for bodies that cannot report any, such as audio).
    """

    __slots__ = ("_stream", "_text", "_pending", "_plain", "_plain_size", "total_tokens", "streamed_chars", "reported")

    def __init__(self, event_stream: bool, text_keys: tuple[str, ...] = CHAT_TEXT_KEYS, plain: bool = True) -> None:
        self._stream = event_stream
        self._text = _text_pattern(text_keys)
        self._pending = b""
        self._plain: list[bytes] = []
        self._plain_size = 0 if plain else PLAIN_BODY_LIMIT + 1
        #: What upstream reported, once it has.
        self.total_tokens: Optional[int] = None
        #: The reported usage, as L{Usage}.
        self.reported: Optional[Usage] = None
        #: Characters of generated text seen so far in a stream.
        self.streamed_chars = 0

    def feed(self, data: bytes) -> None:
        if not self._stream:
            self._plain_size += len(data)
            if self._plain_size <= PLAIN_BODY_LIMIT:
                self._plain.append(data)
            return
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, payload: bytes) -> None:
        if not payload or payload == b"[DONE]":
            return
        # The hot path, every token of every stream: count the text
        # without parsing the event.
        for text in self._text.findall(payload):
            self.streamed_chars += _json_string_length(text)
        if _USAGE_OBJECT.search(payload) is None:
            return
        try:
            event = fastjson.loads(payload)
        except ValueError:
            return
        if isinstance(event, dict):
            self._read(event)

    def _read(self, document: dict[str, Any]) -> None:
        """
        Take the usage of a response object or stream event.
        """
        self._usage(document.get("usage"))
        response = document.get("response")
        if self.reported is None and isinstance(response, dict):
            # A Responses stream's last event carries the whole response.
            self._usage(response.get("usage"))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        total = usage.get("total_tokens")
        if not _count(total):
            return
        self.total_tokens = total
        # Chat and embeddings say prompt/completion; the Responses API (and
        # the audio and image routes that follow it) says input/output.
        responses = "input_tokens" in usage or "output_tokens" in usage
        prefix_in, prefix_out = ("input", "output") if responses else ("prompt", "completion")
        details_in = usage.get(prefix_in + "_tokens_details")
        details_out = usage.get(prefix_out + "_tokens_details")
        self.reported = Usage(
            prompt=_number(usage.get(prefix_in + "_tokens")),
            completion=_number(usage.get(prefix_out + "_tokens")),
            reasoning=_number(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0,
            cached=_number(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0,
        )

    def finish(self) -> None:
        """
        The body is complete: read a plain body's usage.
        """
        if self._stream or self._plain_size > PLAIN_BODY_LIMIT:
            return
        try:
            document = fastjson.loads(b"".join(self._plain))
        except ValueError:
            return
        finally:
            self._plain = []
        if isinstance(document, dict):
            self._read(document)

    def usage(self, prompt_estimate: int) -> Usage:
        """
        The usage to record: as reported, else estimated (marked inexact).
        """
        if self.reported is not None:
            return self.reported
        return Usage(prompt=prompt_estimate, completion=math.ceil(self.streamed_chars / 4), exact=False)

    def used(self, prompt_estimate: int) -> int:
        """
        The tokens to charge: what upstream reported, or else the prompt
        estimate plus the output seen so far.
        """
        if self.total_tokens is not None:
            return self.total_tokens
        return prompt_estimate + math.ceil(self.streamed_chars / 4)


def _json_string_length(raw: bytes) -> int:
    """
    The number of characters a JSON string's body encodes, without decoding
    its escapes: each escape sequence is one character (C{\\uXXXX} six
    bytes, the others two).  Exact but for an escaped backslash, which
    counts as none; that is good enough for an estimate.
    """
    text = raw.decode("utf-8", "replace")
    escapes = text.count("\\")
    unicode_escapes = text.count("\\u")
    return len(text) - escapes - 4 * unicode_escapes


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> int:
    return value if _count(value) else 0


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def inject_include_usage(body: bytes, document: dict[str, Any]) -> Optional[bytes]:
    """
    The body with C{stream_options.include_usage} turned on, for a streamed
    request that did not ask for usage; C{None} when there is nothing to do
    (the client asked for it) or it cannot be done without re-serialising
    the client's JSON (it set other C{stream_options}).

    The member is inserted right after the opening brace, so the rest of
    the body stays byte for byte what the client sent.
    """
    if "stream_options" in document:
        # Even "stream_options": null: inserting a second member would make
        # a duplicate key, whose last value (the client's) would win.
        return None
    start = len(body) - len(body.lstrip())
    if body[start : start + 1] != b"{":
        return None
    return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]


class UsageEventFilter:
    """
    Undoes what C{include_usage} does to an event stream, so that a client
    that did not ask for usage receives the exact bytes it would have
    without the injection: the usage-only event (C{"choices": []} with a
    C{"usage"} object) is removed, and so is the C{"usage": null} member
    that OpenAI adds to every other chunk.

    Complete events pass at once; only an event still incomplete at the
    end of a chunk waits for its remaining bytes.  (In JSON, a quote inside
    a string is always escaped, so the unescaped bytes C{"usage":null} can
    only be the member itself.)
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def __call__(self, data: bytes) -> bytes:
        if not self._pending and data.endswith(b"\n\n"):
            complete = data
        else:
            data = self._pending + data
            end = _last_boundary(data)
            if end < 0:
                self._pending = data
                return b""
            complete, self._pending = data[:end], data[end:]
        if b'"usage"' not in complete:
            return complete
        complete = _NULL_USAGE.sub(b"", complete)
        if _USAGE_OBJECT.search(complete) is None:
            return complete
        return b"".join(e for e in _events(complete) if not _usage_only(e))

    def discard(self) -> None:
        """
        Forget an incomplete event (the stream failed mid-event).
        """
        self._pending = b""

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


#: The C{"usage": null} member, with the comma that joins it to another.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')
#: A usage object, as in the usage-only event.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')

#: The blank line that ends an event, whatever the line endings.
_BOUNDARY = re.compile(rb"\r?\n\r?\n")


def _last_boundary(data: bytes) -> int:
    """
    The offset just past the last event boundary in C{data}, or -1.
    """
    end = -1
    for match in _BOUNDARY.finditer(data):
        end = match.end()
    return end


def _events(data: bytes) -> list[bytes]:
    """
    Complete events, each with its own terminating blank line.
    """
    events, start = [], 0
    for match in _BOUNDARY.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    return events


def _usage_only(event: bytes) -> bool:
    if not event.startswith(b"data:") or b'"usage"' not in event:
        return False
    try:
        payload = fastjson.loads(event[5:])
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)
