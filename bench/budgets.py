"""
What enforcing budgets adds to a request's CPU, measured in process (the
machine's load moves whole-daemon rates by more than this costs, so the
stable figure is the admission step itself): a client's budget
reservation and its settlement, with four budgets (tokens and dollars, per
day and month) and with none, on the store the daemon uses without
C{--shared-state}.

    PYTHONPATH=. python bench/budgets.py            # a few seconds
    PYTHONPATH=. python bench/budgets.py --smoke    # CI: the script works
"""

from __future__ import annotations

import argparse
import statistics
import time

from twisted.internet.task import Clock

from oaiproxy.access.budgetstore import BudgetHold, BudgetStore
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.ledger.prices import Price, PriceBook, Prices

NOW = 1796299200.0  # 2026-12-03 12:00 UTC
FOUR = Budgets(tokens_per_day=10**12, tokens_per_month=10**12, usd_per_day=1e9, usd_per_month=1e9)


def per_request(client: Client, count: int) -> float:
    """
    Microseconds of CPU for one admission's reservation plus its
    settlement, over C{count} of them.
    """
    clock = Clock()
    clock.advance(NOW)
    store = BudgetStore(clock, Prices(PriceBook({"gpt-4o-mini": Price(0.15, 0.075, 0.60)}, "prices.toml")))
    start = time.process_time()
    for _ in range(count):
        hold = store.admit(client, "gpt-4o-mini", 20, 120)
        if isinstance(hold, BudgetHold):
            hold.settle(60)
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.count, args.rounds = 1000, 1
    four = Client("bench", b"\0" * 32, budgets=FOUR)
    none = Client("bench", b"\0" * 32)
    figures = {
        name: statistics.median(per_request(client, args.count) for _ in range(args.rounds))
        for name, client in (("four budgets", four), ("no budget", none))
    }
    print(f"{args.rounds} round(s) of {args.count:,} admissions; median CPU per request")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} µs |")


if __name__ == "__main__":
    main()
