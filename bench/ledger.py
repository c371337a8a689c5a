"""
What the usage ledger costs: requests per second and the added p50 with
the ledger on (SQLite) against off (issue 15; the target is at most 5%).

Starts the fake upstream and two daemons as real processes on 127.0.0.1,
both with a prices file (so both count spend in the metrics): one with
C{--usage-db off}, one with a SQLite ledger in a temporary directory.  The
daemons are pinned to CPU 0 with taskset when available, this script and
the upstream to CPU 1.  Rounds alternate between the two, so a machine
that slows down mid-run slows both; each figure is the median of the
rounds.

 - latency: plain chat completions over one keep-alive connection (p50);
 - throughput: 8 clients on their own keep-alive connections for a few
   seconds (requests per second).

At the end the ledger must hold exactly the requests sent through the
daemon that has one (a ledger that is fast because it drops records would
fail here).

    PYTHONPATH=. python bench/ledger.py            # about a minute
    PYTHONPATH=. python bench/ledger.py --smoke    # seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from urllib.parse import urlsplit

from quick import timed  # bench/ is this script's directory

from oaiproxy.fake.processes import start_fake_upstream, start_proxy

KEY = "sk-bench-not-a-real-key"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say something short."}]}).encode()
PRICES = '[models."gpt-4o-mini"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n'


def latencies(base: str, count: int) -> list[float]:
    """
    Plain chat completions over one keep-alive connection (quick.py's).
    """
    return timed(base + "/v1", BODY, False, count)


def throughput(base: str, clients: int, seconds: float) -> tuple[float, int]:
    """
    Requests per second over C{clients} connections for C{seconds}; and
    how many were sent.
    """
    url = urlsplit(base)
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        while time.monotonic() < stop:
            connection.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"unexpected status {response.status}")
            counts[i] += 1
        connection.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - start), sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="latency requests per round and target")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput seconds per round and target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run: the script still works")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.seconds, args.rounds = 50, 0.5, 1

    workdir = tempfile.mkdtemp(prefix="oaiproxy-bench-ledger-")
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    if pin:
        os.sched_setaffinity(0, {1})
    prices = os.path.join(workdir, "prices.toml")
    with open(prices, "w") as f:
        f.write(PRICES)
    ledger = os.path.join(workdir, "usage.sqlite3")
    upstream, direct = start_fake_upstream(workdir, "")
    env = {"OPENAI_API_KEY": KEY}
    common = ["--upstream", direct, "--prices-file", prices]
    off, off_base = start_proxy(workdir, [*common, "--usage-db", "off"], env, prefix=pin)
    on, on_base = start_proxy(workdir, [*common, "--usage-db", ledger], env, prefix=pin)
    targets = {"off": off_base, "on": on_base}
    sent_on = 0
    p50: dict[str, list[float]] = {"direct": [], "off": [], "on": []}
    rps: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for target in targets.values():
            latencies(target, 50)  # warm up: connection pools, the ledger's first flush
        sent_on += 50
        p50["direct"].append(statistics.median(latencies(direct.rsplit("/v1", 1)[0], args.requests)))
        for n in range(args.rounds):
            order = ("off", "on") if n % 2 == 0 else ("on", "off")
            for name in order:
                p50[name].append(statistics.median(latencies(targets[name], args.requests)))
                rate, count = throughput(targets[name], 8, args.seconds)
                rps[name].append(rate)
                if name == "on":
                    sent_on += args.requests + count
    finally:
        off.stop()
        on.stop()
        upstream.stop()
    written = sqlite3.connect(ledger).execute("SELECT SUM(requests) FROM usage_daily").fetchone()[0]
    shutil.rmtree(workdir, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in p50.items()}
    rate = {name: statistics.median(values) for name, values in rps.items()}
    print(f"{args.rounds} round(s), {args.requests} latency requests and {args.seconds:g}s of 8 clients per round")
    print("| ledger | requests/s (8 clients) | p50, 1 connection | added p50 vs direct |")
    print("|---|---|---|---|")
    for name in ("off", "on"):
        print(f"| {name} | {rate[name]:,.0f} | {med[name]:.2f} ms | +{med[name] - med['direct']:.2f} ms |")
    print(
        f"ledger on / off: requests/s {rate['on'] / rate['off']:.3f}, added p50 "
        f"{(med['on'] - med['direct']) / max(1e-9, med['off'] - med['direct']):.3f}"
    )
    print(f"ledger holds {written} requests of {sent_on} sent through it")
    if written != sent_on:
        raise SystemExit("the ledger lost requests")


if __name__ == "__main__":
    main()
