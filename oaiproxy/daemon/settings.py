# -*- test-case-name: tests.daemon.test_settings -*-
"""
The one table of the daemon's settings.

Each setting is declared once, here: its twistd option, its environment
variable, its default, how its text is parsed, its C{--help} line and its
row in the README's configuration table.  L{oaiproxy.daemon.tap.Options}
takes its C{optFlags}, C{optParameters}, help and environment lookups from
L{SETTINGS}, and a test compares the README with L{markdown_table}.

It lives beside the tap rather than in L{oaiproxy.config}, which sits
below every layer: the table names parsers and defaults of the routes and
upstream layers (C{--routes}, the Azure C{api-version}).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from oaiproxy.config import (
    DEFAULT_PORT,
    DEFAULT_UPSTREAM,
    Config,
    parse_attempts,
    parse_byte_count,
    parse_instances,
    parse_interval,
    parse_log_format,
    parse_milliseconds,
    parse_seconds,
    parse_shared_state,
    parse_style,
    parse_workers,
)
from oaiproxy.routetable import DEFAULT_ROUTES, ROUTES, parse_routes
from oaiproxy.upstream.styles import DEFAULT_AZURE_API_VERSION, DEFAULT_AZURE_RESPONSES_API_VERSION

__all__ = ["MAIN_OPTIONS", "SETTINGS", "Setting", "by_option", "markdown_table"]

#: How a setting is given on the command line.
PARAMETER, FLAG, REPEATABLE, REFUSED, ENVIRONMENT = "parameter", "flag", "repeatable", "refused", "environment"


def _text(name: str, text: str) -> str:
    return text


def _stripped(name: str, text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class Setting:
    """
    One setting.

    @ivar option: the twistd option without C{--}; C{None} for a variable
        only the environment sets.
    @ivar env: the environment variable, if any.
    @ivar help: the C{--help} text; the environment variable and the
        default are added to it from this row.
    @ivar doc: the README's "meaning" cell (Markdown).
    @ivar kind: L{PARAMETER}, L{FLAG}, L{REPEATABLE} (an C{opt_} method
        collects each value), L{REFUSED} (defined only to refuse it) or
        L{ENVIRONMENT}.
    @ivar metavar: what the option takes, as the README shows it.
    @ivar field: the L{Config} field a plain setting fills: the option,
        else the variable, else the field's default, through C{parse}.
        Settings without one are read by C{Options} itself.
    @ivar parse: C{(name, text) -> value}, C{name} being the option or the
        variable, for the error message.
    @ivar default: the default as the README shows it, when it is not the
        L{Config} field's (or there is no field); C{None} for "none".
    @ivar env_value: the value the variable takes (C{=off}), if only one.
    @ivar env_note: how the variable's value differs from the option's.
    @ivar sources: the C{--help} bracket, where it is not "env VAR,
        default D" (the secrets' several sources).
    @ivar shown: whether C{--help} and the README list it (internal and
        refused options are not).
    """

    option: Optional[str]
    env: Optional[str]
    help: str
    doc: str
    kind: str = PARAMETER
    metavar: str = ""
    field: Optional[str] = None
    parse: Optional[Callable[[str, str], Any]] = None
    default: Optional[str] = None
    env_value: str = ""
    env_note: str = ""
    sources: Optional[str] = None
    shown: bool = True

    def shown_default(self) -> Optional[str]:
        """
        The default as the README shows it; C{None} for none.
        """
        if self.default is not None or self.field is None:
            return self.default
        value = _CONFIG_DEFAULTS[self.field]
        if value is None:
            return None
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, int):
            return str(value)
        return f"`{value}`"

    def usage(self) -> str:
        """
        The C{--help} text: the help, then where else the value comes from
        and its default.
        """
        if self.sources is not None:
            return f"{self.help} [{self.sources}]"
        parts = []
        if self.env is not None:
            note = f" ({self.env_note})" if self.env_note else ""
            parts.append(f"env {self.env}{self.env_value}{note}")
        default = self.shown_default()
        if default is not None and self.kind != FLAG:
            parts.append(f"default {default.replace('`', '')}")
        return f"{self.help} [{', '.join(parts)}]" if parts else self.help

    def markdown_row(self) -> str:
        """
        The setting's row in the README's configuration table.
        """
        if self.option is None:
            option = "(environment only)"
        else:
            option = f"`--{self.option}{' ' + self.metavar if self.metavar else ''}`"
            if self.kind == REPEATABLE:
                option += " (repeatable)"
        env = ""
        if self.env is not None:
            env = f"`{self.env}{self.env_value}`" + (f" ({self.env_note})" if self.env_note else "")
        default = self.shown_default()
        if default is None:
            default = "off" if self.kind == FLAG else "none"
        cells = [option, env, default, self.doc]
        return "|" + "|".join(_cell(cell) for cell in cells) + "|"


def _cell(text: str) -> str:
    """
    A Markdown table cell: a C{|} in it escaped, an empty one one space.
    """
    return " " + text.replace("|", _ESCAPED_PIPE) + " " if text else " "


_ESCAPED_PIPE = "\\|"


_CONFIG_DEFAULTS: dict[str, Any] = {
    field.name: field.default for field in dataclasses.fields(Config) if field.default is not dataclasses.MISSING
}

#: Every setting, in the README's order.  C{--help} shows L{MAIN_OPTIONS}
#: first, then the rest in this order.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "port",
        "PORT",
        "Listen on this Twisted endpoint (tcp:, ssl:, unix:, systemd:...); repeatable.",
        "any Twisted server endpoint: `tcp:`, `ssl:`, `unix:`, `systemd:`; a `unix:` socket is created mode `660` "
        "unless the description sets one (`unix:/run/oaiproxy/api.sock:mode=600`)",
        kind=REPEATABLE,
        metavar="ENDPOINT",
        default=f"`{DEFAULT_PORT}`",
        env_note="a port number",
    ),
    Setting(
        "upstream",
        "OPENAI_BASE_URL",
        "Upstream base URL; route paths (/chat/completions...) are appended, and /v1 first if the URL has no path.",
        "upstream base; route paths are appended (`/v1` first, for a URL without a path)",
        metavar="URL",
        default=f"`{DEFAULT_UPSTREAM}`",
    ),
    Setting(
        "routes",
        "OAIPROXY_ROUTES",
        "API routes to serve, separated by commas, or 'all': " + ", ".join(r.name for r in ROUTES) + ".",
        "API routes served, comma-separated, or `all` ([routes](#routes-and-upstreams))",
        metavar="NAMES",
        field="routes",
        parse=parse_routes,
        default=f"`{','.join(DEFAULT_ROUTES)}`",
    ),
    Setting(
        "upstream-style",
        "OAIPROXY_UPSTREAM_STYLE",
        "openai (OpenAI, vLLM, Ollama, OpenRouter, LM Studio...) or azure (Azure OpenAI: deployment paths, "
        "api-version, api-key header).",
        "how the upstream addresses routes and takes its key ([Azure](#upstream-kinds))",
        metavar="openai|azure",
        field="upstream_style",
        parse=parse_style,
    ),
    Setting(
        "azure-deployment",
        "OAIPROXY_AZURE_DEPLOYMENTS",
        "MODEL=DEPLOYMENT: the Azure deployment serving MODEL (a model not listed is its own deployment); repeatable.",
        "the Azure deployment for a model; a model not listed is its own deployment",
        kind=REPEATABLE,
        metavar="MODEL=DEPLOYMENT",
        env_note="comma-separated",
    ),
    Setting(
        "azure-api-version",
        "OAIPROXY_AZURE_API_VERSION",
        "The api-version sent to Azure OpenAI.",
        "the `api-version` sent to Azure",
        metavar="V",
        field="azure_api_version",
        parse=_stripped,
        default=f"`{DEFAULT_AZURE_API_VERSION}` (`{DEFAULT_AZURE_RESPONSES_API_VERSION}` for the Responses API)",
    ),
    Setting(
        "upstream-header",
        None,
        "NAME:VALUE: a header sent with every upstream request (e.g. OpenRouter's HTTP-Referer); repeatable.",
        "a static header for every upstream request, e.g. OpenRouter's `HTTP-Referer`; it replaces a client's "
        "header of that name. Not for secrets (the command line shows in `ps`; the key goes in `--api-key-file`). "
        "Headers the proxy or the connection owns cannot be set: `Authorization`, `api-key`, `Cookie`, `Host`, "
        "`Content-Type`, `Content-Length`, `Accept-Encoding`, `Expect`, the `X-Forwarded-*`/`Forwarded`/"
        "`X-Real-IP` family and hop-by-hop headers",
        kind=REPEATABLE,
        metavar="NAME:VALUE",
    ),
    Setting(
        "api-key-file",
        "OPENAI_API_KEY",
        "File holding the upstream API key.",
        "the upstream key: this file, else `$CREDENTIALS_DIRECTORY/openai_api_key` (systemd `LoadCredential=`), "
        "else the variable; required unless `--mock-upstream`",
        metavar="PATH",
        sources="else the systemd credential openai_api_key, else env OPENAI_API_KEY",
    ),
    Setting(
        "upstreams-file",
        "OAIPROXY_UPSTREAMS_FILE",
        "File of upstreams (TOML or JSON: names, URLs, where their keys are, weights, priorities, models) to "
        "fail over between, re-read on SIGHUP; instead of --upstream and --api-key-file.",
        "several upstreams with failover ([Several upstreams](#several-upstreams)); else "
        "`$CREDENTIALS_DIRECTORY/upstreams`; re-read on SIGHUP. Not with the single-upstream options "
        "(`--upstream`, `--api-key-file`, `--upstream-style`, `--azure-deployment`, `--upstream-header`)",
        metavar="PATH",
        sources="env OAIPROXY_UPSTREAMS_FILE, else the systemd credential upstreams",
    ),
    Setting(
        "max-attempts",
        "OAIPROXY_MAX_ATTEMPTS",
        "Upstreams one request may try, each at most once, before the client gets the last failure.",
        "upstreams one request may try, each once, within the read timeout overall",
        metavar="N",
        field="max_attempts",
        parse=parse_attempts,
    ),
    Setting(
        "first-byte-timeout",
        "OAIPROXY_FIRST_BYTE_TIMEOUT",
        "Seconds a stream's first body byte may take before the next upstream is tried (never cuts the last "
        "candidate); 0 for off.",
        "a stream's first byte deadline before the next upstream is tried; never for the last candidate; 0 = off",
        metavar="S",
        field="first_byte_timeout",
        parse=parse_interval,
        default="off",
    ),
    Setting(
        "client-keys-file",
        "OAIPROXY_CLIENT_KEYS_FILE",
        "File of clients (TOML or JSON: names, key hashes, limits, model allow-lists), re-read on SIGHUP.",
        "the clients: names, key hashes, limits, model allow-lists ([above](#clients-limits-and-safe-defaults)); "
        "else `$CREDENTIALS_DIRECTORY/client_keys`; re-read on SIGHUP",
        metavar="PATH",
        sources="env OAIPROXY_CLIENT_KEYS_FILE, else the systemd credential client_keys; keys in env "
        "OAIPROXY_CLIENT_KEYS are added",
    ),
    Setting(
        None,
        "OAIPROXY_CLIENT_KEYS",
        "",
        "plain comma-separated client keys, added to the file's; none at all = no client auth",
        kind=ENVIRONMENT,
    ),
    Setting(
        "allow-open-relay",
        None,
        "Start even when a listener is reachable from other hosts and no client keys are set "
        "(anyone who can connect spends the upstream key). Without it, that refuses to start.",
        "start even when a listener is reachable from other hosts and no client keys are set",
        kind=FLAG,
    ),
    Setting(
        "header-timeout",
        "OAIPROXY_HEADER_TIMEOUT",
        "Seconds a client has to send a request's line and headers (slow senders are cut off).",
        "time for a request's line and headers to arrive",
        metavar="S",
        field="header_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "body-timeout",
        "OAIPROXY_BODY_TIMEOUT",
        "Seconds a request body has to arrive, plus one for every 64 KiB received (slow senders get a 408).",
        "time for a request's body to arrive, plus one second per 64 KiB received "
        "([above](#clients-limits-and-safe-defaults))",
        metavar="S",
        field="body_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "max-connections-per-ip",
        "OAIPROXY_MAX_CONNECTIONS_PER_IP",
        "Connections one client address may hold before presenting a valid client key (16 times as many in all).",
        "connections one client address may hold that have not presented a valid client key; 16 times as many in all",
        metavar="N",
        field="max_connections_per_ip",
        parse=parse_byte_count,
    ),
    Setting(
        "drain-timeout",
        "OAIPROXY_DRAIN_TIMEOUT",
        "On SIGTERM, seconds in-flight requests may run on before they are cut off.",
        "on SIGTERM, how long requests in flight may run on before they are cut off",
        metavar="S",
        field="drain_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "connect-timeout",
        "OAIPROXY_CONNECT_TIMEOUT",
        "Seconds to open the upstream connection.",
        "seconds to open the upstream connection",
        metavar="S",
        field="connect_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "read-timeout",
        "OAIPROXY_READ_TIMEOUT",
        "Longest upstream silence, before the response head and between body chunks, in seconds.",
        "longest upstream silence: before the response head, and between body chunks",
        metavar="S",
        field="read_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "idle-timeout",
        "OAIPROXY_IDLE_TIMEOUT",
        "Seconds an idle client connection is kept open.",
        "seconds an idle client (keep-alive) connection stays open",
        metavar="S",
        field="idle_timeout",
        parse=parse_seconds,
    ),
    Setting(
        "max-body-bytes",
        "OAIPROXY_MAX_BODY_BYTES",
        "Largest request body accepted.",
        "request body limit (image inputs are large)",
        metavar="N",
        field="max_body_bytes",
        parse=parse_byte_count,
    ),
    Setting(
        "log-format",
        "OAIPROXY_LOG_FORMAT",
        "Logs as 'text' or 'json': one JSON object per line on standard output, the access entries and, "
        "unless twistd's --logfile or --syslog takes the rest, every other line too (needs twistd --nodaemon).",
        "logs as text lines, or one JSON object per line on standard output (needs `-n`; access entries and, "
        "without `--logfile` or `--syslog`, every other line)",
        metavar="text|json",
        field="log_format",
        parse=parse_log_format,
    ),
    Setting(
        "metrics-port",
        "OAIPROXY_METRICS_PORT",
        "Serve /metrics on this endpoint only (e.g. tcp:9108:interface=127.0.0.1), without auth; "
        "otherwise /metrics is on the API port behind a client key or the metrics key.",
        "serve `/metrics` only on this endpoint",
        metavar="ENDPOINT",
        field="metrics_port",
        parse=_text,
    ),
    Setting(
        "metrics-key-file",
        "OAIPROXY_METRICS_KEY",
        "File holding a key that may read /metrics (Authorization: Bearer).",
        "a key that may read `/metrics`: the option names a file holding it, the variable holds the key",
        metavar="PATH",
        env_note="the key itself, not a path",
    ),
    Setting(
        "admin-key-file",
        "OAIPROXY_ADMIN_KEY_FILE",
        "File holding the admin key, which reads every client's usage (GET /usage) and the dashboard.",
        "the admin key: this file, else `$CREDENTIALS_DIRECTORY/admin_key` (systemd `LoadCredential=`); "
        "none = no admin endpoints",
        metavar="PATH",
        sources="env OAIPROXY_ADMIN_KEY_FILE, else the systemd credential admin_key",
    ),
    Setting(
        "sse-keepalive",
        "OAIPROXY_SSE_KEEPALIVE",
        "Seconds of upstream silence in a stream before a ': keepalive' comment is sent; 0 for never.",
        "keepalive comment interval on silent streams; 0 = off",
        metavar="S",
        field="sse_keepalive",
        parse=parse_interval,
    ),
    Setting(
        "no-stream-usage",
        "OAIPROXY_STREAM_USAGE",
        "Do not add stream_options.include_usage to streamed requests (token counts of streams whose "
        "client did not ask for usage are then estimates).",
        "do not add `stream_options.include_usage` to streamed requests",
        kind=FLAG,
        default="on",
        env_value="=off",
    ),
    Setting(
        "workers",
        "OAIPROXY_WORKERS",
        "Worker processes serving the same listeners: a number, or auto (one per CPU).",
        "worker processes sharing the listeners ([above](#performance-and-several-cores))",
        metavar="N|auto",
        field="workers",
        parse=parse_workers,
    ),
    Setting(
        "no-malloc-tuning",
        "OAIPROXY_MALLOC_TUNING",
        "Leave glibc's allocator at its defaults, which hand each freed large block back to the kernel, "
        "instead of keeping freed blocks for the next request's bodies.",
        "leave glibc's allocator at its defaults instead of keeping freed large blocks "
        "([above](#performance-and-several-cores))",
        kind=FLAG,
        default="on",
        env_value="=off",
    ),
    # The usage ledger and prices (issue 15).
    Setting(
        "usage-db",
        "OAIPROXY_USAGE_DB",
        "The usage ledger: a SQLite file (created if missing) or a postgresql://user@host/db URL (no password "
        "in it); 'off' for none.",
        "the usage ledger ([Usage and budgets](#usage-and-budgets)): a SQLite file, or `postgresql://user@host/db` "
        "(the password in `--usage-db-password-file`); `off` for none. Default: `$STATE_DIRECTORY/usage.sqlite3` "
        "under systemd's `StateDirectory=`, `./oaiproxy-usage.sqlite3` with `--mock-upstream`, else off",
        metavar="PATH|URL",
        default="off (see meaning)",
    ),
    Setting(
        "usage-db-password-file",
        None,
        "File holding the PostgreSQL ledger's password.",
        "the PostgreSQL ledger's password: this file, else `$CREDENTIALS_DIRECTORY/usage_db_password`; never in "
        "the URL",
        metavar="PATH",
        sources="else the systemd credential usage_db_password",
    ),
    Setting(
        "prices-file",
        "OAIPROXY_PRICES_FILE",
        "File of model prices (TOML or JSON: USD per million input, cached input and output tokens), re-read on "
        "SIGHUP; models not in it have cost unknown.",
        "USD per million tokens by model ([prices](#usage-and-budgets)); re-read on SIGHUP; a model not in it "
        "has cost unknown",
        metavar="PATH",
    ),
    Setting(
        "shared-state",
        "OAIPROXY_SHARED_STATE",
        "Share client limits with the other processes of the group (--workers, other hosts) through this Redis: "
        "redis://HOST:PORT/DB, or rediss:// for TLS; no password in it. Checked at startup.",
        "share client limits through this Redis: `redis://host:port/db`, `rediss://` for TLS (a user name may go "
        "in it, a password may not) ([Several processes and hosts](#several-processes-and-hosts)); checked at "
        "startup, which fails naming why",
        metavar="URL",
        field="shared_state",
        parse=parse_shared_state,
    ),
    Setting(
        "shared-state-password-file",
        "OAIPROXY_SHARED_STATE_PASSWORD_FILE",
        "File holding the shared state's Redis password (never on the command line).",
        "the Redis password: this file, else `$CREDENTIALS_DIRECTORY/shared_state_password` (systemd "
        "`LoadCredential=`); none = a Redis without `requirepass`",
        metavar="PATH",
        sources="env OAIPROXY_SHARED_STATE_PASSWORD_FILE, else the systemd credential shared_state_password",
    ),
    Setting(
        "shared-state-ca-file",
        "OAIPROXY_SHARED_STATE_CA_FILE",
        "PEM file of the CA that signed the rediss:// server's certificate (else the system's roots).",
        "the CA (PEM) a `rediss://` server's certificate is verified against; else the system's roots",
        metavar="PATH",
        field="shared_state_ca_file",
        parse=_text,
    ),
    Setting(
        "shared-state-prefix",
        "OAIPROXY_SHARED_STATE_PREFIX",
        "Prefix of every key the proxy writes, so several groups can share one Redis.",
        "prefix of every key written, so several groups can share one Redis",
        metavar="TEXT",
        field="shared_state_prefix",
        parse=_text,
    ),
    Setting(
        "shared-state-instances",
        "OAIPROXY_SHARED_STATE_INSTANCES",
        "Processes expected to share the limits: while Redis is unreachable each enforces 1/N of every limit.",
        "processes sharing the limits (all hosts' workers): while Redis is unreachable each enforces 1/N of every "
        "limit",
        metavar="N",
        field="shared_state_instances",
        parse=parse_instances,
        default="the `--workers` count",
    ),
    Setting(
        "shared-state-deadline",
        "OAIPROXY_SHARED_STATE_DEADLINE",
        "Milliseconds a call to Redis may take before the proxy decides that call locally (Redis is marked "
        "down only after max(1 s, 10 x this) without any reply, or a lost connection).",
        "milliseconds a Redis call may take before the proxy decides that call locally; Redis is marked down only "
        "after max(1 s, 10 × this) without any reply, or on a lost connection",
        metavar="MS",
        field="shared_state_deadline_ms",
        parse=parse_milliseconds,
    ),
    Setting(
        "shared-state-lease",
        "OAIPROXY_SHARED_STATE_LEASE",
        "Seconds a concurrency slot is held in Redis without renewal: how long the slots of a process that "
        "died stay taken.",
        "seconds a concurrency slot lives without renewal (renewed every third): how long a dead process's slots "
        "stay taken",
        metavar="S",
        field="shared_state_lease",
        parse=parse_seconds,
    ),
    Setting(
        "mock-upstream",
        None,
        "Forward to a built-in mock of the OpenAI API (deterministic answers, streaming too) instead of a real "
        "upstream; no key needed.",
        "forward to a built-in fake API (deterministic answers, streaming too) instead of a real upstream",
        kind=FLAG,
    ),
    # Internal: set by the supervisor for its workers.
    Setting(
        "worker-share",
        "OAIPROXY_WORKER_SHARE",
        "(internal, set by the supervisor) the number of workers the client limits are split among.",
        "",
        field="worker_share",
        parse=parse_workers,
        shown=False,
    ),
    Setting(
        "worker-listener",
        None,
        "(internal, set by the supervisor) an inherited listening socket, FD:FAMILY.",
        "",
        kind=REPEATABLE,
        shown=False,
    ),
    Setting(
        "worker-metrics-listener",
        None,
        "(internal, set by the supervisor) the inherited --metrics-port socket, FD:FAMILY.",
        "",
        shown=False,
    ),
    # Defined only to refuse them: getopt's prefix matching would otherwise
    # take "--api-key sk-..." for --api-key-file and echo the key as a path.
    Setting(
        "api-key",
        None,
        "Refused: a key on the command line is visible to every user in ps. Use --api-key-file or OPENAI_API_KEY.",
        "",
        kind=REFUSED,
        shown=False,
    ),
    Setting(
        "shared-state-password",
        None,
        "Refused: a password on the command line is visible to every user in ps. Use "
        "--shared-state-password-file or the systemd credential shared_state_password.",
        "",
        kind=REFUSED,
        shown=False,
    ),
    Setting(
        "client-keys",
        None,
        "Refused: keys on the command line are visible to every user in ps. Use --client-keys-file or "
        "OAIPROXY_CLIENT_KEYS.",
        "",
        kind=REFUSED,
        shown=False,
    ),
)

#: Shown first in C{--help}, in this order: what a new user needs.
MAIN_OPTIONS: tuple[str, ...] = (
    "port",
    "upstream",
    "api-key-file",
    "client-keys-file",
    "mock-upstream",
    "routes",
    "upstream-style",
    "workers",
    "log-format",
    "allow-open-relay",
)

_BY_OPTION = {setting.option: setting for setting in SETTINGS if setting.option is not None}


def by_option(option: str) -> Setting:
    """
    The setting of C{--option}.
    """
    return _BY_OPTION[option]


def markdown_table() -> str:
    """
    The README's configuration table, generated from L{SETTINGS}.
    """
    rows = [setting.markdown_row() for setting in SETTINGS if setting.shown]
    return "\n".join(["| option | environment | default | meaning |", "|---|---|---|---|", *rows]) + "\n"


if __name__ == "__main__":
    # python -m oaiproxy.daemon.settings: the README's table, regenerated.
    print(markdown_table(), end="")
