"""
What the dashboard's live figures cost the request path: CPU per plain
request through the whole proxy (the in-memory harness: site, admission,
exchange, the fake upstream, the access log chain with the refusals'
check) with the dashboard's sampler ticking as often as it would at that
rate (every 5 s), against the same with the sampler off; and what one tick
costs on its own, with few series and with many.

    python bench/dashboard.py [--requests 3000] [--runs 5]

(PYTHONPATH=. from a checkout.)  Each figure is the median of the runs,
on and off interleaved so that the machine's drift hits both alike.
Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import treq

from oaiproxy.fake.harness import Harness, chat_body

KEY = b"bench-client-key-0123456789"


def one_request(h: Harness) -> None:
    d = h.post(chat_body(), headers={b"authorization": [b"Bearer " + KEY]})
    box: list[Any] = []
    d.addCallback(treq.content).addBoth(box.append)
    h.pump()
    if not box or isinstance(box[0], Exception):
        raise RuntimeError(f"request failed: {box}")


def cpu_per_request(h: Harness, requests: int, tick_every: int) -> float:
    """
    CPU seconds per request over C{requests}, the sampler ticking every
    C{tick_every} requests (0: never).
    """
    dashboard = h.built.dashboard
    assert dashboard is not None
    started = time.process_time()
    for i in range(requests):
        one_request(h)
        if tick_every and i % tick_every == 0:
            h.clock.advance(dashboard.interval)
            dashboard.tick()
    return (time.process_time() - started) / requests


def tick_cost(h: Harness, ticks: int = 200) -> float:
    dashboard = h.built.dashboard
    assert dashboard is not None
    started = time.process_time()
    for _ in range(ticks):
        h.clock.advance(dashboard.interval)
        dashboard.tick()
    return (time.process_time() - started) / ticks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1500.0, help="requests/s the tick interval is scaled to")
    args = parser.parse_args()
    h = Harness(client_keys=[KEY])
    for _ in range(500):
        one_request(h)  # warm up
    every = int(args.rate * h.built.dashboard.interval)  # type: ignore[union-attr]
    on: list[float] = []
    off: list[float] = []
    for run in range(args.runs):
        # Alternate which goes first, so that a drift in the machine's
        # load does not favour one.
        for ticking in (False, True) if run % 2 else (True, False):
            (on if ticking else off).append(cpu_per_request(h, args.requests, every if ticking else 0))
    few = tick_cost(h)
    # Many series: 50 clients x 10 models x 3 status classes of requests.
    metrics = h.metrics
    for c in range(50):
        for m in range(10):
            for status in ("2xx", "4xx", "5xx"):
                metrics.requests.labels(f"client-{c}", f"model-{m}", "chat_completions", status).inc()
    many = tick_cost(h)
    refusals = h.built.dashboard.refusals  # type: ignore[union-attr]
    record = h.records[-1]
    started = time.perf_counter()
    for _ in range(100_000):
        refusals(record)
    check = (time.perf_counter() - started) / 100_000
    print(f"sampler off: {statistics.median(off) * 1e6:.1f} us CPU per request (runs: {[round(x * 1e6) for x in off]})")
    print(
        f"sampler on (a tick every {every} requests, i.e. every 5 s at {args.rate:g}/s): "
        f"{statistics.median(on) * 1e6:.1f} us CPU per request (runs: {[round(x * 1e6) for x in on]})"
    )
    print(f"one tick: {few * 1e3:.2f} ms (few series), {many * 1e3:.2f} ms (1,500 request series)")
    print(f"the refusals' check on a request answered 200: {check * 1e9:.0f} ns")
    print(f"share of a core at one tick per 5 s: {few / 5 * 100:.3f}% / {many / 5 * 100:.3f}%")


if __name__ == "__main__":
    main()
