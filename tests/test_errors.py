"""
Tests for L{oaiproxy.errors}: the OpenAI-shaped error answers the proxy
produces itself.

They check, for every constructor (found by looking at the module, so a
new one cannot be missed), the HTTP status and the C{type}, C{param} and
C{code} fields the SDKs map to exception classes; its exact headers (the
retry policy, C{Allow} on a 405); the exact shape of the JSON body; and
the server-sent event that reports a failure in the middle of a stream.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Optional

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy import errors
from oaiproxy.errors import ApiError, sse_error_event

Headers = tuple[tuple[bytes, bytes], ...]

NO_RETRY = ((b"x-should-retry", b"false"),)
RATE_HEADERS = ((b"x-ratelimit-limit-requests", b"60"),)

#: (constructor, arguments, status, type, param, code, headers) for every
#: error the proxy can produce: every public function of L{errors} that
#: returns an L{ApiError} has at least one row (see
#: L{ConstructorTests.test_every_constructor_has_a_case}).  The headers
#: are the whole policy: C{x-should-retry: false} wherever a retry gets the
#: same answer, nothing where the SDKs' own retry of a 408 or 5xx is right,
#: C{Allow} on a 405, the pacing headers on a 429 that can wait.
CASES: list[tuple[Callable[..., ApiError], tuple[Any, ...], int, str, Optional[str], Optional[str], Headers]] = [
    (errors.bad_request, ("bad model", "model"), 400, "invalid_request_error", "model", None, NO_RETRY),
    (
        errors.bad_request,
        ("bad json", None, "invalid_json"),
        400,
        "invalid_request_error",
        None,
        "invalid_json",
        NO_RETRY,
    ),
    (errors.invalid_api_key, (), 401, "invalid_request_error", None, "invalid_api_key", NO_RETRY),
    (errors.admin_key_required, (True,), 401, "invalid_request_error", None, "invalid_api_key", NO_RETRY),
    (errors.admin_key_required, (False,), 401, "invalid_request_error", None, "invalid_api_key", NO_RETRY),
    (errors.not_found, ("GET", "/v2/models"), 404, "invalid_request_error", None, "unknown_url", NO_RETRY),
    (errors.not_found, ("GET", "/v1/v1/models"), 404, "invalid_request_error", None, "unknown_url", NO_RETRY),
    (
        errors.method_not_allowed,
        ("GET", "/v1/chat/completions", ["POST"]),
        405,
        "invalid_request_error",
        None,
        "method_not_allowed",
        ((b"Allow", b"POST"),) + NO_RETRY,
    ),
    (errors.body_too_large, (1024,), 413, "invalid_request_error", None, "request_too_large", NO_RETRY),
    (errors.upstream_unreachable, ("ConnectionRefusedError",), 502, "api_error", None, "upstream_unreachable", ()),
    (errors.upstream_timeout, (10.0, "connect"), 504, "api_error", None, "upstream_timeout", ()),
    (
        errors.upstreams_unavailable,
        ("gpt-4o", 2.5),
        503,
        "api_error",
        None,
        "upstreams_unavailable",
        ((b"retry-after", b"3"),),
    ),
    (errors.upstreams_unavailable, ("gpt-4o", None), 503, "api_error", None, "upstreams_unavailable", NO_RETRY),
    (
        errors.upstream_failed_mid_response,
        ("ResponseFailed",),
        502,
        "api_error",
        None,
        "upstream_stream_interrupted",
        (),
    ),
    (errors.internal_error, (), 500, "api_error", None, "internal_error", ()),
    (errors.upstream_rejected_proxy_key, (), 502, "api_error", None, "upstream_auth_failed", NO_RETRY),
    (errors.upstream_response_too_large, (8,), 502, "api_error", None, "upstream_response_too_large", NO_RETRY),
    (errors.upstream_unreadable, ("model list",), 502, "api_error", None, "upstream_bad_response", NO_RETRY),
    (errors.model_not_found, ("o9",), 404, "invalid_request_error", None, "model_not_found", NO_RETRY),
    (
        errors.not_an_id,
        ("model", "..", "model_not_found"),
        404,
        "invalid_request_error",
        None,
        "model_not_found",
        NO_RETRY,
    ),
    (errors.not_an_id, ("response", "a/b", None), 404, "invalid_request_error", None, None, NO_RETRY),
    (errors.openai_key_sent, (), 401, "invalid_request_error", None, "openai_key_not_accepted", NO_RETRY),
    (errors.openai_key_sent, ("the URL",), 401, "invalid_request_error", None, "openai_key_not_accepted", NO_RETRY),
    (errors.insufficient_quota, ("over",), 429, "insufficient_quota", None, "insufficient_quota", NO_RETRY),
    (errors.model_unpriced, ("c", "m", "p.toml"), 403, "invalid_request_error", "model", "model_not_priced", NO_RETRY),
    (errors.model_unpriced, ("c", None, None), 403, "invalid_request_error", "model", "model_not_priced", NO_RETRY),
    (errors.model_not_allowed, ("c", "m"), 403, "invalid_request_error", "model", "model_not_allowed", NO_RETRY),
    (errors.model_not_allowed, ("c", None), 403, "invalid_request_error", "model", "model_not_allowed", NO_RETRY),
    (errors.route_not_enabled, ("embeddings",), 404, "invalid_request_error", None, "route_not_enabled", NO_RETRY),
    (
        errors.route_not_available,
        ("moderations", "Azure OpenAI"),
        404,
        "invalid_request_error",
        None,
        "route_not_available",
        NO_RETRY,
    ),
    (errors.bad_http, ("bad",), 400, "invalid_request_error", None, "bad_http_request", NO_RETRY),
    (errors.header_timeout, (10,), 408, "invalid_request_error", None, "request_timeout", ()),
    (errors.body_timeout, (30, 65536), 408, "invalid_request_error", None, "request_timeout", ()),
    (
        errors.draining,
        (),
        503,
        "api_error",
        None,
        "proxy_draining",
        ((b"x-should-retry", b"true"), (b"retry-after", b"1")),
    ),
    (errors.shut_down_mid_response, (), 503, "api_error", None, "proxy_shutting_down", ()),
    (errors.usage_forbidden, (), 403, "invalid_request_error", "client", "permission_denied", NO_RETRY),
    (errors.ledger_unavailable, (), 503, "api_error", None, "ledger_unavailable", ((b"retry-after", b"5"),)),
    (
        errors.rate_limited,
        ("slow down", 1.2, RATE_HEADERS),
        429,
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
        ((b"retry-after", b"2"), (b"retry-after-ms", b"1200")) + RATE_HEADERS,
    ),
    (
        errors.rate_limited,
        ("too many", None, RATE_HEADERS),
        429,
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
        NO_RETRY + RATE_HEADERS,
    ),
]


def constructors() -> set[str]:
    """
    The name of every public function in L{errors} that builds an
    L{ApiError}, found by looking, so that a new one cannot be left out.
    """
    return {
        name
        for name, function in inspect.getmembers(errors, inspect.isfunction)
        if not name.startswith("_")
        and function.__module__ == errors.__name__
        and inspect.signature(function).return_annotation in ("ApiError", ApiError)
    }


def made(case: tuple[Any, ...]) -> ApiError:
    """
    The error a row of L{CASES} constructs.
    """
    return case[0](*case[1])


#: The constructors whose answer a retry can change: a slow client (408),
#: an unreachable, silent or dropped upstream, a bug, a restart (or a
#: stream it cut short), a rate limit with a time to wait, a usage ledger
#: that cannot be read now.  Every other error is the same on a retry.
RETRYABLE = {
    "request_timeout",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_stream_interrupted",
    "internal_error",
    "proxy_draining",
    "proxy_shutting_down",
    "ledger_unavailable",
}


def sdk_retries(error: ApiError) -> bool:
    """
    Whether the openai SDKs (Python C{_should_retry}, Node C{shouldRetry})
    retry an answer: C{x-should-retry} first, then 408, 409, 429 and 5xx.
    """
    header = dict(error.headers).get(b"x-should-retry")
    if header is not None:
        return header == b"true"
    return error.status in (408, 409, 429) or error.status >= 500


def decoded_body(error: ApiError) -> Any:
    """
    The response body as a client would parse it.
    """
    return json.loads(error.body().decode("utf-8"))


class ConstructorTests(SynchronousTestCase):
    """
    Each constructor yields the status and fields the SDKs rely on.
    """

    def test_every_constructor_has_a_case(self) -> None:
        """
        Every error constructor in L{errors} is in the table, so each
        check below covers it; and the table names nothing else.
        """
        self.assertEqual({case[0].__name__ for case in CASES}, constructors())
        self.assertIn("shut_down_mid_response", constructors())  # the look finds them

    def test_status_and_fields(self) -> None:
        """
        Every error has the HTTP status and C{type}/C{param}/C{code} that
        make the SDKs raise the matching exception class.
        """
        for case in CASES:
            error = made(case)
            self.assertEqual(
                (error.status, error.type, error.param, error.code),
                case[2:6],
                f"wrong fields for {error!r}",
            )

    def test_headers(self) -> None:
        """
        Every error carries exactly the headers of the policy in the table,
        in that order: C{x-should-retry: false} where a retry is pointless,
        C{Allow} on a 405, the timing on a 429 that can wait, nothing else.
        """
        for case in CASES:
            self.assertEqual(made(case).headers, case[6], f"{case[0].__name__}{case[1]!r}")

    def test_messages_are_non_empty_strings(self) -> None:
        """
        Every error carries a human-readable message, which is what a user
        sees in the SDK's exception.
        """
        for case in CASES:
            message = made(case).message
            self.assertIsInstance(message, str)
            self.assertNotEqual(message.strip(), "", f"empty message from {case[0].__name__}")

    def test_retried_only_where_waiting_can_help(self) -> None:
        """
        An SDK retries (twice by default) only the answers a retry can
        change; everything else says C{x-should-retry: false}, so a refused
        upstream key costs one upstream request per call, not three.
        """
        for case in CASES:
            error = made(case)
            retry_after = dict(error.headers).get(b"retry-after")
            expected = error.code in RETRYABLE or retry_after is not None
            self.assertEqual(sdk_retries(error), expected, f"{error.code} ({error.status}) retried: {not expected}")
            if not expected:
                self.assertIn((b"x-should-retry", b"false"), error.headers, error.code)

    def test_upstream_auth_failure_is_not_retried(self) -> None:
        """
        The 502 for a refused upstream key carries C{x-should-retry:
        false}, which the SDKs obey before the status.
        """
        self.assertEqual(errors.upstream_rejected_proxy_key().headers, ((b"x-should-retry", b"false"),))

    def test_not_found_names_request_and_base_url(self) -> None:
        """
        A 404 names the method and path asked for and points at C{/v1},
        the usual mistake in an SDK's base URL.
        """
        message = errors.not_found("DELETE", "/v2/chat/completions").message
        self.assertIn("DELETE /v2/chat/completions", message)
        self.assertIn("/v1", message)

    def test_body_too_large_names_limit(self) -> None:
        """
        A 413 tells the user the limit they exceeded.
        """
        self.assertIn("4096", errors.body_too_large(4096).message)

    def test_upstream_unreachable_names_reason(self) -> None:
        """
        A 502 says why upstream could not be reached.
        """
        self.assertIn("DNSLookupError", errors.upstream_unreachable("DNSLookupError").message)

    def test_upstream_timeout_names_duration_and_phase(self) -> None:
        """
        A 504 says what timed out and after how long, without a spurious
        C{.0}.
        """
        message = errors.upstream_timeout(600.0, "respond").message
        self.assertIn("respond", message)
        self.assertIn("600 seconds", message)
        self.assertIn("2.5 seconds", errors.upstream_timeout(2.5, "connect").message)


class MethodNotAllowedTests(SynchronousTestCase):
    """
    A 405 carries the C{Allow} header RFC 9110 requires.
    """

    def test_allow_header_single(self) -> None:
        """
        A client using the wrong method learns the right one from C{Allow}.
        """
        error = errors.method_not_allowed("GET", "/v1/chat/completions", ["POST"])
        self.assertEqual(dict(error.headers)[b"Allow"], b"POST")
        self.assertIn("GET", error.message)
        self.assertIn("POST", error.message)

    def test_allow_header_several(self) -> None:
        """
        Several allowed methods are listed comma-separated in one header.
        """
        error = errors.method_not_allowed("POST", "/health", ["GET", "HEAD"])
        self.assertEqual(dict(error.headers)[b"Allow"], b"GET, HEAD")


class BodyTests(SynchronousTestCase):
    """
    The response body is exactly OpenAI's error envelope.
    """

    def test_envelope_shape(self) -> None:
        """
        The body is JSON with only C{error}, holding exactly the four keys
        the SDKs read, with the error's values.
        """
        for case in CASES:
            error = made(case)
            self.assertEqual(
                decoded_body(error),
                {
                    "error": {
                        "message": error.message,
                        "type": error.type,
                        "param": error.param,
                        "code": error.code,
                    }
                },
            )

    def test_null_param_and_code(self) -> None:
        """
        An absent C{param} or C{code} is sent as JSON C{null}, as OpenAI
        does, not omitted.
        """
        error = decoded_body(errors.bad_request("x", None))["error"]
        self.assertIn("param", error)
        self.assertIn("code", error)
        self.assertIsNone(error["param"])
        self.assertIsNone(error["code"])

    def test_ends_with_newline(self) -> None:
        """
        The body ends with a newline so C{curl} output ends cleanly.
        """
        body = errors.internal_error().body()
        self.assertTrue(body.endswith(b"\n"))
        self.assertFalse(body.endswith(b"\n\n"))

    def test_non_ascii_message_is_valid_utf8_json(self) -> None:
        """
        A message with non-ASCII characters still decodes to the same
        text.
        """
        error = errors.bad_request("modèle «inconnu» 模型", "model")
        self.assertEqual(decoded_body(error)["error"]["message"], "modèle «inconnu» 模型")


class SseErrorEventTests(SynchronousTestCase):
    """
    L{sse_error_event} reports a failure inside an already-started stream.
    """

    def test_single_data_event(self) -> None:
        """
        The event is one C{data:} line followed by a blank line, so a
        stream reader sees exactly one event.
        """
        event = sse_error_event(errors.upstream_failed_mid_response("ResponseFailed"))
        self.assertTrue(event.startswith(b"data: "))
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(event.count(b"\n"), 2)

    def test_payload_has_error_key(self) -> None:
        """
        The event's JSON is the error envelope; its C{error} key is what
        the openai SDK turns into C{APIError}.
        """
        error = errors.upstream_failed_mid_response("ResponseFailed")
        event = sse_error_event(error)
        document = json.loads(event[len(b"data: ") : -2].decode("utf-8"))
        self.assertEqual(document, error.payload())
        self.assertEqual(document["error"]["code"], "upstream_stream_interrupted")

    def test_newline_in_message_stays_one_event(self) -> None:
        """
        A newline inside the message is escaped, so it cannot split the
        event or end it early.
        """
        event = sse_error_event(errors.bad_request("line one\n\nline two", None))
        self.assertEqual(event.count(b"\n"), 2)
        self.assertEqual(json.loads(event[len(b"data: ") :])["error"]["message"], "line one\n\nline two")

    def test_openai_sdk_decoder_sees_the_error(self) -> None:
        """
        The openai SDK's own event decoder reads exactly one event whose
        data has an C{error} object with the message.
        """
        try:
            from openai._streaming import SSEDecoder
        except ImportError:  # pragma: no cover - optional test dependency
            self.skipTest("the openai SDK is not installed")
        error = errors.upstream_failed_mid_response("ResponseFailed")
        stream = [b'data: {"choices": []}\n\n', sse_error_event(error)]
        events = list(SSEDecoder().iter_bytes(iter(stream)))
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1].json()["error"]["message"], error.message)
