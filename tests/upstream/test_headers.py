"""
Tests for L{oaiproxy.upstream.headers}: which headers the proxy forwards upstream,
which it sends back to the client, and how it reads a client's bearer
token.

The request side must never leak the client's credentials, cookies or
address upstream and must put exactly one proxy C{Authorization} on the
request; the response side must keep what the SDKs' retry logic reads and
drop cookies, framing and hop-by-hop headers.
"""

from __future__ import annotations

import json
from base64 import b64encode
from typing import Any, Optional, Sequence

import treq
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.access.clients import Client, ClientRegistry, hash_key
from oaiproxy.fake.harness import UPSTREAM_KEY, Harness, chat_body
from oaiproxy.upstream.headers import (
    OPENAI_KEY_MARKER,
    bearer_token,
    client_response_headers,
    is_credential_header,
    openai_key_carrier,
    scope_openai_headers,
    upstream_request_headers,
)

PROXY_AUTH = b"Bearer sk-proj-UPSTREAMSECRET0123456789"
CLIENT_KEY = b"oai-client-CLIENTSECRET42"
#: A project key's shape, built from parts so that no secret scanner takes
#: this file for a leak.
REAL_KEY = b"sk-proj-" + b"Ab1_Cd2-" * 7 + b"Ef" + OPENAI_KEY_MARKER + b"Gh3-Ij4_" * 7 + b"Kl"
LEGACY_KEY = b"sk-" + b"A1b2C3d4e5" * 2 + OPENAI_KEY_MARKER + b"f6G7h8I9j0" * 2

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

    def test_credential_like_headers(self) -> None:
        """
        Credentials in the headers other APIs and gateways use (Anthropic's
        C{x-api-key}, Google's C{x-goog-api-key}, C{X-Auth-Token},
        C{OpenAI-Api-Key}...) never reach upstream either: whatever a
        client sends as a key is its credential for the proxy, or a
        mistake.
        """
        names = [
            b"x-api-key",
            b"X-Goog-Api-Key",
            b"X-Auth-Token",
            b"OpenAI-Api-Key",
            b"x-apikey",
            b"X-Access-Token",
            b"X-Client-Secret",
            b"x-portkey-api-key",
            b"X-Upstream-Authorization",
            b"X-Password",
            b"Proxy-Authorization",
        ]
        sent = upstream(*[(name, CLIENT_KEY) for name in names])
        self.assertEqual(names_of(sent), {b"authorization"})
        for name in names:
            self.assertTrue(is_credential_header(name.lower()), name)

    def test_sdk_headers_are_not_credentials(self) -> None:
        """
        None of the headers the SDKs and OpenAI's API use is taken for a
        credential.
        """
        for name in [
            b"openai-organization",
            b"openai-project",
            b"openai-beta",
            b"idempotency-key",
            b"x-stainless-retry-count",
            b"x-stainless-read-timeout",
            b"x-stainless-package-version",
            b"x-request-id",
            b"x-client-request-id",
            b"user-agent",
            b"accept",
            b"content-type",
            b"x-ms-client-request-id",
            b"http-referer",
            b"x-title",
        ]:
            self.assertFalse(is_credential_header(name), name)

    def test_static_header_may_still_set_one(self) -> None:
        """
        The operator's own C{--upstream-header} may still set a header of
        that kind for an upstream that wants one (the client's is dropped,
        the operator's sent).
        """
        sent = upstream_request_headers(
            make_headers((b"X-Api-Key", CLIENT_KEY)), PROXY_AUTH, extra=[(b"X-Api-Key", b"operator-value")]
        )
        self.assertEqual(sent.getRawHeaders(b"x-api-key"), [b"operator-value"])

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


class NameDecisionsTests(SynchronousTestCase):
    """
    The decisions by header name are remembered for the names seen first,
    and stay right for any name after that.
    """

    def test_decisions_after_many_names(self) -> None:
        """
        After thousands of distinct names (a client making them up), a
        credential-like name is still dropped and others still pass, in
        every case, and the same name is decided the same way again.
        """
        for i in range(3000):
            upstream((b"x-made-up-%d" % i, b"v"))
        for _ in range(2):
            sent = names_of(upstream((b"X-Auth-Token-9999", b"t"), (b"x-custom-9999", b"c"), (b"Cookie", b"c=1")))
            self.assertEqual(sent, {b"x-custom-9999", b"authorization"})

    def test_long_names_are_not_remembered(self) -> None:
        """
        A header name longer than the remembered bound (a client's 10 KB
        name) is decided, and passes or is dropped as any other, but is not
        kept: made-up long names cannot pin memory.
        """
        from oaiproxy.upstream.headers import _REQUEST_DROP, _NamePolicy

        policy = _NamePolicy(_REQUEST_DROP, credentials=True)
        long_name = b"X-" + b"a" * 10_000
        self.assertEqual(policy.kept(long_name), long_name.lower())
        self.assertIsNone(policy.kept(b"x-" + b"k" * 100 + b"-api-key"))
        self.assertEqual(policy.kept(b"X-Short"), b"x-short")
        self.assertEqual(set(policy._known), {b"X-Short"})


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

    def test_two_headers(self) -> None:
        """
        Two C{Authorization} headers give no token, whichever comes first
        and even when they are equal.
        """
        self.assertIsNone(self.token(b"Bearer " + CLIENT_KEY, b"Bearer other"))
        self.assertIsNone(self.token(b"Bearer other", b"Bearer " + CLIENT_KEY))
        self.assertIsNone(self.token(b"Bearer " + CLIENT_KEY, b"Bearer " + CLIENT_KEY))

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


def headers_of(**named: bytes) -> Headers:
    return make_headers(*[(name.replace("_", "-").encode(), value) for name, value in named.items()])


class OpenAIKeyCarrierTests(SynchronousTestCase):
    """
    L{openai_key_carrier} finds a real OpenAI key wherever a client may put
    one, and says where without saying what.
    """

    def test_every_header(self) -> None:
        """
        A key in C{Authorization} (with or without a scheme), in
        C{x-api-key}, C{api-key}, or any other header is found, and the
        header named.
        """
        for key in (REAL_KEY, LEGACY_KEY):
            for name, value in [
                (b"Authorization", b"Bearer " + key),
                (b"Authorization", key),
                (b"Authorization", b"Token " + key),
                (b"x-api-key", key),
                (b"api-key", key),
                (b"X-Something-Else", b"prefix " + key + b" suffix"),
            ]:
                carrier = openai_key_carrier(make_headers((b"Accept", b"*/*"), (name, value)), b"/v1/chat/completions")
                self.assertEqual(carrier, name.decode().lower(), (name, value))

    def test_basic_credentials(self) -> None:
        """
        A key sent as a Basic credential's password (C{curl -u :KEY}) is
        found too.
        """
        for credential in (b":" + REAL_KEY, b"user:" + REAL_KEY, b"user:" + LEGACY_KEY):
            headers = make_headers((b"Authorization", b"Basic " + b64encode(credential)))
            self.assertEqual(openai_key_carrier(headers, b"/v1/models"), "authorization")
        headers = make_headers((b"Authorization", b"Basic " + b64encode(b"user:password")))
        self.assertIsNone(openai_key_carrier(headers, b"/v1/models"))

    def test_url(self) -> None:
        """
        A key in the query string (C{?api_key=}, C{?key=}), percent-encoded
        or not, or in the path, is found.
        """
        quoted = b"".join(b"%%%02X" % c for c in REAL_KEY)
        for uri in [
            b"/v1/chat/completions?api_key=" + REAL_KEY,
            b"/v1/chat/completions?stream=true&key=" + LEGACY_KEY,
            b"/v1/chat/completions?api_key=" + quoted,
            b"/v1/models/" + REAL_KEY,
        ]:
            self.assertEqual(openai_key_carrier(Headers(), uri), "the URL", uri)

    def test_none(self) -> None:
        """
        Requests carrying no real key (an C{sk-} virtual key, a client key,
        the marker alone) are not refused.
        """
        for value in [b"Bearer sk-1234", b"Bearer sk-litellm-" + b"a" * 40, b"Bearer " + CLIENT_KEY, OPENAI_KEY_MARKER]:
            self.assertIsNone(openai_key_carrier(make_headers((b"Authorization", value)), b"/v1/models?x=1"))

    def test_accepted_client_key(self) -> None:
        """
        The configured client key that identified the client is accepted
        whatever its shape; a real key elsewhere in the same request is
        still found.
        """
        headers = make_headers((b"Authorization", b"Bearer " + REAL_KEY))
        self.assertIsNone(openai_key_carrier(headers, b"/v1/models", accepted=(REAL_KEY,)))
        headers.addRawHeader(b"x-api-key", LEGACY_KEY)
        self.assertEqual(openai_key_carrier(headers, b"/v1/models", accepted=(REAL_KEY,)), "x-api-key")
        self.assertEqual(
            openai_key_carrier(Headers(), b"/v1/models?api_key=" + REAL_KEY, accepted=(REAL_KEY,)), "the URL"
        )


class ScopeOpenAIHeadersTests(SynchronousTestCase):
    """
    L{scope_openai_headers}: what a client of a keyed proxy may say about
    the organization and project the shared key acts for.
    """

    def scoped(self, **settings: Any) -> Headers:
        headers = make_headers(
            (b"OpenAI-Organization", b"org-client"), (b"OpenAI-Project", b"proj_client"), (b"OpenAI-Beta", b"x")
        )
        scope_openai_headers(headers, **settings)
        return headers

    def test_dropped_by_default(self) -> None:
        headers = self.scoped()
        self.assertEqual(names_of(headers), {b"openai-beta"})

    def test_passed_when_allowed(self) -> None:
        headers = self.scoped(passthrough=True)
        self.assertEqual(headers.getRawHeaders(b"openai-organization"), [b"org-client"])
        self.assertEqual(headers.getRawHeaders(b"openai-project"), [b"proj_client"])

    def test_fixed_values_replace(self) -> None:
        """
        A fixed value replaces the client's (even with C{passthrough}); a
        header without one follows C{passthrough}.
        """
        headers = self.scoped(project="proj_fixed")
        self.assertEqual(headers.getRawHeaders(b"openai-project"), [b"proj_fixed"])
        self.assertFalse(headers.hasHeader(b"openai-organization"))
        headers = self.scoped(organization="org-fixed", passthrough=True)
        self.assertEqual(headers.getRawHeaders(b"openai-organization"), [b"org-fixed"])
        self.assertEqual(headers.getRawHeaders(b"openai-project"), [b"proj_client"])
        headers = Headers()
        scope_openai_headers(headers, organization="org-fixed")
        self.assertEqual(headers.getRawHeaders(b"openai-organization"), [b"org-fixed"])


def _client(key: bytes, **settings: Any) -> Client:
    return Client(name="alice", key_sha256=bytes.fromhex(hash_key(key.decode())), **settings)


class RequestHeaderPolicyTests(SynchronousTestCase):
    """
    The policies above, through the proxy: what a request that carries a
    real OpenAI key gets, and which organization and project headers reach
    upstream.
    """

    def post(self, h: Harness, headers: dict[bytes, list[bytes]], path: str = "/v1/chat/completions") -> Any:
        response = self.successResultOf(h.post(chat_body(), path=path, headers=headers))
        return response, json.loads(self.successResultOf(treq.content(response)))

    def test_real_key_refused_wherever_it_is(self) -> None:
        """
        A real OpenAI key, in any header or the URL, with or without client
        keys configured (and beside a valid client key), gets a 401 that
        says to rotate it, never quotes it, and names where it was; nothing
        goes upstream, and the log says where, never what.
        """
        client = [b"Bearer " + CLIENT_KEY]
        for h, base in ((Harness(), {}), (Harness(client_keys=[CLIENT_KEY]), {b"authorization": client})):
            for headers, path, where in [
                ({b"authorization": [b"Bearer " + REAL_KEY]}, "/v1/chat/completions", "authorization"),
                ({b"authorization": [REAL_KEY]}, "/v1/chat/completions", "authorization"),
                ({b"x-api-key": [LEGACY_KEY]}, "/v1/chat/completions", "x-api-key"),
                ({b"api-key": [REAL_KEY]}, "/v1/chat/completions", "api-key"),
                ({}, "/v1/chat/completions?api_key=" + REAL_KEY.decode(), "the URL"),
            ]:
                sent = {**base, **headers}
                with capturedLogs() as events:
                    response, body = self.post(h, sent, path)
                self.assertEqual((response.code, body["error"]["code"]), (401, "openai_key_not_accepted"), sent)
                message = body["error"]["message"]
                self.assertIn("rotate", message)
                self.assertIn(where, message)
                self.assertNotIn(b"Ab1_Cd2", json.dumps(body).encode())
                self.assertNotIn(b"A1b2C3d4", json.dumps(body).encode())
                logged = repr(events)
                self.assertIn(where, logged)
                self.assertNotIn("Ab1_Cd2", logged)
                self.assertNotIn("A1b2C3d4", logged)
            self.assertEqual(h.fake.requests, [])

    def test_sk_tokens_are_not_refused(self) -> None:
        """
        Without client keys, an C{sk-} token that is no OpenAI key (a
        LiteLLM-style virtual key, a local server's dummy key) is not
        refused, and goes upstream no more than any client credential.
        """
        h = Harness()
        for token in (b"sk-1234", b"sk-" + b"A1b2C3d4" * 6, b"sk-no-key-required"):
            response, body = self.post(h, {b"authorization": [b"Bearer " + token], b"x-api-key": [token]})
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(h.fake.requests), 3)
        for request in h.fake.requests:
            self.assertNotIn("x-api-key", request.headers)
            self.assertEqual(request.headers["authorization"], ["Bearer " + UPSTREAM_KEY.decode()])

    def test_configured_key_accepted_whatever_its_shape(self) -> None:
        """
        A configured client key is accepted whatever its prefix, an C{sk-}
        one or even one of OpenAI's shape, so teams may keep the keys they
        already hand out; it never goes upstream.
        """
        for key in (b"sk-team-0123456789abcdefghij", REAL_KEY):
            h = Harness(client_keys=[key])
            response, body = self.post(h, {b"authorization": [b"Bearer " + key]})
            self.assertEqual(response.code, 200, body)
            [request] = h.fake.requests
            self.assertEqual(request.headers["authorization"], ["Bearer " + UPSTREAM_KEY.decode()])
            self.assertNotIn(key.decode(), repr(request.headers))

    def test_configured_key_twice_is_no_leak(self) -> None:
        """
        A configured key of OpenAI's shape sent in two C{Authorization}
        headers is refused as two headers are (C{invalid_api_key}), not
        reported as a leaked OpenAI key; a real OpenAI key beside a client
        key still is.
        """
        other = REAL_KEY.replace(b"Ab1_", b"Zz9_")
        h = Harness(client_keys=[REAL_KEY, CLIENT_KEY])
        for values in ([REAL_KEY, REAL_KEY], [CLIENT_KEY, REAL_KEY], [REAL_KEY, CLIENT_KEY]):
            response, body = self.post(h, {b"authorization": [b"Bearer " + v for v in values]})
            self.assertEqual((response.code, body["error"]["code"]), (401, "invalid_api_key"), values)
        response, body = self.post(h, {b"authorization": [b"Bearer " + CLIENT_KEY, b"Bearer " + other]})
        self.assertEqual((response.code, body["error"]["code"]), (401, "openai_key_not_accepted"))
        self.assertEqual(h.fake.requests, [])

    def test_organization_and_project(self) -> None:
        """
        Without client keys (one user) the client's C{OpenAI-Organization}
        and C{OpenAI-Project} go upstream; with them, they are dropped
        unless the client's entry passes them, and a fixed value from the
        entry replaces the client's.
        """
        sent = {b"openai-organization": [b"org-client"], b"openai-project": [b"proj_client"]}

        def upstream_saw(h: Harness, key: Optional[bytes]) -> tuple[Optional[list[str]], Optional[list[str]]]:
            headers = {**sent, **({b"authorization": [b"Bearer " + key]} if key else {})}
            response, body = self.post(h, headers)
            self.assertEqual(response.code, 200, body)
            seen = h.fake.requests[-1].headers
            return seen.get("openai-organization"), seen.get("openai-project")

        self.assertEqual(upstream_saw(Harness(), None), (["org-client"], ["proj_client"]))
        for settings, expected in [
            ({}, (None, None)),
            ({"pass_openai_headers": True}, (["org-client"], ["proj_client"])),
            ({"organization": "org-fixed", "project": "proj_fixed"}, (["org-fixed"], ["proj_fixed"])),
            ({"project": "proj_fixed", "pass_openai_headers": True}, (["org-client"], ["proj_fixed"])),
        ]:
            h = Harness(clients=ClientRegistry([_client(CLIENT_KEY, **settings)]))
            self.assertEqual(upstream_saw(h, CLIENT_KEY), expected, settings)
