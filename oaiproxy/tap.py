# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and service: all of the daemon's wiring.

Every setting has a command-line option and an environment variable; the
option wins.  Secrets are the exception: the upstream key comes from a
file, a systemd credential or the environment, and client keys from the
environment only, so that no secret ever appears in C{ps} output.

A configuration error ends startup with one line on stderr and exit status
1, rather than twistd's usual full usage text or a traceback.
"""

from __future__ import annotations

import hmac
import os
import sys
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from oaiproxy import __version__
from oaiproxy.accesslog import JsonAccessLog, TextAccessLog
from oaiproxy.api import api_resources, streamed_paths
from oaiproxy.clients import ClientRegistry, Credentials, load_clients
from oaiproxy.config import (
    DEFAULT_PORT,
    DEFAULT_UPSTREAM,
    Config,
    ConfigError,
    Secret,
    api_base,
    is_private_address,
    load_api_key,
    parse_byte_count,
    parse_deployment,
    parse_deployments,
    parse_interval,
    parse_log_format,
    parse_seconds,
    parse_style,
    parse_upstream,
    parse_workers,
    port_from_env,
    unix_listener,
)
from oaiproxy.errors import invalid_api_key
from oaiproxy.fake_upstream import FakeUpstream, listen
from oaiproxy.forward import admission_gate
from oaiproxy.headers import bearer_token, parse_static_header
from oaiproxy.lifecycle import DrainService, Lifecycle, ReadinessService, ReloadService
from oaiproxy.limits import Limiter
from oaiproxy.metrics import Metrics, MetricsCheck, MetricsResource
from oaiproxy.resources import HealthResource, build_root, build_tree, error_response
from oaiproxy.routes import BY_NAME, DEFAULT_ROUTES, in_order, parse_routes
from oaiproxy.routes import ROUTES as API_ROUTES
from oaiproxy.sdnotify import Notifier
from oaiproxy.site import ProxySite
from oaiproxy.styles import (
    DEFAULT_AZURE_API_VERSION,
    DEFAULT_AZURE_RESPONSES_API_VERSION,
    AzureStyle,
    OpenAIStyle,
    UpstreamStyle,
)
from oaiproxy.upstream import UpstreamClient, make_http_client
from oaiproxy.workers import FAMILIES, WORKER_INDEX, Supervisor, die_with_parent

__all__ = ["Options", "makeService"]

log = Logger()

_DEFAULTS = Config(ports=(DEFAULT_PORT,), upstream=DEFAULT_UPSTREAM, api_key=None)

#: (option, environment variable, parser, Config field) for every plain
#: setting; the option wins over the environment, which wins over the
#: default.
_SETTINGS: list[tuple[str, str, Callable[[str, str], Any], str]] = [
    ("connect-timeout", "OAIPROXY_CONNECT_TIMEOUT", parse_seconds, "connect_timeout"),
    ("read-timeout", "OAIPROXY_READ_TIMEOUT", parse_seconds, "read_timeout"),
    ("idle-timeout", "OAIPROXY_IDLE_TIMEOUT", parse_seconds, "idle_timeout"),
    ("max-body-bytes", "OAIPROXY_MAX_BODY_BYTES", parse_byte_count, "max_body_bytes"),
    ("drain-timeout", "OAIPROXY_DRAIN_TIMEOUT", parse_seconds, "drain_timeout"),
    ("header-timeout", "OAIPROXY_HEADER_TIMEOUT", parse_seconds, "header_timeout"),
    ("body-timeout", "OAIPROXY_BODY_TIMEOUT", parse_seconds, "body_timeout"),
    ("max-connections-per-ip", "OAIPROXY_MAX_CONNECTIONS_PER_IP", parse_byte_count, "max_connections_per_ip"),
    ("sse-keepalive", "OAIPROXY_SSE_KEEPALIVE", parse_interval, "sse_keepalive"),
    ("log-format", "OAIPROXY_LOG_FORMAT", parse_log_format, "log_format"),
    ("metrics-port", "OAIPROXY_METRICS_PORT", lambda name, text: text, "metrics_port"),
    ("workers", "OAIPROXY_WORKERS", parse_workers, "workers"),
    ("routes", "OAIPROXY_ROUTES", parse_routes, "routes"),
    ("upstream-style", "OAIPROXY_UPSTREAM_STYLE", parse_style, "upstream_style"),
    ("azure-api-version", "OAIPROXY_AZURE_API_VERSION", lambda name, text: text.strip(), "azure_api_version"),
    ("worker-share", "OAIPROXY_WORKER_SHARE", parse_workers, "worker_share"),
]

_MOCK_KEY = Secret(b"mock-upstream-key")


class Options(usage.Options):
    """
    C{twistd oaiproxy} options.  After parsing, C{self.config} holds the
    validated L{Config}.

    @param environ: the environment to read (injected by tests).
    """

    synopsis = "[options]"
    longdesc = (
        "Serve the OpenAI API (chat completions and the model list, and the routes "
        "--routes adds; streaming included) and GET /health, forwarding to the "
        "OpenAI API or a compatible upstream with the key held here. The key is read "
        "from --api-key-file, $CREDENTIALS_DIRECTORY/openai_api_key or "
        "OPENAI_API_KEY; clients present keys from --client-keys-file or "
        "OAIPROXY_CLIENT_KEYS."
    )
    optFlags = [
        [
            "no-stream-usage",
            None,
            "Do not add stream_options.include_usage to streamed requests (token counts of streams whose "
            "client did not ask for usage are then estimates). [env OAIPROXY_STREAM_USAGE=off]",
        ],
        [
            "allow-open-relay",
            None,
            "Start even when a listener is reachable from other hosts and no client keys are set "
            "(anyone who can connect spends the upstream key). Without it, that refuses to start.",
        ],
        [
            "mock-upstream",
            None,
            "Forward to a built-in mock of the OpenAI API (deterministic answers, "
            "streaming too) instead of a real upstream; no key needed.",
        ],
    ]
    optParameters = [
        [
            "upstream",
            None,
            None,
            "Upstream base URL; route paths (/chat/completions...) are appended, and /v1 first if the URL has "
            f"no path. [env OPENAI_BASE_URL, default {DEFAULT_UPSTREAM}]",
        ],
        [
            "routes",
            None,
            None,
            "API routes to serve, separated by commas, or 'all': " + ", ".join(r.name for r in API_ROUTES) + ". "
            f"[env OAIPROXY_ROUTES, default {','.join(DEFAULT_ROUTES)}]",
        ],
        [
            "upstream-style",
            None,
            None,
            "openai (OpenAI, vLLM, Ollama, OpenRouter, LM Studio...) or azure (Azure OpenAI: "
            "deployment paths, api-version, api-key header). [env OAIPROXY_UPSTREAM_STYLE, default openai]",
        ],
        [
            "azure-api-version",
            None,
            None,
            f"The api-version sent to Azure OpenAI. [env OAIPROXY_AZURE_API_VERSION, default "
            f"{DEFAULT_AZURE_API_VERSION}, and {DEFAULT_AZURE_RESPONSES_API_VERSION} for the Responses API]",
        ],
        [
            "api-key-file",
            None,
            None,
            "File holding the upstream API key. [else the systemd credential openai_api_key, else env OPENAI_API_KEY]",
        ],
        [
            "connect-timeout",
            None,
            None,
            f"Seconds to open the upstream connection. [env OAIPROXY_CONNECT_TIMEOUT, "
            f"default {_DEFAULTS.connect_timeout:g}]",
        ],
        [
            "read-timeout",
            None,
            None,
            "Longest upstream silence, before the response head and between body "
            f"chunks, in seconds. [env OAIPROXY_READ_TIMEOUT, default {_DEFAULTS.read_timeout:g}]",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds an idle client connection is kept open. [env OAIPROXY_IDLE_TIMEOUT, "
            f"default {_DEFAULTS.idle_timeout:g}]",
        ],
        [
            "client-keys-file",
            None,
            None,
            "File of clients (TOML or JSON: names, key hashes, limits, model allow-lists), re-read on SIGHUP. "
            "[env OAIPROXY_CLIENT_KEYS_FILE, else the "
            "systemd credential client_keys; keys in env OAIPROXY_CLIENT_KEYS are added]",
        ],
        [
            "drain-timeout",
            None,
            None,
            "On SIGTERM, seconds in-flight requests may run on before they are cut off. "
            f"[env OAIPROXY_DRAIN_TIMEOUT, default {_DEFAULTS.drain_timeout:g}]",
        ],
        [
            "header-timeout",
            None,
            None,
            "Seconds a client has to send a request's line and headers (slow senders are cut off). "
            f"[env OAIPROXY_HEADER_TIMEOUT, default {_DEFAULTS.header_timeout:g}]",
        ],
        [
            "body-timeout",
            None,
            None,
            "Seconds a request body has to arrive, plus one for every 64 KiB received (slow senders get a 408). "
            f"[env OAIPROXY_BODY_TIMEOUT, default {_DEFAULTS.body_timeout:g}]",
        ],
        [
            "max-connections-per-ip",
            None,
            None,
            "Connections one client address may hold before presenting a valid client key (16 times as many "
            f"in all). [env OAIPROXY_MAX_CONNECTIONS_PER_IP, default {_DEFAULTS.max_connections_per_ip}]",
        ],
        [
            "sse-keepalive",
            None,
            None,
            "Seconds of upstream silence in a stream before a ': keepalive' comment is sent; 0 for never. "
            f"[env OAIPROXY_SSE_KEEPALIVE, default {_DEFAULTS.sse_keepalive:g}]",
        ],
        [
            "log-format",
            None,
            None,
            "Access log as 'text' (a log line) or 'json' (one object per line on standard output). "
            "[env OAIPROXY_LOG_FORMAT, default text]",
        ],
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics on this endpoint only (e.g. tcp:9108:interface=127.0.0.1), without auth; "
            "otherwise /metrics is on the API port behind a client key or the metrics key. "
            "[env OAIPROXY_METRICS_PORT]",
        ],
        [
            "metrics-key-file",
            None,
            None,
            "File holding a key that may read /metrics (Authorization: Bearer). [env OAIPROXY_METRICS_KEY]",
        ],
        [
            "workers",
            None,
            None,
            "Worker processes serving the same listeners: a number, or auto (one per CPU). "
            "[env OAIPROXY_WORKERS, default 1]",
        ],
        [
            "worker-share",
            None,
            None,
            "(internal, set by the supervisor) the number of workers the client limits are split among.",
        ],
        [
            "max-body-bytes",
            None,
            None,
            f"Largest request body accepted. [env OAIPROXY_MAX_BODY_BYTES, default {_DEFAULTS.max_body_bytes}]",
        ],
    ]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self["port"] = []
        self["worker-listener"] = []
        self["upstream-header"] = []
        self["azure-deployment"] = []
        self.argv: list[str] = []
        self.config: Config = _DEFAULTS

    def opt_port(self, description: str) -> None:
        """
        Listen on this Twisted endpoint (tcp:, ssl:, unix:, systemd:...); repeatable. [env PORT as a port number, default tcp:8080:interface=127.0.0.1]
        """  # noqa: E501 (usage.Options shows the docstring as one paragraph)
        self["port"].append(description)

    def opt_api_key(self, value: str) -> None:
        """
        Refused: a key on the command line is visible to every user in ps. Use --api-key-file or OPENAI_API_KEY.
        """  # noqa: E501
        # Defined so that getopt's prefix matching cannot turn "--api-key
        # sk-..." into "--api-key-file sk-..." and echo the key as a path.
        raise usage.UsageError(
            "--api-key is not accepted: a key on the command line is visible to every user "
            "of the host in ps; use --api-key-file PATH or the OPENAI_API_KEY environment variable"
        )

    def opt_client_keys(self, value: str) -> None:
        """
        Refused: keys on the command line are visible to every user in ps. Use --client-keys-file or OAIPROXY_CLIENT_KEYS.
        """  # noqa: E501
        # As for --api-key: getopt would otherwise take it for a prefix of
        # --client-keys-file and print the key as a path.
        raise usage.UsageError(
            "--client-keys is not accepted: keys on the command line are visible to every user of the host "
            "in ps; use --client-keys-file PATH (a file of key hashes) or OAIPROXY_CLIENT_KEYS"
        )

    def opt_upstream_header(self, value: str) -> None:
        """
        NAME:VALUE: a header sent with every upstream request (e.g. OpenRouter's HTTP-Referer); repeatable.
        """  # noqa: E501
        try:
            self["upstream-header"].append(parse_static_header(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_azure_deployment(self, value: str) -> None:
        """
        MODEL=DEPLOYMENT: the Azure deployment serving MODEL (a model not listed is its own deployment); repeatable. [env OAIPROXY_AZURE_DEPLOYMENTS, comma-separated]
        """  # noqa: E501
        try:
            self["azure-deployment"].append(parse_deployment("--azure-deployment", value))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def opt_worker_listener(self, value: str) -> None:
        """
        (internal, set by the supervisor) an inherited listening socket, FD:FAMILY.
        """
        self["worker-listener"].append(value)

    def opt_version(self) -> None:
        """
        Print the oaiproxy version and exit.
        """
        print(f"oaiproxy {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        # Kept so a supervisor can start workers with the same arguments.
        self.argv = list(options) if options is not None else []
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd oaiproxy: error: {e} (see: twistd oaiproxy --help)") from None

    def postOptions(self) -> None:
        try:
            self.config = self._build()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _build(self) -> Config:
        config = self._settings()
        if config.workers > 1 and config.metrics_port:
            raise ConfigError(
                "--metrics-port cannot be combined with --workers: each worker serves its own /metrics on the API port"
            )
        for listener in config.worker_listeners:
            fd, _, family = listener.partition(":")
            if not fd.isdigit() or family not in FAMILIES:
                raise ConfigError(f"--worker-listener must be FD:INET|INET6|UNIX, not {listener!r}")
        if config.upstream_style == "azure":
            unserved = sorted(name for name in config.routes if BY_NAME[name].azure is None)
            if unserved and config.routes == frozenset(BY_NAME):
                # "all": all that Azure serves.
                config = replace(config, routes=config.routes - frozenset(unserved))
            elif unserved:
                raise ConfigError(f"Azure OpenAI does not serve {', '.join(unserved)}: remove it from --routes")
            if config.upstream == DEFAULT_UPSTREAM and not config.mock_upstream:
                raise ConfigError("--upstream-style azure needs --upstream https://RESOURCE.openai.azure.com")
        elif config.azure_deployments or config.azure_api_version:
            raise ConfigError(
                "--azure-deployment (OAIPROXY_AZURE_DEPLOYMENTS) and --azure-api-version (OAIPROXY_AZURE_API_VERSION) "
                "need --upstream-style azure (OAIPROXY_UPSTREAM_STYLE=azure)"
            )
        return config

    def _settings(self) -> Config:
        env = self.environ
        ports = tuple(self["port"]) or (port_from_env(env) or DEFAULT_PORT,)
        upstream = parse_upstream(self["upstream"] or env.get("OPENAI_BASE_URL") or DEFAULT_UPSTREAM)
        mock = bool(self["mock-upstream"])
        deployments = tuple(self["azure-deployment"]) or parse_deployments(
            "OAIPROXY_AZURE_DEPLOYMENTS", env.get("OAIPROXY_AZURE_DEPLOYMENTS", "")
        )
        api_key = None if mock else load_api_key(self["api-key-file"], env)
        values: dict[str, Any] = {}
        for option, variable, parse, name in _SETTINGS:
            if self[option] is not None:
                values[name] = parse("--" + option, self[option])
            elif env.get(variable):
                values[name] = parse(variable, env[variable])
        return Config(
            ports=ports,
            upstream=api_base(upstream, values.get("upstream_style", "openai")),
            azure_deployments=deployments,
            api_key=api_key,
            clients=load_clients(self["client-keys-file"], env),
            mock_upstream=mock,
            allow_open_relay=bool(self["allow-open-relay"]),
            api_key_file=self["api-key-file"],
            client_keys_file=self["client-keys-file"],
            metrics_key=self._metrics_key(),
            stream_usage=not self["no-stream-usage"] and env.get("OAIPROXY_STREAM_USAGE", "on") != "off",
            worker_listeners=tuple(self["worker-listener"]),
            upstream_headers=tuple(self["upstream-header"]),
            **values,
        )

    def _metrics_key(self) -> Optional[Secret]:
        if self["metrics-key-file"]:
            return load_api_key(self["metrics-key-file"], {})
        value = self.environ.get("OAIPROXY_METRICS_KEY", "").strip()
        return Secret(value.encode("utf-8")) if value else None


@implementer(IStreamServerEndpoint)
class _AnnouncingEndpoint:
    """
    An endpoint that reports the address it actually bound, which only the
    listening port knows (C{tcp:0}, C{systemd:} sockets).
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        announce: Callable[[IListeningPort], None],
    ) -> None:
        self._endpoint = endpoint
        self._description = description
        self._announce = announce

    def listen(self, factory: Any) -> "Deferred[IListeningPort]":
        d: Deferred[IListeningPort] = self._endpoint.listen(factory)

        def announced(port: IListeningPort) -> IListeningPort:
            self._announce(port)
            return port

        def refused(failure: Failure) -> IListeningPort:
            # A busy or forbidden port: one line instead of a traceback.
            # strports re-raises it from startup, so twistd exits 1.
            failure.trap(CannotListenError)
            raise SystemExit(
                f"twistd oaiproxy: error: cannot listen on {self._description}: {failure.value.socketError}"
            )

        return d.addCallbacks(announced, refused)


class _Exposure:
    """
    Whether any listener is reachable from other hosts; a reload may not
    leave such a proxy without client keys.
    """

    public = False


def _listen(description: str, site: Any, announce: Callable[[IListeningPort], None], reactor: Any) -> IService:
    """
    A listener service for C{site} on an endpoint description.  strports
    makes a bind failure stop twistd (exit status 1), which systemd sees;
    the wrapper adds the startup report and readiness.
    """
    try:
        listener = strports.service(unix_listener(description), site, reactor=reactor)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SystemExit(f"twistd oaiproxy: error: cannot use the endpoint {description!r}: {e}") from None
    listener.endpoint = _AnnouncingEndpoint(listener.endpoint, description, announce)
    return listener


def _metrics_announcer(bound: "Deferred[None]", keyed: bool) -> Callable[[IListeningPort], None]:
    def announce(port: IListeningPort) -> None:
        address: Any = port.getHost()
        if not keyed and not is_private_address(address):
            log.warn(
                "metrics on {host} are readable by anyone who can connect (client names, models, volumes); "
                "set --metrics-key-file or listen on loopback",
                host=getattr(address, "host", "-"),
            )
        log.info(
            "metrics at http://{host}:{port}/metrics",
            host=getattr(address, "host", "-"),
            port=getattr(address, "port", "-"),
        )
        bound.callback(None)

    return announce


def _metrics_check(credentials: Credentials, metrics_key: Optional[Secret]) -> MetricsCheck:
    """
    Who may read /metrics on the API port: the holder of the metrics key, or
    any client; with neither configured, anyone who may use the API.
    """

    def check(request: Any) -> Optional[bytes]:
        token = bearer_token(request.requestHeaders)
        if token is not None:
            if metrics_key is not None and hmac.compare_digest(token, metrics_key.reveal()):
                return None
            if credentials.clients.identify(token) is not None:
                return None
        elif metrics_key is None and not len(credentials.clients):
            return None
        return error_response(request, invalid_api_key())

    return check


def _announcer(
    description: str, config: Config, bound: "Deferred[None]", exposure: _Exposure
) -> Callable[[IListeningPort], None]:
    scheme = "https" if description.startswith("ssl:") else "http"

    def announce(port: IListeningPort) -> None:
        address: Any = port.getHost()
        host = getattr(address, "host", None)
        if host is None:
            base = f"{scheme}+unix:{getattr(address, 'name', address)}"
        else:
            shown = f"[{host}]" if ":" in host else host
            base = f"{scheme}://{shown}:{address.port}"
        log.info(
            "oaiproxy listening on {base}: API at {base}/v1 ({first}...), health at {base}/health",
            base=base,
            first=f"{base}/v1/{in_order(config.routes)[0].name}",
            endpoint=description,
        )
        if not is_private_address(address):
            exposure.public = True
            if not len(config.clients):
                if not config.allow_open_relay:
                    raise SystemExit(
                        f"twistd oaiproxy: error: refusing to start: {base} is reachable from other hosts and "
                        "no client keys are set, so anyone who can connect could spend the upstream key. "
                        "Set client keys (--client-keys-file, OAIPROXY_CLIENT_KEYS), listen on 127.0.0.1, "
                        "or pass --allow-open-relay if that is really what you want."
                    )
                log.critical(
                    "OPEN RELAY: {base} is reachable from other hosts and no client keys are "
                    "set (--allow-open-relay). Anyone who can connect can spend the upstream "
                    "API key.",
                    base=base,
                )
        bound.callback(None)

    return announce


class _MockUpstreamService(Service):
    """
    Serve the built-in fake API on a free loopback port and point the
    upstream client at it, before the proxy's own listeners open.
    """

    def __init__(self, reactor: Any, upstream: UpstreamClient) -> None:
        self._reactor = reactor
        self._upstream = upstream
        self._port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        azure = isinstance(self._upstream.style, AzureStyle)
        fake = FakeUpstream(self._reactor, api_key=_MOCK_KEY.reveal(), chunk_interval=0.05, record=False, azure=azure)
        self._port = listen(self._reactor, fake)
        address: Any = self._port.getHost()
        self._upstream.base_url = f"http://127.0.0.1:{address.port}" + ("" if azure else "/v1")
        log.info(
            "mock upstream on {url}: answers are canned, no real API is called",
            url=self._upstream.base_url,
        )

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> "Optional[Deferred[None]]":
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            stopped: Optional[Deferred[None]] = port.stopListening()
            return stopped
        return None


def _reloader(options: Options, credentials: Credentials, exposure: _Exposure) -> Callable[[], bool]:
    """
    The SIGHUP action: read the key sources again, then swap the secrets in
    one step.  Any failure keeps the secrets in use and says why.
    """
    config = options.config

    def reload() -> bool:
        try:
            if config.mock_upstream:
                api_key = credentials.api_key
            else:
                api_key = load_api_key(config.api_key_file, options.environ)
            clients = load_clients(config.client_keys_file, options.environ)
            if exposure.public and not len(clients) and not config.allow_open_relay:
                raise ConfigError(
                    "the new configuration has no client keys, and the proxy is reachable from other hosts"
                )
        except ConfigError as e:
            log.error("reload failed, keeping the credentials in use: {why}", why=str(e))
            return False
        changed = api_key != credentials.api_key
        credentials.replace(api_key, clients)
        log.info(
            "reloaded: upstream key {key}, {count} client(s)",
            key="changed" if changed else "unchanged",
            count=len(clients),
        )
        return True

    return reload


def _worker_index(environ: Mapping[str, str]) -> Optional[int]:
    """
    The index the supervisor gave this worker (in its environment), if any.
    """
    index = environ.get(WORKER_INDEX, "")
    return int(index) if index.isdigit() else None


def _supervise(options: Options, reactor: Any, notifier: Notifier, service: MultiService) -> IService:
    """
    C{--workers N}: this process only holds the listeners and speaks for
    the group (see L{oaiproxy.workers}).
    """
    config = options.config

    def output(data: bytes) -> None:
        stream = sys.__stdout__
        if stream is not None:
            stream.buffer.write(data)
            stream.flush()

    supervisor = Supervisor(
        reactor, config.ports, options.argv, config.workers, notifier, dict(options.environ), output
    )
    supervisor.setServiceParent(service)

    def exit_status() -> None:
        if supervisor.failed:
            # twistd would exit 0 after a clean reactor stop.
            os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", exit_status)

    def status() -> str:
        return f"{config.workers} workers serving {len(config.ports)} listener(s)"

    ReloadService(supervisor.reload, notifier, status, lambda f: reactor.callFromThread(f)).setServiceParent(service)
    ReadinessService(notifier, [supervisor.all_ready], status).setServiceParent(service)
    log.info("oaiproxy {version}: supervising {count} workers", version=__version__, count=config.workers)
    return service


def makeService(
    options: Options,
    reactor: Any = None,
    http: Optional[Any] = None,
    notifier: Optional[Notifier] = None,
) -> IService:
    """
    Build the daemon: listeners on every C{--port}, the Resource tree, the
    upstream client, and the services that talk to systemd (readiness,
    reload on SIGHUP, drain on stop).

    @param reactor: the reactor (the global one by default).
    @param http: a treq-like client to use instead of the pooled one
        (for tests).
    @param notifier: where readiness goes (by default C{$NOTIFY_SOCKET}).
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    config = options.config
    if notifier is None:
        notifier = Notifier.from_environ(options.environ)
    service = MultiService()

    if config.workers > 1 and not config.worker_listeners:
        return _supervise(options, reactor, notifier, service)

    api_key = _MOCK_KEY if config.mock_upstream else config.api_key
    assert api_key is not None, "Options guarantees a key unless mocking"
    clients: ClientRegistry = config.clients if config.clients is not None else ClientRegistry()
    credentials = Credentials(api_key, clients)
    exposure = _Exposure()
    lifecycle = Lifecycle()
    if http is None:
        http = make_http_client(reactor, config.connect_timeout)
    assert http is not None
    style: UpstreamStyle = OpenAIStyle()
    if config.upstream_style == "azure":
        style = AzureStyle(config.azure_api_version, dict(config.azure_deployments))
    upstream = UpstreamClient(
        http, config.upstream, credentials, reactor, config.read_timeout, config.upstream_headers, style
    )
    if config.mock_upstream:
        _MockUpstreamService(reactor, upstream).setServiceParent(service)

    metrics = Metrics()
    limiter = Limiter(reactor, share=config.worker_share)
    enabled = in_order(config.routes)
    api = api_resources(
        enabled,
        upstream,
        reactor,
        credentials,
        lifecycle,
        config.connect_timeout,
        limiter,
        stream_usage=config.stream_usage,
        sse_keepalive=config.sse_keepalive,
    )
    metrics_check = _metrics_check(credentials, config.metrics_key)
    health = HealthResource(lifecycle)
    on_api_port = None if config.metrics_port else MetricsResource(metrics, metrics_check)
    served = [r.name for r in API_ROUTES if r.name not in api and (r.azure is not None or style.name != "azure")]
    unavailable = [r.name for r in API_ROUTES if r.name not in api and r.name not in served]
    site = ProxySite(
        build_tree(api, health, on_api_port, disabled=served, unavailable=unavailable),
        streamed_paths=streamed_paths(enabled),
        max_body_bytes=config.max_body_bytes,
        idle_timeout=config.idle_timeout,
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        max_connections_per_ip=config.max_connections_per_ip,
        gate=admission_gate(credentials),
        lifecycle=lifecycle,
        metrics=metrics,
        access_log=JsonAccessLog() if config.log_format == "json" else TextAccessLog(),
        worker=_worker_index(options.environ),
        reactor=reactor,
    )
    listening: list[Deferred[None]] = []
    if config.worker_listeners:
        # A worker: accept on the sockets the supervisor opened, and never
        # outlive the supervisor.
        die_with_parent()
        for listener in config.worker_listeners:
            fd, _, family = listener.partition(":")
            bound: Deferred[None] = Deferred()
            listening.append(bound)
            adopted = AdoptedStreamServerEndpoint(reactor, int(fd), FAMILIES[family])
            announced = _AnnouncingEndpoint(adopted, listener, _announcer(listener, config, bound, exposure))
            StreamServerEndpointService(announced, site).setServiceParent(service)
    for description in () if config.worker_listeners else config.ports:
        bound = Deferred[None]()
        listening.append(bound)
        _listen(description, site, _announcer(description, config, bound, exposure), reactor).setServiceParent(service)
    if config.metrics_port:
        # A private listener (loopback, or firewalled) for the scraper; the
        # metrics key still applies when one is set.
        metrics_site = ProxySite(
            build_root(None, health, MetricsResource(metrics, metrics_check if config.metrics_key else None)),
            max_body_bytes=1024,
            idle_timeout=config.idle_timeout,
            header_timeout=config.header_timeout,
            access_log=lambda record: None,
            reactor=reactor,
        )
        bound = Deferred()
        listening.append(bound)
        _listen(
            config.metrics_port, metrics_site, _metrics_announcer(bound, config.metrics_key is not None), reactor
        ).setServiceParent(service)

    def status() -> str:
        return (
            f"serving {len(config.ports)} listener(s), forwarding to "
            f"{'the mock upstream' if config.mock_upstream else upstream.base_url}, "
            f"{len(credentials.clients)} client(s)"
        )

    # Stopping runs in reverse order: the drain starts as the listeners
    # close, so no new connection arrives while in-flight requests finish.
    DrainService(lifecycle, reactor, config.drain_timeout, notifier).setServiceParent(service)
    # callFromThread is the signal-safe way back into the reactor.
    reload = ReloadService(
        _reloader(options, credentials, exposure), notifier, status, lambda f: reactor.callFromThread(f)
    )
    reload.setServiceParent(service)
    ReadinessService(notifier, listening, status).setServiceParent(service)

    log.info(
        "oaiproxy {version} forwarding {routes} to {upstream} ({style}) "
        "(client keys: {keys}, read timeout {read:g}s, body limit {limit} bytes, drain {drain:g}s)",
        version=__version__,
        routes=", ".join(route.name for route in enabled),
        style=style.name,
        upstream=upstream.base_url if not config.mock_upstream else "the mock upstream",
        keys=len(clients) or "none",
        read=config.read_timeout,
        limit=config.max_body_bytes,
        drain=config.drain_timeout,
    )
    return service
