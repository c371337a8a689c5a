"""
Added latency of admission through the shared store (a real local
redis-server, loopback) against the in-process limiter: p50 and p99 of one
admit (one round trip), sequential, then of an admit under 32 concurrent.

    python bench/shared_limits.py [--admits 5000]

(PYTHONPATH=. from a checkout.)  Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

from twisted.internet import defer, reactor, task

from oaiproxy.access.clients import Client, Limits
from oaiproxy.access.limits import Limiter, LocalLimitStore
from oaiproxy.access.shared import SharedLimitStore
from oaiproxy.fake.processes import RedisServer
from oaiproxy.sharedstate.link import KeySpace, RedisLink, RedisTarget, redis_connector


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2] * 1000, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000


@defer.inlineCallbacks
def measure(store, admits: int, concurrency: int):
    client = Client(
        "bench", b"", limits=Limits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent_requests=10**6)
    )
    samples: list[float] = []

    @defer.inlineCallbacks
    def one():
        started = time.perf_counter()
        held = yield store.admit(client, 100)
        samples.append(time.perf_counter() - started)
        held.settle(50)

    for _ in range(admits // concurrency):
        yield defer.gatherResults([one() for _ in range(concurrency)])
    return percentiles(samples)


@defer.inlineCallbacks
def main(admits: int):
    server = RedisServer().start()
    try:
        link = RedisLink(
            redis_connector(reactor, RedisTarget("127.0.0.1", server.port)),
            reactor,
            keepalive=0,
            deadline=float(os.environ.get("DEADLINE", "0.05")),
        )
        link.startService()
        while not link.up:
            yield task.deferLater(reactor, 0.01, lambda: None)
        shared = SharedLimitStore(link, reactor, KeySpace("bench:"))
        local = LocalLimitStore(Limiter(reactor))
        for concurrency in (1, 32):
            lp50, lp99 = yield measure(local, admits, concurrency)
            before = shared.fallback_admitted
            sp50, sp99 = yield measure(shared, admits, concurrency)
            while not link.up:
                yield task.deferLater(reactor, 0.01, lambda: None)
            if shared.fallback_admitted != before:
                print(f"  ({shared.fallback_admitted - before} of them admitted in fallback)")
            print(
                f"concurrency {concurrency:>2}: in-process p50 {lp50:.3f} ms p99 {lp99:.3f} ms; "
                f"redis p50 {sp50:.3f} ms p99 {sp99:.3f} ms; added p50 +{sp50 - lp50:.3f} ms"
            )
        # On a loaded machine a call can miss the 50 ms deadline: say so.
        print(f"admitted in fallback: {shared.fallback_admitted}, episodes: {link.episodes}")
        link.stopService()
    finally:
        server.remove()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--admits", type=int, default=5000)
    options = parser.parse_args()
    task.react(lambda _: main(options.admits))
