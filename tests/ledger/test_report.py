"""
Tests for L{oaiproxy.ledger.report}: C{python -m oaiproxy usage} over a
real SQLite ledger, in each format.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.__main__ import main
from oaiproxy.ledger.queries import add_totals
from oaiproxy.ledger.report import parse_since
from tests.ledger.fakes import sqlite_ledger
from tests.support import temp_dir

TODAY = datetime.datetime.now(datetime.timezone.utc).date()
OLD = (TODAY - datetime.timedelta(days=30)).isoformat()
ROWS = [
    (TODAY.isoformat(), "alice", "gpt-4o-mini", "openai", 3, 1, 0, 300, 150, 100, 20, 0.000135, 0),
    (TODAY.isoformat(), "alice", "gpt-4o", "openai", 1, 0, 1, 100, 50, 0, 0, 0.0, 1),
    (TODAY.isoformat(), "bob", "gpt-4o-mini", "azure", 2, 0, 0, 200, 100, 0, 0, 0.00009, 0),
    (OLD, "bob", "gpt-4o-mini", "azure", 7, 0, 0, 700, 350, 0, 0, 0.000315, 0),
]


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        engine = sqlite_ledger(temp_dir(self))
        connection = engine.connect()
        cursor = connection.cursor()
        engine.begin(cursor)
        add_totals(cursor, engine, ROWS)
        connection.commit()
        connection.close()
        self.db = engine.path

    def usage(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(["usage", "--db", self.db, *args], out, err)
        return status, out.getvalue(), err.getvalue()

    def test_table(self) -> None:
        """
        The table groups by client and model (the default) over the last
        seven days, ends with a total, and marks a cost with unpriced
        requests in it with +?.
        """
        status, out, _ = self.usage()
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0], f"usage {(TODAY - datetime.timedelta(days=6)).isoformat()} to {TODAY} (UTC)")
        self.assertEqual(lines[1].split()[:4], ["client", "model", "requests", "errors"])
        self.assertEqual(lines[2].split(), ["alice", "gpt-4o", "1", "0", "1", "100", "50", "0", "0", "0.000000+?", "1"])
        self.assertEqual(lines[3].split()[:3], ["alice", "gpt-4o-mini", "3"])
        self.assertEqual(lines[-1].split()[:2], ["total", "6"])
        self.assertTrue(lines[-1].split()[-2].endswith("+?"))

    def test_csv_by_upstream(self) -> None:
        """
        CSV for a spreadsheet: a header, one line per group, the cost and
        whether it is complete.
        """
        status, out, _ = self.usage("--by", "upstream", "--format", "csv", "--since", "60d")
        self.assertEqual(status, 0)
        rows = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual([(r["upstream"], r["requests"], r["cost_complete"]) for r in rows],
                         [("azure", "9", "true"), ("openai", "4", "false")])  # fmt: skip
        self.assertEqual(rows[0]["cost_usd"], "0.000405")

    def test_json_by_day(self) -> None:
        """
        JSON for a script: the period, the rows by day, the total; --since
        takes a date.
        """
        status, out, _ = self.usage("--by", "day", "--format", "json", "--since", OLD, "--until", OLD)
        self.assertEqual(status, 0)
        document = json.loads(out)
        self.assertEqual((document["since"], document["until"], document["by"]), (OLD, OLD, ["day"]))
        self.assertEqual([(r["day"], r["requests"]) for r in document["rows"]], [(OLD, 7)])
        self.assertEqual(document["total"]["prompt_tokens"], 700)

    def test_errors(self) -> None:
        """
        A wrong --by, a wrong date, a missing ledger are one line and
        status 2.
        """
        for args in (["--by", "colour"], ["--since", "last week"]):
            status, out, err = self.usage(*args)
            self.assertEqual((status, out), (2, ""))
            self.assertEqual(len(err.splitlines()), 1)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["usage", "--db", os.path.join(temp_dir(self), "none.db")], out, err), 2)
        self.assertIn("no ledger at", err.getvalue())

    def test_since(self) -> None:
        self.assertEqual(parse_since("1d", TODAY), TODAY)
        self.assertEqual(parse_since("7d", datetime.date(2026, 12, 3)), datetime.date(2026, 11, 27))
