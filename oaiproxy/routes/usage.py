# -*- test-case-name: tests.routes.test_usage -*-
"""
C{GET /usage}: what each client used, by UTC day, model and upstream,
from the usage ledger, with its budgets and what is left of them; the
agreed shape is in the README ("Usage and budgets").

The policy (the query, the window, who sees whom) is
L{oaiproxy.routes.usagepolicy}; here the rows are read and the answer
written.  The ledger is read in its pool's thread
(L{oaiproxy.ledger.writer.LedgerWriter.rows}), never on the reactor, and
what the writer still holds in memory is added (taken when the read's
answer is back, as L{LedgerWriter.pending_rows} says: the pool has one
thread, so a flush whose batch is still in flight then ran after the read,
and a flush that ran before it has been cleared from the writer).
Rows are added up with the report command's own
L{oaiproxy.ledger.report.summarize}.

A database that is down, locked or slower than L{READ_SECONDS} makes this
answer a 503 (C{ledger_unavailable}), logged once per episode; the proxy
keeps serving.  While a read that timed out still holds the pool's thread,
the next ones are answered 503 at once rather than queued behind it.

The request is in the access log (route C{usage}, with the client whose
key asked), but the metrics do not count it as that client's API request
(L{oaiproxy.observe.metrics.Metrics.observe} labels it client C{-}).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.access.admin import Caller, caller
from oaiproxy.access.budgets import PERIODS, Cost, Period
from oaiproxy.access.budgetstore import BudgetStore
from oaiproxy.access.clients import Client, Credentials
from oaiproxy.errors import ApiError, internal_error, invalid_api_key, ledger_unavailable, rate_limited
from oaiproxy.ledger.queries import Row
from oaiproxy.ledger.report import summarize
from oaiproxy.ledger.writer import LedgerWriter
from oaiproxy.routes.usagepolicy import Window, parse_query, utc_day, visible_clients, window_for
from oaiproxy.web import Endpoint, error_response, query_of

__all__ = ["UsageResource", "usage_document", "budget_entries", "READ_SECONDS"]

log = Logger(namespace="oaiproxy.usage")

#: How long a read of the ledger may take before the answer is a 503.
READ_SECONDS = 5.0

_SUMMED = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
_ROW_KEY = ("client", "day", "model", "upstream")


class UsageResource(Endpoint):
    """
    C{GET /usage}.

    @param credentials: who may ask (the admin key, the client keys), read
        per request, so a reload applies at once.
    @param writer: the ledger (rows written, rows held); C{None} while the
        ledger is off.
    @param budgets: the clients' budget totals; C{None}: no budgets shown.
    """

    def __init__(
        self,
        credentials: Credentials,
        clock: IReactorTime,
        writer: Optional[LedgerWriter] = None,
        budgets: Optional[BudgetStore] = None,
        read_seconds: float = READ_SECONDS,
    ) -> None:
        super().__init__()
        self._credentials = credentials
        self._clock = clock
        self._writer = writer
        self._budgets = budgets
        self._read_seconds = read_seconds
        # A read that timed out and still holds the pool's one thread.
        self._stuck = False
        # The episode of failed reads in progress (logged once).
        self._failing = False
        # Who has a read queued: one each, so that no one key can fill the
        # pool's one thread (which the ledger's writes share) with reads.
        self._reading: set[str] = set()

    def render_GET(self, request: Request) -> bytes | int:
        who = caller(self._credentials, request.requestHeaders)
        if who is None:
            return error_response(request, invalid_api_key())
        now = self._clock.seconds()
        query = parse_query(query_of(request), utc_day(now))
        if isinstance(query, ApiError):
            return error_response(request, query)
        names = visible_clients(who, query)
        if isinstance(names, ApiError):
            return error_response(request, names)
        window = window_for(who, query, now)
        if isinstance(window, ApiError):
            return error_response(request, window)
        writer = self._writer
        if writer is not None and self._stuck:
            return error_response(request, ledger_unavailable())
        asker = "client " + who.name if isinstance(who, Client) else "admin"
        if asker in self._reading:
            return error_response(
                request,
                rate_limited("GET /usage: one read at a time per key; this key's last is still running.", 1, ()),
            )
        self._reading.add(asker)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        answer = (
            self._read(writer, window, names)
            .addBoth(self._read_over, asker)
            .addCallback(self._answer, who, names, window, now)
        )

        def send(result: bytes | ApiError) -> None:
            if finished:
                return
            body = result if isinstance(result, bytes) else error_response(request, result)
            if isinstance(result, bytes):
                _json_headers(request, len(body))
            request.write(body)
            request.finish()

        answer.addCallback(send).addErrback(self._bug, request, finished)
        return NOT_DONE_YET

    def _read_over(self, result: Any, asker: str) -> Any:
        """
        The read of C{asker} is back (or given up on): it may ask again.
        """
        self._reading.discard(asker)
        return result

    @staticmethod
    def _bug(failure: Failure, request: Request, finished: list[bool]) -> None:
        log.failure("GET /usage failed", failure)
        if not finished:
            request.write(error_response(request, internal_error()))
            request.finish()

    def _read(
        self, writer: Optional[LedgerWriter], window: Window, names: Optional[tuple[str, ...]]
    ) -> "Deferred[Optional[list[Row]] | ApiError]":
        """
        The ledger's rows of C{window} (of C{names}, when given) plus those
        still held in memory; C{None} with the ledger off; the 503 when the
        database cannot answer in time.
        """
        if writer is None:
            return succeed(None)
        first, last = window.days
        outcome: Deferred[Optional[list[Row]] | ApiError] = Deferred()
        timer = self._clock.callLater(self._read_seconds, self._timed_out, outcome, writer)
        read = writer.rows(first, last, names[0] if names is not None and len(names) == 1 else None)

        def done(result: "list[Row] | Failure") -> None:
            self._stuck = False
            if timer.active():
                timer.cancel()
            if outcome.called:
                return
            if isinstance(result, Failure):
                self._failed(writer, _why(result.value))
                outcome.callback(ledger_unavailable())
                return
            if self._failing:
                self._failing = False
                log.info("GET /usage: reading the usage ledger {db} again", db=writer.pool.engine.describe())
            # What the writer holds, taken now that the answer is back: the
            # rows the database did not have when it was read.
            held = [
                Row(*key, *totals)
                for key, totals in writer.pending_rows().items()
                if first <= key[0] <= last and (names is None or key[1] in names)
            ]
            outcome.callback([r for r in result if names is None or r.client in names] + held)

        read.addBoth(done)
        return outcome

    def _timed_out(self, outcome: "Deferred[Any]", writer: LedgerWriter) -> None:
        self._stuck = True
        self._failed(writer, f"no answer in {self._read_seconds:g}s")
        outcome.callback(ledger_unavailable())

    def _failed(self, writer: LedgerWriter, why: str) -> None:
        if self._failing:
            return
        self._failing = True
        log.error(
            "GET /usage: cannot read the usage ledger {db} ({why}); answering 503 until it can be read; "
            "requests are not affected",
            db=writer.pool.engine.describe(),
            why=why,
        )

    def _answer(
        self,
        rows: "Optional[list[Row]] | ApiError",
        who: Caller,
        names: Optional[tuple[str, ...]],
        window: Window,
        now: float,
    ) -> "Deferred[bytes | ApiError]":
        if isinstance(rows, ApiError):
            return succeed(rows)
        configured = {client.name: client for client in self._credentials.clients}
        if isinstance(who, Client):
            # Its own entry as it is now (the registry may have been
            # reloaded since), and never anyone else's.
            configured = {who.name: configured.get(who.name, who)}
        shown = _shown(configured, rows or (), names)
        budgeted = [
            configured[name]
            for name in shown
            if self._budgets is not None and name in configured and configured[name].budgets.any
        ]
        spends = [self._spent(client) for client in budgeted]

        def write(spent: list[dict[str, Cost]]) -> bytes:
            budgets = {
                client.name: budget_entries(client, spent_now, self._periods(client))
                for client, spent_now in zip(budgeted, spent)
            }
            document = usage_document(shown, rows, budgets, window, now)
            return _dumps(document)

        return gatherResults(spends, consumeErrors=True).addCallback(write)

    def _spent(self, client: Client) -> "Deferred[dict[str, Cost]]":
        """
        What C{client} spent and reserved in its current periods: the
        group's figure (Redis, with --shared-state), else this process's.
        """
        assert self._budgets is not None
        return self._budgets.current(client)

    def _periods(self, client: Client) -> dict[str, Period]:
        assert self._budgets is not None
        return self._budgets.periods(client)


def _shown(configured: Mapping[str, Client], rows: Iterable[Row], names: Optional[tuple[str, ...]]) -> list[str]:
    """
    The clients an answer lists, sorted: every configured one and every
    one with rows (or, when C{names} are given, those of them that are).
    """
    known = set(configured) | {row.client for row in rows}
    if names is not None:
        known &= set(names)
    return sorted(known)


def budget_entries(client: Client, spent: Mapping[str, Cost], periods: Mapping[str, Period]) -> list[dict[str, Any]]:
    """
    The client's budgets, as configured, with what is used and left of each
    in its current period, shortest period first.
    """
    budgets = client.budgets
    zone = budgets.zone
    entries = []
    for kind in PERIODS:
        period = periods[kind]
        used = spent.get(kind, Cost(0, 0.0))
        for unit in ("tokens", "usd"):
            name = f"{unit}_per_{kind}"
            limit = getattr(budgets, name)
            if limit is None:
                continue
            amount: float = used.tokens if unit == "tokens" else round(used.usd or 0.0, 6)
            left = max(0, limit - amount) if unit == "tokens" else round(max(0.0, limit - amount), 6)
            entries.append(
                {
                    "budget": name,
                    "unit": unit,
                    "limit": limit,
                    "used": amount,
                    "left": left,
                    "period_start": datetime.datetime.fromtimestamp(period.begins, zone).isoformat(),
                    "resets_at": datetime.datetime.fromtimestamp(period.ends, zone).isoformat(),
                    "timezone": budgets.budget_timezone,
                }
            )
    return entries


def usage_document(
    clients: Sequence[str],
    rows: Optional[Sequence[Row]],
    budgets: Mapping[str, list[dict[str, Any]]],
    window: Window,
    now: float,
) -> dict[str, Any]:
    """
    The answer: C{clients} in order, each with its budgets, its rows (the
    ledger's and those held in memory added up by day, model and upstream)
    and their totals.  C{rows} is C{None} while the ledger is off.
    """
    days: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    for entry in summarize(rows or (), _ROW_KEY):
        if entry["client"] in days:
            days[entry["client"]].append(
                {
                    "day": entry["day"],
                    "model": entry["model"],
                    "upstream": entry["upstream"],
                    **_sums(entry),
                    "estimated": entry["estimated"] > 0,
                }
            )
    totals = {entry["client"]: _sums(entry) for entry in summarize(rows or (), ("client",))}
    empty = {**{column: 0 for column in _SUMMED}, "cost_usd": 0.0}
    return {
        "object": "usage",
        "ledger": rows is not None,
        "since": window.days[0],
        "until": window.days[1],
        "generated_at": round(now, 3),
        "clients": [
            {
                "client": name,
                "budgets": budgets.get(name, []),
                "days": days[name],
                "totals": totals.get(name, empty),
            }
            for name in clients
        ],
    }


def _sums(entry: Mapping[str, Any]) -> dict[str, Any]:
    """
    The counts of a summarized entry, and its cost: C{None} (unknown) when
    any of its tokens had no price, never a guessed 0.
    """
    return {
        **{column: entry[column] for column in _SUMMED},
        "cost_usd": entry["cost_usd"] if entry["cost_complete"] else None,
    }


def _dumps(document: Mapping[str, Any]) -> bytes:
    """
    Compact JSON, ASCII only, with C{<}, C{>} and C{&} escaped too: a client
    name is data, and stays inert even if a page pastes the answer into
    HTML.
    """
    text = json.dumps(document, ensure_ascii=True, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii") + b"\n"


def _json_headers(request: Request, length: int) -> None:
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    headers.setRawHeaders(b"content-length", [b"%d" % (length,)])


def _why(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
