"""
What failing over costs (issue 13), with real processes on 127.0.0.1: fake
upstreams (C{python -m oaiproxy.fake.upstream}) behind the daemon
(C{twistd -n oaiproxy --upstreams-file ...}, pinned to CPU 0 with taskset
when available).

1. The cost of one failover: the latency a request gains when the first
   upstream it tries refuses the connection and the next one answers.
   The pool has N "dead" entries (a loopback port nothing listens on), each
   serving only its own model C{dead-i} at priority 0, and one live
   upstream at priority 1 that serves any model; a request for C{dead-i}
   tries that dead entry, is refused, and fails over to the live one:
   exactly one failover each.  Every dead entry takes 5 requests (its
   breaker opens after the fifth failure in a row).  The baseline is the
   same requests through a second daemon whose pool has the live upstream
   alone, sent alternately with them.
2. One of three upstreams killed mid-way: the same load (concurrent plain
   and streamed chat completions for a duration) through a pool of three
   equal upstreams, once with all healthy and once with one killed
   (SIGKILL) half-way through; the success rate and the latency
   percentiles of each, so the added p99 shows what the failure costs the
   clients.  The two runs alternate (C{--rounds}), since the machine's
   other load moves from run to run.

Figures are milliseconds; only figures from one run on one machine are
comparable.

    PYTHONPATH=. python bench/failover.py              # about a minute
    PYTHONPATH=. python bench/failover.py --smoke      # a few seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

from oaiproxy.fake.processes import Process, start_fake_upstream, start_proxy

KEY_VARIABLE = "BENCH_UPSTREAM_KEY"
KEY = "sk-bench-not-a-real-key"
MESSAGES = [{"role": "user", "content": "Say something short. " * 10}]


def body(model: str, stream: bool = False) -> bytes:
    document: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if stream:
        document["stream"] = True
    return json.dumps(document).encode()


def free_port() -> int:
    """
    A loopback port nothing listens on (bound, then released): connecting
    to it is refused at once, as to a crashed upstream.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def entry(name: str, url: str, priority: int = 0, models: Optional[Sequence[str]] = None) -> str:
    lines = ["[[upstreams]]", f'name = "{name}"', f'url = "{url}"', f'key_env = "{KEY_VARIABLE}"']
    lines.append(f"priority = {priority}")
    if models is not None:
        lines.append("models = [" + ", ".join(f'"{m}"' for m in models) + "]")
    return "\n".join(lines) + "\n"


def start_pool(workdir: str, name: str, entries: Sequence[str], pin: Sequence[str]) -> tuple[Process, str]:
    path = f"{workdir}/{name}.toml"
    with open(path, "w") as f:
        f.write("\n".join(entries))
    args = ["--upstreams-file", path, "--read-timeout", "10"]
    return start_proxy(workdir, args, {KEY_VARIABLE: KEY}, prefix=pin)


class Client:
    """
    One keep-alive connection to the proxy.
    """

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self._address = (url.hostname or "127.0.0.1", url.port or 80)
        self._path = url.path.rstrip("/") + "/v1/chat/completions"
        self._connection: Optional[http.client.HTTPConnection] = None

    def post(self, data: bytes, stream: bool = False) -> tuple[bool, float]:
        """
        Send one request; whether it succeeded (a 200 and, for a stream,
        its last event) and how long it took, in milliseconds.
        """
        start = time.perf_counter()
        ok = False
        try:
            if self._connection is None:
                self._connection = http.client.HTTPConnection(*self._address, timeout=30)
            self._connection.request("POST", self._path, data, {"Content-Type": "application/json"})
            response = self._connection.getresponse()
            answer = response.read()
            ok = response.status == 200 and (not stream or answer.rstrip().endswith(b"data: [DONE]"))
        except (OSError, http.client.HTTPException):
            if self._connection is not None:
                self._connection.close()
            self._connection = None
        return ok, (time.perf_counter() - start) * 1000

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
    }


def failover_cost(workdir: str, live_url: str, dead: int, pin: Sequence[str]) -> dict[str, Any]:
    """
    Scenario 1: requests that fail over once (a refused connection) against
    the same requests with nothing to fail over from, sent alternately to
    the two daemons so that both see the same load from the rest of the
    machine; the added latency is the median of the pairs' differences.
    """
    refused = f"http://127.0.0.1:{free_port()}/v1"
    entries = [entry(f"dead-{i}", refused, 0, [f"dead-{i}"]) for i in range(dead)]
    entries.append(entry("live", live_url, 1))
    proxies = [
        start_pool(workdir, "no-failover", [entry("live", live_url, 1)], pin),
        start_pool(workdir, "one-failover", entries, pin),
    ]
    clients = [Client(base) for _, base in proxies]
    samples: list[list[float]] = [[], []]
    failed = [0, 0]
    try:
        for client in clients:
            for _ in range(20):
                client.post(body("gpt-4o-mini"))  # warm up the connections to the live upstream
        # Five per dead entry: its breaker opens after the fifth failure.
        for _ in range(5):
            for i in range(dead):
                for which, client in enumerate(clients):
                    ok, ms = client.post(body(f"dead-{i}"))
                    samples[which].append(ms)
                    failed[which] += not ok
    finally:
        for client in clients:
            client.close()
        for process, _ in proxies:
            process.stop()
    figures: dict[str, Any] = {}
    for which, label in enumerate(("no failover", "one failover")):
        figures[label] = {**percentiles(samples[which]), "requests": len(samples[which]), "failed": failed[which]}
    figures["added_p50_ms"] = round(statistics.median(b - a for a, b in zip(*samples)), 3)
    return figures


def load(base: str, seconds: float, concurrency: int, kill: Optional[Process] = None) -> dict[str, Any]:
    """
    C{concurrency} clients, half of them streaming, for C{seconds}; with
    C{kill}, that upstream is killed half-way through.
    """
    results: list[tuple[bool, float, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop = start + seconds

    def run(stream: bool) -> None:
        client = Client(base)
        data = body("gpt-4o-mini", stream)
        while time.perf_counter() < stop:
            ok, ms = client.post(data, stream)
            with lock:
                results.append((ok, ms, time.perf_counter() - start))
        client.close()

    threads = [threading.Thread(target=run, args=(i % 2 == 1,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    if kill is not None:
        time.sleep(seconds / 2)  # the benchmark's own schedule, not a wait for an event
        kill.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join()
    latencies = [ms for _, ms, _ in results]
    succeeded = sum(1 for ok, _, _ in results if ok)
    figures: dict[str, Any] = {
        **percentiles(latencies),
        "requests": len(results),
        "success_rate": round(100.0 * succeeded / max(1, len(results)), 3),
    }
    if kill is not None:
        after = [ms for _, ms, at in results if at >= seconds / 2]
        figures["after_kill"] = percentiles(after)
    return figures


def killed_mid_way(
    workdir: str, seconds: float, concurrency: int, pin: Sequence[str], rounds: int
) -> list[tuple[str, dict[str, Any]]]:
    """
    Scenario 2: three equal upstreams, all healthy, then one killed
    half-way (each run with a fresh daemon and fresh upstreams), C{rounds}
    times in turn, since the machine's other load moves from run to run.
    """
    figures: list[tuple[str, dict[str, Any]]] = []
    for label in ("all healthy", "one killed mid-way") * rounds:
        upstreams = [start_fake_upstream(workdir, "") for _ in range(3)]
        proxy, base = start_pool(workdir, "three", [entry(n, u) for n, (_, u) in zip("abc", upstreams)], pin)
        client = Client(base)
        try:
            for _ in range(30):
                client.post(body("gpt-4o-mini"))
            client.close()
            victim = upstreams[1][0] if label != "all healthy" else None
            figures.append((label, load(base, seconds, concurrency, kill=victim)))
        finally:
            proxy.stop()
            for process, _ in upstreams:
                process.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dead", type=int, default=40, help="dead pool entries in scenario 1 (5 requests each)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run of scenario 2")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in scenario 2 (half stream)")
    parser.add_argument("--rounds", type=int, default=2, help="healthy and killed runs of scenario 2, in turn")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: the script still works")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.smoke:
        args.dead, args.seconds, args.concurrency, args.rounds = 2, 1.0, 2, 1

    workdir = tempfile.mkdtemp(prefix="oaiproxy-bench-")
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    live, live_url = start_fake_upstream(workdir, "")
    try:
        cost = failover_cost(workdir, live_url, args.dead, pin)
    finally:
        live.stop()
    try:
        killed = killed_mid_way(workdir, args.seconds, args.concurrency, pin, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"proxy pinned: {bool(pin)}")
    print(f"\n1. one failover (first upstream refuses the connection), {cost['one failover']['requests']} requests:")
    print("| requests | p50 | p99 | failed |")
    print("|---|---|---|---|")
    for label in ("no failover", "one failover"):
        figure = cost[label]
        print(f"| {label} | {figure['p50_ms']:.2f} ms | {figure['p99_ms']:.2f} ms | {figure['failed']} |")
    print(f"added by a failover (median of paired differences): {cost['added_p50_ms']:+.2f} ms")
    print(f"\n2. three upstreams, {args.concurrency} clients (half streaming) for {args.seconds:g} s:")
    print("| run | requests | success | p50 | p99 | max | p99 after the kill |")
    print("|---|---|---|---|---|---|---|")
    for label, figure in killed:
        after = figure.get("after_kill", {}).get("p99_ms")
        print(
            f"| {label} | {figure['requests']} | {figure['success_rate']:.2f}% | {figure['p50_ms']:.2f} ms "
            f"| {figure['p99_ms']:.2f} ms | {figure['max_ms']:.2f} ms | {'' if after is None else f'{after:.2f} ms'} |"
        )
    for index in range(0, len(killed), 2):
        p99 = killed[index + 1][1]["p99_ms"] - killed[index][1]["p99_ms"]
        print(f"round {index // 2 + 1}: added p99 with one killed: {p99:+.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"failover": cost, "killed": killed}, f, indent=2)
    sys.stdout.flush()
    if args.smoke and any(figure["requests"] == 0 for _, figure in killed):
        raise SystemExit("smoke run: no requests went through")


if __name__ == "__main__":
    main()
