# -*- test-case-name: tests.test_keyshape -*-
"""
What a real OpenAI secret key looks like, for every layer that must not
pass one on or write one down.

The proxy holds the upstream key; a client that sends a real one (in a
header, the query string, the path, its X-Request-Id) is refused
(L{oaiproxy.upstream.headers.openai_key_carrier}), and the key must then
appear in no log line and no answer either: L{redact_openai_keys} blanks
it wherever a request's own text is shown.  It sits in the shared layer
because the shown path of a 404 (L{oaiproxy.web}) needs it as much as the
access log does.
"""

from __future__ import annotations

import re

__all__ = ["OPENAI_KEY_MARKER", "contains_openai_key", "redact_openai_keys"]

#: What every OpenAI secret key carries between its two random halves:
#: C{T3BlbkFJ}, the base64 of "OpenAI".  Secret scanners (gitleaks'
#: C{openai-api-key} rule) key on it; a C{sk-} prefix alone is also worn by
#: LiteLLM virtual keys and many local servers' dummy keys.
OPENAI_KEY_MARKER = b"T3BlbkFJ"
# Legacy keys are sk- + 20 + marker + 20 letters and digits; project,
# service-account and admin keys (sk-proj-, sk-svcacct-, sk-admin-) have
# 58 or 74 characters of [A-Za-z0-9_-] on each side.  The bounds keep a
# search linear in the text's length, and a match takes the whole key,
# for L{redact_openai_keys}.
_OPENAI_KEY = re.compile(rb"sk-[A-Za-z0-9_-]{20,200}T3BlbkFJ[A-Za-z0-9_-]{20,200}")

#: What a blanked key is shown as.
REDACTED = b"<redacted>"


def contains_openai_key(data: bytes) -> bool:
    """
    Whether C{data} holds a real OpenAI secret key (by the shape above),
    anywhere in it.  A text without the marker costs one C{in}.
    """
    return OPENAI_KEY_MARKER in data and _OPENAI_KEY.search(data) is not None


def redact_openai_keys(data: bytes) -> bytes:
    """
    C{data} with every real OpenAI secret key in it replaced by
    L{REDACTED}; the same object when there is none.
    """
    if OPENAI_KEY_MARKER not in data:
        return data
    return _OPENAI_KEY.sub(REDACTED, data)
