"""
The ways a client can try to make an id in its request path reach another
upstream endpoint (with the proxy's shared key), shared by the in-memory
and the end-to-end tests.

Each is what follows C{/v1/models/} or C{/v1/responses/} on the wire, as
C{curl --path-as-is} would send it: twisted.web decodes each segment once
and leaves C{.} and C{..} where they are, so all of these arrive.
"""

from __future__ import annotations

#: (what follows the collection's path, why it is a trick).
ID_TRICKS: list[tuple[str, str]] = [
    ("../files", "a dot-segment"),
    ("../chat/completions", "a dot-segment to another route (lists stored completions)"),
    ("..%2Ffiles", "an encoded slash"),
    ("..%2ffiles", "an encoded slash, lower case"),
    ("%2e%2e/%2e%2e/files", "encoded dots"),
    ("%2E%2E%2F%2E%2E%2Ffiles", "everything encoded"),
    ("..", "the parent itself"),
    (".", "the collection itself"),
    ("%2e", "an encoded dot"),
    ("%2e%2e", "encoded dots alone"),
    ("/files", "an empty segment"),
    ("..%5Cfiles", "an encoded backslash (a slash to some servers)"),
    ("%5C..%5Cfiles", "encoded backslashes around dots"),
    ("%252e%252e%252ffiles", "double encoding (dots to a server that decodes twice)"),
    ("%252e%252e", "double-encoded dots alone"),
    ("..;/files", "a path parameter after the dots (Tomcat reads ..)"),
    ("..%3B", "an encoded path parameter"),
    ("%EF%BC%8E%EF%BC%8E", "fullwidth dots (NFKC folds them to ..)"),
    ("..%EF%BC%8Ffiles", "a fullwidth solidus"),
    ("a%00b", "a NUL"),
    ("a%0d%0aX-Injected:%201", "CR LF"),
    ("a%7f", "DEL"),
    ("a%C2%85", "a C1 control (NEL)"),
    ("%ff", "not UTF-8"),
    ("%20..", "dots after a space (a server that trims segments reads ..)"),
    ("..%20/files", "dots before a space"),
    ("%E3%80%80..", "dots after an ideographic space (NFKC folds it to a space)"),
]
