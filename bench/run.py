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
 (d) N idle open streams: proxy memory per stream;
 workers: ~1 KB requests/s through 1 and through 2 workers (unpinned);
 workers-streams: 2,000 streams at 20 chunks/s direct and through
     --workers 2 (unpinned: the two workers share both cores with the Node.js
     upstream and load generator, which stay on CPU 1): as (c), with the CPU
     of the whole group (supervisor and workers) per chunk.

With --python PATH, (a) and (c) also run through a proxy under that
interpreter (e.g. PyPy: PATH runs this installation's twistd script, so it
needs Twisted, treq and the rest installed for it), beside CPython's.
"""

from __future__ import annotations

import argparse
import contextlib
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
import time
import urllib.parse
from typing import Any, Iterator, Optional, Sequence

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
  upstream whole_body {{
    server unix:{work}/nginx-body.sock;
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      # A large body is read whole before the answer, as a real upstream
      # reads a prompt before it answers; nginx's return alone would answer
      # at once and leave the rest unread, and the proxy would then send
      # only part of the body (an early answer closes the connection).
      if ($http_content_length ~ "^[0-9]{{6,}}$") {{
        rewrite ^ /read-whole-body last;
      }}
      default_type application/json;
      return 200 '{answer}';
    }}
    location = /read-whole-body {{
      internal;
      # (proxy_request_buffering: nginx reads the whole body first.)
      proxy_pass http://whole_body;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }}
  }}
  server {{
    listen unix:{work}/nginx-body.sock;
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


def group_pids(pid: int) -> list[int]:
    """
    C{pid} and its live descendants (a supervisor and its workers), found by
    their parent PIDs in C{/proc}.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found = [pid]
    for member in found:
        found.extend(child for child, parent in parents.items() if parent == member)
    return found


def group_cpu_seconds(pids: list[int]) -> float:
    """
    The CPU time of C{pids} together (one that has exited counts as zero).
    """
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def settle(pid: int, limit: float = 30.0) -> None:
    """
    Wait (at most C{limit} seconds) until C{pid} uses under 5% of a core
    over half a second: the streams a warm-up's client left are torn down
    before the measurement's open.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.025:
            return


def system_seconds(pid: int) -> float:
    """
    The kernel's part of C{pid}'s CPU time (system calls: socket reads and
    writes, epoll).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    """
    C{pid}'s minor page faults so far: each is a fresh page of memory the
    kernel maps (and zeroes) on first touch, a large part of a 1 MB
    body's cost when the allocator hands memory back and takes it again.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7])


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


def load_generator(argv: list[str], timeout: float, cwd: Optional[str] = None, pinned: bool = True) -> str:
    """
    Run a load generator on the upstream's CPU (away from the proxy's;
    not C{pinned}: wherever the kernel puts it) and return its output.
    """
    pin = ["taskset", "-c", UPSTREAM_CPU] if pinned else []
    return subprocess.run([*pin, *argv], capture_output=True, text=True, timeout=timeout, check=True, cwd=cwd).stdout


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


def streams(base: str, count: int, seconds: float, work: str, pinned: bool = True) -> dict[str, Any]:
    argv = ["node", os.path.join(HERE, "stream_client.js"), base, str(count), str(seconds), "live", CLIENT_KEY]
    out = load_generator(argv, seconds + 120, cwd=work, pinned=pinned)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def start_floor(
    work: str, upstream: str, prefix: list[str], options: Sequence[str] = (), port: int = 0
) -> tuple[Process, str]:
    """
    bench/floor.py in front of C{upstream} (a C{http://host:port/v1} URL),
    under C{prefix}; return it and its base URL (without /v1).
    """
    where = urllib.parse.urlsplit(upstream)
    relay = Process(
        [*prefix, sys.executable, os.path.join(HERE, "floor.py"), str(port), str(where.hostname), str(where.port)]
        + list(options),
        child_env({}),
        work,
    )
    return relay, relay.wait_for(r"floor relay listening on (http://\S+)").group(1)


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


@contextlib.contextmanager
def profiled(directory: Optional[str], pid: Optional[int], name: str) -> Iterator[None]:
    """
    With C{directory}, sample C{pid} with py-spy (on the load generators'
    CPU) while the block runs, into C{directory/name.txt} as collapsed
    stacks (one line per stack, its sample count last).
    """
    if not directory or not pid:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    out = os.path.join(directory, name + ".txt")
    argv = ["taskset", "-c", UPSTREAM_CPU, "py-spy", "record", "--nonblocking", "-r", "250", "-f", "raw"]
    spy = subprocess.Popen([*argv, "-o", out, "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: the suite works, figures mean nothing")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--only", default="a,b,c,d,workers,workers-streams", help="scenarios to run, comma-separated (default: all)"
    )
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also run (a), (b) and (c) through the proxy of another checkout (its root, first on its PYTHONPATH), "
        "right before this one's, so before and after come from one run",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="record the proxies under py-spy (collapsed stacks in DIR; the CPU figures then include py-spy's sampling)",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="also run (a) and (c) through a proxy under this interpreter (e.g. /tmp/pypyvenv/bin/pypy3, which "
        "needs the project's dependencies installed), beside CPython's, so both come from one run",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="load each proxy this long before measuring (a) and (c), e.g. for a JIT (default: 1 s of (a), none for (c))",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run (a), (b), (c) and (d) through bench/floor.py, a Twisted byte relay that parses, checks and "
        "logs nothing (what the proxy's CPU and memory could at best come down to on Twisted's reactor)",
    )
    parser.add_argument("--seconds", type=float, help="length of each measurement (default: 10, smoke: 2)")
    parser.add_argument("--streams", help="stream counts for (c), comma-separated (default: 200,1000)")
    parser.add_argument(
        "--worker-streams", type=int, help="stream count for workers-streams (default: 2000, smoke: 50)"
    )
    parser.add_argument(
        "--worker-loads-pinned",
        action="store_true",
        help="keep workers-streams' Node.js upstream and load generator on CPU 1 (default: every process of it "
        "unpinned, on both cores)",
    )
    args = parser.parse_args()
    need("wrk", "nginx", "node", "taskset")
    # Thousands of streams need thousands of descriptors, here and in every
    # process started from here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = args.seconds or (2.0 if args.smoke else 10.0)
    stream_counts = (20, 50) if args.smoke else (200, 1000)
    if args.streams:
        stream_counts = tuple(int(n) for n in args.streams.split(","))
    idle_counts = (50, 100) if args.smoke else (1000, 5000)
    worker_streams = args.worker_streams or (50 if args.smoke else 2000)

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
        # Each proxy under test: a plain one (nginx upstream) and a stream
        # one (the SSE upstream).  "before" is another checkout's code.
        # "pypy" is this checkout's code under another interpreter, which
        # runs this installation's twistd script.
        versions = {"proxy": (env, pin)}
        if args.before:
            versions = {"before": ({**env, "PYTHONPATH": os.path.abspath(args.before)}, pin), **versions}
        if args.python:
            versions["pypy"] = (env, [*pin, args.python])
        plain: dict[str, tuple[Process, str]] = {}
        sse_proxies: dict[str, tuple[Process, str]] = {}
        for name, (version_env, prefix) in versions.items():
            for upstream, table in ((plain_url, plain), (sse_url, sse_proxies)):
                process, base = start_proxy(
                    work, ["--upstream", upstream, *common], version_env, prefix=prefix, port=port
                )
                started.append(process)
                table[name] = (process, base)
        if args.floor:
            for upstream, table in ((plain_url, plain), (sse_url, sse_proxies)):
                table["floor"] = start_floor(work, upstream, pin)
                started.append(table["floor"][0])
        targets = {"direct": plain_url, **{name: base + "/v1" for name, (_, base) in plain.items()}}

        only = set(args.only.split(","))
        # (a) plain requests
        small = lua(work, "small", body(1024))
        for target, base in targets.items():
            # Warm up (direct needs no JIT's warm-up).
            wrk(base + "/chat/completions", small, 64, (args.warmup or 1) if target != "direct" else 1)
        results["a"] = {}
        for target, base in targets.items() if "a" in only else ():
            pid = plain[target][0].pid if target in plain else None
            cpu = cpu_seconds(pid) if pid else 0.0
            with profiled(args.profile, pid, f"{target}-a"):
                run = wrk(base + "/chat/completions", small, 64, seconds)
            results["a"][target] = {
                "rps_64": run["rps"],
                "proxy_cpu_us_per_request": 1e6 * (cpu_seconds(pid) - cpu) / run["requests"]
                if pid and run["requests"]
                else None,
                "c1": wrk(base + "/chat/completions", small, 1, seconds),
                "c8": wrk(base + "/chat/completions", small, 8, seconds),
            }

        # (b) 1 MB bodies
        large = lua(work, "large", body(1024 * 1024))
        results["b"] = {}
        for target, base in targets.items() if "b" in only else ():
            process = plain[target][0] if target in plain else None
            cpu = cpu_seconds(process.pid) if process else 0.0
            kernel = system_seconds(process.pid) if process else 0.0
            faults = minor_faults(process.pid) if process else 0
            with profiled(args.profile, process.pid if process else None, f"{target}-b"):
                run = wrk(base + "/chat/completions", large, 8, seconds)
            used = cpu_seconds(process.pid) - cpu if process else 0.0
            in_kernel = system_seconds(process.pid) - kernel if process else 0.0
            faulted = minor_faults(process.pid) - faults if process else 0
            results["b"][target] = {
                "mb_per_s": run["rps"] * len(body(1024 * 1024)) / 1e6,
                "errors": run["errors"],
                "proxy_cpu_ms_per_request": 1000 * used / run["requests"] if process and run["requests"] else None,
                "proxy_kernel_share": in_kernel / used if process and used else None,
                "proxy_faults_per_request": faulted / run["requests"] if process and run["requests"] else None,
                "proxy_peak_rss_mb": memory_kb(process.pid, "VmHWM") / 1024 if process else None,
            }
            if process:
                # What the proxy keeps once the load is over: glibc's trim
                # returns free heap at the next free, so 2 s is ample.
                time.sleep(2)
                results["b"][target]["proxy_rss_after_mb"] = memory_kb(process.pid, "VmRSS") / 1024

        # (c) concurrent streams at 20 chunks/s
        results["c"] = {}
        for count in stream_counts if "c" in only else ():
            row: dict[str, Any] = {}
            stream_targets = {"direct": sse_url, **{name: base + "/v1" for name, (_, base) in sse_proxies.items()}}
            for target, base in stream_targets.items():
                process = sse_proxies[target][0] if target in sse_proxies else None
                if process and args.warmup:
                    streams(base, count, args.warmup, work)
                    settle(process.pid)
                cpu = cpu_seconds(process.pid) if process else 0.0
                kernel = system_seconds(process.pid) if process else 0.0
                with profiled(args.profile, process.pid if process else None, f"{target}-c{count}"):
                    measured = streams(base, count, seconds, work)
                measured["delivered"] = measured["received"] / max(1, measured["expected"])
                if process:
                    used = cpu_seconds(process.pid) - cpu
                    measured["proxy_cpu_share"] = used / (seconds + 2)
                    # Stream setup included: the CPU of the whole scenario
                    # over the chunks the client received.
                    measured["proxy_cpu_us_per_chunk"] = 1e6 * used / max(1, measured["received"])
                    measured["proxy_system_share_of_cpu"] = (system_seconds(process.pid) - kernel) / max(used, 1e-9)
                    measured["proxy_peak_rss_mb"] = memory_kb(process.pid, "VmHWM") / 1024
                row[target] = measured
            results["c"][str(count)] = row

        # (d) idle open streams, each count on a proxy of its own: one that
        # served (c) or a smaller count keeps that load's freed heap for
        # reuse (oaiproxy/daemon/allocator.py), and new streams filling it
        # would not show in its RSS.
        results["d"] = {}
        for count in idle_counts if "d" in only else ():
            fresh, fresh_base = start_proxy(work, ["--upstream", sse_url, *common], env, prefix=pin, port=port)
            started.append(fresh)
            results["d"][str(count)] = idle_streams(fresh_base + "/v1", count, fresh.pid, work)
            fresh.stop()
            if args.floor:
                relay, relay_base = start_floor(work, sse_url, pin)
                started.append(relay)
                results["d"][f"{count} (floor)"] = idle_streams(relay_base + "/v1", count, relay.pid, work)
                relay.stop()

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

        # Multi-core streams: many streams direct and through 2 workers,
        # unpinned like "workers"; the CPU is the whole group's.
        results["workers-streams"] = {}
        if "workers-streams" in only:
            # Its own upstream: on both cores unless pinned like the others.
            pinned = args.worker_loads_pinned
            upstream = Process(
                [*(["taskset", "-c", UPSTREAM_CPU] if pinned else []), "node", os.path.join(HERE, "sse_upstream.js")]
                + ["0", "1000000", "20"],
                child_env({}),
                work,
            )
            started.append(upstream)
            url = upstream.wait_for(r"listening on (http://\S+/v1)").group(1)

            def loaded(base: str) -> dict[str, Any]:
                """
                The streams through C{base}, with the share of a core the
                Node.js upstream and load generator used meanwhile.
                """
                before = cpu_seconds(upstream.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
                figures = streams(base, worker_streams, seconds, work, pinned)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                client = after.ru_utime + after.ru_stime - before[1].ru_utime - before[1].ru_stime
                figures["upstream_cpu_share"] = (cpu_seconds(upstream.pid) - before[0]) / (seconds + 2)
                figures["client_cpu_share"] = client / (seconds + 2)
                return figures

            row = {"direct": loaded(url)}
            proxy, base = start_proxy(work, ["--upstream", url, "--workers", "2", *common], env, port=port)
            started.append(proxy)
            streams(base + "/v1", min(200, worker_streams), 1, work, pinned)  # warm up: imports, pools, caches
            group = group_pids(proxy.pid)
            start = {pid: cpu_seconds(pid) for pid in group}
            row["workers 2"] = loaded(base + "/v1")
            spent = {pid: group_cpu_seconds([pid]) - start[pid] for pid in group}
            proxy.stop()
            if args.floor:
                # Two relays on one port (SO_REUSEPORT), unpinned like the
                # workers: what two processes on Twisted's reactor can do.
                shared_port = free_port()
                relays = [start_floor(work, url, [], ["--reuseport"], port=shared_port)[0] for _ in range(2)]
                started.extend(relays)
                streams(f"http://127.0.0.1:{shared_port}/v1", min(200, worker_streams), 1, work, pinned)
                relay_start = {relay.pid: cpu_seconds(relay.pid) for relay in relays}
                row["floor x2"] = loaded(f"http://127.0.0.1:{shared_port}/v1")
                row["floor x2"]["proxy_cpu_us_per_chunk"] = (
                    1e6
                    * sum(cpu_seconds(pid) - was for pid, was in relay_start.items())
                    / max(1, row["floor x2"]["received"])
                )
                for relay in relays:
                    relay.stop()
            measured = row["workers 2"]
            measured["processes"] = len(group)
            measured["proxy_cpu_share"] = sum(spent.values()) / (seconds + 2)
            measured["proxy_cpu_us_per_chunk"] = 1e6 * sum(spent.values()) / max(1, measured["received"])
            measured["supervisor_cpu_share"] = spent[proxy.pid] / (seconds + 2)
            measured["worker_cpu_shares"] = [spent[pid] / (seconds + 2) for pid in group if pid != proxy.pid]
            for figures in row.values():
                figures["delivered"] = figures["received"] / max(1, figures["expected"])
            row["layout"] = {"loads_pinned": pinned}
            results["workers-streams"][str(worker_streams)] = row
            upstream.stop()
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict[str, Any]) -> str:
    """
    The figures as a Markdown table: direct, then each proxy version (with
    C{--before}: before, then this checkout's; with C{--python}: then
    that interpreter's), then this checkout's ratio to direct (or, with
    C{--before}, to before) and the other interpreter's to this one's.
    The streams through two workers follow in a table of their own.
    """
    a, b = r["a"], r["b"]
    names = [n for n in ("before", "proxy", "floor", "pypy") if n in (a or b or next(iter(r["c"].values()), {}))]
    base = "before" if "before" in names else "direct"
    ratios = [("proxy", base)] + ([("proxy", "floor")] if "floor" in names else [])
    ratios += [("pypy", "proxy")] if "pypy" in names else []
    heads = ["direct", *names, *(f"{top} / {bottom}" for top, bottom in ratios)]
    lines = ["| scenario | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]

    def row(label: str, figures: dict[str, Any], key: Any, fmt: str, ratio: bool = True) -> None:
        values = {n: key(figures[n]) if n in figures else None for n in ("direct", *names)}
        cells = [format(values[n], fmt) if values[n] is not None else "" for n in ("direct", *names)]
        for top, bottom in ratios:
            rel = ""
            numerator, denominator = values.get(top), values.get(bottom)
            if ratio and denominator and numerator is not None:
                rel = f"{numerator / denominator:.3f}"
            cells.append(rel)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if a:
        row("(a) requests/s at 64 connections", a, lambda x: x["rps_64"], ",.0f")
        row("(a) proxy CPU per request, µs", a, lambda x: x["proxy_cpu_us_per_request"], ".0f")
        for c in ("c1", "c8"):
            for p in ("p50", "p99"):
                row(
                    f"(a) latency {p} at {c[1:]} connection(s), ms",
                    a,
                    lambda x, c=c, p=p: x[c][f"{p}_ms"],
                    ".2f",
                    False,
                )
    if b:
        row("(b) 1 MB bodies, MB/s", b, lambda x: x["mb_per_s"], ",.0f")
        row("(b) proxy CPU per 1 MB request, ms", b, lambda x: x["proxy_cpu_ms_per_request"], ".2f")
        row("(b) proxy CPU in the kernel, share", b, lambda x: x["proxy_kernel_share"], ".0%")
        row("(b) proxy minor page faults per 1 MB request", b, lambda x: x["proxy_faults_per_request"], ",.0f")
        row("(b) proxy peak RSS (8 concurrent), MB", b, lambda x: x["proxy_peak_rss_mb"], ".0f")
        row("(b) proxy RSS 2 s after the load, MB", b, lambda x: x.get("proxy_rss_after_mb"), ".0f")
    for count, figures in r["c"].items():
        row(f"(c) {count} streams: chunks delivered", figures, lambda x: 100 * x["delivered"], ".1f", False)
        row(f"(c) {count} streams: chunk delay p50, ms", figures, lambda x: x["delay_p50_ms"], ".1f", False)
        row(f"(c) {count} streams: chunk delay p99, ms", figures, lambda x: x["delay_p99_ms"], ".1f", False)
        row(f"(c) {count} streams: time to first chunk p50, ms", figures, lambda x: x["first_p50_ms"], ".1f", False)
        row(f"(c) {count} streams: proxy CPU per chunk, µs", figures, lambda x: x.get("proxy_cpu_us_per_chunk"), ".1f")
        row(f"(c) {count} streams: proxy CPU, share of a core", figures, lambda x: x.get("proxy_cpu_share"), ".0%")
        row(
            f"(c) {count} streams: of which in the kernel", figures, lambda x: x.get("proxy_system_share_of_cpu"), ".0%"
        )
        row(f"(c) {count} streams: proxy peak RSS, MB", figures, lambda x: x.get("proxy_peak_rss_mb"), ".0f")
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
    if len(lines) == 2:
        lines = []  # only the streams through two workers were measured
    for count, w in r.get("workers-streams", {}).items():
        d, p = w["direct"], w["workers 2"]
        floor = w.get("floor x2")
        where = "on CPU 1, beside one of the workers" if w["layout"]["loads_pinned"] else "on the same two cores"
        lines += [
            "",
            f"{count} streams x 20 chunks/s, `--workers 2` unpinned on both cores; the Node.js upstream and load "
            f"generator (one process each) run {where}:",
            "",
            "| figure | direct | --workers 2 | added |" + (" two floor relays | added |" if floor else ""),
            "|---|---|---|---|" + ("---|---|" if floor else ""),
            f"| chunks delivered | {100 * d['delivered']:.1f}% | {100 * p['delivered']:.1f}% | |"
            + (f" {100 * floor['delivered']:.1f}% | |" if floor else ""),
        ]
        for key, label in (
            ("delay_p50_ms", "chunk delay p50, ms"),
            ("delay_p99_ms", "chunk delay p99, ms"),
            ("steady_delay_p50_ms", "chunk delay p50 once every stream is open, ms"),
            ("steady_delay_p99_ms", "chunk delay p99 once every stream is open, ms"),
            ("first_p50_ms", "time to first chunk p50, ms"),
            ("first_p99_ms", "time to first chunk p99, ms"),
        ):
            if d[key] is not None and p[key] is not None:
                cells = f"| {label} | {d[key]:.1f} | {p[key]:.1f} | {p[key] - d[key]:+.1f} |"
                if floor and floor[key] is not None:
                    cells += f" {floor[key]:.1f} | {floor[key] - d[key]:+.1f} |"
                lines.append(cells)
        lines += [
            f"| streams failed | {d['failed']} | {p['failed']} | |" + (f" {floor['failed']} | |" if floor else ""),
            f"| group CPU per chunk ({p['processes']} processes), µs | | {p['proxy_cpu_us_per_chunk']:.1f} | |"
            + (f" {floor['proxy_cpu_us_per_chunk']:.1f} | |" if floor else ""),
            f"| group CPU, share of one core (supervisor's; each worker's) | | {p['proxy_cpu_share']:.0%} "
            f"({p['supervisor_cpu_share']:.0%}; {', '.join(format(w, '.0%') for w in p['worker_cpu_shares'])}) | |",
            f"| Node.js upstream / load generator CPU, share of one core | {d['upstream_cpu_share']:.0%} / "
            f"{d['client_cpu_share']:.0%} | {p['upstream_cpu_share']:.0%} / {p['client_cpu_share']:.0%} | |"
            + (f" {floor['upstream_cpu_share']:.0%} / {floor['client_cpu_share']:.0%} | |" if floor else ""),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    # Interrupted or terminated, still stop every process started here.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    sys.exit(main())
