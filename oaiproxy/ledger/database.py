# -*- test-case-name: tests.ledger.test_writer -*-
"""
Named transactions on the ledger's database, through one
L{twisted.enterprise.adbapi.ConnectionPool} (synapse's C{DatabasePool},
small).

A transaction is a function of a cursor, run in the pool's one thread; it
may run more than once (a busy SQLite file, a PostgreSQL serialization
failure are retried at once, up to L{MAX_ATTEMPTS}), so it must have no
side effect but its SQL: the caller acts on the result, back in the
reactor.

The connection is the pool's (C{connect}/C{disconnect}, which adbapi
provides for its threads); commit, rollback and reconnection are done here
rather than by adbapi's C{runInteraction}, whose reconnection logs a
traceback at every failed attempt: while the database is down the writer
tries every second, and says so once (L{oaiproxy.ledger.writer}).  A
connection whose rollback fails, or that the engine sees closed, is
dropped; the next transaction connects again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred

from oaiproxy.ledger.engines import Engine

__all__ = ["LedgerPool", "MAX_ATTEMPTS"]

#: Attempts of a transaction that fails in a way worth retrying.
MAX_ATTEMPTS = 3

T = TypeVar("T")


class LedgerPool:
    """
    The ledger's connection pool.

    @param pool: the adbapi pool (by default the engine's, one thread).
    @param reactor: where results are delivered.
    """

    def __init__(self, engine: Engine, reactor: Any, pool: Optional[adbapi.ConnectionPool] = None) -> None:
        self.engine = engine
        self._reactor = reactor
        self._pool = pool if pool is not None else engine.make_pool(reactor)

    def run(self, desc: str, transaction: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Run C{transaction(cursor, *args)} in the pool's thread, committed;
        the Deferred fires with its result, or fails with the last error.

        @param desc: what it is, for errors.
        """
        return threads.deferToThreadPool(self._reactor, self._pool.threadpool, self._in_thread, desc, transaction, args)

    def _in_thread(self, desc: str, transaction: Callable[..., T], args: tuple[Any, ...]) -> T:
        engine = self.engine
        connection = self._pool.connect()
        attempt = 1
        while True:
            cursor = connection.cursor()
            try:
                engine.begin(cursor)
                result = transaction(cursor, *args)
                cursor.close()
                connection.commit()
                return result
            except Exception as error:
                if not self._rolled_back(connection) or engine.is_connection_closed(connection):
                    self._pool.disconnect(connection)
                    raise
                if attempt >= MAX_ATTEMPTS or not engine.is_retryable(error):
                    raise
                attempt += 1

    @staticmethod
    def _rolled_back(connection: Any) -> bool:
        try:
            connection.rollback()
        except Exception:
            return False
        return True

    def close(self) -> None:
        """
        Close the connection and stop the thread.
        """
        self._pool.close()
