# -*- test-case-name: tests.ledger.test_writer -*-
"""
From a finished request's record to the ledger's totals and the spend
metrics: the site hands every record to L{UsageRecorder} (beside the
access log), which only reads it.

Counted: every request that was sent upstream (C{attempts} > 0), whatever
its end; a request the proxy answered itself (refused key, limit,
validation) cost nothing and is in the metrics and the access log only.
An error is an answer of 400 or more, or one cut off (upstream failed, or
shutdown); a client that left early is not one, and is charged what it
was streamed.  The model is the one the client asked for; a name upstream
never accepted is recorded as C{other}, so junk names cannot grow the
ledger a row each.
"""

from __future__ import annotations

import re
import time
from typing import Any, Optional

from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oaiproxy.ledger.prices import Prices
from oaiproxy.ledger.writer import Key, LedgerWriter
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord

__all__ = ["UsageRecorder", "day_of", "MODEL_LIMIT"]

log = Logger(namespace="oaiproxy.ledger")

#: Distinct accepted model names the ledger keeps apart (past it: C{other}).
MODEL_LIMIT = 10_000
_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")


def day_of(seconds: float) -> str:
    """
    The UTC day of a time, C{YYYY-MM-DD}.
    """
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


class _Day:
    """
    L{day_of}, formatted once a day rather than once a request.
    """

    def __init__(self) -> None:
        self._number = -1
        self._text = ""

    def __call__(self, seconds: float) -> str:
        number = int(seconds // 86400)
        if number != self._number:
            self._number, self._text = number, day_of(seconds)
        return self._text


class UsageRecorder:
    """
    Reads each finished record into the spend metrics and, when there is
    a ledger, into its writer.

    @param prices: the prices in use (reloaded in place on SIGHUP).
    @param writer: the ledger's writer; C{None} when the ledger is off
        (the cost metrics still count).
    """

    def __init__(
        self, clock: IReactorTime, metrics: Metrics, prices: Prices, writer: Optional[LedgerWriter] = None
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self.prices = prices
        self.writer = writer
        self._models: set[str] = set()
        self._warned: set[str] = set()
        self._day = _Day()
        self.cost = Counter(
            "oaiproxy_cost_usd",
            "Spend in USD at the prices file's prices, by client and model (unpriced models are not in it: see "
            "oaiproxy_unpriced_tokens_total).",
            ["client", "model"],
            registry=metrics.series_registry,
        )
        self.unpriced = Counter(
            "oaiproxy_unpriced_tokens",
            "Tokens of models the prices file has no price for: their cost is unknown.",
            ["model"],
            registry=metrics.series_registry,
        )

    def __call__(self, record: RequestRecord) -> None:
        if record.attempts <= 0:
            return
        usage = record.usage
        model = self._model(record)
        cost: Optional[float] = 0.0
        if usage is not None and (usage.prompt or usage.completion):
            cost = self.prices.book.cost(record.model, usage)
            label = self._metrics.model_label(record.model, claim=False)
            if cost is None:
                self.unpriced.labels(label).inc(usage.prompt + usage.completion)
                self._warn_unpriced(model)
            elif cost:
                self.cost.labels(record.client, label).inc(cost)
        if self.writer is None:
            return
        errors = 1 if record.status >= 400 or record.ended in ("cut_off", "shutdown") else 0
        totals: list[Any] = [
            1,
            errors,
            1 if usage is not None and not usage.exact else 0,
            usage.prompt if usage else 0,
            usage.completion if usage else 0,
            usage.cached if usage else 0,
            usage.reasoning if usage else 0,
            cost or 0.0,
            1 if cost is None else 0,
        ]
        key: Key = (self._day(self._clock.seconds()), record.client, model, record.upstream or "-")
        self.writer.add(key, totals)

    def _model(self, record: RequestRecord) -> str:
        """
        The ledger's model name: the requested one once upstream has
        accepted it (answered below 400, or reported usage); C{other}
        for a name it never accepted or that is not a model name.
        """
        model = record.model
        if not model:
            return "-"
        if model in self._models:
            return model
        accepted = record.usage is not None or (record.upstream_status is not None and record.upstream_status < 400)
        if accepted and _MODEL_NAME.match(model) and len(self._models) < MODEL_LIMIT:
            self._models.add(model)
            return model
        return "other"

    def _warn_unpriced(self, model: str) -> None:
        book = self.prices.book
        if book.path is None or model in self._warned:
            return
        self._warned.add(model)
        log.warn(
            "no price for model {model} in the prices file {path}: its cost is unknown (its tokens are counted "
            "in oaiproxy_unpriced_tokens_total; add it to the file and reload)",
            model=model,
            path=book.path,
        )
