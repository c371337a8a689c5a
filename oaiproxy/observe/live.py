# -*- test-case-name: tests.observe.test_live -*-
"""
The dashboard's live figures: the last hour of the proxy's metrics,
sampled every few seconds, and its most recent refusals.

Nothing here runs on a request's path.  L{LiveStats.sample} reads the
metrics registry (in a group, every worker's files: the group's totals)
on a timer, keeps one L{Snapshot} per tick for the window, and turns two
neighbouring snapshots into rates and percentiles only when the dashboard
asks (L{LiveStats.series}): requests per second by status class from the
counters' deltas, proxy overhead and time to first token at p50 and p99
from the histograms' bucket deltas (as Prometheus's C{histogram_quantile}
does), upstream errors per second by kind.

L{Refusals} keeps the last requests the proxy answered itself with an
error (no upstream attempt: a bad key, a limit, a budget, a bad body):
time, client name, route, status and error code only, never a body, a
header value or a key.  It reads the finished records (one comparison per
request; the list is bounded).

In a group of workers each worker writes what only it knows (its pool's
breakers and its refusals) to a small file of its own in the group's
metrics directory every tick (L{WorkerFiles}); whichever worker the
dashboard reaches reads them all.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

from prometheus_client.core import Metric
from twisted.internet.interfaces import IReactorTime

from oaiproxy.observe.records import RequestRecord

__all__ = [
    "LIVE_INTERVAL",
    "LIVE_WINDOW",
    "LiveStats",
    "Refusals",
    "Snapshot",
    "WorkerFiles",
    "merge_upstreams",
    "quantile",
    "snapshot_of",
]

#: Seconds between two samples.
LIVE_INTERVAL = 5.0
#: How far back the live charts go, in seconds.
LIVE_WINDOW = 3600.0
#: Refusals kept (per worker in a group).
REFUSALS_KEPT = 100

_REQUESTS = "oaiproxy_requests"
_ERRORS = "oaiproxy_upstream_errors"
_OVERHEAD = "oaiproxy_proxy_overhead_seconds"
_TTFT = "oaiproxy_time_to_first_chunk_seconds"
_STREAMS = "oaiproxy_open_streams"
_IN_FLIGHT = "oaiproxy_in_flight_requests"

#: Cumulative bucket counts by upper bound (C{inf} last), summed over labels.
Buckets = tuple[tuple[float, float], ...]


class Snapshot(NamedTuple):
    """
    The metrics at one tick: counters' totals, gauges' values, histograms'
    cumulative buckets.
    """

    at: float
    requests: Mapping[str, float]
    errors: Mapping[str, float]
    open_streams: float
    in_flight: float
    overhead: Buckets
    ttft: Buckets


def snapshot_of(families: Iterable[Metric], at: float) -> Snapshot:
    """
    The figures the dashboard charts, out of a registry's collected
    families (labels other than the status class and the error kind are
    summed away).
    """
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    gauges = {_STREAMS: 0.0, _IN_FLIGHT: 0.0}
    buckets: dict[str, dict[float, float]] = {_OVERHEAD: {}, _TTFT: {}}
    for family in families:
        name = family.name
        if name == _REQUESTS or name == _ERRORS:
            into, label = (requests, "status_class") if name == _REQUESTS else (errors, "kind")
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels.get(label, "-")
                    into[key] = into.get(key, 0.0) + sample.value
        elif name in gauges:
            gauges[name] = sum(sample.value for sample in family.samples)
        elif name in buckets:
            by_bound = buckets[name]
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    by_bound[bound] = by_bound.get(bound, 0.0) + sample.value
    return Snapshot(
        at,
        requests,
        errors,
        gauges[_STREAMS],
        gauges[_IN_FLIGHT],
        tuple(sorted(buckets[_OVERHEAD].items())),
        tuple(sorted(buckets[_TTFT].items())),
    )


def quantile(q: float, before: Buckets, after: Buckets) -> Optional[float]:
    """
    The C{q} quantile (0 to 1) of what was observed between two snapshots
    of a histogram, interpolated linearly inside its bucket; C{None} when
    nothing was observed.  Above the last finite bound it is that bound,
    as with Prometheus (the histogram knows no more).
    """
    earlier = dict(before)
    counts = [(bound, total - earlier.get(bound, 0.0)) for bound, total in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank and cumulative > below:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def _rates(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> dict[str, float]:
    # A counter that went backwards (a lone process restarted) counts from 0.
    return {key: max(0.0, value - before.get(key, 0.0)) / seconds for key, value in after.items()}


class LiveStats:
    """
    The last L{LIVE_WINDOW} seconds of the metrics, one snapshot per
    L{sample} (a C{TimerService} calls it every L{LIVE_INTERVAL}).

    @param collect: the registry's families now (C{registry.collect}).
    """

    def __init__(
        self,
        collect: Callable[[], Iterable[Metric]],
        clock: IReactorTime,
        interval: float = LIVE_INTERVAL,
        window: float = LIVE_WINDOW,
    ) -> None:
        self._collect = collect
        self._clock = clock
        self.interval = interval
        self.window = window
        self._snapshots: deque[Snapshot] = deque(maxlen=int(window / interval) + 1)

    def sample(self) -> None:
        """
        Take one snapshot now.
        """
        self._snapshots.append(snapshot_of(self._collect(), self._clock.seconds()))

    def series(self) -> dict[str, Any]:
        """
        The charts' data: one point per interval between two snapshots
        (C{t} its end, in POSIX seconds), every series as long as C{t};
        C{None} where a percentile had no observation to read.
        """
        snapshots = list(self._snapshots)
        t: list[float] = []
        rps: list[dict[str, float]] = []
        errors: list[dict[str, float]] = []
        series: dict[str, list[Optional[float]]] = {
            name: [] for name in ("open_streams", "in_flight", "overhead_p50", "overhead_p99", "ttft_p50", "ttft_p99")
        }
        for before, after in zip(snapshots, snapshots[1:]):
            seconds = after.at - before.at
            if seconds <= 0:
                continue
            t.append(after.at)
            rps.append(_rates(before.requests, after.requests, seconds))
            errors.append(_rates(before.errors, after.errors, seconds))
            series["open_streams"].append(after.open_streams)
            series["in_flight"].append(after.in_flight)
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                series["overhead_" + name].append(quantile(q, before.overhead, after.overhead))
                series["ttft_" + name].append(quantile(q, before.ttft, after.ttft))
        return {
            "interval": self.interval,
            "window": self.window,
            "t": t,
            "requests_per_second": _columns(rps),
            "upstream_errors_per_second": _columns(errors),
            **series,
        }


def _columns(rows: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """
    One list per key out of one mapping per point (0 where a key is
    missing: a status class seen only later).
    """
    keys = sorted({key for row in rows for key in row})
    return {key: [round(row.get(key, 0.0), 4) for row in rows] for key in keys}


class Refusals:
    """
    The last L{REFUSALS_KEPT} requests the proxy refused itself: answered
    with a status of 400 or more without an upstream attempt.  Called with
    every finished record (after the access log).

    The error code is the one the proxy answered with
    (L{RequestRecord.error_code}); nothing else of the request is kept.
    """

    def __init__(self, size: int = REFUSALS_KEPT) -> None:
        self._kept: deque[dict[str, Any]] = deque(maxlen=size)

    def __call__(self, record: RequestRecord) -> None:
        if record.status >= 400 and not record.attempts:
            self._kept.append(
                {
                    "at": record.started,
                    "client": record.client,
                    "route": record.route,
                    "status": record.status,
                    "code": record.error_code,
                }
            )

    def recent(self) -> list[dict[str, Any]]:
        """
        The refusals kept, newest first.
        """
        return list(reversed(self._kept))


def merge_upstreams(reports: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """
    One entry per upstream out of each worker's view of its pool: the
    worst breaker state, in-flight summed, the latest failure, the longest
    cooldown, and how many workers see the breaker other than closed.
    """
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for health in report:
            name = health["name"]
            entry = merged.get(name)
            if entry is None:
                entry = merged[name] = dict(health, workers=0, not_closed=0)
            else:
                if health["state_value"] > entry["state_value"]:
                    entry["state"], entry["state_value"] = health["state"], health["state_value"]
                entry["in_flight"] += health["in_flight"]
                entry["cooldown_left"] = max(entry["cooldown_left"], health["cooldown_left"])
                if (health["last_failure_at"] or 0) > (entry["last_failure_at"] or 0):
                    entry["last_failure"] = health["last_failure"]
                    entry["last_failure_at"] = health["last_failure_at"]
            entry["workers"] += 1
            entry["not_closed"] += 1 if health["state_value"] else 0
    return list(merged.values())


class WorkerFiles:
    """
    What each worker of a group alone knows (its pool's breakers, its
    refusals), in a small JSON file per worker process in the group's
    metrics directory (private to the group, removed when it stops; the
    metrics' reader looks only at C{*.db} files).  A worker writes its own
    every tick (written whole, then renamed: never read half-written); a
    reader takes the upstreams of the files written in the last three
    ticks (a dead worker's pool is gone) and the refusals of every file
    written within the window (a dead worker's refusals still happened).
    """

    PREFIX = "dashboard-"

    def __init__(self, directory: str, pid: int, clock: IReactorTime, interval: float, window: float) -> None:
        self.directory = directory
        self._path = os.path.join(directory, f"{self.PREFIX}{pid}.json")
        self._clock = clock
        self._interval = interval
        self._window = window

    def write(self, document: Mapping[str, Any]) -> None:
        """
        Write this worker's file.
        """
        partial = self._path + ".tmp"
        with open(partial, "w", encoding="utf-8") as out:
            json.dump(dict(document, written_at=self._clock.seconds()), out)
        os.replace(partial, self._path)

    def read(self) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]], int]:
        """
        Every fresh worker's upstreams, the refusals of the window (newest
        first), and how many workers are fresh.
        """
        now = self._clock.seconds()
        upstreams: list[list[dict[str, Any]]] = []
        refusals: list[dict[str, Any]] = []
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith(self.PREFIX) and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as source:
                    document = json.load(source)
            except (OSError, ValueError):
                continue  # removed meanwhile
            age = now - document.get("written_at", 0)
            if age > self._window:
                continue
            if age <= 3 * self._interval:
                upstreams.append(document.get("upstreams", []))
            refusals.extend(document.get("refusals", []))
        refusals.sort(key=lambda refusal: refusal["at"], reverse=True)
        return upstreams, refusals[:REFUSALS_KEPT], len(upstreams)
