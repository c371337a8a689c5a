"""
The usage meter and the usage filter on their own, in one process: the
per-chunk cost of a normal stream, and the cost of one long line without a
newline (issue 11: a broken or hostile upstream's 17 MB C{data:} line).

    PYTHONPATH=. python bench/meter.py                  # every figure
    PYTHONPATH=. python bench/meter.py --line-mb 1      # a seconds-long smoke run
    PYTHONPATH=. python bench/meter.py --before ../old  # also another checkout's, alternating

Figures are CPU time on this process (C{time.process_time}), best of
C{--rounds}; only figures from one machine are comparable, and on a busy
machine only those of one run: C{--before} loads another checkout's
C{oaiproxy/observe/usage.py} beside this one and alternates the two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from types import ModuleType
from typing import Callable, Sequence

from oaiproxy.observe import usage


def chat_events(count: int) -> list[bytes]:
    """
    A chat stream as OpenAI sends it with C{include_usage}: one word of
    content per event, C{"usage": null} on each, a usage-only event, then
    C{[DONE]}.
    """
    events = []
    for i in range(count):
        payload = {
            "id": "chatcmpl-BENCH0123456789",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0123456789",
            "choices": [{"index": 0, "delta": {"content": f" word{i % 100}"}, "logprobs": None, "finish_reason": None}],
            "usage": None,
        }
        events.append(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    final = {"id": "chatcmpl-BENCH", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": count}}
    final["usage"]["total_tokens"] = 9 + count  # type: ignore[index]
    events.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def reads_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def cpu(run: Callable[[], None], rounds: int) -> float:
    """
    The best CPU time of C{rounds} runs, in seconds.
    """
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def _usage_path(checkout: str) -> str:
    """
    Where a checkout keeps the usage module: C{oaiproxy/observe/usage.py}
    since the package has subpackages, C{oaiproxy/usage.py} before.
    """
    path = os.path.join(checkout, "oaiproxy", "observe", "usage.py")
    return path if os.path.exists(path) else os.path.join(checkout, "oaiproxy", "usage.py")


def load(checkout: str) -> ModuleType:
    """
    Another checkout's usage module, beside this one.
    """
    spec = importlib.util.spec_from_file_location("usage_before", _usage_path(checkout))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def through_meter(module: ModuleType, reads: Sequence[bytes]) -> Callable[[], None]:
    def run() -> None:
        meter = module.UsageMeter(True)
        for read in reads:
            meter.feed(read)
        meter.finish()

    return run


def through_filter(module: ModuleType, reads: Sequence[bytes]) -> Callable[[], None]:
    def run() -> None:
        strip = module.UsageEventFilter()
        for read in reads:
            strip(read)
        strip.flush()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events in the normal stream")
    parser.add_argument("--line-mb", type=float, default=17.0, help="size of the newline-less line, MB")
    parser.add_argument("--read-kb", type=int, default=16, help="bytes per read for the long line, KiB")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each normal-stream figure (best is shown)")
    parser.add_argument("--before", help="another checkout, whose meter is measured too, alternating")
    args = parser.parse_args()

    modules = {"this": usage}
    if args.before:
        modules = {"before": load(args.before), "after": usage}
    events = chat_events(args.events)
    whole = b"".join(events)
    cases = {
        "normal stream, one event per read": events,
        "normal stream, 1,500-byte reads": reads_of(whole, 1500),
    }
    print("| scenario | code | meter | filter (include_usage stripped) |")
    print("|---|---|---|---|")
    for name, reads in cases.items():
        best: dict[str, list[float]] = {label: [float("inf")] * 2 for label in modules}
        for _ in range(args.rounds):
            for label, module in modules.items():
                meter = cpu(through_meter(module, reads), 1)
                strip = cpu(through_filter(module, reads), 1)
                best[label] = [min(best[label][0], meter), min(best[label][1], strip)]
        for label, (meter, strip) in best.items():
            per_read = [f"{t / len(reads) * 1e6:.2f} µs per read" for t in (meter, strip)]
            print(f"| {name} ({len(reads):,} reads) | {label} | {per_read[0]} | {per_read[1]} |")

    line = b"data: " + b"x" * int(args.line_mb * 1_000_000)
    reads = reads_of(line, args.read_kb * 1024)
    for label, module in modules.items():
        meter = cpu(through_meter(module, reads), 1)
        strip = cpu(through_filter(module, reads), 1)
        print(
            f"| one {args.line_mb:g} MB line without a newline, {args.read_kb} KiB reads ({len(reads):,} reads) "
            f"| {label} | {meter * 1000:,.1f} ms | {strip * 1000:,.1f} ms |"
        )


if __name__ == "__main__":
    main()
