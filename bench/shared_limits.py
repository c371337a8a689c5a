"""
Added latency of admission through the shared store (a real local
redis-server, loopback) against the in-process limiter: p50 and p99 of one
admit (one round trip), sequential, then of an admit under 32 concurrent.
Then requests per second of the real daemon with C{--workers 2}, with
limits shared through that Redis against the same group without it (each
worker then holds its own split of every limit): wrk at 64 connections,
~1 KB requests, nginx as the upstream (as bench/run.py's scenario (a)).

    python bench/shared_limits.py [--admits 5000] [--seconds 10] [--deadline-ms 50]
    python bench/shared_limits.py --admits 200 --seconds 1 --rounds 1   # smoke run

(PYTHONPATH=. from a checkout.)  The second part needs wrk and nginx; it is
skipped, saying so, without them.  Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import urllib.request

from twisted.internet import defer, reactor, task, threads

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


def throughput(server: RedisServer, seconds: float, deadline_ms: float, rounds: int) -> None:
    """
    Requests per second of two workers, limits shared through C{server}
    or split among the workers.
    """
    # bench/ is this script's directory: bench/run.py's upstream and load.
    from run import ANSWER, CLIENT_KEY, NGINX_CONF, UPSTREAM_KEY, body, free_port, lua, wrk

    from oaiproxy.access.clients import file_entry
    from oaiproxy.fake.processes import Process, child_env, start_proxy

    if not (shutil.which("wrk") and shutil.which("nginx")):
        print("requests/s: skipped (needs wrk and nginx: apt-get install wrk nginx-light)")
        return
    work = tempfile.mkdtemp(prefix="oaiproxy-bench-")
    started: list[Process] = []
    try:
        port = free_port()
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(work=work, port=port, answer=ANSWER))
        started.append(Process(["nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work], child_env({}), work))
        key = CLIENT_KEY
        clients = os.path.join(work, "clients.toml")
        with open(clients, "w") as f:
            # Limits high enough never to refuse, so every request is
            # admitted through the store (no limits: no store at all).
            f.write("[defaults]\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000000\n")
            f.write("concurrent_requests = 100000\n" + file_entry("bench", key))
        script = lua(work, "small", body(1024))
        common = ["--upstream", f"http://127.0.0.1:{port}/v1", "--client-keys-file", clients, "--workers", "2"]
        common += ["--max-connections-per-ip", "100000"]
        shared = ["--shared-state", f"redis://127.0.0.1:{server.port}/0", "--shared-state-prefix", "rps:"]
        shared += ["--shared-state-deadline", f"{deadline_ms:g}"]
        bases = {}
        for name, extra in (("split", []), ("shared", shared)):
            proxy, base = start_proxy(
                work, [*common, *extra], {"OPENAI_API_KEY": UPSTREAM_KEY}, port="tcp:0:interface=127.0.0.1:backlog=4096"
            )
            started.append(proxy)
            proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)
            wrk(base + "/v1/chat/completions", script, 64, 1)  # warm up
            bases[name] = (proxy, base)
        # Rounds alternate between the two groups (both running), so that
        # the other work of a shared machine weighs on both alike.
        runs: dict[str, list[dict[str, float]]] = {"split": [], "shared": []}
        for _ in range(rounds):
            for name, (_proxy, base) in bases.items():
                runs[name].append(wrk(base + "/v1/chat/completions", script, 64, seconds))
        episodes = bases["shared"][0].output.count("unreachable")
        counters = shared_counters(bases["shared"][1], key)
        sent = sum(run["requests"] for run in runs["shared"])
        ratios = [b["rps"] / a["rps"] for a, b in zip(runs["split"], runs["shared"])]

        def median(name: str, key: str) -> float:
            return statistics.median(run[key] for run in runs[name])

        print(
            f"--workers 2, 64 connections, {rounds} round(s) of {seconds:g} s: limits split "
            f"{median('split', 'rps'):,.0f} req/s (p50 {median('split', 'p50_ms'):.2f} ms, "
            f"p99 {median('split', 'p99_ms'):.2f} ms); shared in Redis {median('shared', 'rps'):,.0f} req/s "
            f"(p50 {median('shared', 'p50_ms'):.2f} ms, p99 {median('shared', 'p99_ms'):.2f} ms); shared / split "
            f"per round {', '.join(f'{r:.2f}x' for r in ratios)}; non-2xx "
            f"{sum(r['errors'] for r in runs['split']):.0f} / {sum(r['errors'] for r in runs['shared']):.0f}; "
            f"fallback episodes {episodes} (deadline {deadline_ms:g} ms); of the shared group's {sent:,.0f} "
            f"requests (and its warm-up), calls that missed the deadline "
            f"{counters.get('oaiproxy_shared_state_late_total', 0):,.0f}, admitted in fallback "
            f"{counters.get('oaiproxy_shared_state_fallback_admitted_total', 0):,.0f}"
        )
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)


def shared_counters(base: str, key: str) -> dict[str, float]:
    """
    The group's C{oaiproxy_shared_state_*} series from its C{/metrics}
    (summed over the workers): how many calls were decided locally.
    """
    request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode("utf-8")
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("oaiproxy_shared_state_"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


@defer.inlineCallbacks
def main(admits: int, seconds: float, deadline_ms: float, rounds: int):
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
        if seconds > 0:
            # The load generators block: off the reactor's thread.
            yield threads.deferToThread(throughput, server, seconds, deadline_ms, rounds)
    finally:
        server.remove()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--admits", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0, help="of wrk per group (0: no requests/s part)")
    parser.add_argument("--deadline-ms", type=float, default=50.0, help="--shared-state-deadline of the group")
    parser.add_argument("--rounds", type=int, default=3, help="alternating wrk runs per group")
    options = parser.parse_args()
    task.react(lambda _: main(options.admits, options.seconds, options.deadline_ms, options.rounds))
