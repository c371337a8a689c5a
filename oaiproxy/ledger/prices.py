# -*- test-case-name: tests.ledger.test_prices -*-
"""
What tokens cost: the prices file (C{--prices-file}), TOML or JSON.

    taken = "2025-08-07"        # when the figures were copied (shown in warnings)

    [models."gpt-4o-mini"]
    input = 0.15                # USD per million prompt tokens
    cached_input = 0.075        # USD per million cached prompt tokens
    output = 0.60               # USD per million completion tokens

Reasoning tokens are output tokens (upstream counts them in
C{completion_tokens}); cached tokens are the part of the prompt that
upstream read from its cache.  C{cached_input} may be left out: cached
tokens are then charged at the C{input} price, which can over-count a
bill and never under-count it.

The proxy never guesses a price: a model is priced only by its exact name
(a dated snapshot such as C{gpt-4o-2024-08-06} is a different model with
its own price, so it needs its own entry).  A model without one has cost
"unknown" (L{PriceBook.cost} returns C{None}); the ledger counts its
requests as unpriced and its tokens in C{oaiproxy_unpriced_tokens_total}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from oaiproxy.config import ConfigError, read_config_file, read_document
from oaiproxy.observe.records import Usage

__all__ = ["Price", "PriceBook", "Prices", "load_prices", "parse_prices", "EMPTY"]

_FIELDS = ("input", "cached_input", "output")


@dataclass(frozen=True)
class Price:
    """
    One model's prices, in USD per million tokens.
    """

    input: float
    cached_input: float
    output: float

    def cost(self, usage: Usage) -> float:
        """
        The USD cost of C{usage}: uncached prompt at the input price, the
        cached part at the cached price, completion (reasoning included) at
        the output price.
        """
        cached = min(usage.cached, usage.prompt)
        uncached = usage.prompt - cached
        return (uncached * self.input + cached * self.cached_input + usage.completion * self.output) / 1e6


@dataclass(frozen=True)
class PriceBook:
    """
    Every priced model, by exact name.

    @ivar path: the file they came from (named in warnings), if any.
    @ivar taken: the date the file says its figures were taken, if it does.
    """

    models: Mapping[str, Price]
    path: Optional[str] = None
    taken: Optional[str] = None

    def price(self, model: Optional[str]) -> Optional[Price]:
        return None if model is None else self.models.get(model)

    def cost(self, model: Optional[str], usage: Usage) -> Optional[float]:
        """
        What C{usage} of C{model} cost; C{None} when the model has no price.
        """
        price = self.price(model)
        return None if price is None else price.cost(usage)


#: No prices file: every model is unpriced.
EMPTY = PriceBook({})


def _number(path: str, model: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{path}: models.{model}.{field} must be a number of USD per million tokens, 0 or more")
    return float(value)


def parse_prices(document: Mapping[str, Any], path: str) -> PriceBook:
    """
    A prices file's table, checked: every model needs C{input} and
    C{output}; an unknown key (a typo like C{ouput}) is refused rather
    than silently leaving a price out.
    """
    unknown = set(document) - {"models", "taken"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (expected [models.NAME] and taken)")
    taken = document.get("taken")
    if taken is not None and not isinstance(taken, str):
        taken = str(taken)  # a TOML date
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: models must be a table of [models.NAME] entries")
    prices = {}
    for model, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f'{path}: [models."{model}"] must be a table with input, output and cached_input')
        extra = set(entry) - set(_FIELDS)
        if extra:
            raise ConfigError(f"{path}: models.{model}: unknown key(s) {', '.join(sorted(extra))}")
        for field in ("input", "output"):
            if field not in entry:
                raise ConfigError(f"{path}: models.{model} has no {field} price (the proxy never guesses one)")
        input_price = _number(path, model, "input", entry["input"])
        cached = _number(path, model, "cached_input", entry.get("cached_input", input_price))
        prices[model] = Price(input_price, cached, _number(path, model, "output", entry["output"]))
    return PriceBook(prices, path, taken)


def load_prices(path: str) -> PriceBook:
    """
    Read and check the prices file at C{path}.

    @raise ConfigError: naming the file and what is wrong in it.
    """
    document = read_document(read_config_file(path, "prices file"), path, "[models.NAME] tables")
    return parse_prices(document, path)


class Prices:
    """
    The prices in use, which a reload replaces (SIGHUP, like the clients
    file): a file that cannot be read keeps the old ones.
    """

    def __init__(self, book: PriceBook = EMPTY) -> None:
        self.book = book

    def reload(self) -> PriceBook:
        """
        Read the file again.

        @raise ConfigError: the file is wrong; the prices stay as they were.
        """
        if self.book.path is not None:
            self.book = load_prices(self.book.path)
        return self.book
