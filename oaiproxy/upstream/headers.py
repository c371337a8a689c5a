# -*- test-case-name: tests.upstream.test_headers -*-
"""
The proxy's header policy, as pure functions over L{Headers}.

A forwarding proxy has to decide, for every header, whether it describes the
end-to-end message (forward it) or one hop of the connection (drop it), and
whether it carries a credential (never forward it).  Keeping these decisions
here, free of I/O, lets them be read in one place and tested exhaustively.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from typing import Iterable, Optional, Sequence
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

from oaiproxy.keyshape import OPENAI_KEY_MARKER, contains_openai_key

__all__ = [
    "looks_like_openai_key",
    "HOP_BY_HOP",
    "upstream_request_headers",
    "client_response_headers",
    "bearer_token",
    "bearer_tokens",
    "client_request_id",
    "parse_static_header",
    "is_credential_header",
    "openai_key_carrier",
    "url_carries_openai_key",
    "scope_openai_headers",
]

#: Connection-level headers (RFC 9110 section 7.6.1 plus the historical
#: ones) that describe a single hop and must never be relayed.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers that never go upstream, beyond the hop-by-hop ones:
#:  - credentials of the client (the proxy substitutes its own key);
#:  - framing and routing that the upstream connection sets for itself
#:    (Host, Content-Length) or that the proxy negotiates itself
#:    (Accept-Encoding: treq asks for gzip and decodes it);
#:  - C{Expect}, which the proxy already answered;
#:  - addresses of the client, which the upstream has no need to learn.
_REQUEST_DROP: frozenset[bytes] = HOP_BY_HOP | frozenset(
    {
        b"authorization",
        b"api-key",
        b"cookie",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"expect",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)

#: Response headers that never go back to the client, beyond hop-by-hop:
#: cookies (one upstream session must not leak between proxy users),
#: framing, which twisted.web recomputes for the body it actually sends, and
#: C{Server}, which names the proxy the client is really talking to.
_RESPONSE_DROP: frozenset[bytes] = HOP_BY_HOP | frozenset({b"set-cookie", b"set-cookie2", b"content-length", b"server"})


def looks_like_openai_key(token: bytes) -> bool:
    """
    Whether a token is, or holds, a real OpenAI secret key: someone about
    to hand their real key to the proxy (see L{contains_openai_key}).
    """
    return contains_openai_key(token)


def _connection_tokens(headers: Headers) -> set[bytes]:
    """
    The header names listed in C{Connection}, which are hop-by-hop for this
    message only (RFC 9110 section 7.6.1).
    """
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


#: Header names that carry a client's credential, whatever the API they
#: come from (Anthropic's C{x-api-key}, Google's C{x-goog-api-key}...).
_CREDENTIAL_NAMES: frozenset[bytes] = frozenset(
    {b"authorization", b"proxy-authorization", b"api-key", b"x-api-key", b"cookie"}
)
#: And any name with a credential-like word in it (C{X-Auth-Token},
#: C{OpenAI-Api-Key}, C{X-Access-Token}, C{X-Secret}...).  None of the
#: headers the OpenAI SDKs send (C{OpenAI-*}, C{X-Stainless-*},
#: C{Idempotency-Key}) has one.
_CREDENTIAL_WORD = re.compile(
    rb"(?:^|[-_.])(?:api[-_]?key|auth|authorization|token|secret|password|passwd|credentials?|bearer)(?:$|[-_.])"
)


def is_credential_header(name: bytes) -> bool:
    """
    Whether a request header (by its lower-cased name) carries a client's
    credential, which never goes upstream: the proxy sends its own.
    """
    return name in _CREDENTIAL_NAMES or _CREDENTIAL_WORD.search(name) is not None


#: Header names up to this long have their decision remembered.
_REMEMBERED_NAME = 64


class _NamePolicy:
    """
    Which header names a direction drops (by the name alone: C{drop}, and
    with C{credentials} every L{is_credential_header}), remembered per raw
    name: a message's names are the same few again and again, and the
    credential check is a regular expression.  Memory stays bounded: past
    C{limit} names, new ones are decided each time.
    """

    __slots__ = ("_drop", "_credentials", "_known", "_limit")

    def __init__(self, drop: frozenset[bytes], credentials: bool, limit: int = 1024) -> None:
        self._drop = drop
        self._credentials = credentials
        self._known: dict[bytes, Optional[bytes]] = {}
        self._limit = limit

    def kept(self, name: bytes) -> Optional[bytes]:
        """
        The lower-cased name when a header of this name may pass, else
        C{None}.
        """
        try:
            return self._known[name]
        except KeyError:
            pass
        lowered = name.lower()
        kept = None if (lowered in self._drop or (self._credentials and is_credential_header(lowered))) else lowered
        if len(self._known) < self._limit and len(name) <= _REMEMBERED_NAME:
            # (A client's or an upstream's names: a long one is decided
            # again each time rather than pinned.)
            self._known[name] = kept
        return kept


def _kept(headers: Headers, policy: _NamePolicy) -> Iterable[tuple[bytes, list[bytes]]]:
    also = _connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        lowered = policy.kept(name)
        if lowered is None or lowered in also:
            continue
        if lowered == b"content-encoding" and not b"".join(values).strip():
            # Twisted's ContentDecoderAgent leaves an empty Content-Encoding
            # on responses that had none; it means nothing, so drop it.
            continue
        yield name, list(values)


_REQUEST_NAMES = _NamePolicy(_REQUEST_DROP, credentials=True)
_RESPONSE_NAMES = _NamePolicy(_RESPONSE_DROP, credentials=False)


def upstream_request_headers(
    client: Headers,
    authorization: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
    credential_header: bytes = b"authorization",
) -> Headers:
    """
    The headers to send upstream for a client request.

    End-to-end headers the SDKs rely on (C{Content-Type}, C{Accept},
    C{OpenAI-Organization}, C{OpenAI-Project}, C{OpenAI-Beta},
    C{User-Agent}, C{X-Stainless-*}, C{X-Request-Id}...) pass through
    unchanged; the client's credentials, in any header that looks like one
    (L{is_credential_header}), are replaced by C{authorization}.
    (C{OpenAI-Organization} and C{OpenAI-Project} are decided per client
    before this: see L{scope_openai_headers}.)

    @param client: the headers of the incoming request.
    @param authorization: the complete C{Authorization} value for upstream,
        for example C{b"Bearer sk-..."}.
    @param extra: the operator's static upstream headers
        (C{--upstream-header}); each replaces the client's header of that
        name.
    @param credential_header: the header that carries C{authorization}:
        C{Authorization}, or C{api-key} for Azure OpenAI.  The client's
        own C{Authorization} and C{api-key} are dropped either way.
    """
    out = Headers()
    for name, values in _kept(client, _REQUEST_NAMES):
        out.setRawHeaders(name, values)
    for name, value in extra:
        out.setRawHeaders(name, [value])
    out.setRawHeaders(credential_header, [authorization])
    return out


#: Headers an operator may not set with C{--upstream-header}: the proxy or
#: the connection owns them.
_NOT_SETTABLE = _REQUEST_DROP | frozenset({b"content-type"})
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_static_header(text: str) -> tuple[bytes, bytes]:
    """
    Parse C{NAME:VALUE} (as C{--upstream-header} takes it).

    @raise ValueError: with a message naming the header, never its value
        (which may be a credential of an OpenAI-compatible service).
    """
    name, sep, value = text.partition(":")
    raw_name = name.strip().encode("latin-1", "replace")
    if not sep or not _TOKEN.match(raw_name):
        raise ValueError("--upstream-header must be NAME:VALUE with a valid header name")
    if raw_name.lower() in _NOT_SETTABLE:
        raise ValueError(f"--upstream-header cannot set {name.strip()}: the proxy sets it itself")
    raw_value = value.strip().encode("latin-1", "replace")
    if any(b < 0x20 and b != 0x09 for b in raw_value) or b"\x7f" in raw_value:
        raise ValueError(f"--upstream-header {name.strip()}: the value has control characters")
    return raw_name, raw_value


def client_response_headers(upstream: Headers, length: Optional[int]) -> list[tuple[bytes, list[bytes]]]:
    """
    The headers to send back to the client for an upstream response.

    Rate-limit headers, C{retry-after}, C{retry-after-ms},
    C{x-should-retry}, C{x-request-id} and C{content-type} pass through so
    that the SDKs' retry logic behaves as if talking to upstream directly.

    @param length: the length of the body the client will receive, when it
        is known; C{None} makes twisted.web frame the body itself (chunked),
        which is also what lets a stream flow without buffering.
    @return: C{(name, values)} pairs, meant for C{setRawHeaders} so that
        upstream values replace the defaults twisted.web presets (C{Date},
        C{Content-Type}).
    """
    out = list(_kept(upstream, _RESPONSE_NAMES))
    if length is not None:
        out.append((b"Content-Length", [b"%d" % (length,)]))
    # An nginx in front of the proxy would otherwise buffer event streams.
    out.append((b"X-Accel-Buffering", [b"no"]))
    return out


def bearer_token(headers: Headers) -> Optional[bytes]:
    """
    The token of an C{Authorization: Bearer <token>} header, or C{None}.

    The scheme is matched case-insensitively, as RFC 9110 requires.  Two
    or more C{Authorization} headers (a field RFC 9110 allows once) give
    none, even equal ones: which one counts would otherwise be this
    function's choice, and a proxy or cache in front may choose the other.
    """
    values = headers.getRawHeaders(b"authorization")
    if not values or len(values) > 1:
        return None
    return _bearer_of(values[0])


def bearer_tokens(headers: Headers) -> list[bytes]:
    """
    The token of every C{Authorization: Bearer} header, for a request that
    sent several (which L{bearer_token} refuses to choose among).
    """
    tokens = (_bearer_of(value) for value in headers.getRawHeaders(b"authorization", ()))
    return [token for token in tokens if token is not None]


def _bearer_of(value: bytes) -> Optional[bytes]:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def client_request_id(value: Optional[bytes]) -> Optional[str]:
    """
    A client's own C{X-Request-Id}, if it is a reasonable one to echo and
    log: at most 128 printable ASCII characters, no spaces, no OpenAI key.
    """
    if value is None or not (0 < len(value) <= 128):
        return None
    if not all(0x21 <= b < 0x7F for b in value):
        return None
    if contains_openai_key(value):
        # Refused (openai_key_carrier), and never an id to log or echo.
        return None
    return value.decode("ascii")


def openai_key_carrier(headers: Headers, uri: bytes, accepted: tuple[bytes, ...] = ()) -> Optional[str]:
    """
    Where a request carries a real OpenAI secret key (see
    L{contains_openai_key}): the lower-cased name of a
    header, C{"the URL"}, or C{None} for nowhere.

    Every header value is looked at, not only C{Authorization}: clients put
    keys in C{x-api-key}, C{api-key}, in C{Authorization} without a scheme
    or in a C{Basic} credential, and in the query string (C{?api_key=}).
    Each look is a substring search for the keys' fixed marker, so a
    request carrying none costs one C{in} per header value.

    @param accepted: client keys, which are accepted whatever they look
        like (teams may keep keys they already hand out): not taken for
        leaked keys.  The one that identified the client, or those among
        several C{Authorization} headers (refused, but not as a leak).
    """
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        for value in values:
            if _carries_key(value, accepted):
                return lowered.decode("latin-1")
            if lowered in (b"authorization", b"proxy-authorization"):
                scheme, _, credential = value.strip().partition(b" ")
                if scheme.lower() == b"basic" and _carries_key(_unbase64(credential), accepted):
                    return lowered.decode("latin-1")
    if url_carries_openai_key(uri):
        return "the URL"
    return None


def url_carries_openai_key(uri: bytes) -> bool:
    """
    Whether a request's URL carries a real OpenAI secret key, as it is or
    percent-decoded (L{openai_key_carrier}'s last look).
    """
    return _carries_key(uri, ()) or (b"%" in uri and _carries_key(unquote_to_bytes(uri), ()))


def _carries_key(value: bytes, accepted: tuple[bytes, ...]) -> bool:
    if OPENAI_KEY_MARKER not in value:
        return False
    for key in accepted:
        value = value.replace(key, b"")
    return contains_openai_key(value)


def _unbase64(text: bytes) -> bytes:
    try:
        return b64decode(text.strip() + b"==")
    except (binascii.Error, ValueError):
        return b""


_OPENAI_ORGANIZATION = b"openai-organization"
_OPENAI_PROJECT = b"openai-project"


def scope_openai_headers(
    headers: Headers,
    organization: Optional[str] = None,
    project: Optional[str] = None,
    passthrough: bool = False,
) -> None:
    """
    Decide, for a client of a proxy with client keys, the
    C{OpenAI-Organization} and C{OpenAI-Project} that go upstream.

    These headers choose which organization or project the shared upstream
    key acts for (and bills), so a client does not choose them unless its
    entry says so: a fixed value from its entry replaces the client's, and
    otherwise the client's own pass only with C{passthrough}; by default
    they are removed.  (Without client keys, a single-user proxy, the
    client's pass unchanged and this is not called.)

    @param headers: the client request's headers, changed in place.
    """
    for name, fixed in ((_OPENAI_ORGANIZATION, organization), (_OPENAI_PROJECT, project)):
        if fixed is not None:
            headers.setRawHeaders(name, [fixed.encode("latin-1")])
        elif not passthrough:
            headers.removeHeader(name)
