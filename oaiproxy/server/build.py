# -*- test-case-name: tests.server.test_build -*-
"""
The one wiring: from a L{Config} and the collaborators that differ between
the daemon and the tests, the Site that serves the API (and the private
one for C{--metrics-port}).

L{oaiproxy.daemon.tap.makeService} calls L{build_site} with the pooled
upstream client and the reactor; the in-memory harness
(L{oaiproxy.fake.harness}) calls it with an in-memory client and a
L{twisted.internet.task.Clock}.  Whatever the tree, the upstream client or
the site are made of is decided here once, so the tests exercise what the
daemon serves.

This is the composition root: the one module of C{server/} that knows the
layers above it (routes, access, upstream, observe), because it puts them
together; nothing in the request path imports it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaiproxy.access.admin import is_admin
from oaiproxy.access.admission import admission_gate
from oaiproxy.access.budgetstore import BudgetedLimits, BudgetRefresh, BudgetStore
from oaiproxy.access.clients import ClientRegistry, Credentials
from oaiproxy.access.limits import Limiter, LimitStore, LocalLimitStore
from oaiproxy.config import Config, Secret
from oaiproxy.drain import Lifecycle
from oaiproxy.errors import invalid_api_key
from oaiproxy.ledger.prices import EMPTY, Prices
from oaiproxy.ledger.queries import Spend, select_spend
from oaiproxy.ledger.recorder import UsageRecorder
from oaiproxy.observe.accesslog import AccessLog, JsonAccessLog, TextAccessLog
from oaiproxy.observe.metrics import Metrics, MetricsCheck, MetricsResource, Unrecorded, UpstreamGauges
from oaiproxy.observe.records import RequestRecord
from oaiproxy.routes.forwarding import ForwardingResource
from oaiproxy.routes.jsonapi import api_resources, streamed_paths
from oaiproxy.routes.live import Dashboard
from oaiproxy.routes.usage import UsageResource
from oaiproxy.routetable import ROUTES, Route, in_order
from oaiproxy.server.dashboard import mount
from oaiproxy.server.site import ProxySite
from oaiproxy.server.tree import HealthResource, UpstreamsHealthResource, build_root, build_tree
from oaiproxy.upstream.client import TreqLike, UpstreamClient
from oaiproxy.upstream.headers import bearer_token
from oaiproxy.upstream.pool import Pool, PoolGroup, Upstream
from oaiproxy.upstream.styles import AzureStyle, OpenAIStyle, UpstreamStyle
from oaiproxy.upstream.upstreams import SINGLE, Upstreams
from oaiproxy.web import error_response

if TYPE_CHECKING:
    # Imported when used: the Redis client is an extra (oaiproxy[redis]).
    from oaiproxy.access.shared import SharedLimitStore
    from oaiproxy.access.sharedbudgets import SharedBudgetStore
    from oaiproxy.sharedstate.link import SharedState

__all__ = ["Built", "build_site", "metrics_check", "style_of", "watch_pool"]


@dataclass(frozen=True)
class Built:
    """
    What L{build_site} made, for the caller to listen with and look at.

    @ivar site: the API listeners' factory (every C{--port} shares it).
    @ivar metrics_site: the C{--metrics-port} listener's factory, if set.
    @ivar upstream: the first member's client (with the single-upstream
        options, the one client: the mock upstream re-points it).
    @ivar upstreams: the pool and its members' clients: C{upstreams.pool}
        (members, breakers, in-flight), C{upstreams.clients},
        C{upstreams.observe} (breaker transitions), C{upstreams.listen}
        (every attempt's end), C{upstreams.replace} (a reload).
    @ivar limiter: the per-client limits in this process (behind
        C{limit_store} unless the limits are shared).
    @ivar limit_store: where admission takes the per-client limits from,
        shared by every route.
    @ivar api: the resource of each enabled route, by route name.
    @ivar routes: the enabled routes, in the table's order.
    @ivar usage: the spend metrics and the usage ledger's recorder.
    @ivar budgets: the clients' budget totals in this process.
    @ivar budget_refresh: the service that reads them again from the
        ledger every second and sets the remaining gauges (the daemon
        starts it).
    @ivar dashboard: the dashboard's live state; the daemon calls its
        C{tick} every C{dashboard.interval} seconds.
    """

    site: ProxySite
    metrics_site: Optional[ProxySite]
    upstream: UpstreamClient
    limiter: Limiter
    api: dict[str, ForwardingResource]
    routes: list[Route]
    upstreams: Upstreams
    limit_store: LimitStore
    usage: Optional[UsageRecorder] = None
    budgets: Optional[BudgetStore] = None
    budget_refresh: Optional[BudgetRefresh] = None
    dashboard: Optional[Dashboard] = None


def style_of(config: Config) -> UpstreamStyle:
    """
    How the configured upstream addresses the API.
    """
    if config.upstream_style == "azure":
        return AzureStyle(config.azure_api_version, dict(config.azure_deployments))
    return OpenAIStyle()


def single_upstream(config: Config) -> Upstream:
    """
    The pool of one that the single-upstream options describe (its key is
    read from the reloadable credentials, not from this entry).
    """
    return Upstream(
        SINGLE,
        config.upstream,
        Secret(b""),
        style=config.upstream_style,
        model_map=dict(config.azure_deployments),
        headers=config.upstream_headers,
    )


def build_upstreams(
    config: Config,
    http: TreqLike,
    credentials: Credentials,
    clock: IReactorTime,
    http_for: Optional[HttpFor] = None,
    group: Optional[PoolGroup] = None,
) -> Upstreams:
    """
    The pool for C{config}: the upstreams file's entries, or the pool of
    one of the single-upstream options.
    """
    entries = config.upstreams if config.upstreams is not None else (single_upstream(config),)

    def client_for(upstream: Upstream) -> TreqLike:
        if http_for is not None and upstream.connect_timeout is not None:
            return http_for(upstream.connect_timeout)
        return http

    return Upstreams.build(
        entries,
        clock,
        client_for,
        config.read_timeout,
        keys={SINGLE: credentials} if config.upstreams is None else None,
        azure_api_version=config.azure_api_version,
        max_attempts=config.max_attempts,
        first_byte_timeout=config.first_byte_timeout,
        shorthand=config.upstreams is None,
        group=group,
    )


#: Makes the treq-like client for a connect timeout (an upstream's own).
HttpFor = Callable[[float], TreqLike]


def build_site(
    config: Config,
    *,
    http: TreqLike,
    credentials: Credentials,
    clock: IReactorTime,
    lifecycle: Lifecycle,
    metrics: Metrics,
    access_log: Optional[AccessLog] = None,
    worker: Optional[int] = None,
    http_for: Optional[HttpFor] = None,
    shared: Optional[SharedState] = None,
    usage: Optional[UsageRecorder] = None,
    group_dir: Optional[str] = None,
) -> Built:
    """
    Wire the proxy for C{config}.

    @param http: the treq-like client requests go upstream through (the
        pooled one in the daemon, an in-memory one in tests).
    @param credentials: the upstream key and the client registry, replaced
        in place by a reload.
    @param clock: every timeout's clock (the reactor, or a C{Clock}).
    @param lifecycle: drains every route and the health check together.
    @param metrics: what C{/metrics} serves and every request counts in.
    @param access_log: where each request's record goes; by default the
        text or JSON log that C{config.log_format} names.
    @param worker: which worker of a group this process is, if any.
    @param http_for: makes the client for an upstream whose entry sets its
        own C{connect_timeout} (by default every upstream uses C{http}).
    @param shared: the Redis the group shares limits and breakers through
        (C{--shared-state}); without it, all state is in this process.
    @param usage: reads every finished request into the spend metrics and
        the usage ledger; by default, the metrics only, at C{config.prices}.
    @param group_dir: in a worker of a group, the group's metrics
        directory (the dashboard's per-worker files go there too).
    """
    group = None
    if shared is not None and config.upstreams is not None:
        # The breakers of an upstreams file's pool are the group's (the
        # shorthand's never opens); imported here, as the Redis client is
        # an extra.
        from oaiproxy.upstream.shared import SharedBreakers

        group = SharedBreakers(shared.link, clock, shared.keys)
    upstreams = build_upstreams(config, http, credentials, clock, http_for, group)
    watch_pool(metrics, upstreams.pool)
    upstream = next(iter(upstreams.clients.values()))
    styles = {client.style.name for client in upstreams.clients.values()}
    # With a shared state the group shares the exact limits: no split
    # among workers (each takes 1 / instances only while Redis is down).
    limiter = Limiter(clock, share=1 if shared is not None else config.worker_share)
    store: LimitStore = (
        LocalLimitStore(limiter) if shared is None else shared_limit_store(config, shared, clock, metrics)
    )
    enabled = in_order(config.routes)
    if usage is None:
        usage = UsageRecorder(clock, metrics, Prices(config.prices or EMPTY))
    # The budgets price requests with the recorder's prices, which a
    # reload replaces in place.
    budgets = (
        BudgetStore(clock, usage.prices)
        if shared is None
        else shared_budget_store(config, shared, clock, metrics, usage.prices)
    )
    api = api_resources(
        enabled,
        upstreams,
        clock,
        credentials,
        lifecycle,
        config.connect_timeout,
        BudgetedLimits(store, budgets),
        stream_usage=config.stream_usage,
        sse_keepalive=config.sse_keepalive,
    )
    check = metrics_check(credentials, config.metrics_key)
    health = HealthResource(lifecycle, UpstreamsHealthResource(upstreams.pool, check))
    on_api_port = None if config.metrics_port else MetricsResource(metrics, check)
    served = [r.name for r in ROUTES if r.name not in api and (r.azure is not None or styles != {"azure"})]
    unavailable = [r.name for r in ROUTES if r.name not in api and r.name not in served]
    if access_log is None:
        access_log = JsonAccessLog() if config.log_format == "json" else TextAccessLog()
    dashboard = Dashboard(metrics, upstreams.pool, clock, group_dir)
    access_log = _both(access_log, usage, dashboard.refusals)
    usage_resource = UsageResource(credentials, clock, usage.writer, budgets)
    tree = build_tree(
        api,
        health,
        on_api_port,
        disabled=served,
        unavailable=unavailable,
        usage=usage_resource,
    )
    mount(tree, dashboard, credentials)
    site = ProxySite(
        tree,
        streamed_paths=streamed_paths(enabled),
        max_body_bytes=config.max_body_bytes,
        idle_timeout=config.idle_timeout,
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        max_connections_per_ip=config.max_connections_per_ip,
        gate=admission_gate(credentials),
        lifecycle=lifecycle,
        metrics=metrics,
        access_log=access_log,
        worker=worker,
        reactor=clock,
    )
    metrics_site = None
    if config.metrics_port:
        # A private listener (loopback, or firewalled) for the scraper; the
        # metrics key still applies when one is set.
        private = check if config.metrics_key else None
        private_health = HealthResource(lifecycle, UpstreamsHealthResource(upstreams.pool, private))
        private_tree = build_root(None, private_health, MetricsResource(metrics, private))
        # The dashboard and the usage it shows, with the admin key as on
        # the API port.
        mount(private_tree, dashboard, credentials)
        private_tree.putChild(b"usage", usage_resource)
        metrics_site = ProxySite(
            private_tree,
            max_body_bytes=1024,
            idle_timeout=config.idle_timeout,
            header_timeout=config.header_timeout,
            access_log=lambda record: None,
            # Its own requests are not counted (nor, in a group, written).
            metrics=Unrecorded(),
            reactor=clock,
        )
    refresh = budget_refresh(budgets, credentials, clock, usage, metrics)
    return Built(
        site, metrics_site, upstream, limiter, api, enabled, upstreams, store, usage, budgets, refresh, dashboard
    )


def budget_refresh(
    store: BudgetStore, credentials: Credentials, clock: IReactorTime, usage: UsageRecorder, metrics: Metrics
) -> BudgetRefresh:
    """
    What keeps C{store} near the ledger's totals (with a ledger: every
    process's spend) and shows what is left of each budget.
    """
    writer = usage.writer
    read = None
    unwritten: Callable[[], Any] = dict
    if writer is not None:
        pool = writer.pool

        def read(first: str, last: str) -> "Deferred[list[Spend]]":
            return pool.run("ledger_select_spend", select_spend, pool.engine, first, last)

        unwritten = writer.pending_rows
    refresh = BudgetRefresh(
        store, lambda: credentials.clients, clock, read, unwritten, registry=metrics.series_registry
    )
    metrics.watch_budgets(lambda: refresh.shown)
    return refresh


def shared_limit_store(
    config: Config, shared: "SharedState", clock: IReactorTime, metrics: Metrics
) -> "SharedLimitStore":
    """
    The client limits of a group, in its Redis: exact across the group
    (no split among workers), each process's share (1 / instances) only
    while Redis is unreachable; its state and fallbacks in the metrics.
    """
    from oaiproxy.access.shared import SharedLimitStore

    store = SharedLimitStore(shared.link, clock, shared.keys, shared.instances, config.shared_state_lease)
    metrics.watch_shared_state(shared.link.up)
    shared.link.watchers.append(metrics.shared_state_changed)
    shared.link.late_watchers.append(metrics.shared_state_late_call)
    store.on_fallback = metrics.admitted_in_fallback
    return store


def shared_budget_store(
    config: Config, shared: "SharedState", clock: IReactorTime, metrics: Metrics, prices: Prices
) -> "SharedBudgetStore":
    """
    The budget totals of a group, in its Redis; its fallbacks in the
    metrics (the shared-state series are made by L{shared_limit_store}).
    """
    from oaiproxy.access.sharedbudgets import SharedBudgetStore

    store = SharedBudgetStore(
        clock, prices, shared.link, shared.keys, shared.instances, ledger=config.usage_db is not None
    )
    store.on_fallback = metrics.budget_decided_in_fallback
    store.on_lost_settle = metrics.budget_settle_lost
    return store


def _both(access_log: AccessLog, usage: UsageRecorder, refusals: Callable[[RequestRecord], None]) -> AccessLog:
    """
    Every finished record to the access log, then to the usage recorder
    and the dashboard's recent refusals.
    """

    def record(record: RequestRecord) -> None:
        access_log(record)
        usage(record)
        refusals(record)

    return record


def watch_pool(metrics: Metrics, pool: Pool) -> None:
    """
    Show C{pool} in the per-upstream metrics: its attempts and failovers as
    they happen, its breakers and in-flight counts as they are at each
    scrape (a reload's new members included: the pool object stays).
    """
    pool.observer = metrics
    metrics.watch_upstreams(lambda: [UpstreamGauges(m.name, m.breaker.state.value, m.in_flight) for m in pool.members])


def metrics_check(credentials: Credentials, metrics_key: Optional[Secret]) -> MetricsCheck:
    """
    Who may read /metrics on the API port: the holder of the metrics key or
    of the admin key, or any client; with none configured, anyone who may
    use the API.
    """

    def check(request: Any) -> Optional[bytes]:
        token = bearer_token(request.requestHeaders)
        if token is not None:
            if metrics_key is not None and hmac.compare_digest(token, metrics_key.reveal()):
                return None
            if is_admin(credentials, request.requestHeaders):
                return None
            clients: ClientRegistry = credentials.clients
            if clients.identify(token) is not None:
                return None
        elif metrics_key is None and not len(credentials.clients):
            return None
        return error_response(request, invalid_api_key())

    return check
