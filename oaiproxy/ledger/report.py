# -*- test-case-name: tests.ledger.test_report -*-
"""
C{python -m oaiproxy usage}: a report from the ledger, for a terminal
(C{table}), a spreadsheet (C{csv}) or a script (C{json}).

    python -m oaiproxy usage [--db PATH|URL] [--since 7d] [--until DATE]
                             [--by client|model|day|upstream[,...]] [--format table|csv|json]

C{--since} is a number of days back (C{7d}: today and the six days
before, UTC) or a date, C{YYYY-MM-DD}; C{--until} a date (default
today), both inclusive.  C{--by} groups the rows (several columns
comma-separated); the table ends with a total.  Cost is the sum over
priced requests; a group with unpriced requests shows its cost with a
C{+?} in the table (C{cost_complete} false in CSV and JSON): the real
figure is higher by what the unpriced tokens cost.  An estimated usage
(a stream cut short without upstream's usage) is counted in
C{estimated}.

It reads with a plain connection, outside the reactor, and writes
nothing: it can run while the daemon writes (SQLite's WAL lets a reader
in beside the writer).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
from typing import Any, Mapping, Sequence, TextIO

from oaiproxy.config import ConfigError
from oaiproxy.ledger.engines import create_engine, load_db_password
from oaiproxy.ledger.queries import COLUMNS, Row, select_rows
from oaiproxy.ledger.schema import schema_version

__all__ = ["add_arguments", "run", "summarize", "render", "parse_since", "GROUPS"]

GROUPS = ("client", "model", "day", "upstream")
FORMATS = ("table", "csv", "json")
_SUMS = COLUMNS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", help="the ledger: a SQLite file or a postgresql:// URL (default: env OAIPROXY_USAGE_DB)"
    )
    parser.add_argument(
        "--db-password-file",
        help="file holding the PostgreSQL password (default: $CREDENTIALS_DIRECTORY/usage_db_password)",
    )
    parser.add_argument("--since", default="7d", help="Nd (the last N days, today included) or YYYY-MM-DD")
    parser.add_argument("--until", help="YYYY-MM-DD, inclusive (default: today, UTC)")
    parser.add_argument("--by", default="client,model", help="group by: client, model, day, upstream (comma-separated)")
    parser.add_argument("--format", default="table", choices=FORMATS)


def parse_since(text: str, today: datetime.date) -> datetime.date:
    """
    C{Nd} (today and the N-1 days before it) or a date.
    """
    text = text.strip()
    if text.endswith("d") and text[:-1].isdigit() and int(text[:-1]) > 0:
        return today - datetime.timedelta(days=int(text[:-1]) - 1)
    return _date("--since", text)


def _date(name: str, text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a date, YYYY-MM-DD (or, for --since, Nd), not {text!r}") from None


def _groups(text: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    wrong = [g for g in groups if g not in GROUPS]
    if wrong or not groups:
        raise ConfigError(f"--by takes {', '.join(GROUPS)} (comma-separated), not {text!r}")
    return groups


def summarize(rows: Sequence[Row], by: Sequence[str]) -> list[dict[str, Any]]:
    """
    The rows added up by the columns C{by}, sorted by them.
    """
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(getattr(row, g) for g in by)
        entry = groups.get(key)
        if entry is None:
            entry = groups[key] = {**dict(zip(by, key)), **{c: 0 for c in _SUMS}}
            entry["cost_usd"] = 0.0
        for column in _SUMS:
            entry[column] += getattr(row, column)
    result = [groups[key] for key in sorted(groups)]
    for entry in result:
        entry["cost_usd"] = round(entry["cost_usd"], 6)
        entry["cost_complete"] = entry["unpriced"] == 0
    return result


def _total(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {c: sum(e[c] for e in entries) for c in _SUMS}
    total["cost_usd"] = round(total["cost_usd"], 6)
    total["cost_complete"] = total["unpriced"] == 0
    return total


_HEADINGS = {
    "requests": "requests",
    "errors": "errors",
    "estimated": "estimated",
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "cached_tokens": "cached",
    "reasoning_tokens": "reasoning",
    "cost_usd": "cost USD",
    "unpriced": "unpriced",
}


def render(entries: Sequence[Mapping[str, Any]], by: Sequence[str], fmt: str, period: tuple[str, str]) -> str:
    """
    The report in C{fmt}.
    """
    columns = list(by) + list(_SUMS)
    if fmt == "json":
        document: dict[str, Any] = {"since": period[0], "until": period[1], "by": list(by), "rows": list(entries)}
        document["total"] = _total(entries)
        return json.dumps(document, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns + ["cost_complete"])
        for entry in entries:
            writer.writerow([_csv_value(entry[c]) for c in columns] + [str(entry["cost_complete"]).lower()])
        return out.getvalue()
    cells = [[*(by), *(_HEADINGS[c] for c in _SUMS)]]
    for entry in [*entries, {**{g: "" for g in by}, **_total(entries), by[0]: "total"}]:
        cells.append([str(entry[g]) for g in by] + [_cell(entry, c) for c in _SUMS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        if n == len(cells) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(v.ljust(w) if i < len(by) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
        )
    return f"usage {period[0]} to {period[1]} (UTC)\n" + "\n".join(lines) + "\n"


def _csv_value(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _cell(entry: Mapping[str, Any], column: str) -> str:
    value = entry[column]
    if column == "cost_usd":
        return f"{value:,.6f}" + ("" if entry["cost_complete"] else "+?")
    return f"{value:,}"


def run(args: argparse.Namespace, out: TextIO, err: TextIO, environ: Mapping[str, str] = os.environ) -> int:
    """
    The C{usage} command; 2 for a usage error, 1 when the ledger cannot
    be read.
    """
    try:
        target = args.db or environ.get("OAIPROXY_USAGE_DB")
        if not target:
            raise ConfigError("no ledger given: --db PATH|URL (or OAIPROXY_USAGE_DB)")
        today = datetime.datetime.now(datetime.timezone.utc).date()
        since = parse_since(args.since, today)
        until = _date("--until", args.until) if args.until else today
        by = _groups(args.by)
        if "://" not in target and not os.path.exists(target):
            raise ConfigError(f"no ledger at {target}")
        engine = create_engine(target, load_db_password(args.db_password_file, environ))
    except ConfigError as e:
        err.write(f"python -m oaiproxy usage: error: {e}\n")
        return 2
    module = engine.module()
    try:
        connection = engine.connect()
        try:
            cursor = connection.cursor()
            if schema_version(cursor) < 1:
                raise ConfigError(f"{engine.describe()} holds no usage ledger")
            rows = select_rows(cursor, engine, since.isoformat(), until.isoformat())
        finally:
            connection.close()
    except (module.Error, ConfigError) as e:
        text = str(e).strip().splitlines()
        err.write(f"python -m oaiproxy usage: error: cannot read {engine.describe()}: {text[0] if text else e}\n")
        return 1
    out.write(render(summarize(rows, by), by, args.format, (since.isoformat(), until.isoformat())))
    return 0
