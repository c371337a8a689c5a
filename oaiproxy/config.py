# -*- test-case-name: tests.test_config -*-
"""
The proxy's configuration: one frozen value built once at startup, and the
pure parsers that turn command-line and environment strings into it.

Secrets are wrapped in L{Secret}, whose C{repr} and C{str} never show the
value, so a config object can be logged, printed in a traceback or put in
an assertion message without leaking the upstream key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "Secret",
    "DEFAULT_PORT",
    "DEFAULT_UPSTREAM",
    "CREDENTIAL_NAME",
    "parse_seconds",
    "parse_byte_count",
    "parse_interval",
    "parse_log_format",
    "parse_instances",
    "parse_milliseconds",
    "parse_shared_state",
    "load_shared_state_password",
    "load_admin_key",
    "SHARED_STATE_CREDENTIAL",
    "parse_workers",
    "parse_upstream",
    "parse_style",
    "parse_deployment",
    "parse_deployments",
    "api_base",
    "port_from_env",
    "client_keys_from_env",
    "load_api_key",
    "CLIENT_KEYS_CREDENTIAL",
    "is_private_address",
    "unix_listener",
    "UNIX_MODE",
    "config_file_path",
    "read_config_file",
    "read_document",
]

DEFAULT_PORT = "tcp:8080:interface=127.0.0.1"
DEFAULT_UPSTREAM = "https://api.openai.com/v1"
#: The name of the systemd credential (C{LoadCredential=openai_api_key:...})
#: looked up under C{$CREDENTIALS_DIRECTORY}.
CREDENTIAL_NAME = "openai_api_key"
#: The systemd credential holding client keys, one per line.
CLIENT_KEYS_CREDENTIAL = "client_keys"


class ConfigError(Exception):
    """
    A configuration value is missing or malformed.  The message is one line
    meant for an operator and never contains a secret.
    """


class Secret:
    """
    A credential that refuses to be displayed.

    The value is available only through L{reveal}, which makes every place
    that handles the raw key easy to find.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Config:
    """
    Everything the running proxy needs, validated.

    @ivar ports: server endpoint descriptions to listen on.
    @ivar upstream: the upstream base URL, without a trailing slash.
    @ivar api_key: the upstream key, or C{None} only with C{mock_upstream}.
    @ivar clients: the clients allowed in (an L{oaiproxy.access.clients.ClientRegistry});
        empty means no client auth.
    @ivar api_key_file: where the key was read from (C{--api-key-file}),
        kept so a reload reads the same place again.
    @ivar client_keys_file: likewise for C{--client-keys-file}.
    """

    ports: tuple[str, ...]
    upstream: str
    api_key: Optional[Secret]
    clients: Any = None
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    max_body_bytes: int = 64 * 1024 * 1024
    idle_timeout: float = 75.0
    drain_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections_per_ip: int = 256
    allow_open_relay: bool = False
    log_format: str = "text"
    metrics_port: Optional[str] = None
    metrics_key: Optional[Secret] = None
    #: The admin key (C{--admin-key-file}, the credential C{admin_key}).
    admin_key: Optional[Secret] = None
    sse_keepalive: float = 15.0
    stream_usage: bool = True
    upstream_headers: tuple[tuple[bytes, bytes], ...] = ()
    routes: frozenset[str] = frozenset({"chat/completions", "models"})
    upstream_style: str = "openai"
    azure_api_version: Optional[str] = None
    azure_deployments: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    #: Keep freed large blocks for reuse (L{oaiproxy.daemon.allocator}).
    malloc_tuning: bool = True
    worker_listeners: tuple[str, ...] = ()
    #: A worker's inherited C{--metrics-port} socket (C{fd:family}).
    worker_metrics_listener: Optional[str] = None
    worker_share: int = 1
    mock_upstream: bool = False
    api_key_file: Optional[str] = None
    client_keys_file: Optional[str] = None
    #: The upstreams file's entries (L{oaiproxy.upstream.pool.Upstream}s),
    #: or C{None}: the single-upstream options make a pool of one.
    upstreams: Any = None
    upstreams_file: Optional[str] = None
    max_attempts: int = 3
    first_byte_timeout: Optional[float] = None
    #: C{--shared-state}: the Redis URL (no password in it), or C{None}.
    shared_state: Optional[str] = None
    #: Its password (a file or the systemd credential; handed to workers).
    shared_state_password: Optional[Secret] = None
    shared_state_ca_file: Optional[str] = None
    shared_state_prefix: str = "oaiproxy:"
    #: The processes expected to share the limits; C{None}: the workers.
    shared_state_instances: Optional[int] = None
    shared_state_deadline_ms: float = 50.0
    shared_state_lease: float = 30.0
    #: The usage ledger (oaiproxy.ledger): a SQLite path or a postgresql://
    #: URL, or C{None} for off; the PostgreSQL password; the prices (an
    #: L{oaiproxy.ledger.prices.PriceBook}, or C{None} without a file).
    usage_db: Optional[str] = None
    usage_db_password: Optional[Secret] = None
    prices: Any = None


def parse_seconds(name: str, text: str) -> float:
    """
    Parse a positive, finite number of seconds.

    @param name: the option's name, for the error message.
    """
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {text!r}") from None
    if not (0 < value < float("inf")):
        raise ConfigError(f"{name} must be a positive number of seconds, not {text!r}")
    return value


def parse_interval(name: str, text: str) -> float:
    """
    Parse a number of seconds that may be 0 (meaning "off").
    """
    if text.strip() in ("0", "0.0"):
        return 0.0
    return parse_seconds(name, text)


def parse_workers(name: str, text: str) -> int:
    """
    A number of worker processes, or C{auto} for one per CPU.
    """
    if text == "auto":
        return os.cpu_count() or 1
    return _count(name, text, 256, "a number of processes or auto")


def parse_attempts(name: str, text: str) -> int:
    """
    How many upstreams one request may try (C{--max-attempts}).
    """
    return _count(name, text, 16, "a whole number of attempts")


def _count(name: str, text: str, most: int, what: str) -> int:
    """
    A whole number from 1 to C{most}; C{what} says what the option takes.
    """
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, not {text!r}") from None
    if not 1 <= value <= most:
        raise ConfigError(f"{name} must be between 1 and {most}, not {text!r}")
    return value


def parse_instances(name: str, text: str) -> int:
    """
    How many processes share the limits (C{--shared-state-instances}).
    """
    return _count(name, text, 4096, "a whole number of processes")


def parse_milliseconds(name: str, text: str) -> float:
    """
    A positive number of milliseconds, at most a minute.
    """
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of milliseconds, not {text!r}") from None
    if not (0 < value <= 60000):
        raise ConfigError(f"{name} must be a positive number of milliseconds (at most 60000), not {text!r}")
    return value


def parse_shared_state(name: str, text: str) -> str:
    """
    Check a C{--shared-state} URL: C{redis://host[:port][/db]} or
    C{rediss://} (TLS), optionally with an ACL user name.  A password in
    it is refused, like a key on the command line: it would show in C{ps}
    and in the unit file; it goes in C{--shared-state-password-file}.
    """
    shown = _redact_url(text)
    try:
        parts = urlsplit(text.strip())
        _ = parts.port  # raises ValueError for a port that is not a number
        path = parts.path.strip("/")
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {shown!r}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{name} must be a redis:// or rediss:// URL with a host, not {shown!r}")
    if parts.password is not None:
        raise ConfigError(
            f"{name} must not carry a password (it would show in ps and in logs): "
            "put it in --shared-state-password-file or the systemd credential shared_state_password"
        )
    if path and not path.isdigit():
        raise ConfigError(f"{name}'s database must be a number (redis://host:port/0), not {shown!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or fragment: {shown!r}")
    return text.strip()


def parse_log_format(name: str, text: str) -> str:
    if text not in ("text", "json"):
        raise ConfigError(f"{name} must be text or json, not {text!r}")
    return text


def parse_switch(name: str, text: str) -> bool:
    """
    A variable that turns a default on or off: C{on} or C{off} (any case),
    nothing else, so that a C{0} or a typo is not taken silently for on.
    """
    value = text.strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(f"{name} must be on or off, not {text!r}")
    return value == "on"


def parse_byte_count(name: str, text: str) -> int:
    """
    Parse a positive whole number of bytes.
    """
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of bytes, not {text!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number of bytes, not {text!r}")
    return value


def parse_upstream(text: str) -> str:
    """
    Check an upstream base URL and normalise it (no trailing slash).

    Only C{http} and C{https} with a host are accepted; credentials, a query
    or a fragment in the URL are refused, because they would be silently
    dropped or, worse, logged.
    """
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"--upstream is not a valid URL: {_redact_url(text)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--upstream must be an http:// or https:// URL with a host, not {_redact_url(text)!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--upstream must not carry credentials; the key goes in --api-key-file or OPENAI_API_KEY")
    if parts.query or parts.fragment:
        raise ConfigError(f"--upstream must not have a query or fragment: {_redact_url(text)!r}")
    return text.rstrip("/")


def parse_style(name: str, text: str) -> str:
    """
    Check an upstream style: C{openai} (OpenAI and every server that copies
    its API) or C{azure}.
    """
    if text not in ("openai", "azure"):
        raise ConfigError(f"{name} must be 'openai' or 'azure', not {text!r}")
    return text


def parse_deployment(name: str, text: str) -> tuple[str, str]:
    """
    Parse C{MODEL=DEPLOYMENT} (as C{--azure-deployment} takes it).
    """
    model, sep, deployment = text.partition("=")
    if not sep or not model.strip() or not deployment.strip():
        raise ConfigError(f"{name} must be MODEL=DEPLOYMENT, not {text!r}")
    return model.strip(), deployment.strip()


def parse_deployments(name: str, text: str) -> tuple[tuple[str, str], ...]:
    """
    Parse C{MODEL=DEPLOYMENT} pairs separated by commas (the environment's
    form of C{--azure-deployment}).
    """
    return tuple(parse_deployment(name, part) for part in text.split(",") if part.strip())


def api_base(url: str, style: str) -> str:
    """
    The base URL requests are addressed from.  An OpenAI-style URL with no
    path (C{http://localhost:11434}, as Ollama's and vLLM's own docs show
    the host) gets C{/v1}, where every OpenAI-compatible server serves the
    API; a URL with a path (C{https://openrouter.ai/api/v1}) is used as
    given.  Azure's base is the resource host: its paths start C{/openai}.
    """
    if style == "openai" and not urlsplit(url).path.strip("/"):
        return url.rstrip("/") + "/v1"
    return url


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,15}$")


def _redact_url(text: str) -> str:
    """
    A URL as an error message may show it: the scheme, host, port and path,
    with any userinfo (a password), query or fragment (a key, for some
    gateways) replaced by C{<redacted>}.  Built by hand, because the URL
    being reported may be one that C{urlsplit} cannot read.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.match(scheme):
        # Not even a scheme: perhaps a key given in the wrong place.
        return "<not a URL; not shown>"
    ends = [at for at in (rest.find("/"), rest.find("?"), rest.find("#")) if at >= 0]
    end = min(ends) if ends else len(rest)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        # A password may itself contain "@": keep only what follows the last.
        authority = "<redacted>@" + authority.rsplit("@", 1)[1]
    host, colon, port = authority.rpartition(":")
    if colon and not authority.endswith("]") and not port.isdigit():
        # "host:secret", a password whose user was left out.
        authority = f"{host}:<redacted>"
    cut = [at for at in (tail.find("?"), tail.find("#")) if at >= 0]
    path = tail[: min(cut)] if cut else tail
    shown = f"{scheme}://{authority}{path}"
    if "?" in tail:
        shown += "?<redacted>"
    elif "#" in tail:
        shown += "#<redacted>"
    return shown


def port_from_env(environ: Mapping[str, str]) -> Optional[str]:
    """
    The endpoint for the C{PORT} environment variable (a bare port number,
    as platforms such as Heroku set it), kept on loopback like the default.
    """
    text = environ.get("PORT")
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not (0 <= int(text) <= 65535):
        raise ConfigError(f"PORT must be a port number, not {text!r}")
    return f"tcp:{int(text)}:interface=127.0.0.1"


def client_keys_from_env(environ: Mapping[str, str]) -> tuple[Secret, ...]:
    """
    The client keys from C{OAIPROXY_CLIENT_KEYS} (comma-separated).

    Client keys are read from the environment only, never from the command
    line, where any user of the host could read them in C{ps}.
    """
    text = environ.get("OAIPROXY_CLIENT_KEYS", "")
    keys = [k.strip() for k in text.split(",")]
    return tuple(Secret(k.encode("utf-8")) for k in keys if k)


def load_api_key(key_file: Optional[str], environ: Mapping[str, str]) -> Secret:
    """
    Find the upstream key, in order: C{--api-key-file}, the systemd
    credential C{$CREDENTIALS_DIRECTORY/openai_api_key}, C{OPENAI_API_KEY}.

    @raise ConfigError: when none is set, or a named file is unreadable or
        empty.  The message names the file, never its content.
    """
    if key_file:
        return _read_key_file(key_file)
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = os.path.join(credentials, CREDENTIAL_NAME)
        if os.path.exists(path):
            return _read_key_file(path)
    value = environ.get("OPENAI_API_KEY", "").strip()
    if value:
        return Secret(value.encode("utf-8"))
    raise ConfigError(
        "no upstream API key: set OPENAI_API_KEY, pass --api-key-file PATH, "
        f"provide the systemd credential {CREDENTIAL_NAME}, or use "
        "--mock-upstream to try the proxy without one"
    )


def _read_key_file(path: str, what: str = "API key file") -> Secret:
    if not os.path.exists(path):
        # Not echoed: a value that names no file may be a key passed by
        # mistake, and this message goes to the journal.
        raise ConfigError(f"the {what} given does not exist (the value is not shown in case it is a key)")
    try:
        with open(path, "rb") as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from None
    if not value:
        raise ConfigError(f"the {what} {path} is empty")
    if b"\n" in value or b" " in value:
        raise ConfigError(f"the {what} {path} must hold the key alone on one line")
    return Secret(value)


#: The systemd credential holding the admin key.
ADMIN_KEY_CREDENTIAL = "admin_key"

#: The shortest admin key accepted: it opens every client's usage, so it
#: must not be guessable (L{ADMIN_KEY_RECIPE} makes 58 characters).
ADMIN_KEY_MIN_LENGTH = 24

#: A command that makes a good admin key, for messages and the README.
ADMIN_KEY_RECIPE = "python -c 'import secrets; print(\"oaiproxy-admin-\" + secrets.token_urlsafe(32))'"


def load_admin_key(key_file: Optional[str], environ: Mapping[str, str]) -> Optional[Secret]:
    """
    The admin key (it reads every client's usage and the dashboard's data):
    C{--admin-key-file} (or C{OAIPROXY_ADMIN_KEY_FILE}, a path), else the
    systemd credential C{$CREDENTIALS_DIRECTORY/admin_key}; C{None} when
    none is set, which leaves the admin endpoints closed.  Never the
    command line, never a variable's value: both are visible to other
    local users.

    @raise ConfigError: for an unreadable, empty or short key file.
    """
    path = config_file_path(key_file, "OAIPROXY_ADMIN_KEY_FILE", ADMIN_KEY_CREDENTIAL, environ)
    if path is None:
        return None
    key = _read_key_file(path, "admin key file")
    if len(key.reveal()) < ADMIN_KEY_MIN_LENGTH:
        raise ConfigError(
            f"the admin key in {path} is shorter than {ADMIN_KEY_MIN_LENGTH} characters: "
            f"make one with {ADMIN_KEY_RECIPE}"
        )
    return key


#: The systemd credential holding the shared state's (Redis) password.
SHARED_STATE_CREDENTIAL = "shared_state_password"


def load_shared_state_password(password_file: Optional[str], environ: Mapping[str, str]) -> Optional[Secret]:
    """
    The shared state's password: C{--shared-state-password-file} (or its
    variable, a path), else the systemd credential
    C{$CREDENTIALS_DIRECTORY/shared_state_password}; C{None} for a Redis
    without one.  Never the command line, never a variable's value.
    """
    path = config_file_path(password_file, "OAIPROXY_SHARED_STATE_PASSWORD_FILE", SHARED_STATE_CREDENTIAL, environ)
    if path is None:
        return None
    return _read_key_file(path, "shared state password file")


def config_file_path(given: Optional[str], variable: str, credential: str, environ: Mapping[str, str]) -> Optional[str]:
    """
    Where a configuration file is: the option's value C{given}, else the
    environment C{variable}, else the systemd credential C{credential}
    under C{$CREDENTIALS_DIRECTORY} when it exists; C{None} for none.
    """
    path = given or environ.get(variable)
    if path:
        return path
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    candidate = os.path.join(credentials, credential) if credentials else None
    if candidate is not None and os.path.exists(candidate):
        return candidate
    return None


def read_config_file(path: str, what: str) -> bytes:
    """
    The bytes of a configuration file (C{what}: C{"client keys file"}...).

    @raise ConfigError: for a file that does not exist (without echoing
        the value, which may be a key given by mistake: the message goes
        to the journal) or cannot be read.
    """
    if not os.path.exists(path):
        raise ConfigError(f"the {what} given does not exist (the value is not shown in case it is a key)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def read_document(data: bytes, path: str, sections: str) -> dict[str, Any]:
    """
    A configuration file's content as a table: JSON if the name ends in
    C{.json} or its first non-blank character is C{{}}, else TOML.

    @param sections: the sections it should hold, in words, for the error
        (C{"[defaults] and [[clients]]"}).
    @raise ConfigError: naming the file, for a document that is neither, or
        is not a table.
    """
    text = data.decode("utf-8", "replace")
    try:
        if path.endswith(".json") or text.lstrip().startswith("{"):
            document = json.loads(text)
        else:
            document = tomllib.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path} is neither valid TOML nor JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a table with {sections}")
    return document


def is_private_address(address: IAddress) -> bool:
    """
    Whether a listening address is reachable only from this host: a loopback
    IP, or a UNIX socket (guarded by file permissions; see
    L{unix_listener}).

    An IPv4-mapped IPv6 address (C{::ffff:127.0.0.1}) is what its IPv4
    address is: a socket bound there accepts only IPv4 connections to that
    address.
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = address.host.split("%", 1)[0]
        try:
            ip: Any = ipaddress.ip_address(host)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            ip = mapped
        return bool(ip.is_loopback)
    return False


#: The mode of a C{unix:} listener's socket file when the description does
#: not set one: the owner and its group may connect (a reverse proxy in the
#: group), others not.  Twisted's own default, 666, lets every local user in.
UNIX_MODE = "660"


def unix_listener(description: str) -> str:
    """
    An endpoint description with the proxy's default socket mode
    (L{UNIX_MODE}) added to a C{unix:} listener that sets none, positionally
    (C{unix:PATH:MODE}) or as C{mode=}; any other description unchanged.

    The description is split the way Twisted's endpoint parser splits it:
    on C{:} not escaped by a backslash, a parameter's name ending at its
    first unescaped C{=}.
    """
    positional, named = _endpoint_parameters(description)
    if not positional or positional[0] != "unix":
        return description
    if "mode" in named or len(positional) - 1 + ("address" in named) >= 2:
        return description
    return f"{description}:mode={UNIX_MODE}"


def _endpoint_parameters(description: str) -> tuple[list[str], set[str]]:
    positional: list[str] = []
    named: set[str] = set()
    current, key, escaped = "", None, False
    for char in description + ":":
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == "=" and key is None:
            key, current = current, ""
        elif char == ":":
            if key is None:
                positional.append(current)
            else:
                named.add(key)
            current, key = "", None
        else:
            current += char
    return positional, named
