"""
What sharing the breakers through Redis costs, and how fast an opening
spreads (issue 14), against a real local redis-server (loopback).

1. The hot path: one attempt (L{Pool.choose} then L{Pool.finish} with a
   200) through a pool of three closed upstreams, with and without the
   shared breakers joined; p50 and p99 per attempt.  No Redis call is made
   on this path; the figure shows it.
2. Redis's load: calls per second one process makes while nothing
   happens (the reads: one per upstream per interval).
3. Spreading: two "processes" (two pools, each with its own link and
   shared breakers, in this process); process one opens an upstream,
   and the time until process two holds it open is measured, (a) with no
   traffic at two (it learns at its next read: up to the interval), and
   (b) when two's next request fails there (it asks at once: one round
   trip).  Trials are spread at random over the read interval.

    PYTHONPATH=. python bench/shared_breakers.py [--trials 20]
    PYTHONPATH=. python bench/shared_breakers.py --smoke

Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from twisted.internet import defer, reactor, task

from oaiproxy.config import Secret
from oaiproxy.fake.processes import RedisServer
from oaiproxy.sharedstate.link import KeySpace, RedisLink, RedisTarget, redis_connector
from oaiproxy.upstream.breaker import State
from oaiproxy.upstream.pool import Choice, Kind, Outcome, Pool, Upstream
from oaiproxy.upstream.shared import SharedBreakers

OK = Outcome(Kind.ANSWERED, 200)
FAILED = Outcome(Kind.ANSWERED, 500)
NAMES = ("a", "b", "c")


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def process(port: int, prefix: str, interval: float) -> Any:
    # A generous deadline: the timed loops hold the reactor for a while.
    link = RedisLink(redis_connector(reactor, RedisTarget("127.0.0.1", port)), reactor, keepalive=0, deadline=1.0)
    link.startService()
    while not link.up:
        yield pause(0.01)
    group = SharedBreakers(link, reactor, KeySpace(prefix), interval=interval)
    pool = Pool([Upstream(n, f"https://{n}.example", Secret(b"k")) for n in NAMES], reactor, group=group)
    return link, group, pool


@defer.inlineCallbacks
def attempts(pool: Pool, count: int) -> Any:
    """
    C{count} attempts, in runs of 500 between which the reactor turns (as
    between requests), so the reads are answered meanwhile.
    """
    samples = []
    for start in range(0, count, 500):
        for _ in range(min(500, count - start)):
            started = time.perf_counter()
            choice = pool.choose(None)
            assert isinstance(choice, Choice)
            pool.finish(choice, OK)
            samples.append(time.perf_counter() - started)
        yield pause(0)
    return percentiles(samples)


def open_a(pool: Pool) -> None:
    for _ in range(5):
        choice = pool.choose(None, exclude=("b", "c"))
        assert isinstance(choice, Choice)
        pool.finish(choice, FAILED)
    assert pool["a"].breaker.state is State.OPEN


@defer.inlineCallbacks
def spreading(port: int, trials: int, interval: float, fail_at_two: bool) -> Any:
    delays = []
    for trial in range(trials):
        prefix = f"bench{int(fail_at_two)}-{trial}:"
        one = yield process(port, prefix, interval)
        two = yield process(port, prefix, interval)
        yield pause(random.random() * interval)
        open_a(one[2])
        started = time.perf_counter()
        if fail_at_two:
            choice = two[2].choose(None, exclude=("b", "c"))
            if isinstance(choice, Choice):
                two[2].finish(choice, FAILED)
        while two[2]["a"].breaker.state is State.CLOSED:
            yield pause(0.0005)
        delays.append(time.perf_counter() - started)
        for link, group, _ in (one, two):
            group.stop()
            link.stopService()
    return percentiles(delays), max(delays)


@defer.inlineCallbacks
def main(trials: int, count: int, interval: float) -> Any:
    server = RedisServer().start()
    try:
        link, group, shared = yield process(server.port, "bench:", interval)
        alone = Pool([Upstream(n, f"https://{n}.example", Secret(b"k")) for n in NAMES], reactor)
        for _ in range(3):
            yield attempts(alone, count)
            yield attempts(shared, count)
        base = yield attempts(alone, count)
        with_group = yield attempts(shared, count)
        assert link.up, "the link went down during the timed runs"
        print(f"(1) one attempt, {count} in a row, three closed upstreams:")
        print(f"    alone       p50 {base[0] * 1e6:.2f} us  p99 {base[1] * 1e6:.2f} us")
        print(f"    shared      p50 {with_group[0] * 1e6:.2f} us  p99 {with_group[1] * 1e6:.2f} us")
        before = int((yield server_calls(server.port)))
        yield pause(5 * interval)
        after = int((yield server_calls(server.port)))
        print(f"(2) calls to Redis per second, idle, one process: {(after - before) / (5 * interval):.1f}")
        group.stop()
        link.stopService()
        for fail_at_two, words in ((False, "no traffic at two"), (True, "two's next request fails there")):
            (p50, p99), worst = yield spreading(server.port, trials, interval, fail_at_two)
            print(f"(3) opened at one, held open at two, {words}, {trials} trials:")
            print(f"    p50 {p50 * 1000:.1f} ms  p99 {p99 * 1000:.1f} ms  max {worst * 1000:.1f} ms")
    finally:
        server.remove()


@defer.inlineCallbacks
def server_calls(port: int) -> Any:
    """
    The EVALSHA calls Redis has served (INFO commandstats), read on a
    connection of its own.
    """
    protocol = yield redis_connector(reactor, RedisTarget("127.0.0.1", port))()
    info = yield protocol.execute_command("INFO", "commandstats")
    protocol.transport.loseConnection()
    for line in str(info).splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--attempts", type=int, default=20000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 2 trials, a 0.2 s interval")
    options = parser.parse_args()
    if options.smoke:
        options.trials, options.attempts, options.interval = 2, 2000, 0.2
    failures: list[Any] = []
    d = main(options.trials, options.attempts, options.interval)
    d.addErrback(failures.append).addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        failures[0].raiseException()
