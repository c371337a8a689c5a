# -*- test-case-name: tests.test_validation -*-
"""
JSON parsing on the hot path.

Every request body is parsed once for validation and every answer once for
its usage, so the parser's speed is the proxy's.  C{orjson} parses typical
request bodies about 2.5 times faster than the standard library (see
C{bench/README.md}).  It is stricter in two ways: integers beyond 64 bits
and C{NaN}/C{Infinity} literals.  A body it refuses is parsed again by the
standard library, so the proxy accepts exactly what C{json} accepts and the
strictness costs only bodies that are unusual anyway.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]  # the scanner json uses; not in typeshed
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

try:
    import orjson
except ImportError:  # pragma: no cover - a platform without orjson wheels
    orjson = None  # type: ignore[assignment]

__all__ = ["loads", "RepeatedMembers"]


def loads(data: Union[bytes, str]) -> Any:
    """
    Parse JSON.

    @raise ValueError: for anything the standard library would refuse
        (including invalid UTF-8); C{RecursionError} for absurd nesting.
    """
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


# An escaped lower-case ASCII letter or underscore (\u0061 to \u007a,
# \u005f), the only escapes that can spell a member name the proxy reads:
# "mod\u0065l" is "model" to every parser.  Text rarely has one (escaped
# non-ASCII text is \u00e9, \u4f60...; HTML-safe encoders escape < > &).
_ESCAPED_NAME_CHAR = re.compile(rb"\\u00(?:6[1-9a-fA-F]|7[0-9aA]|5[fF])")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: From this size on, a body is first walked quote by quote (see
#: L{RepeatedMembers._walk}); below it the two searches take microseconds.
WALK_FROM = 64 * 1024
#: The walk's budget: 64 quotes or backslashes, and one more per this many
#: bytes, past which the body is left to the searches (each costs about
#: 0.15 us in the walk, so a body dense with them costs at most 10 us and
#: 15% more).
WALK_BYTES_PER_STEP = 4096
_DECODER = json.JSONDecoder()


class RepeatedMembers:
    """
    Finds, in a JSON object, a member given twice or under two spellings,
    among C{names} at its top level and C{nested[name]} inside its member
    C{name}.

    Parsers disagree on a repeated member: ours keeps the last value, many
    keep the first, and Go's C{encoding/json} (Ollama, many gateways) also
    matches names case-insensitively, C{"Model"} and C{"\u017ftream"}
    included.  So a name given twice, or in another spelling (other case,
    escapes), means the proxy may check one value while upstream uses
    another.

    Cheap for a body without repetition: the spellings are looked at in the
    parsed keys, and the bytes are searched twice (for the quoted names, a
    regex whose alternatives share their first character and so runs about
    as fast as one C{bytes.count}; and for escaped letters).  Only a body
    where a name appears twice anywhere (a tool parameter called C{model},
    say), or with an escaped letter, is read again member by member.

    The two searches look at every byte at about 4 GB/s: for a 1 MB body
    that was twice orjson's parse, and 40% of the proxy's CPU per request
    (bench/README.md, issue 17).  A large body whose bulk is a few long
    strings (an image or a file in base64, one long document) is walked
    instead from quote to quote and backslash to backslash with
    C{bytes.find}, which skips the bytes between at memory speed; one with
    many of them goes to the searches after a bounded walk.
    """

    def __init__(self, names: frozenset[str], nested: Mapping[str, frozenset[str]] = MappingProxyType({})) -> None:
        self._names = names
        self._nested = dict(nested)
        every = names.union(*self._nested.values())
        alternatives = b"|".join(re.escape(name.encode()) for name in sorted(every, key=len, reverse=True))
        self._quoted = re.compile(b'"(?:' + alternatives + b')"')
        self._encoded = frozenset(name.encode() for name in every)
        self._longest = max(map(len, self._encoded), default=0)

    def __call__(self, data: bytes, document: Mapping[str, Any]) -> Optional[str]:
        """
        The first repeated name (a nested one as
        C{"stream_options.include_usage"}), C{""} when the body could not
        be read again (then it cannot be vouched for either), or C{None}.

        @param document: C{data} as parsed.
        """
        respelled = _respelled(document, self._names)
        if respelled is not None:
            return respelled
        for parent, children in self._nested.items():
            inner = document.get(parent)
            if isinstance(inner, dict):
                respelled = _respelled(inner, children)
                if respelled is not None:
                    return f"{parent}.{respelled}"
        if not self._may_repeat(data):
            return None
        try:
            text = data.decode(json.detect_encoding(data))
            return _repeated(text, _skip(text, 0), self._names, self._nested)[0]
        except (ValueError, IndexError, RecursionError):
            return ""

    def _may_repeat(self, data: bytes) -> bool:
        if not json.detect_encoding(data).startswith("utf-8"):
            # UTF-16 or UTF-32, which the standard library accepts: the byte
            # searches below would find nothing.
            return True
        if len(data) >= WALK_FROM:
            walked = self._walk(data)
            if walked is not None:
                return walked
        found = self._quoted.findall(data)
        if len(found) != len(set(found)):
            return True
        return _ESCAPED_NAME_CHAR.search(data) is not None

    def _walk(self, data: bytes) -> Optional[bool]:
        """
        What the two searches of L{_may_repeat} would answer, found by
        jumping from one quote, then one backslash, to the next; C{None}
        once the body has more of them than the budget allows.

        Each quote is tried as the opening one of a quoted name, as the
        regex does: a name closes at the very next quote, and a match uses
        that quote up.
        """
        budget = 64 + len(data) // WALK_BYTES_PER_STEP
        find, names, longest = data.find, self._encoded, self._longest
        seen: set[bytes] = set()
        at = find(b'"')
        while at >= 0:
            budget -= 1
            if budget < 0:
                return None
            end = find(b'"', at + 1)
            if end < 0:
                break
            if end - at - 1 <= longest and data[at + 1 : end] in names:
                name = data[at + 1 : end]
                if name in seen:
                    return True
                seen.add(name)
                end = find(b'"', end + 1)
            at = end
        at = find(b"\\")
        while at >= 0:
            budget -= 1
            if budget < 0:
                return None
            if _ESCAPED_NAME_CHAR.match(data, at) is not None:
                return True
            at = find(b"\\", at + 1)
        return False


def _respelled(document: Mapping[str, Any], names: frozenset[str]) -> Optional[str]:
    for key in document:
        if key not in names:
            folded = key.casefold()
            if folded in names:
                return folded
    return None


def _skip(text: str, at: int) -> int:
    match = _WHITESPACE.match(text, at)
    return match.end() if match is not None else at


def _repeated(
    text: str, at: int, names: frozenset[str], nested: Mapping[str, frozenset[str]]
) -> tuple[Optional[str], int]:
    """
    Walk the object at C{text[at]}, reading its members' names (escapes
    decoded) and skipping their values with the standard library's C
    scanner, except those of C{nested}, walked the same way.

    @raise ValueError: or C{IndexError}, for what is not a JSON object.
    """
    if text[at] != "{":
        raise ValueError("not an object")
    seen: set[str] = set()
    at = _skip(text, at + 1)
    if text[at] == "}":
        return None, at + 1
    while True:
        if text[at] != '"':
            raise ValueError("expected a member name")
        key, at = scanstring(text, at + 1)
        at = _skip(text, at)
        if text[at] != ":":
            raise ValueError("expected ':'")
        at = _skip(text, at + 1)
        children = nested.get(key)
        if children is not None and text[at] == "{":
            inner, at = _repeated(text, at, children, MappingProxyType({}))
            if inner is not None:
                return f"{key}.{inner}", at
        else:
            _, at = _DECODER.raw_decode(text, at)
        if key in names:
            if key in seen:
                return key, at
            seen.add(key)
        at = _skip(text, at)
        if text[at] == ",":
            at = _skip(text, at + 1)
            continue
        if text[at] != "}":
            raise ValueError("expected ',' or '}'")
        return None, at + 1
