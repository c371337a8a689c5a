# -*- test-case-name: tests.ledger.test_schema -*-
"""
The ledger's versioned schema, brought up to date at startup, the way
synapse's C{prepare_database} does it.

C{schema/<version>/} holds the deltas of each version, applied in name
order: a C{.sql} file on both engines, a C{.sql.sqlite} or C{.sql.postgres}
file on that engine only.  The database records its version in
C{schema_version} and every file applied in C{applied_schema_deltas}.

One process migrates: the daemon (or a group's supervisor) before any
listener or worker starts, in one transaction that holds every other
process off (C{BEGIN IMMEDIATE} on SQLite, an advisory lock on
PostgreSQL), so two hosts starting at once apply each delta once.  A
worker only checks that the version is the one it knows.  A database
newer than this oaiproxy is refused: an older binary must not write a
schema it does not know.

This runs outside the reactor, with a blocking connection: it is startup,
before anything is served, and a failure must stop the start with one
line on the terminal.
"""

from __future__ import annotations

import os
import re
from typing import Any

from oaiproxy.config import ConfigError
from oaiproxy.ledger.engines import Engine

__all__ = ["SCHEMA_VERSION", "SchemaError", "prepare", "deltas", "schema_version"]

#: The version this code reads and writes.
SCHEMA_VERSION = 2

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema")


class SchemaError(ConfigError):
    """
    The database cannot be used at this version (one line for the
    operator).
    """


def deltas(version: int, engine: Engine) -> list[tuple[str, str]]:
    """
    The files of C{version} for C{engine}, in order, as (name, SQL).
    """
    directory = os.path.join(SCHEMA_DIR, str(version))
    found = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".sql") or name.endswith(f".sql.{engine.name}"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                found.append((name, f.read()))
    return found


def statements(sql: str) -> list[str]:
    """
    The statements of a delta file: comments dropped, split at each C{;}
    that ends a line.
    """
    text = "\n".join(re.sub(r"--.*$", "", line) for line in sql.splitlines())
    return [part.strip() for part in re.split(r";\s*(?:\n|$)", text) if part.strip()]


def schema_version(cursor: Any) -> int:
    """
    The database's version; 0 for an empty database.
    """
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    return int(row[0]) if row else 0


def prepare(engine: Engine, connection: Any, migrate: bool = True, target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """
    Bring the database to version C{target} (or, with C{migrate} false,
    check that it is there); return the version found and the version now.

    @raise SchemaError: for a database newer than this code, or (without
        C{migrate}) one not at C{target}.
    """
    cursor = connection.cursor()
    try:
        engine.begin(cursor)
        engine.lock_for_migration(cursor)
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, "
            "version INTEGER NOT NULL)"
        )
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS applied_schema_deltas (version INTEGER NOT NULL, file TEXT NOT NULL, "
            "UNIQUE (version, file))"
        )
        found = schema_version(cursor)
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"the usage ledger {engine.describe()} is at schema version {found}, newer than this oaiproxy "
                f"knows ({SCHEMA_VERSION}): upgrade oaiproxy, or point --usage-db elsewhere"
            )
        if found < target and not migrate:
            raise SchemaError(
                f"the usage ledger {engine.describe()} is at schema version {found}, not {target}: "
                "the process that starts first (the supervisor) migrates it"
            )
        for version in range(found + 1, target + 1):
            for name, sql in deltas(version, engine):
                for statement in statements(sql):
                    cursor.execute(statement)
                cursor.execute(
                    engine.convert("INSERT INTO applied_schema_deltas (version, file) VALUES (?, ?)"), (version, name)
                )
        if target > found:
            cursor.execute("DELETE FROM schema_version")
            cursor.execute(engine.convert("INSERT INTO schema_version (version) VALUES (?)"), (target,))
        connection.commit()
        return found, max(found, target)
    except BaseException:
        connection.rollback()
        raise
    finally:
        cursor.close()
