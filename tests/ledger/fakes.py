"""
A threadless ledger pool for tests on a L{Clock}, the way synapse's
C{make_fake_db_pool} does it: the adbapi pool is real (a real SQLite file
in a temporary directory), but its "thread" runs each job on the clock's
next turn (C{advance(0)}), in the test's own thread; a test can hold the
jobs (a slow database) or make them fail (a database that is down).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from oaiproxy.ledger.database import LedgerPool
from oaiproxy.ledger.engines import SqliteEngine
from oaiproxy.ledger.schema import prepare
from oaiproxy.ledger.writer import LedgerWriter


class ThreadlessReactor(Clock):
    """
    A Clock that adbapi and C{deferToThreadPool} accept as a reactor.
    """

    def callWhenRunning(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        return None

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, *args: Any, **kwargs: Any) -> None:
        return None

    def removeSystemEventTrigger(self, *args: Any) -> None:
        pass


class Threadless:
    """
    The pool's thread: jobs run on the clock, unless held; with C{error}
    set, each job fails with it instead of running.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.held = False
        self.error: Optional[BaseException] = None
        self.queued: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.jobs = 0

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:  # noqa: E501
        self.queued.append((on_result, f, a, kw))
        self.clock.callLater(0, self._run)

    def _run(self) -> None:
        while self.queued and not self.held:
            on_result, f, a, kw = self.queued.pop(0)
            self.jobs += 1
            if self.error is not None:
                on_result(False, Failure(self.error))
                continue
            try:
                result = f(*a, **kw)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)

    def release(self) -> None:
        self.held = False
        self._run()

    def stop(self) -> None:
        pass


def sqlite_ledger(directory: str, name: str = "usage.sqlite3") -> SqliteEngine:
    """
    A fresh SQLite ledger file, migrated.
    """
    engine = SqliteEngine(os.path.join(directory, name))
    connection = engine.connect()
    prepare(engine, connection)
    connection.close()
    return engine


def threadless_writer(
    directory: str, **kwargs: Any
) -> tuple[LedgerWriter, ThreadlessReactor, Threadless, CollectorRegistry, SqliteEngine]:
    """
    A writer over a real, migrated SQLite file, on a clock, threadless.
    """
    engine = sqlite_ledger(directory)
    reactor = ThreadlessReactor()
    adbapi_pool = engine.make_pool(reactor)
    thread = Threadless(reactor)
    adbapi_pool.threadpool = thread  # type: ignore[assignment]
    registry = CollectorRegistry()
    writer = LedgerWriter(LedgerPool(engine, reactor, adbapi_pool), reactor, registry, **kwargs)
    return writer, reactor, thread, registry, engine


def read_rows(engine: SqliteEngine) -> list[tuple[Any, ...]]:
    """
    What the file holds, read with a connection of its own.
    """
    connection = engine.connect()
    try:
        return [
            tuple(r)
            for r in connection.execute(
                "SELECT day, client, model, upstream, requests, errors, estimated, prompt_tokens, completion_tokens, "
                "cached_tokens, reasoning_tokens, cost_usd, unpriced FROM usage_daily ORDER BY day, client, model"
            )
        ]
    finally:
        connection.close()
