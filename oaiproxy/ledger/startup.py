# -*- test-case-name: tests.ledger.test_schema -*-
"""
Opening the ledger at startup: connect once, bring the schema up to date
(or, in a worker, check it), then hand the writer its pool.  Any failure
is a L{ConfigError}: the daemon does not start with a ledger it was told
to keep and cannot open, rather than run without recording spend.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from oaiproxy.config import ConfigError, Secret
from oaiproxy.ledger.database import LedgerPool
from oaiproxy.ledger.engines import create_engine
from oaiproxy.ledger.prices import Prices
from oaiproxy.ledger.queries import Spend, select_spend
from oaiproxy.ledger.schema import SchemaError, prepare
from oaiproxy.ledger.writer import LedgerWriter

__all__ = ["migrate", "open_writer", "read_spend", "reload_prices"]

log = Logger(namespace="oaiproxy.ledger")


def migrate(target: str, password: Optional[Secret], apply: bool = True) -> tuple[int, int]:
    """
    Bring the ledger at C{target} to this code's schema (C{apply} false:
    only check it is there); return the versions before and after.

    @raise ConfigError: the database cannot be reached or used.
    """
    engine = create_engine(target, password)
    module = engine.module()
    try:
        connection = engine.connect()
    except module.Error as e:
        raise ConfigError(f"cannot open the usage ledger {engine.describe()}: {_line(e)}") from None
    try:
        before, after = prepare(engine, connection, migrate=apply)
    except SchemaError:
        raise
    except module.Error as e:
        raise ConfigError(f"cannot prepare the usage ledger {engine.describe()}: {_line(e)}") from None
    finally:
        connection.close()
    if after != before:
        log.info(
            "usage ledger {db}: schema version {before} -> {after}", db=engine.describe(), before=before, after=after
        )
    return before, after


def open_writer(
    target: str,
    password: Optional[Secret],
    reactor: Any,
    registry: Optional[CollectorRegistry],
    apply: bool = True,
    wait: Optional[Callable[[], "Deferred[None]"]] = None,
) -> LedgerWriter:
    """
    The writer of the ledger at C{target}, its schema prepared (see
    L{migrate}).

    @param wait: what the writer's stop waits for before its last flush
        (the drain: requests finishing during it are recorded too).
    """
    migrate(target, password, apply)
    engine = create_engine(target, password)
    writer = LedgerWriter(LedgerPool(engine, reactor), reactor, registry, wait=wait)
    log.info("usage ledger: {db} ({engine})", db=engine.describe(), engine=engine.name)
    return writer


def read_spend(target: str, password: Optional[Secret], first_day: str, last_day: str) -> list[Spend]:
    """
    Every client's spend by day over a period, read once at startup on a
    connection of its own (before anything listens: the budgets are
    seeded before the first request).

    @raise ConfigError: the database cannot be read.
    """
    engine = create_engine(target, password)
    module = engine.module()
    try:
        connection = engine.connect()
        try:
            cursor = connection.cursor()
            rows = select_spend(cursor, engine, first_day, last_day)
            cursor.close()
        finally:
            connection.close()
    except module.Error as e:
        raise ConfigError(f"cannot read the usage ledger {engine.describe()}: {_line(e)}") from None
    return rows


def reload_prices(prices: Prices) -> bool:
    """
    Read the prices file again (SIGHUP); a file that cannot be used keeps
    the prices in use, and says why.
    """
    try:
        book = prices.reload()
    except ConfigError as e:
        log.error("reload failed, keeping the prices in use: {why}", why=str(e))
        return False
    if book.path is not None:
        log.info("reloaded the prices file: {count} model(s)", count=len(book.models))
    return True


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
