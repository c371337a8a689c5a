"""
What one /metrics for a group of workers costs: the metrics work of one
request (what L{oaiproxy.server.site} calls: in flight up and down, a
stream's gauge, the record observed, one upstream attempt) in one process
(the in-memory registry) against a worker of a group (prometheus_client's
multiprocess mode, every sample written to memory-mapped files), and the
time of one scrape as a group's directory fills with the files of workers
that were started again.

    python bench/group_metrics.py [--requests 20000]

(PYTHONPATH=. from a checkout.)  Each measurement runs in a fresh Python
(the library picks its mode at import, from the environment).  Figures go
in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

_HOT_PATH = r"""
import json, os, sys, time
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord, Usage

requests, directory = int(sys.argv[1]), os.environ.get("PROMETHEUS_MULTIPROC_DIR")
metrics = Metrics(group_dir=directory, worker=0) if directory else Metrics()
records = []
for i in range(requests):
    r = RequestRecord("req", 0.0)
    r.client, r.model, r.route, r.status, r.upstream = "alice", "gpt-4o-mini", "chat_completions", 200, "default"
    r.upstream_status, r.upstream_sent, r.upstream_head, r.ended_at = 200, 0.0001, 0.0002, 0.0003
    r.stream, r.first_chunk, r.bytes_in, r.bytes_out = i % 2 == 0, 0.00025, 120, 900
    r.usage = Usage(prompt=12, completion=40, exact=True)
    records.append(r)
def one(r):
    metrics.request_started()
    if r.stream:
        metrics.stream_started()
    metrics.attempt_finished("default", "ok")
    if r.stream:
        metrics.stream_finished()
    metrics.request_finished()
    metrics.observe(r)
for r in records[:1000]:
    one(r)
started = time.perf_counter()
for r in records:
    one(r)
elapsed = time.perf_counter() - started
print(json.dumps({"us_per_request": elapsed / requests * 1e6}))
"""

_SCRAPE = r"""
import json, os, sys, time
from prometheus_client.exposition import generate_latest
from oaiproxy.observe.metrics import Metrics
from oaiproxy.observe.records import RequestRecord

metrics = Metrics(group_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"], worker=0)
r = RequestRecord("req", 0.0)
r.client, r.route, r.status = "alice", "chat_completions", 200
metrics.observe(r)
generate_latest(metrics.registry)
rounds = 50
started = time.perf_counter()
for _ in range(rounds):
    generate_latest(metrics.registry)
print(json.dumps({"ms_per_scrape": (time.perf_counter() - started) / rounds * 1000}))
"""


def run(script: str, args: list[str], directory: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if directory is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def fill(directory: str, processes: int) -> None:
    """
    The files of C{processes} workers (each its own pid) that each served
    a few requests, as after restarts: dead workers' counters stay.
    """
    for _ in range(processes):
        run(_HOT_PATH, ["200"], directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    options = parser.parse_args()
    alone = min(run(_HOT_PATH, [str(options.requests)], None)["us_per_request"] for _ in range(options.rounds))
    grouped = []
    for _ in range(options.rounds):
        directory = tempfile.mkdtemp(prefix="oaiproxy-bench-metrics-")
        try:
            grouped.append(run(_HOT_PATH, [str(options.requests)], directory)["us_per_request"])
        finally:
            shutil.rmtree(directory)
    print(f"metrics per request: one process {alone:.1f} us, a worker of a group {min(grouped):.1f} us")
    for processes in (2, 20, 100):
        directory = tempfile.mkdtemp(prefix="oaiproxy-bench-metrics-")
        try:
            fill(directory, processes)
            files = len(os.listdir(directory))
            scrape = min(run(_SCRAPE, [], directory)["ms_per_scrape"] for _ in range(options.rounds))
            print(f"scrape with the files of {processes} worker processes ({files} files): {scrape:.1f} ms")
        finally:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()
