"""
A quick latency benchmark: what the proxy adds to one request.

Starts the fake upstream and the daemon as real processes on 127.0.0.1
(the daemon pinned to CPU 0 with taskset when available), then times the
same requests straight to the upstream ("direct") and through the proxy,
over one keep-alive connection:

 - plain: a ~1 KB chat completion request and its JSON answer;
 - stream: time to the first event of a streamed answer;

each straight to the upstream ("direct"), through the proxy without client
keys ("proxy"), and through a second proxy with a keys file, a model
allow-list and generous per-client limits ("proxy+checks"), so the cost of
the checks a request passes shows as the difference of the last two.

Figures are medians and 99th percentiles in milliseconds; only figures from
one run on one machine are comparable.  The full suite (throughput, many
streams, memory) is issue 6's.

    python bench/quick.py                 # 2,000 requests per scenario
    python bench/quick.py --requests 50   # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable
from urllib.parse import urlsplit

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import start_fake_upstream, start_proxy

KEY = "sk-bench-not-a-real-key"
CLIENT_KEY = "oaiproxy-bench-client-key"
CLIENTS = (
    "[defaults]\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000000\nconcurrent_requests = 1000\n"
    + file_entry("bench", CLIENT_KEY, ["gpt-4o-mini"])
)
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a benchmark. " * 20},
            {"role": "user", "content": "Say something short. " * 20},
        ],
    }
).encode()
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()


def timed(base: str, body: bytes, first_event_only: bool, count: int) -> list[float]:
    """
    Send C{count} requests over one keep-alive connection; return each
    one's latency in milliseconds (to the whole body, or to the first
    event of a stream).
    """
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    path = url.path.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + CLIENT_KEY}
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        if first_event_only:
            response.readline()
            samples.append((time.perf_counter() - start) * 1000)
            response.read()
        else:
            response.read()
            samples.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise SystemExit(f"unexpected status {response.status} from {base}")
    connection.close()
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario and target")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="oaiproxy-bench-")
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    upstream, direct = start_fake_upstream(workdir, "")  # accepts any key
    clients_file = f"{workdir}/clients.toml"
    with open(clients_file, "w") as f:
        f.write(CLIENTS)
    proxy, base = start_proxy(workdir, ["--upstream", direct], {"OPENAI_API_KEY": KEY}, prefix=pin)
    checked, checked_base = start_proxy(
        workdir, ["--upstream", direct, "--client-keys-file", clients_file], {"OPENAI_API_KEY": KEY}, prefix=pin
    )
    targets = {"direct": direct, "proxy": base + "/v1", "proxy+checks": checked_base + "/v1"}
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        scenarios: dict[str, Callable[[str], list[float]]] = {
            "plain": lambda target: timed(target, BODY, False, args.requests),
            "stream first event": lambda target: timed(target, STREAM_BODY, True, args.requests),
        }
        for name, run in scenarios.items():
            for target in targets.values():
                run(target)  # warm up every path, connection pools included
            results[name] = {label: summary(run(target)) for label, target in targets.items()}
    finally:
        checked.stop()
        proxy.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.requests} requests per scenario, one keep-alive connection, proxy pinned: {bool(pin)}")
    print("| scenario | target | p50 | p99 | added p50 vs direct |")
    print("|---|---|---|---|---|")
    for name, figures in results.items():
        for label, figure in figures.items():
            added = figure["p50_ms"] - figures["direct"]["p50_ms"]
            print(f"| {name} | {label} | {figure['p50_ms']:.2f} ms | {figure['p99_ms']:.2f} ms | +{added:.2f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "results": results}, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
