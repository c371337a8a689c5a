"""
Tests for L{oaiproxy.ledger.prices}: the prices file, checked; the cost of
a usage; the shipped example; a reload that keeps the old prices when the
new file is wrong.
"""

from __future__ import annotations

import os

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError
from oaiproxy.ledger.prices import Price, Prices, load_prices, parse_prices
from oaiproxy.ledger.startup import reload_prices
from oaiproxy.observe.records import Usage
from tests.support import temp_dir

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                       "prices.example.toml")  # fmt: skip


def write(directory: str, text: str, name: str = "prices.toml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class PricesTests(SynchronousTestCase):
    def test_cost(self) -> None:
        """
        Uncached prompt at the input price, cached prompt at the cached
        price, completion (reasoning inside it) at the output price.
        """
        price = Price(input=2.0, cached_input=0.5, output=8.0)
        usage = Usage(prompt=1_000_000, completion=500_000, reasoning=400_000, cached=250_000)
        self.assertAlmostEqual(price.cost(usage), 0.75 * 2.0 + 0.25 * 0.5 + 0.5 * 8.0)

    def test_file(self) -> None:
        """
        A TOML file's models, their prices, the date they were taken; a
        model left without cached_input pays the input price for it.
        """
        path = write(
            temp_dir(self),
            'taken = "2026-12-03"\n[models."a"]\ninput = 1\ncached_input = 0.5\noutput = 4\n'
            '[models."b"]\ninput = 3\noutput = 6\n',
        )
        book = load_prices(path)
        self.assertEqual(book.taken, "2026-12-03")
        self.assertEqual(book.models["a"], Price(1.0, 0.5, 4.0))
        self.assertEqual(book.models["b"], Price(3.0, 3.0, 6.0))
        self.assertIsNone(book.cost("gpt-4o-2024-08-06", Usage(prompt=1)))

    def test_refused(self) -> None:
        """
        A missing price, a typo, a negative or non-numeric price are
        refused with the file and the entry named, never guessed.
        """
        cases = {
            '[models."a"]\ninput = 1\n': "no output price",
            '[models."a"]\ninput = 1\nouput = 2\noutput = 2\n': "ouput",
            '[models."a"]\ninput = -1\noutput = 2\n': "models.a.input",
            '[models."a"]\ninput = "cheap"\noutput = 2\n': "models.a.input",
            'currency = "EUR"\n': "currency",
            "[models]\na = 3\n": "must be a table",
        }
        for text, words in cases.items():
            error = self.assertRaises(ConfigError, parse_prices, __import__("tomllib").loads(text), "p.toml")
            self.assertIn(words, str(error), text)
            self.assertIn("p.toml", str(error))

    def test_example_file(self) -> None:
        """
        The shipped example parses, says when its figures were taken and
        warns to check them.
        """
        book = load_prices(EXAMPLE)
        self.assertIn("gpt-4o-mini", book.models)
        self.assertRegex(book.taken or "", r"^\d{4}-\d{2}-\d{2}$")
        with open(EXAMPLE, encoding="utf-8") as f:
            self.assertIn("CHECK EVERY FIGURE", f.read())

    def test_reload(self) -> None:
        """
        A reload reads the file again; a broken file keeps the prices in
        use and says why.
        """
        directory = temp_dir(self)
        path = write(directory, '[models."a"]\ninput = 1\noutput = 2\n')
        prices = Prices(load_prices(path))
        write(directory, '[models."a"]\ninput = 5\noutput = 2\n')
        self.assertTrue(reload_prices(prices))
        self.assertEqual(prices.book.models["a"].input, 5.0)
        write(directory, '[models."a"]\ninput = 5\n')
        with capturedLogs() as events:
            self.assertFalse(reload_prices(prices))
        self.assertEqual(prices.book.models["a"].input, 5.0)
        self.assertIn("keeping the prices", events[0]["log_format"])
