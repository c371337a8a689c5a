"""
What the usage ledger and the budgets cost: requests per second and the
added p50 with the ledger on (SQLite) against off (issue 15; the target is
at most 5%), and with budgets enforced on top.

Starts the fake upstream and three daemons as real processes on
127.0.0.1, all with a prices file (so all count spend in the metrics) and
one client key: one with C{--usage-db off}, one with a SQLite ledger in a
temporary directory, and one with a ledger and a client whose token and
dollar budgets (day and month) are checked, reserved and settled on every
request and re-read from the ledger every second.  The daemons are pinned
to CPU 0 with taskset when available, this script and the upstream to
CPU 1.  Rounds rotate among them, so a machine that slows down mid-run
slows all; each figure is the median of the rounds.

 - latency: plain chat completions over one keep-alive connection (p50);
 - throughput: 8 clients on their own keep-alive connections for a few
   seconds (requests per second).

At the end each ledger must hold exactly the requests sent through its
daemon (a ledger that is fast because it drops records would
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

from quick import CLIENT_KEY, timed  # bench/ is this script's directory

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import start_fake_upstream, start_proxy

KEY = "sk-bench-not-a-real-key"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say something short."}]}).encode()
PRICES = '[models."gpt-4o-mini"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n'
#: Budgets no run comes near, so that every request is checked and admitted.
BUDGETS = (
    "tokens_per_day = 1000000000\ntokens_per_month = 1000000000\nusd_per_day = 100000.0\nusd_per_month = 100000.0\n"
)
NAMES = ("off", "on", "budgets")


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
            headers = {"Content-Type": "application/json", "Authorization": "Bearer " + CLIENT_KEY}
            connection.request("POST", "/v1/chat/completions", BODY, headers)
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
    plain, budgeted = os.path.join(workdir, "clients.toml"), os.path.join(workdir, "budgeted.toml")
    with open(plain, "w") as f:
        f.write(file_entry("bench", CLIENT_KEY))
    with open(budgeted, "w") as f:
        f.write(file_entry("bench", CLIENT_KEY) + BUDGETS)
    ledgers = {"on": os.path.join(workdir, "usage.sqlite3"), "budgets": os.path.join(workdir, "budgets.sqlite3")}
    upstream, direct = start_fake_upstream(workdir, "")
    env = {"OPENAI_API_KEY": KEY}
    common = ["--upstream", direct, "--prices-file", prices]
    argv = {
        "off": [*common, "--usage-db", "off", "--client-keys-file", plain],
        "on": [*common, "--usage-db", ledgers["on"], "--client-keys-file", plain],
        "budgets": [*common, "--usage-db", ledgers["budgets"], "--client-keys-file", budgeted],
    }
    daemons = {name: start_proxy(workdir, argv[name], env, prefix=pin) for name in NAMES}
    targets = {name: base for name, (_, base) in daemons.items()}
    sent = {name: 0 for name in NAMES}
    p50: dict[str, list[float]] = {"direct": [], **{name: [] for name in NAMES}}
    rps: dict[str, list[float]] = {name: [] for name in NAMES}
    try:
        for name, target in targets.items():
            latencies(target, 50)  # warm up: connection pools, the ledger's first flush
            sent[name] += 50
        p50["direct"].append(statistics.median(latencies(direct.rsplit("/v1", 1)[0], args.requests)))
        for n in range(args.rounds):
            for name in NAMES[n % 3 :] + NAMES[: n % 3]:
                p50[name].append(statistics.median(latencies(targets[name], args.requests)))
                rate, count = throughput(targets[name], 8, args.seconds)
                rps[name].append(rate)
                sent[name] += args.requests + count
    finally:
        for daemon, _ in daemons.values():
            daemon.stop()
        upstream.stop()
    written = {
        name: sqlite3.connect(path).execute("SELECT SUM(requests) FROM usage_daily").fetchone()[0]
        for name, path in ledgers.items()
    }
    shutil.rmtree(workdir, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in p50.items()}
    rate = {name: statistics.median(values) for name, values in rps.items()}
    print(f"{args.rounds} round(s), {args.requests} latency requests and {args.seconds:g}s of 8 clients per round")
    print("| ledger | requests/s (8 clients) | p50, 1 connection | added p50 vs direct |")
    print("|---|---|---|---|")
    labels = {"off": "off", "on": "on (SQLite)", "budgets": "on, and budgets enforced"}
    for name in NAMES:
        print(f"| {labels[name]} | {rate[name]:,.0f} | {med[name]:.2f} ms | +{med[name] - med['direct']:.2f} ms |")

    def added(name: str) -> float:
        return med[name] - med["direct"]

    for name, base in (("on", "off"), ("budgets", "on")):
        print(
            f"{name} / {base}: requests/s {rate[name] / rate[base]:.3f}, "
            f"added p50 {added(name) / max(1e-9, added(base)):.3f}"
        )
    for name in ledgers:
        print(f"ledger of {name!r} holds {written[name]} requests of {sent[name]} sent through it")
        if written[name] != sent[name]:
            raise SystemExit("a ledger lost requests")


if __name__ == "__main__":
    main()
