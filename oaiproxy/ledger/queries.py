# -*- test-case-name: tests.ledger.test_writer -*-
"""
The ledger's SQL: the one write (add a batch of per-day totals) and the
one read (the rows of a period), as functions of a cursor, so the writer
runs them in the pool's thread and the report command on a blocking
connection alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

from oaiproxy.ledger.engines import Engine

__all__ = ["KEY", "COLUMNS", "Row", "Spend", "add_totals", "select_rows", "select_spend"]

#: What a row is keyed by.
KEY = ("day", "client", "model", "upstream")
#: What a row adds up, in the order of L{Row} and of the writer's totals.
COLUMNS = (
    "requests",
    "errors",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced",
)

_UPSERT = (
    f"INSERT INTO usage_daily ({', '.join(KEY + COLUMNS)}) VALUES ({', '.join('?' * (len(KEY) + len(COLUMNS)))}) "
    f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in COLUMNS)
)


@dataclass(frozen=True)
class Row:
    """
    One (day, client, model, upstream) row.
    """

    day: str
    client: str
    model: str
    upstream: str
    requests: int
    errors: int
    estimated: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: float
    unpriced: int


class Spend(NamedTuple):
    """
    One client's spend on one UTC day, every model and upstream added up:
    what the budgets read.
    """

    day: str
    client: str
    tokens: int
    cost_usd: float


def add_totals(cursor: Any, engine: Engine, rows: Sequence[Sequence[Any]]) -> int:
    """
    Add each row's totals to the ledger (inserting the rows not there
    yet); one statement per row, in one transaction.  Addition commutes,
    so writers in several processes need no coordination beyond the
    database's own lock.
    """
    cursor.executemany(engine.convert(_UPSERT), [tuple(row) for row in rows])
    return len(rows)


def select_rows(cursor: Any, engine: Engine, first_day: str, last_day: str, client: Optional[str] = None) -> list[Row]:
    """
    The rows of the days from C{first_day} to C{last_day} (inclusive,
    C{YYYY-MM-DD}), of one client or all.
    """
    sql = f"SELECT {', '.join(KEY + COLUMNS)} FROM usage_daily WHERE day >= ? AND day <= ?"
    args: list[Any] = [first_day, last_day]
    if client is not None:
        sql += " AND client = ?"
        args.append(client)
    cursor.execute(engine.convert(sql + " ORDER BY day, client, model, upstream"), args)
    rows = []
    for r in cursor.fetchall():
        counts = [int(v) for v in r[4:11]]
        rows.append(Row(str(r[0]), r[1], r[2], r[3], *counts, cost_usd=float(r[11]), unpriced=int(r[12])))  # type: ignore[misc]
    return rows


def select_spend(cursor: Any, engine: Engine, first_day: str, last_day: str) -> list[Spend]:
    """
    Every client's spend by day from C{first_day} to C{last_day}
    (inclusive): one aggregate query over the primary key's leading
    column, whose answer grows with clients times days, not with models
    and upstreams.
    """
    cursor.execute(
        engine.convert(
            "SELECT day, client, SUM(prompt_tokens + completion_tokens), SUM(cost_usd) FROM usage_daily "
            "WHERE day >= ? AND day <= ? GROUP BY day, client"
        ),
        [first_day, last_day],
    )
    return [Spend(str(r[0]), r[1], int(r[2] or 0), float(r[3] or 0.0)) for r in cursor.fetchall()]
