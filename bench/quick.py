"""
A quick latency benchmark: what the proxy adds to one request.

Starts the fake upstream and the daemon as real processes on 127.0.0.1
(the daemon pinned to CPU 0 with taskset when available), then times the
same requests straight to the upstream ("direct") and through the proxy,
over one keep-alive connection:

 - plain: a ~1 KB chat completion request and its JSON answer;
 - stream: time to the first event of a streamed answer.

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

from oaiproxy.testing import start_fake_upstream, start_proxy

KEY = "sk-bench-not-a-real-key"
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
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + KEY}
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
    upstream, direct = start_fake_upstream(workdir, KEY)
    proxy, base = start_proxy(workdir, ["--upstream", direct], {"OPENAI_API_KEY": KEY}, prefix=pin)
    proxied = base + "/v1"
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        scenarios: dict[str, Callable[[str], list[float]]] = {
            "plain": lambda target: timed(target, BODY, False, args.requests),
            "stream first event": lambda target: timed(target, STREAM_BODY, True, args.requests),
        }
        for name, run in scenarios.items():
            run(direct)  # warm up both paths, connection pool included
            run(proxied)
            results[name] = {"direct": summary(run(direct)), "proxy": summary(run(proxied))}
    finally:
        proxy.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.requests} requests per scenario, one keep-alive connection, proxy pinned: {bool(pin)}")
    print("| scenario | direct p50 | direct p99 | proxy p50 | proxy p99 | added p50 |")
    print("|---|---|---|---|---|---|")
    for name, figures in results.items():
        d, p = figures["direct"], figures["proxy"]
        added = p["p50_ms"] - d["p50_ms"]
        print(
            f"| {name} | {d['p50_ms']:.2f} ms | {d['p99_ms']:.2f} ms | {p['p50_ms']:.2f} ms "
            f"| {p['p99_ms']:.2f} ms | +{added:.2f} ms |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "results": results}, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
