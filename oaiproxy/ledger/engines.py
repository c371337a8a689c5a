# -*- test-case-name: tests.ledger.test_schema -*-
"""
The two databases the ledger can live in, and everything that differs
between them, in one place (the way synapse's C{storage/engines} do it):
how to connect, what each new connection is set up with, placeholders,
how a write transaction starts, which errors are worth a retry.

SQL elsewhere is written once, with C{?} placeholders and the
C{INSERT ... ON CONFLICT ... DO UPDATE} upsert that SQLite (3.24+) and
PostgreSQL (9.5+) both have.

B{SQLite} is the embedded default: one file, WAL mode (readers never wait
for the writer), C{synchronous=FULL} (a committed flush survives a power
cut too: it costs one fsync a second), a C{busy_timeout} so that several
processes writing one file (C{--workers}, or two daemons) wait their turn
instead of failing, and write transactions opened with C{BEGIN IMMEDIATE}
so that a writer takes the lock before it reads anything (a deferred one
could be refused the upgrade, which no timeout cures).

B{PostgreSQL} is for several hosts: C{postgresql://user@host[:port]/db},
the password from a file or a systemd credential, never from the URL (a
URL is a command-line argument, which C{ps} shows).  Sessions get a
statement timeout, so a wedged server cannot hold the ledger's thread
forever; the upsert is atomic under the default READ COMMITTED, so no
stronger isolation is needed; serialization failures and deadlocks are
retried.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from twisted.enterprise import adbapi

from oaiproxy.config import ConfigError, Secret, read_config_file

__all__ = [
    "Engine",
    "SqliteEngine",
    "PostgresEngine",
    "create_engine",
    "usage_db_target",
    "load_db_password",
    "MOCK_USAGE_DB",
    "STATE_USAGE_DB",
    "PASSWORD_CREDENTIAL",
    "OFF",
]

#: The ledger file of a C{--mock-upstream} run, in the current directory.
MOCK_USAGE_DB = "oaiproxy-usage.sqlite3"
#: The ledger file under systemd's C{$STATE_DIRECTORY} (C{StateDirectory=}).
STATE_USAGE_DB = "usage.sqlite3"
#: The systemd credential holding the PostgreSQL password.
PASSWORD_CREDENTIAL = "usage_db_password"
#: C{--usage-db} values that turn the ledger off.
OFF = ("off", "none")

#: How long a SQLite writer waits for another process's transaction.
BUSY_TIMEOUT_SECONDS = 5.0
#: PostgreSQL: the longest one statement may run, and connect.
STATEMENT_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_SECONDS = 5


class Engine:
    """
    One kind of database.

    @ivar name: C{sqlite} or C{postgres}, the suffix of the engine's own
        schema files.
    """

    name = ""

    def describe(self) -> str:
        """
        Where the ledger is, for logs and errors: never a password.
        """
        raise NotImplementedError

    def module(self) -> Any:
        """
        The DB-API module (imported only when used: psycopg2 is an extra).
        """
        raise NotImplementedError

    def connect_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    def on_new_connection(self, connection: Any) -> None:
        """
        Set a new connection up (pragmas, session settings).
        """

    def convert(self, sql: str) -> str:
        """
        The SQL in this engine's placeholder style.
        """
        return sql

    def begin(self, cursor: Any) -> None:
        """
        Open a write transaction.
        """

    def lock_for_migration(self, cursor: Any) -> None:
        """
        Hold off every other process's migration until this transaction
        ends (two hosts starting at once).
        """

    def is_retryable(self, error: BaseException) -> bool:
        """
        Whether the transaction that raised C{error} may succeed if run
        again at once on the same connection.
        """
        return False

    def is_connection_closed(self, connection: Any) -> bool:
        return False

    def connect(self) -> Any:
        """
        A blocking connection, set up: for migrations at startup and for
        the report command, which run outside the reactor.
        """
        args, kwargs = self.connect_arguments()
        connection = self.module().connect(*args, **kwargs)
        self.on_new_connection(connection)
        return connection

    def make_pool(self, reactor: Any) -> adbapi.ConnectionPool:
        """
        The adbapi pool the writer uses: one connection, one thread (a
        flush at a time is all the ledger needs, and all SQLite allows).
        Reconnection is the writer's own (L{oaiproxy.ledger.database}), so
        that a database that is down is logged once, not by adbapi at
        every attempt.
        """
        args, kwargs = self.connect_arguments()
        return adbapi.ConnectionPool(
            self.module().__name__,
            *args,
            cp_min=1,
            cp_max=1,
            cp_reconnect=False,
            cp_noisy=False,
            cp_openfun=self.on_new_connection,
            cp_reactor=reactor,
            **kwargs,
        )


class SqliteEngine(Engine):
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> str:
        return self.path

    def module(self) -> Any:
        return sqlite3

    def connect_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # isolation_level=None: the module opens no transaction behind our
        # back; begin() opens each one explicitly.  The pool's one thread
        # is not the one that made the connection object's pool entry.
        return (self.path,), {"timeout": BUSY_TIMEOUT_SECONDS, "isolation_level": None, "check_same_thread": False}

    def on_new_connection(self, connection: Any) -> None:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")

    def begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")

    def lock_for_migration(self, cursor: Any) -> None:
        # BEGIN IMMEDIATE already holds the write lock.
        pass

    def is_retryable(self, error: BaseException) -> bool:
        # "database is locked" comes after the busy timeout has already
        # waited (and retried) for BUSY_TIMEOUT_SECONDS: the next flush
        # tries again, holding the totals meanwhile.
        return False


class PostgresEngine(Engine):
    name = "postgres"

    def __init__(self, url: str, password: Optional[Secret] = None) -> None:
        self.url = url
        self.password = password

    def describe(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"postgresql://{user}{host}{port}{parts.path}"

    def module(self) -> Any:
        try:
            import psycopg2
        except ImportError:
            raise ConfigError(
                "a PostgreSQL ledger needs psycopg2: pip install 'oaiproxy[postgres]' (psycopg2-binary)"
            ) from None
        return psycopg2

    def connect_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "dsn": self.url,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": "oaiproxy",
        }
        if self.password is not None:
            kwargs["password"] = self.password.reveal().decode("utf-8")
        return (), kwargs

    def on_new_connection(self, connection: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        connection.commit()

    def convert(self, sql: str) -> str:
        # psycopg2's style; no SQL of ours holds a literal ? or %.
        return sql.replace("?", "%s")

    def lock_for_migration(self, cursor: Any) -> None:
        # A transaction-scoped advisory lock: released at commit.
        cursor.execute("SELECT pg_advisory_xact_lock(7316252)")

    def is_retryable(self, error: BaseException) -> bool:
        # Serialization failure, deadlock (as synapse's engine has them).
        return getattr(error, "pgcode", None) in ("40001", "40P01")

    def is_connection_closed(self, connection: Any) -> bool:
        return bool(getattr(connection, "closed", 0))


def create_engine(target: str, password: Optional[Secret] = None) -> Engine:
    """
    The engine for a C{--usage-db} value: a C{postgresql://} URL, or the
    path of a SQLite file.

    @raise ConfigError: for a URL of another kind, or one with a password.
    """
    if target.startswith(("postgresql://", "postgres://")):
        if urlsplit(target).password is not None:
            raise ConfigError(
                "the --usage-db URL must not hold the password (the command line shows in ps): put it in "
                "--usage-db-password-file or the systemd credential usage_db_password"
            )
        return PostgresEngine(target, password)
    if "://" in target:
        raise ConfigError(f"--usage-db must be a SQLite file path or a postgresql:// URL, not {target.split(':')[0]}:")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ConfigError(f"--usage-db {target}: the directory {directory} does not exist")
    return SqliteEngine(target)


def usage_db_target(given: Optional[str], environ: Mapping[str, str], mock_upstream: bool) -> Optional[str]:
    """
    Where the ledger is: C{--usage-db}, else C{OAIPROXY_USAGE_DB}, else
    C{$STATE_DIRECTORY/usage.sqlite3} under a systemd unit with
    C{StateDirectory=}, else for a C{--mock-upstream} run a file in the
    current directory; C{None} (the ledger off) otherwise, or when the
    value is C{off}.
    """
    value = given if given is not None else environ.get("OAIPROXY_USAGE_DB")
    if value is not None and value.strip():
        value = value.strip()
        return None if value.lower() in OFF else value
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return os.path.join(state, STATE_USAGE_DB)
    if mock_upstream:
        return os.path.abspath(MOCK_USAGE_DB)
    return None


def load_db_password(given: Optional[str], environ: Mapping[str, str]) -> Optional[Secret]:
    """
    The PostgreSQL password: C{--usage-db-password-file}, else the systemd
    credential C{usage_db_password}; C{None} for neither (libpq's own
    C{~/.pgpass} then applies).
    """
    path = given
    if not path:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        candidate = os.path.join(credentials, PASSWORD_CREDENTIAL) if credentials else None
        if candidate is None or not os.path.exists(candidate):
            return None
        path = candidate
    value = read_config_file(path, "usage database password file").strip()
    if not value:
        raise ConfigError(f"the usage database password file {path} is empty")
    return Secret(value)
