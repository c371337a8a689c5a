"""
The benchmark suite: every figure of bench/README.md from one command.

    python bench/run.py            # full run, a few minutes
    python bench/run.py --smoke    # seconds-long, for CI: checks the suite runs

The proxy (the real twistd daemon, with validation, a client-keys file and
metrics on) is pinned to CPU 0; the fast upstreams (nginx for plain and
large requests, a Node.js server for streams) and the load generators
(Debian's wrk, a Node.js stream client) share CPU 1, so they are never the
bottleneck of a one-core proxy.  Every scenario also runs straight against
the upstream ("direct") in the same run, so each figure comes with its
ratio to direct.  Needs: wrk, nginx, node, taskset.

Scenarios:
 (a) ~1 KB requests and answers: requests/s at 64 connections; latency p50
     and p99 at 1 and 8 connections (added = proxy minus direct);
 (b) 1 MB request bodies: MB/s and proxy CPU per request;
 (c) N concurrent long streams at 20 chunks/s: share of chunks delivered, added
     per-chunk delay p50/p99, time to first chunk, proxy CPU and peak RSS;
 (d) N idle open streams: proxy memory per stream.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any, Optional

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import Process, child_env, start_proxy

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_KEY = "oaiproxy-bench-client-key"
UPSTREAM_KEY = "sk-bench-not-a-real-key"
UPSTREAM_CPU, PROXY_CPU = "1", "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench/run.py needs {', '.join(missing)} (Debian: apt-get install wrk nginx-light nodejs)")


def body(size: int) -> bytes:
    """
    A chat completions body of about C{size} bytes.
    """
    pad = max(0, size - 120)
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "b" * (pad // 2)},
                {"role": "user", "content": "u" * (pad - pad // 2)},
            ],
        }
    ).encode()


#: nginx's answer to every request: a ~1 KB chat completion.
ANSWER = json.dumps(
    {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 800}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 250, "completion_tokens": 120, "total_tokens": 370}}
)  # fmt: skip

NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {work}/nginx-error.log;
pid {work}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_buffer_size 2m;
  client_max_body_size 8m;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{answer}';
    }}
  }}
}}
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.match(r"([0-9.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def load_generator(argv: list[str], timeout: float, cwd: Optional[str] = None) -> str:
    """
    Run a load generator on the upstream's CPU (away from the proxy's) and
    return its output.
    """
    return subprocess.run(
        ["taskset", "-c", UPSTREAM_CPU, *argv], capture_output=True, text=True, timeout=timeout, check=True, cwd=cwd
    ).stdout


def wrk(url: str, script: str, connections: int, seconds: float) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url]
    out = load_generator(argv, seconds + 60)
    result = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        result[f"p{pct}_ms"] = _ms(re.search(rf"\s{pct}%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = re.search(r"(\d+) requests in", out)
    result["requests"] = float(requests.group(1)) if requests else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def lua(work: str, name: str, payload: bytes) -> str:
    path = os.path.join(work, name + ".json")
    with open(path, "wb") as f:
        f.write(payload)
    script = os.path.join(work, name + ".lua")
    with open(script, "w") as f:
        f.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"\n'
            f'local f = io.open("{path}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
        )
    return script


def streams(base: str, count: int, seconds: float, work: str) -> dict[str, Any]:
    argv = ["node", os.path.join(HERE, "stream_client.js"), base, str(count), str(seconds), "live", CLIENT_KEY]
    out = load_generator(argv, seconds + 120, cwd=work)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def idle_streams(base: str, count: int, proxy_pid: int, work: str) -> dict[str, float]:
    """
    Proxy memory per idle open stream, in KB.
    """
    before = memory_kb(proxy_pid, "VmRSS")
    client = Process(
        [
            "taskset",
            "-c",
            UPSTREAM_CPU,
            "node",
            os.path.join(HERE, "stream_client.js"),
            base,
            str(count),
            "0",
            "idle",
            CLIENT_KEY,
        ],
        child_env({}),
        work,
    )
    try:
        opened = int(client.wait_for(r'\{"open":(\d+)', timeout=120).group(1))
        after = memory_kb(proxy_pid, "VmRSS")
    finally:
        client.stop()
    return {"open": opened, "kb_per_stream": (after - before) / max(1, opened)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: the suite works, figures mean nothing")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", default="a,b,c,d,workers", help="scenarios to run (default: all)")
    args = parser.parse_args()
    need("wrk", "nginx", "node", "taskset")
    # Thousands of streams need thousands of descriptors, here and in every
    # process started from here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = 2.0 if args.smoke else 10.0
    stream_counts = (20, 50) if args.smoke else (200, 1000)
    idle_counts = (50, 100) if args.smoke else (1000, 5000)

    work = tempfile.mkdtemp(prefix="oaiproxy-bench-")
    started: list[Process] = []
    results: dict[str, Any] = {"smoke": args.smoke}
    try:
        answer = ANSWER
        nginx_port = free_port()
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(work=work, port=nginx_port, answer=answer))
        nginx = Process(
            ["taskset", "-c", UPSTREAM_CPU, "nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work],
            child_env({}),
            work,
        )
        started.append(nginx)
        sse = Process(
            ["taskset", "-c", UPSTREAM_CPU, "node", os.path.join(HERE, "sse_upstream.js"), "0", "1000000", "20"],
            child_env({}),
            work,
        )
        started.append(sse)
        sse_url = sse.wait_for(r"listening on (http://\S+/v1)").group(1)
        plain_url = f"http://127.0.0.1:{nginx_port}/v1"

        clients = os.path.join(work, "clients.toml")
        with open(clients, "w") as f:
            f.write(
                "[defaults]\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000000\nconcurrent_requests = 100000\n"
            )
            f.write(file_entry("bench", CLIENT_KEY, ["gpt-4o-mini", "idle"]))
        pin = ["taskset", "-c", PROXY_CPU]
        env = {"OPENAI_API_KEY": UPSTREAM_KEY}
        common = ["--client-keys-file", clients, "--max-connections-per-ip", "100000", "--sse-keepalive", "0"]
        port = "tcp:0:interface=127.0.0.1:backlog=4096"
        plain_proxy, plain_base = start_proxy(work, ["--upstream", plain_url, *common], env, prefix=pin, port=port)
        started.append(plain_proxy)
        sse_proxy, sse_base = start_proxy(work, ["--upstream", sse_url, *common], env, prefix=pin, port=port)
        started.append(sse_proxy)
        targets = {"direct": plain_url, "proxy": plain_base + "/v1"}

        only = set(args.only.split(","))
        # (a) plain requests
        small = lua(work, "small", body(1024))
        for base in targets.values():
            wrk(base + "/chat/completions", small, 64, 1)  # warm up
        results["a"] = (
            {}
            if "a" not in only
            else {
                target: {
                    "rps_64": wrk(base + "/chat/completions", small, 64, seconds)["rps"],
                    "c1": wrk(base + "/chat/completions", small, 1, seconds),
                    "c8": wrk(base + "/chat/completions", small, 8, seconds),
                }
                for target, base in targets.items()
            }
        )

        # (b) 1 MB bodies
        large = lua(work, "large", body(1024 * 1024))
        results["b"] = {}
        for target, base in targets.items() if "b" in only else ():
            cpu = cpu_seconds(plain_proxy.pid)
            run = wrk(base + "/chat/completions", large, 8, seconds)
            used = cpu_seconds(plain_proxy.pid) - cpu
            results["b"][target] = {
                "mb_per_s": run["rps"] * len(body(1024 * 1024)) / 1e6,
                "errors": run["errors"],
                "proxy_cpu_ms_per_request": 1000 * used / run["requests"]
                if target == "proxy" and run["requests"]
                else None,
            }

        # (c) concurrent streams at 20 chunks/s
        results["c"] = {}
        for count in stream_counts if "c" in only else ():
            row: dict[str, Any] = {}
            for target, base in {"direct": sse_url, "proxy": sse_base + "/v1"}.items():
                cpu = cpu_seconds(sse_proxy.pid)
                measured = streams(base, count, seconds, work)
                measured["delivered"] = measured["received"] / max(1, measured["expected"])
                if target == "proxy":
                    measured["proxy_cpu_share"] = (cpu_seconds(sse_proxy.pid) - cpu) / (seconds + 2)
                    measured["proxy_peak_rss_mb"] = memory_kb(sse_proxy.pid, "VmHWM") / 1024
                row[target] = measured
            results["c"][str(count)] = row

        # (d) idle open streams
        results["d"] = {
            str(count): idle_streams(sse_base + "/v1", count, sse_proxy.pid, work)
            for count in (idle_counts if "d" in only else ())
        }

        # Multi-core: the same plain load through 1 and through 2 workers,
        # unpinned (two workers need both cores, which the upstream and the
        # load generator share with them).
        results["workers"] = {}
        for workers in ("1", "2") if "workers" in only else ():
            proxy, base = start_proxy(work, ["--upstream", plain_url, "--workers", workers, *common], env, port=port)
            started.append(proxy)
            wrk(base + "/v1/chat/completions", small, 64, 1)
            results["workers"][workers] = wrk(base + "/v1/chat/completions", small, 64, seconds)["rps"]
            proxy.stop()
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict[str, Any]) -> str:
    a, b = r["a"], r["b"]
    lines = ["| scenario | direct | proxy | proxy / direct |", "|---|---|---|---|"]
    if a:
        lines.append(
            f"| (a) requests/s at 64 connections | {a['direct']['rps_64']:,.0f} | {a['proxy']['rps_64']:,.0f} | {a['proxy']['rps_64'] / a['direct']['rps_64']:.3f} |"
        )
        for c in ("c1", "c8"):
            for p in ("p50", "p99"):
                d, x = a["direct"][c][f"{p}_ms"], a["proxy"][c][f"{p}_ms"]
                lines.append(
                    f"| (a) latency {p} at {c[1:]} connection(s), ms (added) | {d:.2f} | {x:.2f} | +{x - d:.2f} ms |"
                )
    if b:
        lines.append(
            f"| (b) 1 MB bodies, MB/s | {b['direct']['mb_per_s']:,.0f} | {b['proxy']['mb_per_s']:,.0f} | {b['proxy']['mb_per_s'] / b['direct']['mb_per_s']:.3f} |"
        )
        lines.append(f"| (b) proxy CPU per 1 MB request, ms | | {b['proxy']['proxy_cpu_ms_per_request']:.2f} | |")
    for count, row in r["c"].items():
        d, x = row["direct"], row["proxy"]
        lines += [
            f"| (c) {count} streams: chunks delivered | {d['delivered']:.1%} | {x['delivered']:.1%} | |",
            f"| (c) {count} streams: chunk delay p50 / p99, ms (added) | {d['delay_p50_ms']:.1f} / {d['delay_p99_ms']:.1f} "
            f"| {x['delay_p50_ms']:.1f} / {x['delay_p99_ms']:.1f} | +{x['delay_p50_ms'] - d['delay_p50_ms']:.1f} / "
            f"+{x['delay_p99_ms'] - d['delay_p99_ms']:.1f} ms |",
            f"| (c) {count} streams: time to first chunk p50, ms | {d['first_p50_ms']:.1f} | {x['first_p50_ms']:.1f} | |",
            f"| (c) {count} streams: proxy CPU (share of a core), peak RSS | | {x['proxy_cpu_share']:.0%}, "
            f"{x['proxy_peak_rss_mb']:.0f} MB | |",
        ]
    for count, idle in r["d"].items():
        lines.append(
            f"| (d) {count} idle streams ({idle['open']} open): proxy memory per stream | | {idle['kb_per_stream']:.1f} KB | |"
        )
    if r.get("workers"):
        w = r["workers"]
        lines.append(
            f"| (a) requests/s at 64 connections, 1 vs 2 workers (unpinned) | {w['1']:,.0f} | {w['2']:,.0f} | "
            f"{w['2'] / w['1']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # Interrupted or terminated, still stop every process started here.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    sys.exit(main())
