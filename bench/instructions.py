"""
Instructions per relayed stream chunk and per plain request: the real
daemon under valgrind's callgrind, counted only in a steady-state window.

    PYTHONPATH=. python bench/instructions.py                      # a few minutes
    PYTHONPATH=. python bench/instructions.py --before /path/to/old # both, alternating

CPU time per unit of work (bench/run.py) moves by 20% and more on this
shared machine; a count of the proxy's user-space instructions moves by a
few percent, so it shows what a change to the hot path is worth.  It does
not count the kernel's work (system calls), and under callgrind the
proxy is about 50 times slower, so the load is small: N streams at 20
chunks/s (bench/sse_upstream.js, after a warm-up in which all are open),
and sequential ~1 KB chat completions over one keep-alive connection to
nginx's fixed answer.  The daemon runs as in bench/run.py: client keys,
validation, limits, usage metering, metrics and the text access log on.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: the nginx answer, the request body, the keys file)

from oaiproxy.access.clients import file_entry  # noqa: E402
from oaiproxy.fake.processes import Process, child_env, twistd  # noqa: E402


def callgrind_proxy(work: str, root: str, upstream: str, name: str) -> tuple[Process, str, str]:
    """
    The daemon of checkout C{root} under callgrind (instrumentation off
    until asked), pinned to the proxy's CPU.
    """
    clients = os.path.join(work, "clients.toml")
    if not os.path.exists(clients):
        with open(clients, "w") as f:
            f.write("[defaults]\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000000\n")
            f.write(file_entry("bench", run.CLIENT_KEY, ["gpt-4o-mini"]))
    out = os.path.join(work, f"{name}.callgrind")
    argv = ["taskset", "-c", run.PROXY_CPU, "valgrind", "--tool=callgrind", "--instr-atstart=no"]
    argv += [f"--callgrind-out-file={out}", sys.executable, twistd(), "--nodaemon", "--pidfile=", "oaiproxy"]
    argv += ["--port", "tcp:0:interface=127.0.0.1", "--upstream", upstream, "--client-keys-file", clients]
    argv += ["--max-connections-per-ip", "100000", "--sse-keepalive", "0"]
    proxy = Process(argv, child_env({"OPENAI_API_KEY": run.UPSTREAM_KEY, "PYTHONPATH": root}), work)
    base = proxy.wait_for(r"oaiproxy listening on (http://127\.\d+\.\d+\.\d+:\d+)", timeout=300).group(1)
    return proxy, base, out


def counted(proxy: Process, out: str, work: Any) -> int:
    """
    Run C{work()} with instrumentation on; the instructions it cost.
    """
    pid = str(proxy.pid)
    subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
    work()
    subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True)
    total = 0
    for name in os.listdir(os.path.dirname(out)):
        if name.startswith(os.path.basename(out)):
            with open(os.path.join(os.path.dirname(out), name)) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            os.unlink(os.path.join(os.path.dirname(out), name))
    return total


def per_chunk(work: str, root: str, sse_url: str, streams: int, seconds: float) -> float:
    proxy, base, out = callgrind_proxy(work, root, sse_url, "streams")
    argv = ["taskset", "-c", run.UPSTREAM_CPU, "node", os.path.join(HERE, "stream_client.js"), base + "/v1"]
    client = Process([*argv, str(streams), str(seconds + 30), "live", run.CLIENT_KEY], child_env({}), work)
    try:
        time.sleep(15)  # every stream open and relaying
        instructions = counted(proxy, out, lambda: time.sleep(seconds))
    finally:
        client.stop()
        proxy.stop()
    return instructions / (streams * 20 * seconds)


def per_request(work: str, root: str, plain_url: str, requests: int) -> float:
    proxy, base, out = callgrind_proxy(work, root, plain_url, "plain")
    host, port = base.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = run.body(1024)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {run.CLIENT_KEY}"}

    def send(n: int) -> None:
        for _ in range(n):
            connection.request("POST", "/v1/chat/completions", payload, headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status

    try:
        send(50)  # warm
        instructions = counted(proxy, out, lambda: send(requests))
    finally:
        connection.close()
        proxy.stop()
    return instructions / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="CHECKOUT", help="also measure another checkout's daemon, alternating")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    run.need("nginx", "node", "taskset", "valgrind", "callgrind_control")
    checkouts = {"after": os.path.dirname(HERE)}
    if args.before:
        checkouts = {"before": os.path.abspath(args.before), **checkouts}
    work = tempfile.mkdtemp(prefix="oaiproxy-instructions-")
    started: list[Process] = []
    results: dict[str, dict[str, list[float]]] = {name: {"chunk": [], "request": []} for name in checkouts}
    try:
        nginx_port = run.free_port()
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(run.NGINX_CONF.format(work=work, port=nginx_port, answer=run.ANSWER))
        conf = os.path.join(work, "nginx.conf")
        started.append(
            Process(["taskset", "-c", run.UPSTREAM_CPU, "nginx", "-c", conf, "-p", work], child_env({}), work)
        )
        argv = ["taskset", "-c", run.UPSTREAM_CPU, "node", os.path.join(HERE, "sse_upstream.js"), "0", "1000000", "20"]
        sse = Process(argv, child_env({}), work)
        started.append(sse)
        sse_url = sse.wait_for(r"listening on (http://\S+/v1)").group(1)
        plain_url = f"http://127.0.0.1:{nginx_port}/v1"
        for _ in range(args.rounds):
            for name, root in checkouts.items():
                results[name]["chunk"].append(per_chunk(work, root, sse_url, args.streams, args.seconds))
                results[name]["request"].append(per_request(work, root, plain_url, args.requests))
    finally:
        for process in reversed(started):
            process.stop()
    print(json.dumps(results))
    print("| instructions (callgrind, user space) | " + " | ".join(checkouts) + " |")
    print("|---" * (len(checkouts) + 1) + "|")
    for kind, label in (("chunk", "per relayed stream chunk"), ("request", "per plain ~1 KB request")):
        cells = [", ".join(f"{v:,.0f}" for v in results[name][kind]) for name in checkouts]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
