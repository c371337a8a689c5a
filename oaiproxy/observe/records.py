# -*- test-case-name: tests.test_observe -*-
"""
What one request did, gathered as it happens, for the access log and the
metrics.

The site creates a L{RequestRecord} per request; admission names the
client, the route the model, and the exchange the upstream's answer, timings
and token usage; when the request ends the record goes to the access log and
the metrics, which only ever read it.  It holds names and numbers, never a
header value, a body or a key.

Each field has one owner, the module that writes it (L{OWNERS}; the test
C{tests.observe.test_record_owners} holds the package to it).  The one field
with two is C{route}: the site labels a request by its path on arrival, and
admission relabels an admitted one with the route that serves it (a path
with an id below the route's, like C{/v1/responses/{id}}).
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from twisted.web.server import Request

__all__ = ["RequestRecord", "Usage", "record_of", "new_request_id", "OWNERS", "SINGLE_UPSTREAM"]

_SITE = ("oaiproxy.server.site",)
_ADMISSION = ("oaiproxy.access.admission",)
_ROUTES = ("oaiproxy.routes.forwarding",)
_EXCHANGE = ("oaiproxy.upstream.exchange",)

#: The name of the pool of one that the single-upstream options make.
SINGLE_UPSTREAM = "default"

#: The module that writes each field of L{RequestRecord}, by field.
OWNERS: dict[str, tuple[str, ...]] = {
    "request_id": _SITE,
    "started": _SITE,
    "peer": _SITE,
    "client": _ADMISSION,
    "method": _SITE,
    "route": _SITE + _ADMISSION,
    "path": _SITE,
    "model": _ROUTES,
    "stream": _ROUTES,
    "status": _SITE,
    "upstream": _EXCHANGE,
    "attempts": _EXCHANGE,
    "upstream_status": _EXCHANGE,
    "upstream_request_id": _EXCHANGE,
    "upstream_error": _EXCHANGE,
    "bytes_in": _SITE,
    "bytes_out": _SITE,
    "usage": _EXCHANGE,
    "upstream_sent": _EXCHANGE,
    "upstream_head": _EXCHANGE,
    "first_chunk": _SITE,
    "head_sent": _SITE,
    "ended_at": _SITE,
    "ended": _SITE,
    "end_sent": _EXCHANGE,
    "worker": _SITE,
    # Whichever layer answers with an OpenAI-shaped error, through the one
    # helper they all share.
    "error_code": ("oaiproxy.web",),
}


def new_request_id() -> str:
    """
    A request id for C{x-oaiproxy-request-id}: 96 random bits, hex.
    """
    return "req_" + secrets.token_hex(12)


class Usage:
    """
    Tokens a response used.

    @ivar exact: C{True} when upstream reported them; C{False} when they are
        the estimate for a stream cut short (see L{oaiproxy.observe.usage}).
    """

    __slots__ = ("prompt", "completion", "reasoning", "cached", "total", "exact")

    def __init__(
        self, prompt: int = 0, completion: int = 0, reasoning: int = 0, cached: int = 0, exact: bool = True
    ) -> None:
        self.prompt = prompt
        self.completion = completion
        self.reasoning = reasoning
        self.cached = cached
        self.total = prompt + completion
        self.exact = exact

    def __repr__(self) -> str:
        return (
            f"Usage(prompt={self.prompt}, completion={self.completion}, reasoning={self.reasoning}, "
            f"cached={self.cached}, exact={self.exact})"
        )


class RequestRecord:
    """
    One request's facts.  Times are the site's clock, in seconds.  Each
    field is written by its owner in L{OWNERS} alone; every other module
    only reads it.
    """

    __slots__ = (
        "request_id",
        "started",
        "peer",
        "client",
        "method",
        "route",
        "path",
        "model",
        "stream",
        "status",
        "upstream",
        "attempts",
        "upstream_status",
        "upstream_request_id",
        "upstream_error",
        "bytes_in",
        "bytes_out",
        "usage",
        "upstream_sent",
        "upstream_head",
        "first_chunk",
        "head_sent",
        "ended_at",
        "ended",
        "end_sent",
        "worker",
        "error_code",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.peer = "-"
        self.client = "-"
        self.method = "-"
        self.route = "other"
        self.path = "-"
        self.model: Optional[str] = None
        self.stream = False
        self.status = 0
        #: The name of the upstream that answered (the last one tried).
        self.upstream: Optional[str] = None
        #: How many upstreams the request was sent to (0: none).
        self.attempts = 0
        self.upstream_status: Optional[int] = None
        self.upstream_request_id: Optional[str] = None
        #: Why the upstream failed: connect, timeout, reset or status.
        self.upstream_error: Optional[str] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.usage: Optional[Usage] = None
        self.upstream_sent: Optional[float] = None
        self.upstream_head: Optional[float] = None
        self.first_chunk: Optional[float] = None
        self.head_sent: Optional[float] = None
        self.ended_at: Optional[float] = None
        #: complete, client_disconnected, cut_off or shutdown.
        self.ended = "complete"
        #: The client was sent a stream's end event (C{data: [DONE]}...):
        #: closing the connection after it is not leaving early.
        self.end_sent = False
        #: Which worker process served it (see oaiproxy.daemon.workers), or None.
        self.worker: Optional[int] = None
        #: The code (or else the type) of the error the proxy answered
        #: with itself, if any (the dashboard's recent refusals).
        self.error_code: Optional[str] = None

    @property
    def duration(self) -> float:
        return (self.ended_at if self.ended_at is not None else self.started) - self.started

    @property
    def upstream_seconds(self) -> Optional[float]:
        """
        How long upstream took to send its response head.
        """
        if self.upstream_sent is None or self.upstream_head is None:
            return None
        return self.upstream_head - self.upstream_sent

    @property
    def time_to_first_chunk(self) -> Optional[float]:
        return None if self.first_chunk is None else self.first_chunk - self.started

    @property
    def proxy_seconds(self) -> float:
        """
        Time spent in the proxy itself: before the request went upstream,
        and between upstream's response head and the client's.  For a
        request answered without upstream, all of it.
        """
        if self.upstream_sent is None:
            return self.duration
        before = self.upstream_sent - self.started
        after = 0.0
        if self.upstream_head is not None and self.head_sent is not None:
            after = max(0.0, self.head_sent - self.upstream_head)
        return before + after

    def fields(self) -> dict[str, Any]:
        """
        The record as JSON-ready fields, for the JSON access log.
        """
        usage = self.usage
        return {
            "request_id": self.request_id,
            "peer": self.peer,
            "client": self.client,
            "method": self.method,
            "route": self.route,
            "path": self.path,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "upstream": self.upstream,
            "attempts": self.attempts,
            "upstream_status": self.upstream_status,
            "upstream_request_id": self.upstream_request_id,
            "upstream_error": self.upstream_error,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "prompt_tokens": usage.prompt if usage else None,
            "completion_tokens": usage.completion if usage else None,
            "reasoning_tokens": usage.reasoning if usage else None,
            "cached_tokens": usage.cached if usage else None,
            "usage_exact": usage.exact if usage else None,
            "ttfb_ms": _ms(self.time_to_first_chunk),
            "upstream_ms": _ms(self.upstream_seconds),
            "proxy_ms": _ms(self.proxy_seconds),
            "duration_ms": _ms(self.duration),
            "ended": self.ended,
            "disconnected": self.ended == "client_disconnected",
            "worker": self.worker,
        }


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


def record_of(request: Request) -> RequestRecord:
    """
    The record of a request (a throwaway one for a request that a plain
    twisted.web site made, which keeps the resources usable without it).
    """
    record: Optional[RequestRecord] = getattr(request, "record", None)
    if record is None:
        record = RequestRecord(new_request_id(), 0.0)
        request.record = record  # type: ignore[attr-defined]
    return record
