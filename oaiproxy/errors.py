# -*- test-case-name: tests.test_errors -*-
"""
OpenAI-shaped error responses, as pure data.

Every error the proxy itself produces (bad input, a missing route, an
unreachable upstream) uses the same JSON envelope as the OpenAI API, so the
official SDKs raise their usual exception classes (C{BadRequestError},
C{AuthenticationError}, C{InternalServerError}...) and users see a message
instead of a parse failure.  Nothing here performs I/O: resources decide
I{when} to send an error, this module only decides I{what} it looks like.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "ApiError",
    "bad_request",
    "invalid_api_key",
    "admin_key_required",
    "not_found",
    "not_an_id",
    "model_not_found",
    "method_not_allowed",
    "body_too_large",
    "bad_http",
    "header_timeout",
    "body_timeout",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_rejected_proxy_key",
    "upstream_response_too_large",
    "upstream_unreadable",
    "upstream_failed_mid_response",
    "internal_error",
    "upstreams_unavailable",
    "draining",
    "openai_key_sent",
    "model_not_allowed",
    "rate_limited",
    "shut_down_mid_response",
    "sse_error_event",
    "usage_forbidden",
    "ledger_unavailable",
]

INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"

#: For an answer that would be the same on a retry: the SDKs (Python and
#: Node alike) obey C{x-should-retry} before looking at the status.  They
#: retry 408, 409, 429 and every 5xx by themselves, so without it a 502
#: that no wait can fix costs three upstream requests per call; on the
#: other 4xx it says the same thing to clients with retry rules of their
#: own.
NO_RETRY: tuple[tuple[bytes, bytes], ...] = ((b"x-should-retry", b"false"),)


@dataclass(frozen=True)
class ApiError:
    """
    One error answer: the HTTP status plus the four fields of OpenAI's
    C{{"error": {...}}} object.

    @ivar headers: extra response headers (for example C{Allow} on a 405);
        pairs so that the order on the wire is stable.
    """

    status: int
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def payload(self) -> dict[str, dict[str, Optional[str]]]:
        """
        The JSON-ready envelope, exactly the four keys the SDKs read.
        """
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        """
        The response body: compact UTF-8 JSON with a trailing newline, so
        that C{curl} output ends cleanly in a terminal.
        """
        return json.dumps(self.payload()).encode("utf-8") + b"\n"


def bad_request(message: str, param: Optional[str], code: Optional[str] = None) -> ApiError:
    """
    A 400 for a request body the proxy refuses before calling upstream.
    """
    return ApiError(400, message, INVALID_REQUEST, param, code, NO_RETRY)


def invalid_api_key() -> ApiError:
    """
    A 401 for a missing or unknown client key.  Like OpenAI's own answer it
    never echoes the key that was presented.
    """
    return ApiError(
        401,
        "Incorrect or missing API key: this proxy expects one of its client keys"
        " in one 'Authorization: Bearer <key>' header.",
        INVALID_REQUEST,
        None,
        "invalid_api_key",
        NO_RETRY,
    )


def admin_key_required(configured: bool) -> ApiError:
    """
    A 401 for a proxy endpoint that only the admin key opens.  Says so when
    no admin key is configured, so that the operator knows what to set;
    never echoes what was presented.
    """
    hint = "" if configured else " (none is configured: see --admin-key-file)"
    return ApiError(
        401,
        f"This endpoint needs the proxy's admin key in one 'Authorization: Bearer <key>' header{hint}.",
        INVALID_REQUEST,
        None,
        "invalid_api_key",
        NO_RETRY,
    )


def openai_key_sent(where: Optional[str] = None) -> ApiError:
    """
    A 401 for a request carrying a real OpenAI secret key (by its shape:
    see L{oaiproxy.keyshape.contains_openai_key}).  It is never forwarded:
    the proxy holds the OpenAI key, clients need only a proxy key, and a
    real key in every app's configuration is one leak away from misuse.
    The message says where the key was (a header's name, or the URL),
    never the key.
    """
    place = f" (in {where})" if where else ""
    return ApiError(
        401,
        f"This request carries a real OpenAI API key{place}. It was not forwarded, but it has been sent to a "
        "proxy that does not need it: treat it as exposed and rotate it at https://platform.openai.com/api-keys. "
        "This proxy holds the OpenAI key itself; send the client key your proxy operator gave you instead.",
        INVALID_REQUEST,
        None,
        "openai_key_not_accepted",
        NO_RETRY,
    )


def model_not_allowed(client: str, model: Optional[str]) -> ApiError:
    """
    A 403 for a model outside the client's allow-list (or none named, by a
    client that has one).
    """
    return ApiError(
        403,
        f"Client {client!r} may not use the model {model!r} through this proxy."
        if model is not None
        else f"Client {client!r} may only use the models on its allow-list: name one in 'model'.",
        INVALID_REQUEST,
        "model",
        "model_not_allowed",
        NO_RETRY,
    )


def rate_limited(message: str, retry_after: Optional[float], headers: tuple[tuple[bytes, bytes], ...]) -> ApiError:
    """
    A 429 for a client over one of its limits, with the headers the SDKs
    use to pace their retries (C{retry-after}, C{retry-after-ms}), or
    C{x-should-retry: false} when waiting cannot help.
    """
    if retry_after is None:
        timing = NO_RETRY
    else:
        timing = (
            (b"retry-after", b"%d" % max(1, math.ceil(retry_after))),
            (b"retry-after-ms", b"%d" % max(1, math.ceil(retry_after * 1000))),
        )
    return ApiError(429, message, "rate_limit_error", None, "rate_limit_exceeded", timing + headers)


def insufficient_quota(message: str) -> ApiError:
    """
    A 429 for a client whose budget ran out, with OpenAI's type and code
    for an exhausted balance (what the SDKs and users recognise), and
    C{x-should-retry: false}: retrying before the period resets cannot help.
    """
    return ApiError(429, message, "insufficient_quota", None, "insufficient_quota", NO_RETRY)


def model_unpriced(client: str, model: Optional[str], prices_file: Optional[str]) -> ApiError:
    """
    A 403 for a model without a price asked for by a client with a dollar
    budget: its spend could not be counted against the budget.
    """
    where = f"the prices file {prices_file}" if prices_file else "a prices file (--prices-file)"
    return ApiError(
        403,
        f"Client {client!r} has a dollar budget, so it may only use models with a price in {where}; "
        f"{model!r} has none.",
        INVALID_REQUEST,
        "model",
        "model_not_priced",
        NO_RETRY,
    )


def usage_forbidden() -> ApiError:
    """
    A 403 for a client key asking C{GET /usage} for another client's usage.
    The same words whoever was asked for, whether that client exists or
    not: the answer tells nothing about the others.
    """
    return ApiError(
        403,
        "A client key reads only its own usage: leave out 'client', or name your own client. "
        "Every client's usage needs the proxy's admin key.",
        INVALID_REQUEST,
        "client",
        "permission_denied",
        NO_RETRY,
    )


def ledger_unavailable() -> ApiError:
    """
    A 503 for C{GET /usage} while the usage ledger's database cannot be
    read (down, locked, too slow).  Requests are still served and their
    usage is held for the ledger; only this report has to wait.
    """
    return ApiError(
        503,
        "The usage ledger cannot be read right now (its database is down or too slow); requests are still "
        "served and their usage is kept. Retry later.",
        API_ERROR,
        None,
        "ledger_unavailable",
        ((b"retry-after", b"5"),),
    )


def not_found(method: str, path: str) -> ApiError:
    """
    A 404 that names what was asked for and how to point an SDK at the
    proxy, because the usual cause is a base URL missing or doubling C{/v1}.
    A doubled C{/v1} is named as such, with the path that would have been
    right.
    """
    served = path
    while served.startswith("/v1/v1/") or served == "/v1/v1":
        served = served[len("/v1") :]
    if served != path:
        below = served[len("/v1") :] or "/"
        message = (
            f"Invalid URL ({method} {path}): /v1 is doubled. The base URL already ends in /v1 and the path added "
            f"to it starts with /v1 again; this is served at {served}. Set the base URL to "
            f"http://<proxy-host>:<port>/v1 for a client that adds {below}, or to http://<proxy-host>:<port> "
            f"for one that adds {served} itself."
        )
    else:
        message = (
            f"Invalid URL ({method} {path}): this proxy serves the OpenAI API below /v1 "
            "(POST /v1/chat/completions, GET /v1/models...) and GET /health. Set the SDK's base URL to "
            "http://<proxy-host>:<port>/v1."
        )
    return ApiError(404, message, INVALID_REQUEST, None, "unknown_url", NO_RETRY)


def model_not_found(model: str) -> ApiError:
    """
    OpenAI's own answer for a model a key may not see.
    """
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        INVALID_REQUEST,
        None,
        "model_not_found",
        NO_RETRY,
    )


def not_an_id(kind: str, value: str, code: Optional[str]) -> ApiError:
    """
    A 404 for a path part that cannot be the id of a C{kind} (a model, a
    stored response): one path segment, not C{.} or C{..}, without C{/},
    C{\\}, C{%} or control characters once decoded (see
    L{oaiproxy.upstream.styles.is_path_segment}).  Nothing is asked of upstream.

    @param value: the id as decoded, quoted back (shortened, and with
        control characters escaped) so the client sees what arrived.
    """
    shown = value if len(value) <= 80 else value[:80] + "..."
    return ApiError(
        404,
        f"{shown!r} is not a {kind} id: an id is one path segment, not '.' or '..', without '/', '\\', '%' "
        "or control characters once decoded.",
        INVALID_REQUEST,
        None,
        code,
        NO_RETRY,
    )


def route_not_available(route: str, upstream: str) -> ApiError:
    """
    A 404 for an API route this proxy's upstream does not serve at all.
    """
    return ApiError(
        404,
        f"The route /v1/{route} is not available on this proxy: its upstream ({upstream}) does not serve it.",
        INVALID_REQUEST,
        None,
        "route_not_available",
        NO_RETRY,
    )


def route_not_enabled(route: str) -> ApiError:
    """
    A 404 for an API route this proxy knows but its operator did not turn
    on, naming the option that does.
    """
    return ApiError(
        404,
        f"The route /v1/{route} is not enabled on this proxy. Its operator can enable it with "
        f"--routes (environment OAIPROXY_ROUTES), for example --routes chat/completions,models,{route}.",
        INVALID_REQUEST,
        None,
        "route_not_enabled",
        NO_RETRY,
    )


def method_not_allowed(method: str, path: str, allowed: list[str]) -> ApiError:
    """
    A 405 carrying the C{Allow} header that RFC 9110 requires.
    """
    allow = ", ".join(allowed)
    return ApiError(
        405,
        f"Method {method} is not allowed on {path}; use {allow}.",
        INVALID_REQUEST,
        None,
        "method_not_allowed",
        ((b"Allow", allow.encode("ascii")),) + NO_RETRY,
    )


def bad_http(message: str) -> ApiError:
    """
    A 400 for a request that is not acceptable HTTP: headers too large or
    too many, a malformed request line or body framing.
    """
    return ApiError(400, message, INVALID_REQUEST, None, "bad_http_request", NO_RETRY)


def header_timeout(seconds: float) -> ApiError:
    """
    A 408 for a client that did not send its request's headers in time.
    """
    return ApiError(
        408,
        f"The request's headers did not arrive within {seconds:g} seconds.",
        INVALID_REQUEST,
        None,
        "request_timeout",
    )


def body_timeout(seconds: float, rate: int) -> ApiError:
    """
    A 408 for a request body that did not arrive in time (see
    L{oaiproxy.server.site.BODY_MIN_RATE} for how the time grows with the body).
    """
    return ApiError(
        408,
        f"The request body did not arrive in time: {seconds:g} seconds, plus one second for every "
        f"{rate // 1024} KiB received.",
        INVALID_REQUEST,
        None,
        "request_timeout",
    )


def body_too_large(limit: int) -> ApiError:
    """
    A 413 for a request body over the configured limit.
    """
    return ApiError(
        413,
        f"Request body is larger than this proxy's limit of {limit} bytes.",
        INVALID_REQUEST,
        None,
        "request_too_large",
        NO_RETRY,
    )


def upstream_unreachable(reason: str) -> ApiError:
    """
    A 502 when no response head came back from upstream: connection refused,
    DNS or TLS failure, or the connection dropped before the headers.  The
    SDKs retry 5xx, which is right for these.

    @param reason: a short, secret-free description (an exception class name
        or a fixed phrase), never a formatted exception that could carry
        request data.
    """
    return ApiError(
        502,
        f"The proxy could not get a response from the upstream API ({reason}).",
        API_ERROR,
        None,
        "upstream_unreachable",
    )


def upstream_rejected_proxy_key() -> ApiError:
    """
    A 502 when upstream refuses the proxy's own key (its 401).  Passing the
    401 on would tell the client its key is wrong, and OpenAI's message
    quotes the end of the rejected key, which is the proxy's.  No retry can
    fix it (only the operator can), and each retry would present the
    refused key upstream once more.
    """
    return ApiError(
        502,
        "The upstream API rejected the proxy's API key; the proxy's operator must fix it.",
        API_ERROR,
        None,
        "upstream_auth_failed",
        NO_RETRY,
    )


def upstream_response_too_large(limit: int) -> ApiError:
    """
    A 502 for an upstream answer the proxy must read whole (a model list it
    filters) that was larger than C{limit} bytes once decoded: a broken or
    hostile upstream, or a gzip bomb.  The same upstream would send the
    same again.
    """
    return ApiError(
        502,
        f"The upstream API's response was larger than the proxy's limit of {limit} bytes.",
        API_ERROR,
        None,
        "upstream_response_too_large",
        NO_RETRY,
    )


def upstream_unreadable(what: str) -> ApiError:
    """
    A 502 for an upstream answer the proxy must understand to pass on (a
    model list to filter) and could not: the same upstream would most
    likely answer the same again.
    """
    return ApiError(
        502,
        f"The upstream API's {what} could not be read.",
        API_ERROR,
        None,
        "upstream_bad_response",
        NO_RETRY,
    )


def upstream_timeout(seconds: float, what: str) -> ApiError:
    """
    A 504 for an upstream that did not connect or answer in time.
    """
    return ApiError(
        504,
        f"The upstream API did not {what} within {seconds:g} seconds.",
        API_ERROR,
        None,
        "upstream_timeout",
    )


def upstream_failed_mid_response(reason: str) -> ApiError:
    """
    The error reported inside an event stream when upstream fails after the
    response has started: the status line is gone, so only the body can say
    it.
    """
    return ApiError(
        502,
        f"The upstream API failed during the response ({reason}); the output is incomplete.",
        API_ERROR,
        None,
        "upstream_stream_interrupted",
    )


def upstreams_unavailable(model: Optional[str], retry_after: Optional[float]) -> ApiError:
    """
    A 503 when every upstream serving a model is out (its breaker open, or
    at its concurrency limit), with the time the first admits again as
    C{retry-after}, or C{x-should-retry: false} when waiting cannot help
    (every key refused).
    """
    if retry_after is None:
        timing = NO_RETRY
    else:
        timing = ((b"retry-after", b"%d" % max(1, math.ceil(retry_after))),)
    what = f"model '{model}'" if model else "this request"
    return ApiError(
        503,
        f"No upstream can take {what} right now; retry after the time given.",
        API_ERROR,
        None,
        "upstreams_unavailable",
        timing,
    )


def internal_error() -> ApiError:
    """
    A 500 for a bug in the proxy.  Details go to the log, never the client.
    """
    return ApiError(
        500,
        "The proxy hit an internal error; it has been logged.",
        API_ERROR,
        None,
        "internal_error",
    )


def draining() -> ApiError:
    """
    A 503 for a request that arrives on an open connection while the proxy
    drains for a restart.  The SDKs retry it (C{x-should-retry}), on a new
    connection, which reaches the next process.
    """
    return ApiError(
        503,
        "The proxy is restarting and takes no new requests on this connection; retry.",
        API_ERROR,
        None,
        "proxy_draining",
        ((b"x-should-retry", b"true"), (b"retry-after", b"1")),
    )


def shut_down_mid_response() -> ApiError:
    """
    The error ending a stream that was still running when the drain timeout
    ran out.
    """
    return ApiError(
        503,
        "The proxy shut down before this response was complete; the output is incomplete.",
        API_ERROR,
        None,
        "proxy_shutting_down",
    )


def sse_error_event(error: ApiError) -> bytes:
    """
    Encode C{error} as a final server-sent event.

    The openai SDKs raise C{APIError} when a C{data:} event's JSON has an
    C{error} key, so this is how a stream reports a failure after its 200
    status has already been sent.
    """
    return b"data: " + json.dumps(error.payload()).encode("utf-8") + b"\n\n"
