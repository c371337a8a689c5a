# -*- test-case-name: tests.test_usage -*-
"""
What a response really cost, read from the bytes on their way through.

Upstream reports token C{usage} at the end of a plain JSON answer, and in
the last event of a stream when the request asked for
C{stream_options.include_usage}.  L{UsageMeter} watches the relayed bytes
without delaying them: an event stream is split into events as it goes
(only the bytes of an unfinished line are kept, and at most L{MAX_LINE} of
them), a plain body is kept up to L{PLAIN_BODY_LIMIT} and parsed once at
the end, and of a larger one only the last L{TAIL_BYTES}, where its usage
is.  When no usage is reported, or a stream is cut short, the output is
estimated from every generated field streamed so far at four characters
per token, which is how a cancelled stream is charged.

Nothing an upstream sends makes the meter raise, hold more than those
bounds, or spend more than linear time: a broken or hostile upstream must
not stop a reservation from being settled, nor stall the loop.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Optional

from twisted.python.failure import Failure

from oaiproxy import fastjson
from oaiproxy.observe.records import Usage
from oaiproxy.routetable import CHAT_TEXT_KEYS

__all__ = ["UsageMeter", "inject_include_usage", "UsageEventFilter", "MAX_LINE", "PLAIN_BODY_LIMIT", "TAIL_BYTES"]


#: The events after which a stream is over, whatever bytes upstream still
#: owes (the end of its chunked body): chat and completions' C{[DONE]} is
#: matched separately.
END_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed", "transcript.text.done"})


@functools.lru_cache(maxsize=None)
def _text_pattern(keys: tuple[str, ...]) -> "re.Pattern[bytes]":
    """
    A regular expression for the string members C{keys} of an event, which
    finds the generated text without parsing the event.  It runs on every
    event of every stream, so the names are a trie (one branch tried per
    first letter) and the string body is the unrolled, linear
    C{[^"\\]*(?:\\.[^"\\]*)*}.
    """
    return re.compile(rb'"' + _trie([k.encode("ascii") for k in keys]) + rb'":\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


def _trie(names: list[bytes]) -> bytes:
    """
    An alternation matching exactly C{names}, factored by common prefixes.
    """
    branches = []
    optional = b"" in names
    for first in sorted({n[:1] for n in names if n}):
        rests = [n[1:] for n in names if n[:1] == first]
        rest = b"" if rests == [b""] else _trie(rests)
        branches.append(re.escape(first) + rest)
    if not branches:
        return b""
    if optional:
        return b"(?:" + b"|".join(branches) + b")?"
    return branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"


#: Plain bodies up to this size are kept whole and parsed for their usage.
PLAIN_BODY_LIMIT = 1024 * 1024
#: Of a larger plain body (or an over-long line), the last bytes kept to
#: find the usage in: OpenAI puts C{usage} near the end of a response
#: object, followed at most by a few short members (and, in the Responses
#: API, C{metadata}: 16 pairs of at most 64 + 512 characters).
TAIL_BYTES = 128 * 1024
#: The longest event-stream line (and event) read or held back whole.
#: Past it the meter gives up on the line (but for a usage object at its
#: end) and the usage filter passes the event on unfiltered; the bytes
#: are relayed unchanged either way.
MAX_LINE = 1024 * 1024


class _Tail:
    """
    The last C{size} bytes of what was added, in at most twice that: the
    front is trimmed once per C{size} bytes added, so each byte is copied
    a bounded number of times however small the pieces.
    """

    __slots__ = ("_buffer", "_size")

    def __init__(self, size: int) -> None:
        self._buffer = bytearray()
        self._size = size

    def add(self, data: bytes) -> None:
        if len(data) >= self._size:
            self._buffer = bytearray(data[-self._size :])
            return
        self._buffer += data
        if len(self._buffer) > 2 * self._size:
            del self._buffer[: -self._size]

    def value(self) -> bytes:
        return bytes(self._buffer[-self._size :])

    def __len__(self) -> int:
        return len(self._buffer)


class UsageMeter:
    """
    Counts a response's tokens from its body.

    Usage is read where OpenAI puts it: a top-level C{usage} (chat,
    completions, embeddings, a Responses object), or the C{response.usage}
    of a Responses stream's C{response.completed} event; in either naming
    (C{prompt_tokens}/C{completion_tokens}, or the Responses API's
    C{input_tokens}/C{output_tokens}).

    The meter never raises: whatever goes wrong while reading (a bug, a
    body that defeats a parser) is kept in L{failed} and metering stops, so
    the relay and the settlement go on.

    @param event_stream: the body is server-sent events.
    @param text_keys: the event members that carry generated text.
    @param plain: keep a plain body to read its usage at the end (false
        for bodies that cannot report any, such as audio).

    @ivar ended: a stream's end event (C{data: [DONE]}, a Responses
        C{response.completed}...) has been seen, blank line included:
        after it the client has the whole answer.
    @ivar incomplete: part of the body could not be read (a line over
        L{MAX_LINE}), so an estimate would miss output.
    @ivar failed: why metering stopped, if it did.
    """

    __slots__ = (
        "_stream",
        "_text",
        "_partial",
        "_partial_size",
        "_long",
        "_long_data",
        "_ending",
        "_plain",
        "_plain_size",
        "_plain_tail",
        "_keep_plain",
        "total_tokens",
        "streamed_chars",
        "reported",
        "ended",
        "incomplete",
        "failed",
    )

    def __init__(self, event_stream: bool, text_keys: tuple[str, ...] = CHAT_TEXT_KEYS, plain: bool = True) -> None:
        self._stream = event_stream
        self._text = _text_pattern(text_keys)
        # An unfinished line: its pieces, or, once it is over MAX_LINE, its
        # last bytes (and whether it is a data line).
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._long: Optional[_Tail] = None
        self._long_data = False
        # An end event's data was seen; its blank line will end the stream.
        self._ending = False
        self._plain: list[bytes] = []
        self._plain_size = 0
        self._plain_tail: Optional[_Tail] = None
        self._keep_plain = plain
        #: What upstream reported, once it has.
        self.total_tokens: Optional[int] = None
        #: The reported usage, as L{Usage}.
        self.reported: Optional[Usage] = None
        #: Characters of generated text seen so far in a stream.
        self.streamed_chars = 0
        self.ended = False
        self.incomplete = False
        self.failed: Optional[Failure] = None

    @property
    def buffered(self) -> int:
        """
        How many body bytes the meter holds: at most L{PLAIN_BODY_LIMIT}
        for a plain body, L{MAX_LINE} for a stream (and one read).
        """
        line = len(self._long) if self._long is not None else self._partial_size
        return line + self._plain_size + len(self._plain_tail or ())

    def feed(self, data: bytes) -> None:
        # The hot path, every chunk of every stream: one test per read
        # beyond what splitting it into lines costs.  (A failed meter is
        # turned into a plain one that keeps nothing.)
        try:
            if not self._stream:
                self._feed_plain(data)
                return
            if self._partial_size:
                # The rest of a line begun in an earlier read: only the new
                # bytes are searched, and the line is joined once.
                newline = data.find(b"\n")
                if newline < 0:
                    self._hold(data)
                    return
                self._hold(data[:newline])
                self._end_partial()
                data = data[newline + 1 :]
            lines = data.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())
                elif line:
                    self._other(line)
                elif self._ending:
                    self.ended = True
            if rest:
                self._hold(rest)
        except Exception:
            self._fail()

    def _fail(self) -> None:
        self.failed = Failure()
        self._stream = self._keep_plain = False
        self._partial, self._partial_size, self._long = [], 0, None
        self._plain, self._plain_size, self._plain_tail = [], 0, None

    def _hold(self, piece: bytes) -> None:
        """
        Keep C{piece} of an unfinished line: whole up to L{MAX_LINE}, then
        only the line's last bytes.  (C{_partial_size} counts the line's
        bytes so far either way.)
        """
        self._partial_size += len(piece)
        if self._long is not None:
            self._long.add(piece)
            return
        self._partial.append(piece)
        if self._partial_size > MAX_LINE:
            line = b"".join(self._partial)
            self._partial = []
            self._long_data = line.startswith(b"data:")
            self._long = _Tail(TAIL_BYTES)
            self._long.add(line)

    def _end_partial(self) -> None:
        """
        The unfinished line is complete (its newline arrived).
        """
        self._partial_size = 0
        if self._long is not None:
            tail, is_data = self._long.value(), self._long_data
            self._long = None
            self._over_long(tail, is_data)
            return
        line = b"".join(self._partial)
        self._partial = []
        if line.startswith(b"data:"):
            self._event(line[5:].strip())
        elif line:
            self._other(line)
        elif self._ending:
            self.ended = True

    def _over_long(self, tail: bytes, is_data: bool) -> None:
        """
        A line over L{MAX_LINE}: its text is not counted, but a usage
        object at its end (a Responses C{response.completed} that echoes a
        long prompt) is still read.
        """
        self.incomplete = True
        if is_data:
            self._usage(_last_usage_object(tail))

    def _other(self, line: bytes) -> None:
        """
        A line that is neither C{data:} nor empty: an C{event:} name, or
        another field, or the blank line of CRLF streams.
        """
        if line.startswith(b"event:"):
            if line[6:].strip().decode("ascii", "replace") in END_TYPES:
                self._ending = True
        elif self._ending and not line.strip():
            self.ended = True

    def _event(self, payload: bytes) -> None:
        if not payload:
            return
        if payload == b"[DONE]":
            self._ending = True
            return
        # Count the text without parsing the event.  (A line that came in
        # one read is counted whatever its length: it is linear, and
        # nothing is held for it.)
        for text in self._text.findall(payload):
            self.streamed_chars += _json_string_length(text)
        if _USAGE_OBJECT.search(payload) is None:
            return
        if len(payload) > MAX_LINE:
            # Not parsed whole: its usage is at its end.
            self._usage(_last_usage_object(payload[-TAIL_BYTES:]))
            return
        try:
            event = fastjson.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._read(event)
            if event.get("type") in END_TYPES:
                self._ending = True

    def _feed_plain(self, data: bytes) -> None:
        if not self._keep_plain:
            return
        if self._plain_tail is not None:
            self._plain_tail.add(data)
            return
        self._plain.append(data)
        self._plain_size += len(data)
        if self._plain_size > PLAIN_BODY_LIMIT:
            # Too large to hold: keep only where its usage is.
            self._plain_tail = _Tail(TAIL_BYTES)
            for piece in self._plain:
                self._plain_tail.add(piece)
            self._plain, self._plain_size = [], 0

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
        # Chat and embeddings say prompt/completion; the Responses API (and
        # the audio and image routes that follow it) says input/output.
        responses = "input_tokens" in usage or "output_tokens" in usage
        prefix_in, prefix_out = ("input", "output") if responses else ("prompt", "completion")
        prompt, completion = usage.get(prefix_in + "_tokens"), usage.get(prefix_out + "_tokens", 0)
        if not (_count(prompt) and _count(completion)):
            # A total without counts the request can be charged (a float,
            # a string, a negative figure, or none: embeddings report no
            # completion, never no prompt) is no report: charging it 0
            # would let such an upstream's requests cost nothing.
            return
        self.total_tokens = total
        details_in = usage.get(prefix_in + "_tokens_details")
        details_out = usage.get(prefix_out + "_tokens_details")
        self.reported = Usage(
            prompt=_number(prompt),
            completion=_number(completion),
            reasoning=_number(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0,
            cached=_number(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0,
        )

    def finish(self) -> None:
        """
        The body is complete: read a plain body's usage.
        """
        if self._stream or self.failed is not None:
            return
        try:
            if self._plain_tail is not None:
                tail, self._plain_tail = self._plain_tail.value(), None
                self._usage(_last_usage_object(tail))
                return
            body, self._plain, self._plain_size = b"".join(self._plain), [], 0
            if not body:
                return
            try:
                document = fastjson.loads(body)
            except (ValueError, RecursionError):
                # RecursionError: nesting deeper than the parser's stack.
                return
            if isinstance(document, dict):
                self._read(document)
        except Exception:
            self._fail()

    def usage(self, prompt_estimate: int) -> Usage:
        """
        The usage to record: as reported, else estimated (marked inexact).
        """
        if self.reported is not None:
            return self.reported
        return Usage(prompt=prompt_estimate, completion=math.ceil(self.streamed_chars / 4), exact=False)


#: A member named usage whose value is an object.
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*(?=\{)')
_DECODER = json.JSONDecoder()


def _last_usage_object(tail: bytes) -> Any:
    """
    The last C{"usage": {...}} object in C{tail} (the end of a JSON text
    too large to parse whole), or C{None}.

    In JSON a quote inside a string is always escaped, so the unescaped
    bytes C{"usage"} are a member name, wherever C{tail} starts; the last
    such member holding an object is the response's own usage (what
    follows it in OpenAI's answers holds no usage object).  One object is
    parsed, once: linear in C{tail}.
    """
    end = len(tail)
    while True:
        at = tail.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        match = _USAGE_VALUE.match(tail, at)
        if match is not None:
            try:
                value, _ = _DECODER.raw_decode(tail[match.end() :].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                return None
            return value
        end = at


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


#: More tokens than any request uses (a billion): a figure above it is not
#: a count but a hostile or broken upstream's, and would not even fit the
#: ledger's 64-bit columns once summed (one row that cannot be written
#: stops every write of the ledger).
MAX_REPORTED_TOKENS = 10**9


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPORTED_TOKENS


def _number(value: Any) -> int:
    return value if _count(value) else 0


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def inject_include_usage(body: bytes, document: dict[str, Any]) -> Optional[bytes]:
    """
    The body with C{stream_options.include_usage} turned on, for a streamed
    request that did not ask for usage (the usage is then removed again by
    L{UsageEventFilter}); C{None} when there is nothing to do: the client
    asked for it (C{"include_usage": true}), or its C{stream_options} is
    not an object, which upstream refuses anyway.

    Without C{stream_options}, the member is inserted right after the
    opening brace, so the rest of the body stays byte for byte what the
    client sent.  A client that set C{stream_options} (C{null}, or without
    C{"include_usage": true}, which is how a client would turn usage off to
    be charged an estimate) gets its body re-serialised with the flag on:
    inserting a second member would make a duplicate key, whose last value
    (the client's) would win.  The re-serialised body means what the proxy
    read; only its spacing, escapes and any duplicate keys differ.
    """
    options = document.get("stream_options", _ABSENT)
    if options is _ABSENT:
        start = len(body) - len(body.lstrip())
        if body[start : start + 1] != b"{":
            return None
        return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    forced = dict(document, stream_options=dict(options, include_usage=True))
    # ASCII escapes: a lone surrogate the client escaped stays escaped.
    return json.dumps(forced, separators=(",", ":")).encode("ascii")


_ABSENT = object()


class UsageEventFilter:
    """
    Undoes what C{include_usage} does to an event stream, so that a client
    that did not ask for usage receives the exact bytes it would have
    without the injection: the usage-only event (C{"choices": []} with a
    C{"usage"} object) is removed, and so is the C{"usage": null} member
    that OpenAI adds to every other chunk.

    Complete events pass at once; only an event still incomplete at the
    end of a chunk waits for its remaining bytes, kept as pieces (only the
    new bytes are searched for the event's end).  An event over
    L{MAX_LINE} is not held: what was held goes out, and the rest of that
    event passes unfiltered as it arrives.  (In JSON, a quote inside a
    string is always escaped, so the unescaped bytes C{"usage":null} can
    only be the member itself.)
    """

    __slots__ = ("_pending", "_held", "_last", "_passing")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._held = 0
        # The last bytes seen of an unfinished event: a boundary may begin
        # in them and end in the next read.
        self._last = b""
        # An over-long event is passing through unfiltered.
        self._passing = False

    @property
    def buffered(self) -> int:
        """
        The bytes held back (at most L{MAX_LINE}).
        """
        return 0 if self._passing else self._held

    def __call__(self, data: bytes) -> bytes:
        # The hot path: whole events in one read (_held is never 0 while
        # an event is unfinished, or passing).
        if not self._held and data.endswith(b"\n\n"):
            # (_strip_usage, inlined.)
            if b'"usage"' not in data:
                return data
            data = _NULL_USAGE.sub(b"", data)
            if _USAGE_OBJECT.search(data) is None:
                return data
            return b"".join(e for e in _events(data) if not _usage_only(e))
        return self._unfinished(data)

    def _unfinished(self, data: bytes) -> bytes:
        if b"\n" not in data:
            # No boundary ends in this read: nothing to search.
            last = data[-3:] if len(data) >= 3 else (self._last + data)[-3:]
            if self._passing:
                self._last = last
                return data
            return self._hold(data, last)
        probe = self._last + data
        if self._passing:
            match = _BOUNDARY.search(probe)
            if match is None:
                self._last = probe[-3:]
                return data
            cut = match.end() - len(self._last)
            self._passing, self._held, self._last = False, 0, b""
            return data[:cut] + self(data[cut:]) if cut < len(data) else data
        end = _last_boundary(probe)
        if end < 0:
            return self._hold(data, probe[-3:])
        cut = end - len(self._last)
        complete = b"".join(self._pending) + data[:cut] if self._pending else data[:cut]
        rest = data[cut:]
        self._pending, self._held, self._last = ([rest], len(rest), rest[-3:]) if rest else ([], 0, b"")
        return _strip_usage(complete)

    def _hold(self, data: bytes, last: bytes) -> bytes:
        """
        Hold back C{data}, part of an unfinished event, up to L{MAX_LINE}.
        """
        self._pending.append(data)
        self._held += len(data)
        self._last = last
        if self._held > MAX_LINE:
            # Too long to hold back: let it go as it comes.
            out = b"".join(self._pending)
            self._pending, self._passing = [], True
            return out
        return b""

    def discard(self) -> None:
        """
        Forget an incomplete event (the stream failed mid-event).
        """
        self._pending, self._held, self._last, self._passing = [], 0, b"", False

    def flush(self) -> bytes:
        rest = b"".join(self._pending)
        self.discard()
        return rest


def _strip_usage(complete: bytes) -> bytes:
    """
    Complete events without the usage C{include_usage} added.
    """
    if b'"usage"' not in complete:
        return complete
    complete = _NULL_USAGE.sub(b"", complete)
    if _USAGE_OBJECT.search(complete) is None:
        return complete
    return b"".join(e for e in _events(complete) if not _usage_only(e))


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
    if not event.startswith(b"data:") or b'"usage"' not in event or len(event) > MAX_LINE:
        # (The usage-only event is small; a long one is left alone.)
        return False
    try:
        payload = fastjson.loads(event[5:])
    except (ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)
