"""
Uploads through the proxy: throughput, and what they cost in memory.

Starts the fake upstream and the daemon (C{--routes all}) as real processes
on 127.0.0.1, then sends C{audio/transcriptions} uploads of C{--megabytes}
each over one keep-alive connection, straight to the upstream ("direct")
and through the proxy, in three ways:

 - proxy: no client keys, so nothing waits for the model: the body goes
   upstream as it arrives;
 - proxy+allow-list, model first: a client with an allow-list, the model
   field before the file (as the Python SDK sends it);
 - proxy+allow-list, model last: the model after the file (as the Node SDK
   sends C{{file, model}}), so the upload is held (in a temporary file)
   until its model is known.

For each: MB/s per upload (median of C{--uploads}), and the proxy's peak
resident memory (VmHWM) above its resident memory before the uploads.  A
proxy that held uploads in memory would show at least the upload's size.
The fake upstream reads each upload whole (twisted.web's own request body
handling), so "direct" is the fake's speed, not the network's.

    python bench/upload.py                       # 5 uploads of 32 MB each
    python bench/upload.py --megabytes 2 --uploads 2   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from urllib.parse import urlsplit

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import Process, start_fake_upstream, start_proxy

KEY = "sk-bench-not-a-real-key"
CLIENT_KEY = "oaiproxy-bench-client-key"
BOUNDARY = b"oaiproxy-bench-boundary"


def body_parts(size: int, model_first: bool) -> tuple[list[bytes], int, str]:
    """
    A multipart upload of C{size} bytes of audio as a list of 1 MiB pieces
    (sent one by one, so the client never builds it whole either), its
    length, and the digest the fake upstream will report.
    """
    model = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    file_head = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
    )
    piece = hashlib.sha256(b"bench").digest() * (1024 * 1024 // 32)
    pieces = [piece] * (size // len(piece)) + [piece[: size % len(piece)]]
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(p)
    parts = [file_head, *pieces, b"\r\n"]
    parts = [model, *parts] if model_first else [*parts, model]
    parts.append(b"--" + BOUNDARY + b"--\r\n")
    return parts, sum(len(p) for p in parts), digest.hexdigest()


def upload(connection: http.client.HTTPConnection, path: str, size: int, model_first: bool, key: str) -> float:
    """
    One upload; its throughput in MB/s.
    """
    parts, length, digest = body_parts(size, model_first)
    started = time.perf_counter()
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "multipart/form-data; boundary=" + BOUNDARY.decode())
    connection.putheader("Content-Length", str(length))
    connection.putheader("Authorization", "Bearer " + key)
    connection.endheaders()
    for part in parts:
        connection.send(part)
    response = connection.getresponse()
    answer = json.loads(response.read())
    elapsed = time.perf_counter() - started
    if response.status != 200 or digest not in answer.get("text", ""):
        raise SystemExit(f"upload failed: {response.status} {answer}")
    return length / elapsed / 1e6


def memory(process: Process) -> dict[str, int]:
    """
    The process's current and peak resident memory, in kB.
    """
    pid = process.pid
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def run(base: str, path: str, size: int, uploads: int, model_first: bool, key: str) -> list[float]:
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        return [upload(connection, path, size, model_first, key) for _ in range(uploads)]
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=32, help="size of each upload (default 32)")
    parser.add_argument("--uploads", type=int, default=5, help="uploads per scenario (default 5)")
    args = parser.parse_args()
    size = args.megabytes * 1024 * 1024
    cwd = tempfile.mkdtemp(prefix="oaiproxy-bench-")
    processes: list[Process] = []
    try:
        upstream, upstream_url = start_fake_upstream(cwd, KEY)
        processes.append(upstream)
        direct = run(upstream_url.rsplit("/v1", 1)[0], "/v1/audio/transcriptions", size, args.uploads, True, KEY)
        print(f"upload of {args.megabytes} MB, {args.uploads} times; MB/s median, proxy peak RSS above idle")
        print(f"  {'direct':34} {statistics.median(direct):8.1f} MB/s")
        limit = ["--max-body-bytes", str(2 * size + 1024 * 1024), "--routes", "all"]
        keys = os.path.join(cwd, "clients.toml")
        with open(keys, "w") as f:
            f.write(file_entry("bench", CLIENT_KEY, ["whisper-1"]))
        scenarios = [
            ("proxy", [], {}, True),
            ("proxy+allow-list, model first", ["--client-keys-file", keys], {}, True),
            ("proxy+allow-list, model last", ["--client-keys-file", keys], {}, False),
        ]
        for name, extra, env, model_first in scenarios:
            proxy, base = start_proxy(cwd, ["--upstream", upstream_url, *limit, *extra], {"OPENAI_API_KEY": KEY, **env})
            processes.append(proxy)
            before = memory(proxy)
            speeds = run(base, "/v1/audio/transcriptions", size, args.uploads, model_first, CLIENT_KEY)
            after = memory(proxy)
            peak = (after["VmHWM"] - before["VmRSS"]) / 1024
            print(f"  {name:34} {statistics.median(speeds):8.1f} MB/s   peak RSS +{peak:.1f} MB")
            proxy.stop()
        sys.stdout.flush()
    finally:
        for process in processes:
            process.stop()
        shutil.rmtree(cwd, ignore_errors=True)


if __name__ == "__main__":
    main()
