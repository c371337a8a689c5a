# -*- test-case-name: tests.daemon.test_tap -*-
"""
The twistd plugin's options and service: the process around the one
wiring (L{oaiproxy.server.build.build_site}): listeners, the upstream's
connection pool, readiness, reload and drain, the worker group.

Every setting has a command-line option and an environment variable, both
declared once in L{oaiproxy.daemon.settings}; the option wins.  Secrets are the exception: the upstream key comes from a
file, a systemd credential or the environment, and client keys from the
environment only, so that no secret ever appears in C{ps} output.

A configuration error ends startup with one line on stderr and exit status
1, rather than twistd's usual full usage text or a traceback; so does a
listener that cannot be bound, or that other hosts could reach while no
client keys are set (decided from the endpoint description before binding
where it can be, from the bound address otherwise), with or without
C{--nodaemon} (see L{oaiproxy.daemon.lifecycle.StartupReport}).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import textwrap
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs

from oaiproxy import __version__
from oaiproxy.access.admin import check_admin_key
from oaiproxy.access.budgetstore import ledger_days, seed_from_ledger
from oaiproxy.access.clients import ClientRegistry, Credentials, load_clients
from oaiproxy.config import (
    DEFAULT_PORT,
    DEFAULT_UPSTREAM,
    Config,
    ConfigError,
    Secret,
    api_base,
    is_private_address,
    load_admin_key,
    load_api_key,
    load_shared_state_password,
    parse_deployment,
    parse_deployments,
    parse_switch,
    parse_upstream,
    port_from_env,
    unix_listener,
)
from oaiproxy.daemon.allocator import Mallopt, allocator_plan, libc_mallopt, tune_allocator
from oaiproxy.daemon.lifecycle import (
    DrainService,
    Lifecycle,
    ListenerService,
    ReadinessService,
    ReloadService,
    StartupReport,
    freeze_startup_heap,
)
from oaiproxy.daemon.sdnotify import Notifier
from oaiproxy.daemon.settings import FLAG, MAIN_OPTIONS, PARAMETER, REFUSED, REPEATABLE, SETTINGS, by_option
from oaiproxy.daemon.workers import (
    FAMILIES,
    WORKER_INDEX,
    GroupSecrets,
    SecretsReader,
    Supervisor,
    die_with_parent,
    read_secrets,
)
from oaiproxy.fake.upstream import FakeUpstream, listen
from oaiproxy.ledger.engines import create_engine, load_db_password, usage_db_target
from oaiproxy.ledger.prices import EMPTY, Prices, load_prices
from oaiproxy.ledger.recorder import UsageRecorder
from oaiproxy.ledger.startup import migrate, open_writer, read_spend, reload_prices
from oaiproxy.observe.jsonlog import OBSERVER_NAME
from oaiproxy.observe.jsonlog import observer as json_observer
from oaiproxy.observe.metrics import MULTIPROC_ENV, UPSTREAM_GAUGE_SECONDS, GroupDirectory, Metrics
from oaiproxy.routetable import BY_NAME, in_order
from oaiproxy.server.build import Built, build_site
from oaiproxy.upstream.client import UpstreamClient, make_http_client
from oaiproxy.upstream.headers import parse_static_header
from oaiproxy.upstream.pool import Upstream
from oaiproxy.upstream.poolfile import check_allow_lists, load_upstreams, upstreams_file_path
from oaiproxy.upstream.styles import (
    AzureStyle,
)
from oaiproxy.upstream.upstreams import SINGLE, Upstreams

if TYPE_CHECKING:
    from oaiproxy.sharedstate.link import RedisLink, RedisTarget, SharedState

__all__ = ["Options", "makeService"]

log = Logger()

_DEFAULTS = Config(ports=(DEFAULT_PORT,), upstream=DEFAULT_UPSTREAM, api_key=None)

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
        "OAIPROXY_CLIENT_KEYS. Mint a client key and its keys-file entry with: "
        "python -m oaiproxy keygen --name NAME >> clients.toml. "
        "Try it without a key: twistd -n oaiproxy --mock-upstream."
    )
    # Every option, its help and its environment variable come from the
    # one table of settings (oaiproxy.daemon.settings).
    _MAIN_OPTIONS = MAIN_OPTIONS
    #: Not in --help: set by the supervisor for its workers, or defined
    #: only to refuse them (a key on the command line).
    _HIDDEN_OPTIONS = frozenset(s.option for s in SETTINGS if not s.shown and s.option is not None)
    optFlags = [[s.option, None, s.usage()] for s in SETTINGS if s.kind == FLAG]
    optParameters = [[s.option, None, None, s.usage()] for s in SETTINGS if s.kind == PARAMETER]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        # The opt_ methods' help too comes from the table; each repeatable
        # option's method appends to its list.
        for setting in SETTINGS:
            if setting.kind in (REPEATABLE, REFUSED) and setting.option is not None:
                self.docs[setting.option] = setting.usage()
            if setting.kind == REPEATABLE and setting.option is not None:
                self[setting.option] = []
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.argv: list[str] = []
        self.config: Config = _DEFAULTS

    def opt_port(self, description: str) -> None:
        """
        A listener (C{--port}); its help is in the settings table.
        """
        self["port"].append(description)

    def opt_api_key(self, value: str) -> None:
        """
        Refuse C{--api-key} (see the settings table).
        """
        # Defined so that getopt's prefix matching cannot turn "--api-key
        # sk-..." into "--api-key-file sk-..." and echo the key as a path.
        raise usage.UsageError(
            "--api-key is not accepted: a key on the command line is visible to every user "
            "of the host in ps; use --api-key-file PATH or the OPENAI_API_KEY environment variable"
        )

    def opt_client_keys(self, value: str) -> None:
        """
        Refuse C{--client-keys} (see the settings table).
        """
        # As for --api-key: getopt would otherwise take it for a prefix of
        # --client-keys-file and print the key as a path.
        raise usage.UsageError(
            "--client-keys is not accepted: keys on the command line are visible to every user of the host "
            "in ps; use --client-keys-file PATH (a file of key hashes) or OAIPROXY_CLIENT_KEYS"
        )

    def opt_shared_state_password(self, value: str) -> None:
        """
        Refuse C{--shared-state-password} (see the settings table).
        """
        # As for --api-key: getopt would otherwise take it for a prefix of
        # --shared-state-password-file and name the password as a path.
        raise usage.UsageError(
            "--shared-state-password is not accepted: a password on the command line is visible to every user "
            "of the host in ps; use --shared-state-password-file PATH or the systemd credential "
            "shared_state_password"
        )

    def opt_upstream_header(self, value: str) -> None:
        """
        One C{--upstream-header}, checked as it is given.
        """
        try:
            self["upstream-header"].append(parse_static_header(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_azure_deployment(self, value: str) -> None:
        """
        One C{--azure-deployment}, checked as it is given.
        """
        try:
            self["azure-deployment"].append(parse_deployment("--azure-deployment", value))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def opt_worker_listener(self, value: str) -> None:
        """
        One inherited socket (C{--worker-listener}).
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

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The --help text: the main options first, in the order a new user
        needs them, then the others; neither the internal options nor those
        that exist only to be refused (they still work, or still refuse,
        when given).  (usage.Options would list every option, sorted.)
        """
        width = width or int(os.environ.get("COLUMNS", "80"))
        names = {option.rstrip("="): option for option in self.longOpt}
        main = [names[name] for name in self._MAIN_OPTIONS if name in names]
        rest = [o for o in self.longOpt if o not in main and o.rstrip("=") not in self._HIDDEN_OPTIONS]
        rest.sort(key=lambda o: o in ("help", "version"))
        column = max(len(o) for o in main + rest) + 6

        def block(options: list[str]) -> str:
            lines = []
            for option in options:
                text = " ".join((self.docs.get(option.rstrip("=")) or "").split())
                doc = textwrap.wrap(text, max(20, width - column), break_on_hyphens=False)
                lines.append(f"  --{option}".ljust(column) + (doc[0] if doc else ""))
                lines.extend(" " * column + line for line in doc[1:])
            return "\n".join(lines) + "\n"

        longdesc = "\n".join(textwrap.wrap(self.longdesc, width, break_on_hyphens=False))
        return f"Options:\n{block(main)}\nMore options:\n{block(rest)}\n{longdesc}\n"

    def postOptions(self) -> None:
        try:
            self.config = self._build()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.config.log_format == "json":
            self._log_as_json()

    def _log_as_json(self) -> None:
        """
        With --log-format json, make twistd's own log JSON too, where it
        would go to standard output (beside the JSON access entries): as if
        C{twistd --logger oaiproxy.observe.jsonlog.observer} had been given.  A
        --logfile, --syslog or --logger of the operator's own is left alone.
        A daemon is refused: twistd points its standard output at
        C{/dev/null}, and every access entry would be lost.
        """
        twistd = getattr(self, "parent", None)
        if not isinstance(twistd, dict) or "nodaemon" not in twistd:
            return
        if not twistd["nodaemon"]:
            raise usage.UsageError(
                "--log-format json writes its lines to standard output, which twistd points at /dev/null "
                "when it daemonizes: add -n (--nodaemon; the systemd unit runs so) or use --log-format text"
            )
        if not twistd.get("logger") and logs_to_standard_output(twistd):
            twistd["logger"] = OBSERVER_NAME

    def _build(self) -> Config:
        config = self._settings()
        _check_shared_state_options(config)
        inherited = config.worker_listeners + (
            (config.worker_metrics_listener,) if config.worker_metrics_listener else ()
        )
        for listener in inherited:
            fd, _, family = listener.partition(":")
            if not fd.isdigit() or family not in FAMILIES:
                raise ConfigError(f"--worker-listener must be FD:INET|INET6|UNIX, not {listener!r}")
        if config.upstreams_file is not None:
            return self._pooled(config)
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

    def _single_upstream_options(self) -> list[str]:
        """
        The single-upstream options given (or their variables), which an
        upstreams file replaces.  (C{OPENAI_API_KEY} is not one: it is
        often set for other tools too.)
        """
        given = [f"--{name}" for name in ("upstream", "api-key-file", "upstream-style") if self[name]]
        given += [f"--{name}" for name in ("azure-deployment", "upstream-header") if self[name]]
        for name in ("upstream", "upstream-style", "azure-deployment"):
            if not self[name] and self.environ.get(_env(name)):
                given.append(_env(name))
        return given

    def _pooled(self, config: Config) -> Config:
        """
        The checks of a configuration with an upstreams file.
        """
        path = config.upstreams_file
        clash = self._single_upstream_options()
        if clash:
            raise ConfigError(
                f"the upstreams file {path} and {', '.join(clash)} both say where requests go: "
                "give the upstreams in the file, or use the single-upstream options without it"
            )
        if config.mock_upstream:
            raise ConfigError(f"--mock-upstream cannot be combined with the upstreams file {path}")
        return config

    def _settings(self) -> Config:
        env = self.environ
        ports = tuple(self["port"]) or (port_from_env(env) or DEFAULT_PORT,)
        upstream = parse_upstream(self["upstream"] or env.get(_env("upstream")) or DEFAULT_UPSTREAM)
        mock = bool(self["mock-upstream"])
        deployments = tuple(self["azure-deployment"]) or parse_deployments(
            _env("azure-deployment"), env.get(_env("azure-deployment"), "")
        )
        # A worker gets the secrets from its supervisor (see makeService),
        # never from the files, which may have changed since the group
        # started.
        worker = bool(self["worker-listener"])
        clients = None if worker else load_clients(self["client-keys-file"], env)
        upstreams_file = upstreams_file_path(self["upstreams-file"], env)
        upstreams = None if upstreams_file is None else load_pool(upstreams_file, env, clients)
        pooled = upstreams_file is not None
        api_key = None if mock or worker or pooled else load_api_key(self["api-key-file"], env)
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            # The plain settings: the option, else the variable, else the
            # Config field's default.
            if setting.field is None or setting.parse is None or setting.option is None:
                continue
            variable = setting.env
            if self[setting.option] is not None:
                values[setting.field] = setting.parse("--" + setting.option, self[setting.option])
            elif variable is not None and env.get(variable):
                values[setting.field] = setting.parse(variable, env[variable])
        return Config(
            ports=ports,
            upstream=api_base(upstream, values.get("upstream_style", "openai")),
            azure_deployments=deployments,
            api_key=api_key,
            clients=clients,
            mock_upstream=mock,
            allow_open_relay=bool(self["allow-open-relay"]),
            api_key_file=self["api-key-file"],
            client_keys_file=self["client-keys-file"],
            metrics_key=None if worker else self._metrics_key(),
            admin_key=None if worker else self._admin_key(clients),
            stream_usage=not self["no-stream-usage"] and self._switch(env, "no-stream-usage"),
            malloc_tuning=not self["no-malloc-tuning"] and self._switch(env, "no-malloc-tuning"),
            worker_listeners=tuple(self["worker-listener"]),
            worker_metrics_listener=self["worker-metrics-listener"],
            upstream_headers=tuple(self["upstream-header"]),
            upstreams=upstreams,
            upstreams_file=upstreams_file,
            shared_state_password=None if worker else self._shared_state_password(values),
            **values,
            **self._ledger_settings(mock),
        )

    def _shared_state_password(self, values: Mapping[str, Any]) -> Optional[Secret]:
        """
        The Redis password, read here in the process that checks the
        configuration (a worker is handed it), and only with a
        C{--shared-state} to use it with.
        """
        given = self["shared-state-password-file"] or self.environ.get(_env("shared-state-password-file"))
        if values.get("shared_state") is None:
            if given:
                raise ConfigError("--shared-state-password-file needs --shared-state (OAIPROXY_SHARED_STATE)")
            return None
        return load_shared_state_password(self["shared-state-password-file"], self.environ)

    @staticmethod
    def _switch(env: Mapping[str, str], option: str) -> bool:
        """
        The on/off variable of a C{--no-...} flag (on when unset).
        """
        variable = _env(option)
        return parse_switch(variable, env.get(variable, "on"))

    def _ledger_settings(self, mock: bool) -> dict[str, Any]:
        """
        The usage ledger's settings (oaiproxy.ledger): where it is, its
        password, the prices.
        """
        target = usage_db_target(self["usage-db"], self.environ, mock)
        password = load_db_password(self["usage-db-password-file"], self.environ)
        if target is not None:
            create_engine(target, password)
        path = self["prices-file"] or self.environ.get(_env("prices-file"))
        return {"usage_db": target, "usage_db_password": password, "prices": load_prices(path) if path else None}

    def _admin_key(self, clients: Optional[ClientRegistry]) -> Optional[Secret]:
        """
        The admin key, read here in the process that checks the
        configuration (a worker is handed it), and refused when it is also
        a client's key.
        """
        key = load_admin_key(self["admin-key-file"], self.environ)
        check_admin_key(key, clients if clients is not None else ClientRegistry())
        return key

    def _metrics_key(self) -> Optional[Secret]:
        if self["metrics-key-file"]:
            return load_api_key(self["metrics-key-file"], {})
        value = self.environ.get(_env("metrics-key-file"), "").strip()
        return Secret(value.encode("utf-8")) if value else None


def _check_shared_state_options(config: Config) -> None:
    """
    The shared-state options that make sense only together, and the
    client library they need.
    """
    if config.shared_state is None:
        defaults = _DEFAULTS
        given = [
            f"--{option}"
            for option, field in (
                ("shared-state-ca-file", "shared_state_ca_file"),
                ("shared-state-prefix", "shared_state_prefix"),
                ("shared-state-instances", "shared_state_instances"),
                ("shared-state-deadline", "shared_state_deadline_ms"),
                ("shared-state-lease", "shared_state_lease"),
            )
            if getattr(config, field) != getattr(defaults, field)
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ConfigError(f"{', '.join(given)} {verb} --shared-state (OAIPROXY_SHARED_STATE)")
        return
    if config.shared_state_ca_file is not None and not config.shared_state.startswith("rediss://"):
        raise ConfigError("--shared-state-ca-file is for TLS: use a rediss:// URL with it")
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise ConfigError("--shared-state needs the Redis client: pip install 'oaiproxy[redis]' (txredisapi)") from None


#: Seconds the startup check of C{--shared-state} may take in all.
STARTUP_CHECK_SECONDS = 5.0


def shared_state_target(config: Config) -> "RedisTarget":
    """
    Where C{--shared-state} points, with the password it was given.
    """
    from oaiproxy.sharedstate.link import RedisTarget

    assert config.shared_state is not None
    password = config.shared_state_password
    return RedisTarget.from_url(
        config.shared_state,
        None if password is None else password.reveal().decode("utf-8", "replace"),
        config.shared_state_ca_file,
    )


def shared_instances(config: Config) -> int:
    """
    How many processes share the limits: C{--shared-state-instances}, else
    the group's workers (a worker knows them from its share), else 1.
    """
    return config.shared_state_instances or max(config.workers, config.worker_share)


def shared_state(config: Config, reactor: Any) -> "Optional[SharedState]":
    """
    This process's link to the group's Redis (a service: the caller puts
    it in the service tree), its key space and the expected group size;
    C{None} without C{--shared-state}.
    """
    if config.shared_state is None:
        return None
    from oaiproxy.sharedstate.link import KeySpace, RedisLink, SharedState, redis_connector

    target = shared_state_target(config)
    link = RedisLink(
        redis_connector(reactor, target),
        reactor,
        deadline=config.shared_state_deadline_ms / 1000,
        name=f"{target.host}:{target.port}",
    )
    return SharedState(link, KeySpace(config.shared_state_prefix), shared_instances(config))


def check_shared_state_now(config: Config) -> None:
    """
    The startup check of C{--shared-state}: connect, authenticate, select
    the database and PING, or end startup with one line naming why
    (refused, timeout, unresolved, tls, auth, database), never the
    password.

    twistd calls L{makeService} before its reactor runs (and before it
    daemonizes, so the line reaches the terminal), so the check runs on
    a private reactor of its own, run until the check is over and then
    discarded: the same connection code as the running proxy's, before
    anything is bound.
    """
    from twisted.internet.selectreactor import SelectReactor

    from oaiproxy.sharedstate.link import SharedStateError, check_shared_state, redis_connector

    try:
        target = shared_state_target(config)
    except ValueError as e:
        raise SystemExit(f"twistd oaiproxy: error: --shared-state: {e}") from None
    private = SelectReactor()
    outcome: list[Any] = []

    def check() -> None:
        try:
            d = check_shared_state(redis_connector(private, target), private, STARTUP_CHECK_SECONDS)
        except OSError as e:
            # The CA file, read as the connector is made.
            d = Deferred()
            d.errback(SharedStateError("tls", f"cannot read the CA file {config.shared_state_ca_file}: {e.strerror}"))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: private.stop())

    private.callWhenRunning(check)
    private.run(installSignalHandlers=False)
    result = outcome[0] if outcome else None
    if isinstance(result, Failure):
        if result.check(SharedStateError):
            error = result.value
            raise SystemExit(
                f"twistd oaiproxy: error: cannot use the shared state at {target.host}:{target.port} "
                f"({error.reason}): {error.detail}"
            )
        raise SystemExit(f"twistd oaiproxy: error: cannot use the shared state: {result.getErrorMessage()}")
    log.info("shared state at {where} checked", where=f"{target.host}:{target.port}")


def _env(option: str) -> str:
    """
    The environment variable of C{--option}, from the settings table.
    """
    variable = by_option(option).env
    assert variable is not None, option
    return variable


def load_pool(path: str, environ: Mapping[str, str], clients: Optional[ClientRegistry]) -> tuple[Upstream, ...]:
    """
    The upstreams file's entries, checked against the clients' model
    allow-lists (a model no upstream serves would let a client in to get
    nowhere).

    @raise ConfigError: naming the file, the entry and the field.
    """
    upstreams = load_upstreams(path, environ)
    if clients is not None:
        try:
            check_allow_lists(upstreams, {client.name: client.models for client in clients})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return upstreams


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The endpoint for a C{--port} description, or one line saying what is
    wrong with it.
    """
    try:
        # unix: sockets get mode 660 unless the description sets one.
        return serverFromString(reactor, unix_listener(description))
    except (KeyError, IndexError) as e:
        if description.startswith("systemd:"):
            raise SystemExit(f"twistd oaiproxy: error: {_systemd_missing(description, e)}") from None
        raise SystemExit(f"twistd oaiproxy: error: cannot use the endpoint {description!r}: {e}") from None
    except (ValueError, TypeError, OSError) as e:
        raise SystemExit(f"twistd oaiproxy: error: cannot use the endpoint {description!r}: {e}") from None


def _systemd_missing(description: str, error: Exception) -> str:
    """
    Why a C{systemd:} socket is not there: the name or index asked for, and
    what systemd did pass (nothing, when not started through a socket unit).
    """
    passed = ListenFDs.fromEnvironment().inheritedNamedDescriptors()
    given = ", ".join(repr(name) for name in passed) if passed else "no sockets"
    wanted = f"socket named {error.args[0]!r}" if isinstance(error, KeyError) else "socket at that index"
    if isinstance(error, KeyError):
        fix = (
            f"give its .socket unit FileDescriptorName={error.args[0]} (the name= here), and start the service "
            "through that socket unit"
        )
    else:
        fix = "start the service through its .socket unit, or use name= with the unit's FileDescriptorName="
    return f"cannot use the endpoint {description!r}: systemd passed no {wanted} (it passed {given}); {fix}"


class _Probed(Exception):
    """
    The probe reactor has seen the address; nothing is bound.
    """


class _AddressProbe:
    """
    A stand-in reactor that an endpoint asks to listen, so that the address
    it would bind is known before anything is bound: Twisted's own parser
    reads the description (escapes, C{tcp6:}, C{ssl:}, wrappers such as
    C{haproxy:}).  Every method raises once it has recorded the address,
    so the endpoint goes no further (an adopted socket is not closed).
    """

    address: Optional[IAddress] = None

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self.address = _ip_literal(interface or "0.0.0.0", port)
        raise _Probed()

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = "") -> None:
        self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0) -> None:
        self.address = UNIXAddress(address)
        raise _Probed()

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> None:
        self.address = fd_address(fileDescriptor)
        raise _Probed()


def _ip_literal(host: str, port: int) -> Optional[IAddress]:
    """
    The address for an interface given as an IP; C{None} for a host name,
    whose address only the bound port can tell.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return IPv6Address("TCP", host, port) if ip.version == 6 else IPv4Address("TCP", host, port)


def fd_address(fd: int) -> Optional[IAddress]:
    """
    The address an inherited listening socket is bound to (a systemd
    socket, a worker's), read from the socket itself; C{None} if it cannot
    be read (the listen will say why).
    """
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            name, family = sock.getsockname(), sock.family
    except OSError:
        return None
    if family == socket.AF_INET:
        return IPv4Address("TCP", name[0], name[1])
    if family == socket.AF_INET6:
        return IPv6Address("TCP", name[0], name[1])
    if family == socket.AF_UNIX:
        return UNIXAddress(name)
    return None


def planned_address(description: str) -> Optional[IAddress]:
    """
    The address a C{--port} description will listen on, known before
    binding for C{tcp:}, C{tcp6:}, C{ssl:}, C{unix:} and inherited
    (C{systemd:}) sockets; C{None} when only the bound port can tell (a
    host name, another endpoint type).
    """
    probe = _AddressProbe()
    try:
        endpoint = serverFromString(probe, description)
        endpoint.listen(Factory.forProtocol(Protocol)).addErrback(lambda _: None)
    except Exception:
        return None
    return probe.address


class _Exposure:
    """
    Whether any listener is reachable from other hosts; a reload may not
    leave such a proxy without client keys.
    """

    public = False


def _base_url(description: str, address: Any) -> str:
    scheme = "https" if description.startswith("ssl:") else "http"
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", address)
        return f"{scheme}+unix:{os.fsdecode(name) if isinstance(name, bytes) else name}"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{address.port}"


def _open_relay_refusal(base: str) -> str:
    return (
        f"refusing to start: {base} is reachable from other hosts and "
        "no client keys are set, so anyone who can connect could spend the upstream key. "
        "Set client keys (--client-keys-file, OAIPROXY_CLIENT_KEYS; python -m oaiproxy keygen makes one), "
        "listen on 127.0.0.1, or pass --allow-open-relay if that is really what you want."
    )


def _check_before_binding(
    listeners: list[tuple[str, Optional[IAddress]]], config: Config, clients: ClientRegistry, exposure: _Exposure
) -> None:
    """
    Refuse an open relay before anything is bound or any worker starts,
    for every listener whose address the description tells; the others
    are checked once bound (L{_exposure_check}).
    """
    for description, address in listeners:
        if address is not None and not is_private_address(address):
            exposure.public = True
            if not len(clients) and not config.allow_open_relay:
                raise SystemExit(f"twistd oaiproxy: error: {_open_relay_refusal(_base_url(description, address))}")


def _exposure_check(
    description: str,
    config: Config,
    clients: Callable[[], ClientRegistry],
    exposure: _Exposure,
    report: StartupReport,
    port: IListeningPort,
) -> str:
    """
    The check on a bound port, before anything is accepted on it: refuse
    (L{StartupError}) a port other hosts can reach while no client keys are
    set, and warn loudly when --allow-open-relay allows it.  Returns the
    base URL.
    """
    address: Any = port.getHost()
    base = _base_url(description, address)
    if not is_private_address(address):
        exposure.public = True
        if not len(clients()):
            if not config.allow_open_relay:
                report.fail(_open_relay_refusal(base))
            log.critical(
                "OPEN RELAY: {base} is reachable from other hosts and no client keys are "
                "set (--allow-open-relay). Anyone who can connect can spend the upstream "
                "API key.",
                base=base,
            )
    return base


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


def _announcer(
    description: str,
    config: Config,
    bound: "Deferred[None]",
    exposure: _Exposure,
    credentials: Credentials,
    report: StartupReport,
) -> Callable[[IListeningPort], None]:
    """
    What happens once a listener is bound, before it accepts: the exposure
    check (which may refuse the port), then the startup report, then
    readiness.
    """

    def announce(port: IListeningPort) -> None:
        base = _exposure_check(description, config, lambda: credentials.clients, exposure, report, port)
        log.info(
            "oaiproxy listening on {base}: API at {base}/v1 ({first}...), health at {base}/health, "
            "dashboard at {base}/dashboard/",
            base=base,
            first=f"{base}/v1/{in_order(config.routes)[0].name}",
            endpoint=description,
        )
        bound.callback(None)

    return announce


class _LinkAfterDrain(MultiService):
    """
    The link to the shared state, and the drain: the link starts first
    and stops last, once the drain is over and a deadline more has
    passed, so that the settlements of the requests the drain ended (the
    last of them as their connections close) reach Redis and free their
    concurrency slots at once, rather than when their leases expire.  (A
    L{MultiService} stops all its children at once.)
    """

    def __init__(self, link: "RedisLink", drain: DrainService, clock: Any) -> None:
        super().__init__()
        self._link = link
        self._drain = drain
        self._clock = clock
        link.setServiceParent(self)
        drain.setServiceParent(self)

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        stopped: Deferred[Any] = maybeDeferred(self._drain.stopService)
        stopped.addBoth(lambda _: deferLater(self._clock, self._link.deadline, lambda: None))
        stopped.addBoth(lambda _: self._link.stopService())
        return stopped.addBoth(lambda _: None)


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


def _clients_file(keys_file: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """
    The clients file in use, found as L{load_clients} finds it; C{None} when
    there is none.
    """
    path = keys_file or environ.get(_env("client-keys-file"))
    if path:
        return path
    directory = environ.get("CREDENTIALS_DIRECTORY")
    candidate = os.path.join(directory, "client_keys") if directory else None
    return candidate if candidate is not None and os.path.exists(candidate) else None


def _warn_if_no_clients(config: Config, environ: Mapping[str, str], clients: ClientRegistry) -> None:
    """
    A clients file that lists nobody turns client authentication off, which
    nothing else would say: an empty file is what the systemd steps create.
    """
    path = _clients_file(config.client_keys_file, environ)
    if path is not None and not len(clients):
        log.warn(
            "the clients file {path} lists no clients, so client authentication is OFF: anyone who can "
            "connect may use the proxy and its upstream key. Add clients with python -m oaiproxy keygen, "
            "then reload.",
            path=path,
        )


def _load_credentials(options: Options, credentials: Credentials, exposure: _Exposure) -> Optional[GroupSecrets]:
    """
    Read the key sources again and check the result; C{None}, with the
    reason logged, when it cannot be used.
    """
    config = options.config
    try:
        if config.mock_upstream or config.upstreams_file is not None:
            # (With an upstreams file, the keys are its entries'.)
            api_key = credentials.api_key
        else:
            api_key = load_api_key(config.api_key_file, options.environ)
        clients = load_clients(config.client_keys_file, options.environ)
        admin_key = load_admin_key(options["admin-key-file"], options.environ)
        check_admin_key(admin_key, clients)
        if exposure.public and not len(clients) and not config.allow_open_relay:
            raise ConfigError("the new configuration has no client keys, and the proxy is reachable from other hosts")
    except ConfigError as e:
        log.error("reload failed, keeping the credentials in use: {why}", why=str(e))
        return None
    _warn_if_no_clients(config, options.environ, clients)
    # The Redis password is the one the group started with: the links
    # keep their connections, and a worker started later needs the same.
    return GroupSecrets(api_key, clients, config.metrics_key, config.shared_state_password, admin_key)


def _reloader(
    options: Options,
    credentials: Credentials,
    exposure: _Exposure,
    hand_over: Optional[Callable[[GroupSecrets], int]] = None,
    upstreams: Optional[Upstreams] = None,
) -> Callable[[], bool]:
    """
    The SIGHUP action: read the key sources (and the upstreams file) again,
    then swap the secrets and the pool in one step.  Any failure keeps
    both in use and says why.

    @param hand_over: in a supervisor, gives the checked secrets to every
        worker (and to those started later) and says to how many.
    @param upstreams: the pool to give the upstreams file's new entries
        (a supervisor has none: it only checks the file; its workers read
        it when handed the reload).
    """

    def reload() -> bool:
        secrets = _load_credentials(options, credentials, exposure)
        if secrets is None:
            return False
        entries = _load_entries(options.config, options.environ, secrets.clients)
        if entries is False:
            return False
        assert secrets.api_key is not None
        changed = secrets.api_key != credentials.api_key
        credentials.replace(secrets.api_key, secrets.clients, secrets.admin_key)
        if upstreams is not None and isinstance(entries, tuple):
            upstreams.replace(entries)
            log.info("reloaded the upstreams file: {names}", names=", ".join(u.name for u in entries))
        if hand_over is not None:
            count = hand_over(replace(secrets, api_key=None if options.config.mock_upstream else secrets.api_key))
            log.info(
                "reload checked: upstream key {key}, {count} client(s); handed to {workers} worker(s)",
                key="changed" if changed else "unchanged",
                count=len(secrets.clients),
                workers=count,
            )
            return True
        log.info(
            "reloaded: upstream key {key}, {count} client(s)",
            key="changed" if changed else "unchanged",
            count=len(secrets.clients),
        )
        return True

    return reload


def _forwarding_to(upstreams: Upstreams) -> str:
    """
    Where requests go, for the status line and the startup log: the one
    upstream's URL, or the pool's names.
    """
    clients = upstreams.clients
    if len(clients) == 1 and SINGLE in clients:
        return clients[SINGLE].base_url
    return f"{len(clients)} upstream(s): " + ", ".join(clients)


def _load_entries(
    config: Config, environ: Mapping[str, str], clients: ClientRegistry
) -> "tuple[Upstream, ...] | None | bool":
    """
    The upstreams file's entries read again for a reload: C{None} without
    a file, C{False} (the reason logged) when they cannot be used.
    """
    if config.upstreams_file is None:
        return None
    try:
        return load_pool(config.upstreams_file, environ, clients)
    except ConfigError as e:
        log.error("reload failed, keeping the upstreams and credentials in use: {why}", why=str(e))
        return False


def _worker_reloader(
    config: Config,
    credentials: Credentials,
    exposure: _Exposure,
    environ: Mapping[str, str] = {},
    upstreams: Optional[Upstreams] = None,
) -> Callable[[GroupSecrets], None]:
    """
    In a worker: apply a reload the supervisor has checked (checked again
    here, so that no path serves an open relay), and read the upstreams
    file again into C{upstreams}.
    """

    def apply(secrets: GroupSecrets) -> None:
        if exposure.public and not len(secrets.clients) and not config.allow_open_relay:
            log.error("reload refused, keeping the credentials in use: no client keys, and reachable from other hosts")
            return
        entries = _load_entries(config, environ, secrets.clients)
        if entries is False:
            return
        if upstreams is not None and isinstance(entries, tuple):
            upstreams.replace(entries)
        api_key = _MOCK_KEY if config.mock_upstream or secrets.api_key is None else secrets.api_key
        changed = api_key != credentials.api_key
        credentials.replace(api_key, secrets.clients, secrets.admin_key)
        log.info(
            "reloaded: upstream key {key}, {count} client(s)",
            key="changed" if changed else "unchanged",
            count=len(secrets.clients),
        )

    return apply


class _SecretsService(Service):
    """
    A worker's end of the supervisor's pipe (its standard input): reloads
    arrive there.  A SIGHUP sent to a worker itself (a terminal's hangup
    reaches the whole process group) is ignored rather than fatal, its
    default: the supervisor has it too, and reloads the group.

    @param install: C{signal.signal}, injected for tests.
    """

    def __init__(self, reactor: Any, reader: SecretsReader, install: Callable[[int, Any], Any] = signal.signal) -> None:
        self._reactor = reactor
        self._reader = reader
        self._install = install

    def startService(self) -> None:
        super().startService()
        self._install(signal.SIGHUP, signal.SIG_IGN)
        self._reactor.addReader(self._reader)
        self._reader.dataReceived(b"")

    def stopService(self) -> None:
        super().stopService()
        self._reactor.removeReader(self._reader)


def _metrics(config: Config, environ: Mapping[str, str]) -> Metrics:
    """
    A worker's metrics, in the directory its supervisor made (the group's
    totals at every scrape); one process's own, in memory, otherwise.
    """
    directory = environ.get(MULTIPROC_ENV)
    if config.worker_listeners and directory:
        return Metrics(group_dir=directory, worker=_worker_index(environ))
    return Metrics()


def _worker_index(environ: Mapping[str, str]) -> Optional[int]:
    """
    The index the supervisor gave this worker (in its environment), if any.
    """
    index = environ.get(WORKER_INDEX, "")
    return int(index) if index.isdigit() else None


def logs_to_standard_output(twistd: Optional[Mapping[str, Any]]) -> bool:
    """
    Whether twistd's own log goes to this process's standard output
    (C{--nodaemon} with no C{--logfile}, C{--syslog} or C{--logger} but
    the JSON one C{--log-format json} selects), where the workers' lines
    can pass through as they are.  C{None}, or options without twistd's
    (tests): as if it did.
    """
    if twistd is None or "nodaemon" not in twistd:
        return True
    if not twistd.get("nodaemon") or twistd.get("syslog"):
        return False
    if twistd.get("logfile") not in (None, "", "-"):
        return False
    return twistd.get("logger") in (None, json_observer, OBSERVER_NAME)


def _supervise(
    options: Options,
    reactor: Any,
    notifier: Notifier,
    service: MultiService,
    endpoints: list[tuple[str, IStreamServerEndpoint]],
    report: StartupReport,
    exposure: _Exposure,
    metrics_listener: Optional[tuple[str, IStreamServerEndpoint]] = None,
) -> IService:
    """
    C{--workers N}: this process only holds the listeners and speaks for
    the group (see L{oaiproxy.daemon.workers}).  It checks the configuration; the
    workers get it from here.  It also holds the C{--metrics-port}
    listener, if any, and the group's metrics directory.
    """
    config = options.config

    def writer(stream: Any) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            if stream is not None:
                stream.buffer.write(data)
                stream.flush()

        return write

    clients: ClientRegistry = config.clients if config.clients is not None else ClientRegistry()
    credentials = Credentials(config.api_key or _MOCK_KEY, clients, config.admin_key)
    _warn_if_no_clients(config, options.environ, clients)

    def bound(description: str, port: IListeningPort) -> None:
        _exposure_check(description, config, lambda: credentials.clients, exposure, report, port)

    supervisor = Supervisor(
        reactor,
        endpoints,
        options.argv,
        config.workers,
        notifier,
        dict(options.environ),
        writer(sys.__stdout__),
        GroupSecrets(config.api_key, clients, config.metrics_key, config.shared_state_password, config.admin_key),
        report,
        bound,
        error_output=writer(sys.__stderr__),
        metrics_listener=metrics_listener,
        metrics_dir=GroupDirectory(options.environ),
        relay=None if logs_to_standard_output(getattr(options, "parent", None)) else globalLogPublisher,
        # Before twistd moves to --rundir (it does after this returns).
        cwd=os.getcwd(),
    )
    supervisor.setServiceParent(service)

    def status() -> str:
        return f"{config.workers} workers serving {len(config.ports)} listener(s), {len(credentials.clients)} client(s)"

    reload = _reloader(options, credentials, exposure, supervisor.hand_over)
    ReloadService(reload, notifier, status, lambda f: reactor.callFromThread(f)).setServiceParent(service)
    ReadinessService(
        notifier, [supervisor.all_ready], status, lambda ready: reactor.callWhenRunning(ready)
    ).setServiceParent(service)
    supervisor.all_ready.addCallback(lambda _: report.done())
    log.info("oaiproxy {version}: supervising {count} workers", version=__version__, count=config.workers)
    return service


def _ledger_or_exit(open_it: Callable[[], Any]) -> Any:
    """
    Open (or migrate) the usage ledger, or stop the start with one line.
    """
    try:
        return open_it()
    except ConfigError as e:
        raise SystemExit(f"twistd oaiproxy: error: {e}") from None


def _usage_recorder(
    config: Config, reactor: Any, metrics: Metrics, lifecycle: Lifecycle, service: MultiService
) -> UsageRecorder:
    """
    What reads every finished request into the spend metrics and, with
    C{--usage-db}, the ledger, whose writer joins C{service} (its last
    flush waits for the drain).
    """
    writer = None
    target = config.usage_db
    if target is not None:
        writer = _ledger_or_exit(
            lambda: open_writer(
                target,
                config.usage_db_password,
                reactor,
                metrics.series_registry,
                apply=not config.worker_listeners,
                wait=lifecycle.when_drained,
            )
        )
        writer.setServiceParent(service)
    return UsageRecorder(reactor, metrics, Prices(config.prices or EMPTY), writer)


def _seed_budgets(config: Config, built: Built, credentials: Credentials) -> None:
    """
    Seed the budgets from the ledger now, before anything listens (every
    process of a group does): a restart keeps the period's totals.  Then
    L{Built.budget_refresh} reads them again every second.
    """
    store, usage, target = built.budgets, built.usage, config.usage_db
    if store is None or usage is None or usage.writer is None or target is None:
        return
    clients = list(credentials.clients)
    days = ledger_days(store, clients)
    if days is None:
        return
    first, last = days
    rows = _ledger_or_exit(lambda: read_spend(target, config.usage_db_password, first, last))
    seeded = seed_from_ledger(store, clients, rows, usage.writer.pending_rows())
    log.info("budgets: totals of {count} client(s) read from the usage ledger", count=seeded)


def _and_prices(reload: Callable[..., Any], usage: UsageRecorder) -> Callable[..., Any]:
    """
    A reload that reads the prices file again too.
    """

    def both(*args: Any) -> Any:
        result = reload(*args)
        priced = reload_prices(usage.prices)
        return result and priced if isinstance(result, bool) else result

    return both


def makeService(
    options: Options,
    reactor: Any = None,
    http: Optional[Any] = None,
    notifier: Optional[Notifier] = None,
    report: Optional[StartupReport] = None,
    supervisor_input: int = 0,
    check_shared: Optional[Callable[[Config], None]] = None,
    find_mallopt: Callable[[], Optional[Mallopt]] = libc_mallopt,
) -> IService:
    """
    Build the daemon: listeners on every C{--port}, the Resource tree, the
    upstream client, and the services that talk to systemd (readiness,
    reload on SIGHUP, drain on stop).

    Everything that can be checked before binding is checked here: twistd
    calls this before it daemonizes, so a refusal reaches the terminal
    (C{SystemExit}, one line on stderr).

    @param reactor: the reactor (the global one by default).
    @param http: a treq-like client to use instead of the pooled one
        (for tests).
    @param notifier: where readiness goes (by default C{$NOTIFY_SOCKET}).
    @param report: where a failure after this point goes (by default the
        standard error twistd was started with).
    @param supervisor_input: in a worker, the descriptor its supervisor
        writes the configuration to (standard input).
    @param check_shared: the startup check of C{--shared-state}
        (L{check_shared_state_now}; injected for tests).
    @param find_mallopt: finds the C library's C{mallopt}, which
        L{tune_allocator} calls once the process serves (injected for
        tests).
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    config = options.config
    if notifier is None:
        notifier = Notifier.from_environ(options.environ)
    service = MultiService()
    exposure = _Exposure()
    pending = b""

    if config.worker_listeners:
        # A worker serves the secrets its supervisor read and checked, and
        # never outlives the supervisor.
        try:
            secrets, pending = read_secrets(supervisor_input)
        except ConfigError as e:
            raise SystemExit(f"twistd oaiproxy: error: {e}") from None
        config = replace(
            config,
            api_key=secrets.api_key,
            clients=secrets.clients,
            metrics_key=secrets.metrics_key,
            shared_state_password=secrets.shared_state_password,
            admin_key=secrets.admin_key,
        )
        die_with_parent()
        inherited = [(listener, int(listener.partition(":")[0])) for listener in config.worker_listeners]
        planned = [(listener, fd_address(fd)) for listener, fd in inherited]
        endpoints: list[tuple[str, IStreamServerEndpoint]] = [
            (listener, AdoptedStreamServerEndpoint(reactor, fd, FAMILIES[listener.partition(":")[2]]))
            for listener, fd in inherited
        ]
    else:
        planned = [(description, planned_address(description)) for description in config.ports]
        endpoints = [(description, _endpoint(reactor, description)) for description in config.ports]
    metrics_endpoint: Optional[IStreamServerEndpoint] = None
    if config.worker_listeners:
        # A worker accepts on its supervisor's metrics socket too.
        if config.worker_metrics_listener:
            fd, _, family = config.worker_metrics_listener.partition(":")
            metrics_endpoint = AdoptedStreamServerEndpoint(reactor, int(fd), FAMILIES[family])
    elif config.metrics_port:
        metrics_endpoint = _endpoint(reactor, config.metrics_port)
    clients: ClientRegistry = config.clients if config.clients is not None else ClientRegistry()
    _check_before_binding(planned, config, clients, exposure)
    if config.shared_state is not None and not config.worker_listeners:
        # Once per group, before anything is bound or any worker starts:
        # a worker's link connects in the background (and falls back).
        (check_shared or check_shared_state_now)(config)
    if report is None:
        report = StartupReport(reactor)

    if config.workers > 1 and not config.worker_listeners:
        ledger = config.usage_db
        if ledger is not None:
            # The supervisor migrates the ledger before any worker starts.
            _ledger_or_exit(lambda: migrate(ledger, config.usage_db_password))
        metrics_listener = None
        if config.metrics_port and metrics_endpoint is not None:
            metrics_listener = (config.metrics_port, metrics_endpoint)
        return _supervise(options, reactor, notifier, service, endpoints, report, exposure, metrics_listener)

    api_key = _MOCK_KEY if config.mock_upstream or config.api_key is None else config.api_key
    assert config.mock_upstream or config.upstreams is not None or config.api_key is not None, (
        "Options guarantees a key unless mocking or pooled"
    )
    credentials = Credentials(api_key, clients, config.admin_key)
    if not config.worker_listeners:
        _warn_if_no_clients(config, options.environ, clients)
    lifecycle = Lifecycle()
    http_for = None
    if http is None:
        http = make_http_client(reactor, config.connect_timeout)
        # An upstream with its own connect_timeout gets an agent of its own
        # (the timeout is the agent's); one per distinct timeout.
        agents: dict[float, Any] = {config.connect_timeout: http}

        def http_for(timeout: float) -> Any:
            if timeout not in agents:
                agents[timeout] = make_http_client(reactor, timeout)
            return agents[timeout]

    assert http is not None
    shared = shared_state(config, reactor)
    metrics = _metrics(config, options.environ)
    usage = _usage_recorder(config, reactor, metrics, lifecycle, service)
    built = build_site(
        config,
        http=http,
        credentials=credentials,
        clock=reactor,
        lifecycle=lifecycle,
        metrics=metrics,
        worker=_worker_index(options.environ),
        http_for=http_for,
        shared=shared,
        usage=usage,
        group_dir=options.environ.get(MULTIPROC_ENV) if config.worker_listeners else None,
    )
    upstream, site = built.upstream, built.site
    _seed_budgets(config, built, credentials)
    assert built.budget_refresh is not None
    built.budget_refresh.setServiceParent(service)
    if built.dashboard is not None:
        # The dashboard's live figures, sampled off the request path.
        sampler = TimerService(built.dashboard.interval, built.dashboard.tick)
        sampler.clock = reactor
        sampler.setServiceParent(service)
    if config.mock_upstream:
        _MockUpstreamService(reactor, upstream).setServiceParent(service)
    if config.worker_listeners and MULTIPROC_ENV in options.environ:
        # The other workers cannot read this one's pool: it writes it.
        gauges = TimerService(UPSTREAM_GAUGE_SECONDS, metrics.refresh_upstreams)
        gauges.clock = reactor
        gauges.setServiceParent(service)
    listening: list[Deferred[None]] = []
    # A worker accepts on the sockets its supervisor opened.
    for description, endpoint in endpoints:
        bound: Deferred[None] = Deferred()
        listening.append(bound)
        announce = _announcer(description, config, bound, exposure, credentials, report)
        ListenerService(endpoint, site, description, report, announce).setServiceParent(service)
    if config.metrics_port and built.metrics_site is not None and metrics_endpoint is not None:
        bound = Deferred()
        listening.append(bound)
        ListenerService(
            metrics_endpoint,
            built.metrics_site,
            config.metrics_port,
            report,
            _metrics_announcer(bound, config.metrics_key is not None),
        ).setServiceParent(service)

    def status() -> str:
        return (
            f"serving {len(config.ports)} listener(s), forwarding to "
            f"{'the mock upstream' if config.mock_upstream else _forwarding_to(built.upstreams)}, "
            f"{len(credentials.clients)} client(s)"
        )

    # Stopping runs in reverse order: the drain starts as the listeners
    # close, so no new connection arrives while in-flight requests finish.
    drain = DrainService(lifecycle, reactor, config.drain_timeout, notifier)
    if shared is None:
        drain.setServiceParent(service)
    else:
        # The link closes only once the drain is over, so that the requests
        # in flight settle through it (their concurrency slots free at
        # once, not when their leases expire).
        _LinkAfterDrain(shared.link, drain, reactor).setServiceParent(service)
    if config.worker_listeners:
        # Reloads come from the supervisor, checked, on the pipe.
        reader = SecretsReader(
            supervisor_input,
            _and_prices(_worker_reloader(config, credentials, exposure, options.environ, built.upstreams), usage),
            pending,
        )
        _SecretsService(reactor, reader).setServiceParent(service)
    else:
        # callFromThread is the signal-safe way back into the reactor.
        reload = ReloadService(
            _and_prices(_reloader(options, credentials, exposure, upstreams=built.upstreams), usage),
            notifier,
            status,
            lambda f: reactor.callFromThread(f),
        )
        reload.setServiceParent(service)
    ReadinessService(notifier, listening, status, lambda ready: reactor.callWhenRunning(ready)).setServiceParent(
        service
    )

    def serving(_: object) -> None:
        # Both shape the heap the requests will use, so both wait until
        # startup's own objects are made.
        reactor.callWhenRunning(freeze_startup_heap)
        reactor.callWhenRunning(tune_allocator, allocator_plan(options.environ, config.malloc_tuning), find_mallopt())

    gatherResults(listening).addCallback(lambda _: report.done()).addCallback(serving)

    log.info(
        "oaiproxy {version} forwarding {routes} to {upstream} ({style}) "
        "(client keys: {keys}, read timeout {read:g}s, body limit {limit} bytes, drain {drain:g}s)",
        version=__version__,
        routes=", ".join(route.name for route in built.routes),
        style=upstream.style.name,
        upstream=_forwarding_to(built.upstreams) if not config.mock_upstream else "the mock upstream",
        keys=len(clients) or "none",
        read=config.read_timeout,
        limit=config.max_body_bytes,
        drain=config.drain_timeout,
    )
    return service
