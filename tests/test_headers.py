"""
Tests for L{oaiproxy.headers}: which headers the proxy forwards upstream,
which it sends back to the client, and how it reads a client's bearer
token.

The request side must never leak the client's credentials, cookies or
address upstream and must put exactly one proxy C{Authorization} on the
request; the response side must keep what the SDKs' retry logic reads and
drop cookies, framing and hop-by-hop headers.
"""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.headers import bearer_token, client_response_headers, upstream_request_headers

PROXY_AUTH = b"Bearer sk-proj-UPSTREAMSECRET0123456789"
CLIENT_KEY = b"oai-client-CLIENTSECRET42"

HOP_BY_HOP_NAMES = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
]


def make_headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """
    Headers built from C{(name, value)} pairs, repeated names adding values.
    """
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def names_of(headers: Headers) -> set[bytes]:
    """
    The lower-cased header names present in C{headers}.
    """
    return {name.lower() for name, _ in headers.getAllRawHeaders()}


def upstream(*pairs: tuple[bytes, bytes]) -> Headers:
    """
    What the proxy would send upstream for a client request with C{pairs}.
    """
    return upstream_request_headers(make_headers(*pairs), PROXY_AUTH)


def to_client(*pairs: tuple[bytes, bytes], length: Optional[int] = None) -> dict[bytes, list[bytes]]:
    """
    What the proxy would send the client for an upstream response with
    C{pairs}, keyed by lower-cased name.  Fails on a name given twice,
    which would make C{setRawHeaders} drop one of them.
    """
    result: dict[bytes, list[bytes]] = {}
    for name, values in client_response_headers(make_headers(*pairs), length):
        key = name.lower()
        assert key not in result, f"{name!r} returned twice"
        result[key] = values
    return result


class UpstreamDropTests(SynchronousTestCase):
    """
    Headers that must never reach upstream.
    """

    def assertDropped(self, names: Sequence[bytes], value: bytes = b"x") -> None:
        for name in names:
            sent = upstream((name, value), (b"Content-Type", b"application/json"))
            self.assertNotIn(name.lower(), names_of(sent), name)
            self.assertEqual(sent.getRawHeaders(b"content-type"), [b"application/json"])

    def test_hop_by_hop(self) -> None:
        """
        Connection-level headers describe the client's hop only and are not
        relayed.
        """
        self.assertDropped(HOP_BY_HOP_NAMES)

    def test_proxy_authorization_value_not_forwarded(self) -> None:
        """
        A credential meant for this proxy hop is not handed to OpenAI.
        """
        sent = upstream((b"Proxy-Authorization", b"Basic " + CLIENT_KEY))
        for _, values in sent.getAllRawHeaders():
            for value in values:
                self.assertNotIn(CLIENT_KEY, value)

    def test_headers_named_in_connection(self) -> None:
        """
        A header the client declared hop-by-hop in C{Connection} is dropped,
        whatever the case of its name or token.
        """
        sent = upstream(
            (b"Connection", b"close, X-Hop-Secret"),
            (b"Connection", b" x-other-hop "),
            (b"X-HOP-SECRET", b"1"),
            (b"X-Other-Hop", b"2"),
            (b"X-Kept", b"3"),
        )
        self.assertEqual(names_of(sent), {b"x-kept", b"authorization"})

    def test_client_credentials(self) -> None:
        """
        The client's own key never reaches OpenAI, whether sent as
        C{Authorization}, Azure-style C{api-key}, or in a cookie.
        """
        sent = upstream(
            (b"Authorization", b"Bearer " + CLIENT_KEY),
            (b"api-key", CLIENT_KEY),
            (b"Cookie", b"session=" + CLIENT_KEY),
        )
        self.assertEqual(names_of(sent), {b"authorization"})
        self.assertEqual(sent.getRawHeaders(b"authorization"), [PROXY_AUTH])

    def test_framing_and_negotiation(self) -> None:
        """
        Host, Content-Length, Accept-Encoding and Expect belong to the
        client's connection; the upstream connection sets its own.
        """
        self.assertDropped([b"Host", b"Content-Length", b"Accept-Encoding", b"Expect"])

    def test_client_address(self) -> None:
        """
        The client's address is not disclosed to OpenAI.
        """
        self.assertDropped(
            [
                b"X-Forwarded-For",
                b"Forwarded",
                b"X-Real-IP",
                b"X-Forwarded-Host",
                b"X-Forwarded-Proto",
            ],
            b"203.0.113.7",
        )

    def test_names_case_insensitive(self) -> None:
        """
        Dropping does not depend on how the client spelled the name.
        """
        sent = upstream(
            (b"aUtHoRiZaTiOn", b"Bearer " + CLIENT_KEY),
            (b"API-KEY", CLIENT_KEY),
            (b"cookie", b"a=b"),
            (b"x-FORWARDED-for", b"203.0.113.7"),
            (b"TRANSFER-ENCODING", b"chunked"),
        )
        self.assertEqual(names_of(sent), {b"authorization"})
        self.assertEqual(sent.getRawHeaders(b"authorization"), [PROXY_AUTH])


class UpstreamAuthorizationTests(SynchronousTestCase):
    """
    The proxy's key is sent upstream exactly once.
    """

    def test_set_without_client_authorization(self) -> None:
        """
        A client that sent no key still gets the proxy's key upstream.
        """
        self.assertEqual(upstream().getRawHeaders(b"authorization"), [PROXY_AUTH])

    def test_replaces_several_client_values(self) -> None:
        """
        Several client C{Authorization} headers give way to one proxy value.
        """
        sent = upstream(
            (b"Authorization", b"Bearer a"),
            (b"authorization", b"Bearer b"),
        )
        self.assertEqual(sent.getRawHeaders(b"authorization"), [PROXY_AUTH])

    def test_value_exact(self) -> None:
        """
        The given value is used byte for byte.
        """
        sent = upstream_request_headers(Headers(), b"Bearer k-1")
        self.assertEqual(sent.getRawHeaders(b"Authorization"), [b"Bearer k-1"])


class UpstreamForwardTests(SynchronousTestCase):
    """
    End-to-end headers the SDKs rely on pass through unchanged.
    """

    def test_end_to_end_headers_unchanged(self) -> None:
        """
        Content type, organisation, project, beta flags and SDK telemetry
        reach OpenAI exactly as the client sent them.
        """
        pairs = [
            (b"Content-Type", b"application/json"),
            (b"Accept", b"text/event-stream"),
            (b"OpenAI-Organization", b"org-123"),
            (b"OpenAI-Project", b"proj_456"),
            (b"User-Agent", b"OpenAI/Python 1.40.0"),
            (b"X-Stainless-Lang", b"python"),
            (b"X-Stainless-Retry-Count", b"0"),
            (b"X-Request-Id", b"req-abc"),
        ]
        sent = upstream(*pairs)
        for name, value in pairs:
            self.assertEqual(sent.getRawHeaders(name), [value], name)
        self.assertEqual(names_of(sent), {n.lower() for n, _ in pairs} | {b"authorization"})

    def test_multiple_values_kept(self) -> None:
        """
        A header sent several times keeps every value, in order.
        """
        sent = upstream(
            (b"OpenAI-Beta", b"assistants=v2"),
            (b"openai-beta", b"realtime=v1"),
        )
        self.assertEqual(sent.getRawHeaders(b"OpenAI-Beta"), [b"assistants=v2", b"realtime=v1"])

    def test_client_headers_not_modified(self) -> None:
        """
        Building the upstream headers leaves the client's request headers
        as they were (the access log still sees them).
        """
        client = make_headers((b"Authorization", b"Bearer " + CLIENT_KEY), (b"Host", b"proxy"))
        upstream_request_headers(client, PROXY_AUTH)
        self.assertEqual(client.getRawHeaders(b"authorization"), [b"Bearer " + CLIENT_KEY])
        self.assertEqual(client.getRawHeaders(b"host"), [b"proxy"])


class ClientResponseTests(SynchronousTestCase):
    """
    Headers relayed from upstream back to the client.
    """

    def test_sdk_headers_kept(self) -> None:
        """
        Request ids, timing, rate limits and retry hints reach the client,
        so the SDK retries as if it talked to OpenAI directly.
        """
        pairs = [
            (b"x-request-id", b"req_123"),
            (b"openai-processing-ms", b"250"),
            (b"x-ratelimit-limit-requests", b"500"),
            (b"x-ratelimit-remaining-tokens", b"1999"),
            (b"x-ratelimit-reset-requests", b"120ms"),
            (b"retry-after", b"2"),
            (b"retry-after-ms", b"1500"),
            (b"x-should-retry", b"true"),
            (b"content-type", b"text/event-stream; charset=utf-8"),
        ]
        sent = to_client(*pairs)
        for name, value in pairs:
            self.assertEqual(sent.get(name), [value], name)

    def test_dropped(self) -> None:
        """
        Hop-by-hop headers, cookies, C{Server} and upstream's own
        C{Content-Length} are not relayed.
        """
        dropped = HOP_BY_HOP_NAMES + [b"Set-Cookie", b"Set-Cookie2", b"Server", b"Content-Length"]
        sent = to_client(*[(name, b"1") for name in dropped], (b"x-request-id", b"r"))
        self.assertEqual(set(sent), {b"x-request-id", b"x-accel-buffering"})

    def test_upstream_cookie_value_not_relayed(self) -> None:
        """
        An upstream session cookie never reaches a proxy user.
        """
        sent = to_client((b"Set-Cookie", b"__cf_bm=UPSTREAMCOOKIE; path=/"))
        self.assertNotIn(b"UPSTREAMCOOKIE", b"".join(v for vs in sent.values() for v in vs))

    def test_headers_named_in_connection(self) -> None:
        """
        A header upstream declared hop-by-hop in C{Connection} is dropped.
        """
        sent = to_client((b"Connection", b"X-Upstream-Hop"), (b"X-Upstream-Hop", b"1"))
        self.assertNotIn(b"x-upstream-hop", sent)

    def test_empty_content_encoding_dropped(self) -> None:
        """
        The empty C{Content-Encoding} Twisted's decoder leaves behind is not
        sent: it means nothing and would
        only confuse a client's decoder.
        """
        self.assertNotIn(b"content-encoding", to_client((b"Content-Encoding", b"")))
        self.assertNotIn(b"content-encoding", to_client((b"Content-Encoding", b"  ")))

    def test_real_content_encoding_kept(self) -> None:
        """
        A real C{Content-Encoding} stays, or the client could not decode the
        body.
        """
        self.assertEqual(to_client((b"Content-Encoding", b"br"))[b"content-encoding"], [b"br"])

    def test_content_length_when_known(self) -> None:
        """
        A known length becomes the client's C{Content-Length}, replacing
        upstream's (which described the still-encoded body).
        """
        sent = to_client((b"Content-Length", b"999"), length=42)
        self.assertEqual(sent[b"content-length"], [b"42"])

    def test_content_length_zero(self) -> None:
        """
        An empty body is framed as such, not chunked.
        """
        self.assertEqual(to_client(length=0)[b"content-length"], [b"0"])

    def test_no_content_length_when_unknown(self) -> None:
        """
        Without a length no C{Content-Length} is sent, so a stream flows
        chunked.
        """
        self.assertNotIn(b"content-length", to_client((b"Content-Length", b"999")))

    def test_accel_buffering_off(self) -> None:
        """
        C{X-Accel-Buffering: no} is always added, so an nginx in front does
        not hold back an event stream.
        """
        self.assertEqual(to_client()[b"x-accel-buffering"], [b"no"])
        self.assertEqual(to_client((b"x-request-id", b"r"), length=3)[b"x-accel-buffering"], [b"no"])

    def test_multiple_values_kept(self) -> None:
        """
        A header upstream sent several times keeps every value.
        """
        sent = to_client((b"Vary", b"Origin"), (b"vary", b"Accept-Encoding"))
        self.assertEqual(sent[b"vary"], [b"Origin", b"Accept-Encoding"])


class BearerTokenTests(SynchronousTestCase):
    """
    L{bearer_token} reads the key a client presents.
    """

    def token(self, *values: bytes, name: bytes = b"Authorization") -> Optional[bytes]:
        return bearer_token(make_headers(*[(name, v) for v in values]))

    def test_bearer(self) -> None:
        """
        The usual SDK header yields the key.
        """
        self.assertEqual(self.token(b"Bearer " + CLIENT_KEY), CLIENT_KEY)

    def test_scheme_case_insensitive(self) -> None:
        """
        C{bearer} and C{BEARER} are accepted, as RFC 9110 requires.
        """
        self.assertEqual(self.token(b"bearer abc"), b"abc")
        self.assertEqual(self.token(b"BEARER abc"), b"abc")

    def test_header_name_case_insensitive(self) -> None:
        """
        The header name's spelling does not matter.
        """
        self.assertEqual(self.token(b"Bearer abc", name=b"AUTHORIZATION"), b"abc")

    def test_surrounding_whitespace(self) -> None:
        """
        Spaces around the value or between scheme and token are ignored.
        """
        self.assertEqual(self.token(b"  Bearer    abc  "), b"abc")

    def test_missing(self) -> None:
        """
        No C{Authorization} header means no token.
        """
        self.assertIsNone(bearer_token(Headers()))

    def test_other_scheme(self) -> None:
        """
        Basic credentials, or a bare key without a scheme, are not a
        bearer token.
        """
        self.assertIsNone(self.token(b"Basic dXNlcjpwYXNz"))
        self.assertIsNone(self.token(CLIENT_KEY))
        self.assertIsNone(self.token(b"Bearerabc"))

    def test_empty_token(self) -> None:
        """
        A scheme without a token is not accepted as an empty key.
        """
        self.assertIsNone(self.token(b"Bearer"))
        self.assertIsNone(self.token(b"Bearer    "))
        self.assertIsNone(self.token(b""))
