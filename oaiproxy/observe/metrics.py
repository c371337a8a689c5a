# -*- test-case-name: tests.observe.test_observe,tests.observe.test_metrics -*-
"""
Prometheus metrics, with the standard C{prometheus_client} library.

Series follow Prometheus conventions (C{_total} counters, C{_seconds}
histograms, C{_bytes}) and every label comes from a bounded set, so no
client can blow up the number of series: C{client} is a configured client
name (or C{-}), C{route} one of the proxy's routes, C{status_class} like
C{2xx}, C{upstream} a configured upstream name (or C{-} for a request
that reached none), C{outcome} and C{reason} one of the few words of
L{oaiproxy.upstream.pool.outcome_label}, and C{model} the requested model
for the first L{MODEL_LABEL_LIMIT} distinct, well-formed names seen,
C{other} after that.

Per upstream: attempts by outcome and failovers by reason are counted as
they happen (the pool reports them, L{Metrics} is its observer); the
breaker state and the requests in flight are read from the pool at each
scrape (L{Metrics.watch_upstreams}), since a breaker's state is computed
from the clock when asked: a gauge set on transitions would show an open
breaker until the next request looked at it.

The registry is this object's own, not the library's global one, so tests
and several sites do not share counts.  L{MetricsResource} renders it in
the text exposition format synchronously: the library's Twisted helper
would run a WSGI app on the reactor's thread pool for a few microseconds
of formatting.

A group of workers (C{--workers N}) shows one set of series, whichever
worker a scrape reaches: prometheus_client's multiprocess mode.  The
supervisor makes a private directory (L{GroupDirectory}) and starts every
worker with L{MULTIPROC_ENV} naming it, so that the library, which picks
its value class once, at import, writes every sample of that worker to
memory-mapped files there; a worker's L{Metrics} (C{group_dir=}) serves a
registry holding only a C{MultiProcessCollector} over the directory, which
adds up every file at each scrape.  Counters and histograms of a worker
that died stay in the directory and in the sums, so totals never go
backwards; the supervisor drops a dead worker's gauges
(L{GroupDirectory.process_dead}).  Each gauge says how its workers' values
combine (C{multiprocess_mode}): requests and streams in flight are summed
over live workers; a breaker's state is each worker's own (its breakers
are its own), under a C{worker} label.  The per-upstream gauges, read from
the pool at scrape time in one process, cannot be read from another
worker's pool: in a group each worker writes them every
L{UPSTREAM_GAUGE_SECONDS} (and just before it answers a scrape), and a
scrape keeps only the upstreams its own pool has, so a reload (which every
worker gets) still removes an upstream from them.  Without C{--workers}
nothing of this runs: no files, the in-process registry.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, NamedTuple, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.web.server import Request

from oaiproxy.observe.records import RequestRecord
from oaiproxy.web import Endpoint

__all__ = [
    "Metrics",
    "MetricsResource",
    "MetricsCheck",
    "MODEL_LABEL_LIMIT",
    "UpstreamGauges",
    "GuardedEndpoint",
    "GroupDirectory",
    "MULTIPROC_ENV",
    "UPSTREAM_GAUGE_SECONDS",
    "Unrecorded",
    "BUDGET_REMAINING",
]

#: The variable prometheus_client reads, once, when first imported: set,
#: it writes every sample to files in that directory (multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often a worker of a group writes its pool's per-upstream gauges.
UPSTREAM_GAUGE_SECONDS = 1.0
_BREAKER_STATE = "oaiproxy_upstream_breaker_state"
_UPSTREAM_IN_FLIGHT = "oaiproxy_upstream_in_flight_requests"
#: The budget gauge (L{oaiproxy.access.budgetstore.BudgetRefresh}).
BUDGET_REMAINING = "oaiproxy_budget_remaining"
_BREAKER_HELP = "Each upstream's circuit breaker: 0 closed, 1 half-open, 2 open."
_UPSTREAM_IN_FLIGHT_HELP = "Requests on their way to or from each upstream."

#: Decides whether a request may read the metrics: C{None} to let it in,
#: or the refusal body (with status and headers already set on the request).
MetricsCheck = Callable[[Request], Optional[bytes]]

#: Distinct model names that get their own label value.
MODEL_LABEL_LIMIT = 50
_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/@+-]{1,64}$")

# Latency buckets from 1 ms to 5 min: proxy overhead sits at the low end,
# reasoning streams at the high end.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class UpstreamGauges(NamedTuple):
    """
    One upstream's gauges at a scrape.

    @ivar breaker_state: 0 closed, 1 half-open, 2 open.
    """

    name: str
    breaker_state: int
    in_flight: int


class _UpstreamCollector(Collector):
    """
    The per-upstream gauges, read when scraped from whatever
    L{Metrics.watch_upstreams} was given; an upstream removed by a reload
    drops out of them.
    """

    def __init__(self) -> None:
        self.read: Callable[[], Iterable[UpstreamGauges]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(_BREAKER_STATE, _BREAKER_HELP, labels=["upstream"])
        in_flight = GaugeMetricFamily(_UPSTREAM_IN_FLIGHT, _UPSTREAM_IN_FLIGHT_HELP, labels=["upstream"])
        for gauges in self.read():
            state.add_metric([gauges.name], gauges.breaker_state)
            in_flight.add_metric([gauges.name], gauges.in_flight)
        yield state
        yield in_flight


_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _GroupCollector(Collector):
    """
    A scrape in a group: every worker's files added up, of the per-upstream
    gauges only the upstreams this worker's pool has now, of the budget
    gauges only the budgets its clients have now (a file keeps a series
    its worker removed; every worker gets the same reloads).
    """

    def __init__(
        self,
        directory: str,
        upstreams: Callable[[], Iterable[str]],
        budgets: Callable[[], Optional[Collection[tuple[str, str]]]] = lambda: None,
    ) -> None:
        self._files = MultiProcessCollector(None, path=directory)
        self._upstreams = upstreams
        self._budgets = budgets

    def collect(self) -> Iterator[Metric]:
        current = set(self._upstreams())
        budgets = self._budgets()
        for metric in self._files.collect():
            if metric.name in (_BREAKER_STATE, _UPSTREAM_IN_FLIGHT):
                metric.samples = [s for s in metric.samples if s.labels.get("upstream") in current]
            elif metric.name == BUDGET_REMAINING and budgets is not None:
                metric.samples = [
                    s for s in metric.samples if (s.labels.get("client"), s.labels.get("budget")) in budgets
                ]
            yield metric


class Metrics:
    """
    The proxy's metrics.

    @param group_dir: in a worker of a group, the directory its supervisor
        made (L{GroupDirectory}); C{None} for one process on its own.
    @param worker: that worker's index (the C{worker} label).
    @ivar registry: what C{/metrics} shows.
    @ivar series_registry: where a series registers (C{registry=} of a
        C{Counter}, C{Gauge}, ...): C{registry} itself for one process;
        C{None} in a group, whose samples reach C{/metrics} through the
        files (registered as well, a series would show twice).  Every gauge
        says how a group combines it (C{multiprocess_mode}).
    @raise ValueError: for C{group_dir} when prometheus_client was imported
        without L{MULTIPROC_ENV}: the samples would stay in this process.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        group_dir: Optional[str] = None,
        worker: Optional[int] = None,
    ) -> None:
        self._read: Callable[[], Iterable[UpstreamGauges]] = lambda: ()
        self._budgets: Callable[[], Optional[Collection[tuple[str, str]]]] = lambda: None
        self._group = group_dir is not None
        self._children: dict[tuple[Any, ...], Any] = {}
        if group_dir is not None:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise ValueError(f"{MULTIPROC_ENV} must be set before prometheus_client is first imported")
            # The samples go to files only; the scrape reads every worker's.
            self.registry = CollectorRegistry()
            self.registry.register(
                _GroupCollector(group_dir, lambda: [g.name for g in self._read()], lambda: self._budgets())
            )
            self.series_registry: Optional[CollectorRegistry] = None
        else:
            self.registry = registry if registry is not None else CollectorRegistry()
            self.series_registry = self.registry
        r = self.series_registry
        self._worker = "-" if worker is None else str(worker)
        self.requests = Counter(
            "oaiproxy_requests", "Requests answered.", ["client", "model", "route", "status_class"], registry=r
        )
        self.upstream_latency = Histogram(
            "oaiproxy_upstream_response_seconds",
            "Time from sending a request upstream to its response head, by the upstream that answered.",
            ["route", "upstream"],
            buckets=_SECONDS,
            registry=r,
        )
        self.proxy_overhead = Histogram(
            "oaiproxy_proxy_overhead_seconds",
            "Time spent in the proxy itself, excluding the upstream.",
            ["route"],
            buckets=_OVERHEAD,
            registry=r,
        )
        self.first_chunk = Histogram(
            "oaiproxy_time_to_first_chunk_seconds",
            "Time from a request to the first chunk of its streamed answer, by the upstream that answered.",
            ["route", "upstream"],
            buckets=_SECONDS,
            registry=r,
        )
        self.stream_duration = Histogram(
            "oaiproxy_stream_duration_seconds",
            "Duration of streamed answers, by the upstream that answered.",
            ["route", "upstream"],
            buckets=_SECONDS,
            registry=r,
        )
        # In a group: the sum over the workers alive (a dead worker's
        # requests are not in flight any more).
        self.open_streams = Gauge(
            "oaiproxy_open_streams", "Streamed answers in progress.", registry=r, multiprocess_mode="livesum"
        )
        self.in_flight = Gauge(
            "oaiproxy_in_flight_requests", "Requests being processed.", registry=r, multiprocess_mode="livesum"
        )
        self.disconnects = Counter(
            "oaiproxy_client_disconnects", "Requests whose client left before the answer ended.", ["route"], registry=r
        )
        self.upstream_errors = Counter(
            "oaiproxy_upstream_errors",
            "Upstream failures by kind: connect, timeout, reset (mid-response), status (5xx answer).",
            ["kind"],
            registry=r,
        )
        self.bytes_in = Counter("oaiproxy_request_bytes", "Request body bytes received.", ["route"], registry=r)
        self.bytes_out = Counter("oaiproxy_response_bytes", "Response body bytes sent.", ["route"], registry=r)
        self.tokens = Counter(
            "oaiproxy_tokens",
            "Tokens used, by kind (prompt, completion, reasoning, cached); exact=false for estimates of "
            "streams cut short.",
            ["client", "model", "kind", "exact"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "oaiproxy_upstream_requests",
            "Requests sent to each upstream, by how they ended: ok, client_error, rate_limited, key_refused, "
            "server_error, connect, no_head, first_byte, broken, cancelled.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "oaiproxy_upstream_failovers",
            "Requests that left an upstream for the next, by the upstream left and why.",
            ["upstream", "reason"],
            registry=r,
        )
        self._models: set[str] = set()
        if self._group:
            # Another worker's pool cannot be read at scrape time: each
            # worker writes its own (refresh_upstreams).  A breaker is one
            # worker's, so each worker's state is its own series.
            self._breaker_state = Gauge(
                _BREAKER_STATE, _BREAKER_HELP, ["upstream", "worker"], registry=None, multiprocess_mode="livemax"
            )
            self._upstream_in_flight = Gauge(
                _UPSTREAM_IN_FLIGHT, _UPSTREAM_IN_FLIGHT_HELP, ["upstream"], registry=None, multiprocess_mode="livesum"
            )
        else:
            self._upstreams = _UpstreamCollector()
            self.registry.register(self._upstreams)
        self.shared_state_up: Optional[Gauge] = None
        self.shared_state_episodes: Optional[Counter] = None
        self.shared_state_fallback: Optional[Counter] = None
        self.shared_state_late: Optional[Counter] = None
        self.shared_state_budget_fallback: Optional[Counter] = None
        self.shared_state_budget_lost_settles: Optional[Counter] = None

    def watch_shared_state(self, up: bool) -> None:
        """
        Show the shared state's series (C{--shared-state} only: without
        it, C{oaiproxy_shared_state_up 0} would read as an outage).  The
        gauge takes the minimum over a group's live workers: the group is
        up only while every one of them reaches Redis.
        """
        r = self.series_registry
        self.shared_state_up = Gauge(
            "oaiproxy_shared_state_up",
            "1 while the shared state (Redis) answers, 0 while limits are decided locally.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.shared_state_episodes = Counter(
            "oaiproxy_shared_state_episodes", "Times the shared state (Redis) became unreachable.", registry=r
        )
        self.shared_state_fallback = Counter(
            "oaiproxy_shared_state_fallback_admitted",
            "Requests admitted by this process's own share of the limits while the shared state was unreachable.",
            registry=r,
        )
        self.shared_state_late = Counter(
            "oaiproxy_shared_state_late",
            "Calls to the shared state (Redis) that missed their deadline and were decided locally.",
            registry=r,
        )
        self.shared_state_budget_fallback = Counter(
            "oaiproxy_shared_state_budget_fallback_admitted",
            "Requests whose budgets this process decided on its own totals while the shared state was unreachable.",
            registry=r,
        )
        self.shared_state_budget_lost_settles = Counter(
            "oaiproxy_shared_state_budget_lost_settles",
            "Budget settlements sent to the shared state (Redis) and not confirmed: Redis may keep them reserved.",
            registry=r,
        )
        self.shared_state_up.set(1 if up else 0)

    def shared_state_changed(self, up: bool) -> None:
        if self.shared_state_up is not None:
            self.shared_state_up.set(1 if up else 0)
        if not up and self.shared_state_episodes is not None:
            self.shared_state_episodes.inc()

    def shared_state_late_call(self) -> None:
        if self.shared_state_late is not None:
            self.shared_state_late.inc()

    def admitted_in_fallback(self) -> None:
        if self.shared_state_fallback is not None:
            self.shared_state_fallback.inc()

    def budget_decided_in_fallback(self) -> None:
        if self.shared_state_budget_fallback is not None:
            self.shared_state_budget_fallback.inc()

    def budget_settle_lost(self) -> None:
        if self.shared_state_budget_lost_settles is not None:
            self.shared_state_budget_lost_settles.inc()

    def watch_budgets(self, read: Callable[[], Collection[tuple[str, str]]]) -> None:
        """
        The C{(client, budget)} series of C{oaiproxy_budget_remaining} in
        use now (L{oaiproxy.access.budgetstore.BudgetRefresh.shown}): in a
        group, a scrape shows only those.
        """
        self._budgets = read

    def watch_upstreams(self, read: Callable[[], Iterable[UpstreamGauges]]) -> None:
        """
        Show the per-upstream gauges that C{read} returns at each scrape
        (the pool's members; the last call wins).
        """
        self._read = read
        if not self._group:
            self._upstreams.read = read
        self.refresh_upstreams()

    def refresh_upstreams(self) -> None:
        """
        In a group, write this worker's per-upstream gauges as its pool
        has them now (every L{UPSTREAM_GAUGE_SECONDS}, and before a scrape
        it answers); alone, nothing to do: they are read at scrape time.
        """
        if not self._group:
            return
        for gauges in self._read():
            self._breaker_state.labels(gauges.name, self._worker).set(gauges.breaker_state)
            self._upstream_in_flight.labels(gauges.name).set(gauges.in_flight)

    def model_label(self, model: Optional[str], claim: bool = True) -> str:
        """
        The label value for a model: itself while the set of names seen is
        small, C{other} beyond (and for anything that does not look like a
        model name).

        @param claim: whether this model may take one of the free slots;
            only models upstream accepted do, so a client sending junk
            names cannot use them up.
        """
        if not model:
            return "-"
        if model in self._models:
            return model
        if claim and len(self._models) < MODEL_LABEL_LIMIT and _MODEL_NAME.match(model):
            self._models.add(model)
            return model
        return "other"

    # Events.

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self) -> None:
        self.in_flight.dec()

    def stream_started(self) -> None:
        self.open_streams.inc()

    def stream_finished(self) -> None:
        self.open_streams.dec()

    def attempt_finished(self, upstream: str, outcome: str) -> None:
        self._child(self.upstream_requests, upstream, outcome).inc()

    def failed_over(self, upstream: str, reason: str) -> None:
        self.failovers.labels(upstream, reason).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """
        C{metric.labels(*values)}, looked up once per label set: the
        series of a request are the same few again and again, and
        C{labels} (its checks and its lock) cost about 0.7 µs each, eight
        a request, where a dictionary look-up costs a tenth of that.  The
        children stay as prometheus_client keeps them (none is ever
        removed), so the cache holds no more than it does.
        """
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, record: RequestRecord) -> None:
        """
        Count a finished request, whatever its fate.
        """
        route = record.route
        accepted = record.upstream_status is not None and record.upstream_status < 400
        model = self.model_label(record.model, claim=accepted)
        # GET /usage is the proxy's own report, not its caller's API request.
        client = "-" if route == "usage" else record.client
        self._child(self.requests, client, model, route, f"{record.status // 100}xx").inc()
        upstream = record.upstream or "-"
        if record.upstream_seconds is not None:
            self._child(self.upstream_latency, route, upstream).observe(record.upstream_seconds)
        self._child(self.proxy_overhead, route).observe(record.proxy_seconds)
        if record.stream and record.first_chunk is not None:
            self._child(self.first_chunk, route, upstream).observe(record.first_chunk - record.started)
            self._child(self.stream_duration, route, upstream).observe(record.duration)
        if record.ended == "client_disconnected":
            self._child(self.disconnects, route).inc()
        if record.upstream_error is not None:
            self._child(self.upstream_errors, record.upstream_error).inc()
        self._child(self.bytes_in, route).inc(record.bytes_in)
        self._child(self.bytes_out, route).inc(record.bytes_out)
        usage = record.usage
        if usage is not None:
            exact = "true" if usage.exact else "false"
            for kind, count in (
                ("prompt", usage.prompt),
                ("completion", usage.completion),
                ("reasoning", usage.reasoning),
                ("cached", usage.cached),
            ):
                if count:
                    self._child(self.tokens, record.client, model, kind, exact).inc(count)


class Unrecorded(Metrics):
    """
    The metrics of a site whose own requests nobody reads: the
    C{--metrics-port} listener's, as before.  It makes no series at all:
    in a group, one of its own would write the same series as the API
    site's into this worker's file, each overwriting the other's value,
    and a counter could go backwards.
    """

    def __init__(self) -> None:
        # Not Metrics.__init__: that would make the series.
        self.registry = CollectorRegistry()
        self.series_registry = None
        self._group = False
        self._read = lambda: ()
        self._models = set()

    def request_started(self) -> None:
        pass

    def request_finished(self) -> None:
        pass

    def stream_started(self) -> None:
        pass

    def stream_finished(self) -> None:
        pass

    def attempt_finished(self, upstream: str, outcome: str) -> None:
        pass

    def failed_over(self, upstream: str, reason: str) -> None:
        pass

    def watch_budgets(self, read: Callable[[], Collection[tuple[str, str]]]) -> None:
        """
        The C{(client, budget)} series of C{oaiproxy_budget_remaining} in
        use now (L{oaiproxy.access.budgetstore.BudgetRefresh.shown}): in a
        group, a scrape shows only those.
        """
        self._budgets = read

    def watch_upstreams(self, read: Callable[[], Iterable[UpstreamGauges]]) -> None:
        pass

    def observe(self, record: RequestRecord) -> None:
        pass


class GuardedEndpoint(Endpoint):
    """
    A C{GET} endpoint for operators, behind a L{MetricsCheck}: C{/metrics},
    C{/health/upstreams}.  A subclass says what it answers in L{answer}.

    @param authorized: decides whether a request may read it (see
        L{oaiproxy.server.build.metrics_check}); C{None} lets everyone in,
        for a dedicated, private metrics listener.
    """

    def __init__(self, authorized: Optional[MetricsCheck] = None) -> None:
        super().__init__()
        self._authorized = authorized

    def render_GET(self, request: Request) -> bytes:
        if self._authorized is not None:
            refusal = self._authorized(request)
            if refusal is not None:
                return refusal
        return self.answer(request)

    def answer(self, request: Request) -> bytes:
        """
        The answer to a request let in.
        """
        raise NotImplementedError


class MetricsResource(GuardedEndpoint):
    """
    C{GET /metrics}: the registry in Prometheus' text format.
    """

    def __init__(self, metrics: Metrics, authorized: Optional[MetricsCheck] = None) -> None:
        super().__init__(authorized)
        self._metrics = metrics

    def answer(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode("ascii")])
        self._metrics.refresh_upstreams()
        body: bytes = generate_latest(self._metrics.registry)
        return body


class GroupDirectory:
    """
    The directory a group of workers writes its metrics to: made by the
    supervisor before the first worker starts, private to the group (mode
    0700, a fresh name, so nothing of an earlier run is in it), and removed
    when the group stops.

    Under systemd it is inside C{$RUNTIME_DIRECTORY} (the unit's
    C{RuntimeDirectory=}, which systemd also removes at stop, should the
    supervisor be killed outright); elsewhere in the temporary directory.

    @param environ: where to read C{RUNTIME_DIRECTORY} from.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._parent = environ.get("RUNTIME_DIRECTORY") or None
        self.path: Optional[str] = None

    def create(self) -> str:
        """
        Make the directory (once) and return its path.
        """
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="oaiproxy-metrics-", dir=self._parent)
        return self.path

    def environ(self) -> dict[str, str]:
        """
        What a worker's environment needs to write its samples here.
        """
        return {MULTIPROC_ENV: self.create()}

    def process_dead(self, pid: int) -> None:
        """
        A worker has exited: its gauges leave the group's (its requests are
        no longer in flight), its counters and histograms stay in the sums.
        """
        if self.path is not None:
            mark_process_dead(pid, self.path)

    def remove(self) -> None:
        """
        The group has stopped: remove the directory and every file in it.
        """
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
