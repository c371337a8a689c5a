"""
Tests for L{oaiproxy.ledger.schema}, L{oaiproxy.ledger.engines} and
L{oaiproxy.ledger.startup}: the schema created from nothing and upgraded
from an older version, on SQLite (the same cases run on a real PostgreSQL
in C{tests/e2e/test_ledger.py}); where the ledger is; what is refused.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, Secret
from oaiproxy.ledger.engines import (
    Engine,
    PostgresEngine,
    SqliteEngine,
    create_engine,
    load_db_password,
    usage_db_target,
)
from oaiproxy.ledger.queries import add_totals, select_rows
from oaiproxy.ledger.schema import SCHEMA_VERSION, SchemaError, prepare, statements
from oaiproxy.ledger.startup import migrate
from tests.support import temp_dir

ROW = ("2026-12-03", "alice", "gpt-4o-mini", "openai", 1, 0, 0, 10, 5, 2, 1, 0.5, 0)


class MigrationCases:
    """
    The same cases on either engine: C{self.fresh()} makes an empty
    database and returns its engine.
    """

    def fresh(self) -> Engine:
        raise NotImplementedError

    def prepared(self, engine: Engine, **kwargs: Any) -> tuple[int, int]:
        connection = engine.connect()
        try:
            return prepare(engine, connection, **kwargs)
        finally:
            connection.close()

    def query(self, engine: Engine, sql: str) -> list[tuple[Any, ...]]:
        connection = engine.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql)
            rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
            connection.commit()
            return rows
        finally:
            connection.close()

    def indexes(self, engine: Engine) -> list[str]:
        raise NotImplementedError

    def test_from_nothing(self) -> None:
        """
        An empty database gets the whole schema, records every delta
        applied, and takes a row.
        """
        engine = self.fresh()
        self.assertEqual(self.prepared(engine), (0, SCHEMA_VERSION))  # type: ignore[attr-defined]
        self.assertEqual(self.query(engine, "SELECT version FROM schema_version"), [(SCHEMA_VERSION,)])  # type: ignore[attr-defined]
        applied = self.query(engine, "SELECT version, file FROM applied_schema_deltas ORDER BY version")
        self.assertEqual([v for v, _ in applied], [1, 2])  # type: ignore[attr-defined]
        self.assertTrue(applied[0][1].endswith("." + engine.name))  # type: ignore[attr-defined]
        self.assertIn("usage_daily_client_day", self.indexes(engine))  # type: ignore[attr-defined]
        connection = engine.connect()
        add_totals(connection.cursor(), engine, [ROW, ROW])
        connection.commit()
        rows = select_rows(connection.cursor(), engine, "2026-12-01", "2026-12-31")
        connection.close()
        self.assertEqual([(r.day, r.requests, r.prompt_tokens, r.cost_usd) for r in rows], [("2026-12-03", 2, 20, 1.0)])  # type: ignore[attr-defined]

    def test_upgrade_keeps_rows(self) -> None:
        """
        A database at version 1 (before the index) is upgraded to the
        current version, its rows kept.
        """
        engine = self.fresh()
        self.assertEqual(self.prepared(engine, target=1), (0, 1))  # type: ignore[attr-defined]
        self.assertNotIn("usage_daily_client_day", self.indexes(engine))  # type: ignore[attr-defined]
        connection = engine.connect()
        add_totals(connection.cursor(), engine, [ROW])
        connection.commit()
        connection.close()
        self.assertEqual(self.prepared(engine), (1, SCHEMA_VERSION))  # type: ignore[attr-defined]
        self.assertIn("usage_daily_client_day", self.indexes(engine))  # type: ignore[attr-defined]
        self.assertEqual(self.query(engine, "SELECT requests FROM usage_daily"), [(1,)])  # type: ignore[attr-defined]
        self.assertEqual(self.prepared(engine), (SCHEMA_VERSION, SCHEMA_VERSION))  # type: ignore[attr-defined]

    def test_newer_schema_refused(self) -> None:
        """
        A database newer than this code is refused, untouched.
        """
        engine = self.fresh()
        self.prepared(engine)
        self.query(engine, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
        error = self.assertRaises(SchemaError, self.prepared, engine)  # type: ignore[attr-defined]
        self.assertIn("newer than this oaiproxy", str(error))  # type: ignore[attr-defined]

    def test_worker_does_not_migrate(self) -> None:
        """
        A process told not to migrate (a worker) refuses an old schema
        and leaves it as it was.
        """
        engine = self.fresh()
        self.prepared(engine, target=1)
        error = self.assertRaises(SchemaError, self.prepared, engine, migrate=False)  # type: ignore[attr-defined]
        self.assertIn("supervisor", str(error))  # type: ignore[attr-defined]
        self.assertEqual(self.query(engine, "SELECT version FROM schema_version"), [(1,)])  # type: ignore[attr-defined]


class SqliteMigrationTests(MigrationCases, SynchronousTestCase):
    def fresh(self) -> Engine:
        return SqliteEngine(os.path.join(temp_dir(self), "usage.sqlite3"))

    def indexes(self, engine: Engine) -> list[str]:
        return [r[0] for r in self.query(engine, "SELECT name FROM sqlite_master WHERE type = 'index'")]

    def test_wal_mode(self) -> None:
        """
        The file is in WAL mode, so readers (the report) never wait for
        the writer, and several processes' writers wait their turn.
        """
        engine = self.fresh()
        self.prepared(engine)
        self.assertEqual(self.query(engine, "PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(self.query(engine, "PRAGMA busy_timeout"), [(5000,)])

    def test_startup_error_is_one_line(self) -> None:
        """
        A ledger that cannot be opened stops the start with a line naming
        it.
        """
        path = os.path.join(temp_dir(self), "not-a-database")
        with open(path, "wb") as f:
            f.write(b"\x00garbage" * 100)
        error = self.assertRaises(ConfigError, migrate, path, None)
        self.assertIn(path, str(error))
        self.assertNotIn("\n", str(error))


class EngineTests(SynchronousTestCase):
    def test_where_the_ledger_is(self) -> None:
        """
        The option, else the variable, else systemd's state directory,
        else (mock runs) the current directory; off otherwise or when
        told.
        """
        state = {"STATE_DIRECTORY": "/var/lib/oaiproxy"}
        self.assertEqual(usage_db_target("/x.db", {"OAIPROXY_USAGE_DB": "/y.db"}, False), "/x.db")
        self.assertEqual(usage_db_target(None, {"OAIPROXY_USAGE_DB": "/y.db", **state}, True), "/y.db")
        self.assertEqual(usage_db_target(None, state, True), "/var/lib/oaiproxy/usage.sqlite3")
        self.assertEqual(usage_db_target(None, {}, True), os.path.abspath("oaiproxy-usage.sqlite3"))
        self.assertIsNone(usage_db_target(None, {}, False))
        self.assertIsNone(usage_db_target("off", state, True))
        self.assertIsNone(usage_db_target(None, {"OAIPROXY_USAGE_DB": "off"}, True))

    def test_refused_targets(self) -> None:
        """
        A URL holding a password, another scheme, or a directory that does
        not exist are refused with a line saying what to do.
        """
        error = self.assertRaises(ConfigError, create_engine, "postgresql://u:hunter2@h/db")
        self.assertIn("--usage-db-password-file", str(error))
        self.assertNotIn("hunter2", str(error))
        self.assertRaises(ConfigError, create_engine, "mysql://u@h/db")
        self.assertRaises(ConfigError, create_engine, "/no/such/dir/usage.sqlite3")
        self.assertIsInstance(create_engine("postgresql://u@h/db"), PostgresEngine)

    def test_password_from_the_credential(self) -> None:
        """
        Without the option the password is the systemd credential; an
        empty one is refused; the URL shown never holds it.
        """
        directory = temp_dir(self)
        with open(os.path.join(directory, "usage_db_password"), "w") as f:
            f.write("s3cret\n")
        secret = load_db_password(None, {"CREDENTIALS_DIRECTORY": directory})
        self.assertEqual(secret, Secret(b"s3cret"))
        self.assertIsNone(load_db_password(None, {}))
        engine = PostgresEngine("postgresql://u@db.example:6543/usage", secret)
        self.assertEqual(engine.describe(), "postgresql://u@db.example:6543/usage")
        self.assertEqual(engine.connect_arguments()[1]["password"], "s3cret")
        empty = os.path.join(directory, "empty")
        open(empty, "w").close()
        self.assertRaises(ConfigError, load_db_password, empty, {})

    def test_placeholders_and_retries(self) -> None:
        """
        PostgreSQL gets psycopg2's placeholders; a serialization failure is
        worth a retry at once, other errors are not (a locked SQLite file
        has been waited for already: the next flush tries again).
        """
        self.assertEqual(PostgresEngine("postgresql://u@h/d").convert("a = ? AND b = ?"), "a = %s AND b = %s")

        class Serialization(Exception):
            pgcode = "40001"

        self.assertTrue(PostgresEngine("postgresql://u@h/d").is_retryable(Serialization()))
        self.assertFalse(PostgresEngine("postgresql://u@h/d").is_retryable(Exception()))
        sqlite = SqliteEngine("/tmp/x")
        self.assertFalse(sqlite.is_retryable(sqlite3.OperationalError("database is locked")))

    def test_statements(self) -> None:
        """
        Delta files are split into statements, comments dropped.
        """
        self.assertEqual(statements("-- a;\nCREATE TABLE t (a INT); -- x\nCREATE INDEX i ON t (a);\n"), [
            "CREATE TABLE t (a INT)",
            "CREATE INDEX i ON t (a)",
        ])  # fmt: skip
