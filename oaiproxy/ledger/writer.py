# -*- test-case-name: tests.ledger.test_writer -*-
"""
The ledger's writer: finished requests' totals added up in memory, by
(UTC day, client, model, upstream), and written in one short transaction
every L{FLUSH_SECONDS} or every L{BATCH_RECORDS} records, whichever comes
first, in the pool's one thread.

Nothing here ever delays a request.  L{LedgerWriter.add} only adds to a
dictionary; one flush is in flight at a time, and while it is (a slow
database) records keep adding up beside it.  The buffer is bounded by
rows, not records (L{MAX_ROWS}): a row holds any number of requests, so
memory grows only with new (day, client, model, upstream) combinations.

When a flush fails (the database stopped, locked, full), its totals go
back into the buffer and the next tick tries again: an outage loses
nothing as long as the process lives and the buffer has room.  What finds
no room is dropped and counted (C{oaiproxy_ledger_dropped_records_total});
the outage is logged once when it starts and once when writing works
again, with what was held and what was lost; C{oaiproxy_ledger_up} says
which state it is in and C{oaiproxy_ledger_pending_records} how much is
held (set once a second).  At shutdown the writer flushes what it holds (for at most
L{STOP_SECONDS}); a crash loses at most the records since the last
flush.

A flush that fails after the database committed it (the connection lost
between commit and its answer) is written again: the ledger errs towards
counting twice, never towards losing spend.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.ledger.database import LedgerPool
from oaiproxy.ledger.queries import Row, add_totals, select_rows

__all__ = ["LedgerWriter", "Key", "FLUSH_SECONDS", "BATCH_RECORDS", "MAX_ROWS", "STOP_SECONDS"]

log = Logger(namespace="oaiproxy.ledger")

#: A row's key: (UTC day, client, model, upstream).
Key = tuple[str, str, str, str]

FLUSH_SECONDS = 1.0
BATCH_RECORDS = 1000
MAX_ROWS = 10_000
STOP_SECONDS = 10.0


class LedgerWriter(Service):
    """
    Adds up records' totals and writes them through C{pool}.

    @param registry: where the ledger's own metrics go (the proxy's).
    @param wait: what a stop waits for before its last flush (the daemon's
        drain, so that requests finishing during it are written too).
    """

    def __init__(
        self,
        pool: LedgerPool,
        clock: IReactorTime,
        registry: Optional[CollectorRegistry],
        interval: float = FLUSH_SECONDS,
        batch: int = BATCH_RECORDS,
        max_rows: int = MAX_ROWS,
        stop_timeout: float = STOP_SECONDS,
        wait: Optional[Callable[[], "Deferred[None]"]] = None,
    ) -> None:
        self.pool = pool
        self._wait = wait
        self._clock = clock
        self._interval = interval
        self._batch = batch
        self._max_rows = max_rows
        self._stop_timeout = stop_timeout
        self._pending: dict[Key, list[Any]] = {}
        # The batch being written: not in the database until it commits.
        self._writing: dict[Key, list[Any]] = {}
        self._records = 0
        self._in_flight = 0
        self._flushing = False
        self._waiters: list[Deferred[bool]] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        # The outage in progress: since when, what it held, what it lost.
        self._down_since: Optional[float] = None
        self._dropped_in_episode = 0
        self.up = Gauge(
            "oaiproxy_ledger_up",
            "1 while the usage ledger's last write succeeded, 0 while it cannot write.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.up.set(1)
        self.pending = Gauge(
            "oaiproxy_ledger_pending_records",
            "Finished requests held in memory, not yet written to the usage ledger.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.written = Counter(
            "oaiproxy_ledger_written_records", "Finished requests written to the usage ledger.", registry=registry
        )
        self.failures = Counter(
            "oaiproxy_ledger_write_failures", "Usage ledger flushes that failed (retried).", registry=registry
        )
        self.dropped = Counter(
            "oaiproxy_ledger_dropped_records",
            "Finished requests the usage ledger lost: its buffer was full, or it could not write at shutdown.",
            registry=registry,
        )

    # Adding.

    def add(self, key: Key, totals: Sequence[Any]) -> None:
        """
        Add one record's totals (in L{COLUMNS} order) to its row.
        """
        if self._merge(key, totals):
            self._records += 1
            # In an outage only the clock retries: a request must not
            # become a connection attempt.
            if self._records >= self._batch and not self._flushing and self._down_since is None:
                self.flush()

    def _merge(self, key: Key, totals: Sequence[Any]) -> bool:
        row = self._pending.get(key)
        if row is None:
            if len(self._pending) >= self._max_rows:
                self._drop(totals[0])
                return False
            self._pending[key] = list(totals)
        else:
            for i, value in enumerate(totals):
                row[i] += value
        return True

    def _drop(self, records: int) -> None:
        if records <= 0:
            return
        if not self._dropped_in_episode:
            log.error(
                "usage ledger: buffer full ({rows} rows waiting for {db}): dropping records, counted in "
                "oaiproxy_ledger_dropped_records_total",
                rows=len(self._pending),
                db=self.pool.engine.describe(),
            )
        self._dropped_in_episode += records
        self.dropped.inc(records)

    def pending_rows(self) -> dict[Key, tuple[Any, ...]]:
        """
        What is held and not yet written, by row (for readers that add it
        to what the database says: budgets, C{/usage}): the buffer and the
        batch of the flush in flight.  The pool has one thread, so a read
        queued on it sees the database before or after a flush, and this,
        taken when the read's answer is back, is exactly what it missed.
        """
        rows = {key: list(row) for key, row in self._writing.items()}
        for key, row in self._pending.items():
            held = rows.get(key)
            if held is None:
                rows[key] = list(row)
            else:
                for i, value in enumerate(row):
                    held[i] += value
        return {key: tuple(row) for key, row in rows.items()}

    @property
    def held(self) -> int:
        """
        Records not yet written: held in memory, or in the flush in flight.
        """
        return self._records + self._in_flight

    # Flushing.

    def _tick(self) -> None:
        # The gauge is set once a tick, not per record: a request pays for
        # no metric lock here.
        self.pending.set(self.held)
        self.flush()

    def flush(self) -> "Deferred[bool]":
        """
        Write what is held, unless a flush is already in flight; the
        Deferred fires C{True} once it is written (or there was nothing
        to write), C{False} if it failed (the totals are held again).  It
        never fails.
        """
        if self._flushing:
            return self._when_done()
        if not self._pending:
            return succeed(True)
        batch, self._pending = self._pending, {}
        self._writing = batch
        count, self._records = self._records, 0
        self._in_flight = count
        self._flushing = True
        done = self._when_done()
        rows = [key + tuple(totals) for key, totals in batch.items()]
        d = self.pool.run("ledger_add_totals", add_totals, self.pool.engine, rows)
        d.addCallbacks(self._written, self._failed, callbackArgs=(count,), errbackArgs=(batch, count))
        return done

    def _when_done(self) -> "Deferred[bool]":
        waiter: Deferred[bool] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _finished(self, ok: bool) -> None:
        self._flushing = False
        self._writing = {}
        self._in_flight = 0
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(ok)

    def _written(self, _: object, count: int) -> None:
        self.written.inc(count)
        self._in_flight = 0
        self.pending.set(self.held)
        if self._down_since is not None:
            log.info(
                "usage ledger: writing to {db} again after {seconds:.0f}s; the records held meanwhile are "
                "written, {dropped} dropped",
                db=self.pool.engine.describe(),
                seconds=self._clock.seconds() - self._down_since,
                dropped=self._dropped_in_episode,
            )
            self._down_since = None
        self._dropped_in_episode = 0
        self.up.set(1)
        self._finished(True)

    def _failed(self, failure: Failure, batch: dict[Key, list[Any]], count: int) -> None:
        self.failures.inc()
        self.up.set(0)
        if self._down_since is None:
            self._down_since = self._clock.seconds()
            log.error(
                "usage ledger: cannot write to {db} ({why}); holding the totals in memory (at most {rows} rows) "
                "and retrying every {interval:g}s; requests are not affected",
                db=self.pool.engine.describe(),
                why=_why(failure),
                rows=self._max_rows,
                interval=self._interval,
            )
        held = 0
        for key, totals in batch.items():
            if self._merge(key, totals):
                held += totals[0]
        self._records += held
        self._in_flight = 0
        self.pending.set(self.held)
        self._finished(False)

    # The service.

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        waited = self._wait() if self._wait is not None else succeed(None)
        stopped: Deferred[None] = Deferred()

        def last_flush(_: object) -> "Deferred[None]":
            done: Deferred[None] = Deferred()
            self._drain(3, done)
            done.addTimeout(self._stop_timeout, self._clock)
            return done

        waited.addCallback(last_flush).addBoth(self._stopped).chainDeferred(stopped)
        return stopped

    def _drain(self, tries: int, done: "Deferred[None]") -> None:
        """
        Flush until nothing is held, a flush fails, or C{tries} flushes.
        """

        def next_step(ok: bool) -> None:
            if done.called:
                return
            if not ok or not self._pending or tries <= 1:
                done.callback(None)
            else:
                self._drain(tries - 1, done)

        self.flush().addCallback(next_step)

    def _stopped(self, result: object) -> None:
        if isinstance(result, Failure) and not result.check(TimeoutError, CancelledError):
            log.failure("usage ledger: stopping failed", result)
        lost = self._records + self._in_flight
        if lost:
            self.dropped.inc(lost)
            log.error(
                "usage ledger: {count} records could not be written to {db} at shutdown and are lost",
                count=lost,
                db=self.pool.engine.describe(),
            )
        self.pool.close()

    # Reading.

    def rows(self, first_day: str, last_day: str, client: Optional[str] = None) -> "Deferred[list[Row]]":
        """
        The rows the database holds for a period (what is still in memory
        is in L{pending_rows}).
        """
        return self.pool.run("ledger_select_rows", select_rows, self.pool.engine, first_day, last_day, client)


def _why(failure: Failure) -> str:
    """
    The error, in a line: its type and message (a driver's message names
    the file or host, never the password, which is not in the URL).
    """
    error = failure.value
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
