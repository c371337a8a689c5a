# -*- test-case-name: tests.test_clients -*-
"""
Who may use the proxy: client keys, their names, limits and models.

Clients are described in a keys file that holds, for each client, a name
and the SHA-256 hash of its key, never the key itself: a leaked or
backed-up keys file leaks no key.  Keys are looked up by hash, so checking
one costs a hash and a dictionary lookup whatever the number of clients,
and the final comparison is constant-time.  Logs and metrics only ever see
the client's name.

The file is TOML (or JSON, if its name ends in C{.json} or its first
non-blank character is C{{}})::

    [defaults]                   # for every client, unless it says otherwise
    requests_per_minute = 600
    tokens_per_minute = 400000
    concurrent_requests = 16
    default_max_tokens = 4096    # output reserved when a request sets no max

    [[clients]]
    name = "alice"
    key_sha256 = "5e884898..."   # from: python -m oaiproxy keygen --name alice
    tokens_per_minute = 100000
    models = ["gpt-4o-mini"]     # optional allow-list
    project = "proj_..."         # optional: the OpenAI-Project sent for it
    tokens_per_day = 2000000     # budgets: tokens_per_day, tokens_per_month,
    usd_per_month = 50.0         # usd_per_day, usd_per_month (per client or
    budget_timezone = "Europe/Paris"  # in [defaults]); periods in this zone

C{OpenAI-Organization} and C{OpenAI-Project} pick what the shared upstream
key acts for, so a client's own are dropped unless its entry (or
C{[defaults]}) sets C{pass_openai_headers = true}; C{organization} and
C{project} set fixed values instead.

Keys in C{OAIPROXY_CLIENT_KEYS} (plain, comma-separated) still work for
simple setups; they are named C{env-1}, C{env-2}... and get the defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import zoneinfo
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Mapping, Optional, Sequence

from oaiproxy.config import (
    CLIENT_KEYS_CREDENTIAL,
    ConfigError,
    Secret,
    client_keys_from_env,
    config_file_path,
    read_config_file,
    read_document,
)

__all__ = [
    "Limits",
    "Budgets",
    "Client",
    "ClientRegistry",
    "hash_key",
    "parse_clients",
    "load_clients",
    "mint_key",
    "file_entry",
    "KEY_PREFIX",
    "Credentials",
]

#: Minted keys start with this, which also tells them apart from OpenAI's.
KEY_PREFIX = "oaiproxy-"

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "default_max_tokens")
#: What a client's entry (or the defaults) says about C{OpenAI-Organization}
#: and C{OpenAI-Project}; see L{Client}.
_HEADER_FIELDS = ("organization", "project", "pass_openai_headers")
#: A client's spending caps over calendar periods; see L{Budgets}.
_BUDGET_FIELDS = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month", "budget_timezone")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Limits:
    """
    A client's limits; C{None} means unlimited.

    @ivar default_max_tokens: the output reserved for a request that sets
        neither C{max_tokens} nor C{max_completion_tokens}.
    """

    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    concurrent_requests: Optional[int] = None
    default_max_tokens: int = 4096

    def split(self, parts: int) -> "Limits":
        """
        One of C{parts} equal shares of these limits, for a worker among
        C{parts}: rounded down, so the group never exceeds a limit, but at
        least 1, so a limit below C{parts} can be exceeded (by at most
        C{parts - 1}); keep limits above the number of workers.
        """
        if parts <= 1:
            return self

        def share(value: Optional[int]) -> Optional[int]:
            return None if value is None else max(1, value // parts)

        return Limits(
            share(self.requests_per_minute),
            share(self.tokens_per_minute),
            share(self.concurrent_requests),
            self.default_max_tokens,
        )

    @cached_property
    def any(self) -> bool:
        """
        Whether any limit is set; worked out once per entry (every request
        asks, twice).
        """
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.concurrent_requests))


@dataclass(frozen=True)
class Budgets:
    """
    A client's budgets over calendar days and months; C{None} means no
    budget.  Unlike L{Limits}, budgets are not split between workers: they
    are totals the whole deployment enforces.

    @ivar budget_timezone: the IANA zone whose midnights and 1sts end the
        periods (UTC unless the file says otherwise).
    """

    tokens_per_day: Optional[int] = None
    tokens_per_month: Optional[int] = None
    usd_per_day: Optional[float] = None
    usd_per_month: Optional[float] = None
    budget_timezone: str = "UTC"

    @cached_property
    def any(self) -> bool:
        """
        Whether any budget is set; worked out once per entry (every request
        asks).
        """
        return any(
            v is not None for v in (self.tokens_per_day, self.tokens_per_month, self.usd_per_day, self.usd_per_month)
        )

    @property
    def in_usd(self) -> bool:
        """
        Whether a dollar budget is set: the client may then use only
        priced models, or its spend could not be known.
        """
        return self.usd_per_day is not None or self.usd_per_month is not None

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.budget_timezone)


@dataclass(frozen=True)
class Client:
    """
    One client.  Its repr shows the name only.
    """

    name: str
    key_sha256: bytes = field(repr=False)
    limits: Limits = Limits()
    models: Optional[frozenset[str]] = None
    #: Fixed C{OpenAI-Organization} / C{OpenAI-Project} values sent
    #: upstream for this client, replacing its own.
    organization: Optional[str] = None
    project: Optional[str] = None
    #: Whether the client's own C{OpenAI-Organization} / C{OpenAI-Project}
    #: go upstream (where no fixed value is set); by default they are
    #: dropped, since they pick what the shared key acts for.
    pass_openai_headers: bool = False
    budgets: Budgets = Budgets()

    def allows(self, model: Optional[str]) -> bool:
        """
        Whether the client may use C{model}.  A client with an allow-list
        must name its model: where a route lets upstream pick a default,
        that default is not on anyone's list.
        """
        return self.models is None or (model is not None and model in self.models)


class ClientRegistry:
    """
    The clients, indexed by the hash of their key.
    """

    def __init__(self, clients: Sequence[Client] = ()) -> None:
        self._by_hash = {client.key_sha256: client for client in clients}
        self.names = tuple(client.name for client in clients)

    def __len__(self) -> int:
        return len(self._by_hash)

    def __iter__(self) -> Iterator[Client]:
        return iter(self._by_hash.values())

    def __repr__(self) -> str:
        return f"ClientRegistry({list(self.names)!r})"

    def identify(self, key: bytes) -> Optional[Client]:
        """
        The client whose key this is, or C{None}.
        """
        digest = hashlib.sha256(key).digest()
        client = self._by_hash.get(digest)
        if client is not None and hmac.compare_digest(client.key_sha256, digest):
            return client
        return None


def hash_key(key: str) -> str:
    """
    The hex SHA-256 of a key, as the keys file stores it.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def mint_key() -> str:
    """
    A new client key: 256 random bits, URL-safe.
    """
    return KEY_PREFIX + secrets.token_urlsafe(32)


def file_entry(name: str, key: str, models: Sequence[str] = ()) -> str:
    """
    The keys-file entry for a client: its name and the hash of its key.
    """
    lines = ["[[clients]]", f"name = {_toml_string(name)}", f'key_sha256 = "{hash_key(key)}"']
    if models:
        lines.append(f"models = [{', '.join(_toml_string(m) for m in models)}]")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # A TOML basic string: JSON's quoting, but without JSON's surrogate-pair
    # escapes for characters beyond the BMP, which TOML does not allow.
    return json.dumps(text, ensure_ascii=False)


def _limits(table: Mapping[str, Any], where: str, base: Limits) -> Limits:
    values: dict[str, Any] = {}
    for name in _LIMIT_FIELDS:
        if name in table:
            value = table[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}: {name} must be a positive whole number")
            values[name] = value
    return Limits(**{**base.__dict__, **values})


def _budgets(table: Mapping[str, Any], where: str, base: Budgets) -> Budgets:
    """
    The budgets of an entry, over those of C{base} (the defaults).
    """
    values: dict[str, Any] = {}
    for name in ("tokens_per_day", "tokens_per_month"):
        if name in table:
            value = table[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}: {name} must be a positive whole number of tokens")
            values[name] = value
    for name in ("usd_per_day", "usd_per_month"):
        if name in table:
            value = table[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"{where}: {name} must be a positive number of US dollars")
            values[name] = float(value)
    if "budget_timezone" in table:
        value = table["budget_timezone"]
        try:
            if not isinstance(value, str) or not value:
                raise ValueError(value)
            zoneinfo.ZoneInfo(value)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise ConfigError(
                f"{where}: budget_timezone must be an IANA time zone name such as UTC or Europe/Paris"
            ) from None
        values["budget_timezone"] = value
    return Budgets(**{**base.__dict__, **values})


def _header_settings(table: Mapping[str, Any], where: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """
    The C{organization}, C{project} and C{pass_openai_headers} of an entry,
    over those of C{base} (the defaults).
    """
    values = dict(base)
    for name in ("organization", "project"):
        if name in table:
            value = table[name]
            if (
                not isinstance(value, str)
                or not value.strip()
                or not value.isascii()
                or not all(" " <= c < "\x7f" for c in value)
            ):
                raise ConfigError(f"{where}: {name} must be a non-empty string of printable ASCII")
            values[name] = value.strip()
    if "pass_openai_headers" in table:
        value = table["pass_openai_headers"]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: pass_openai_headers must be true or false")
        values["pass_openai_headers"] = value
    return values


def parse_clients(data: bytes, path: str) -> tuple[Limits, list[Client]]:
    """
    Read a keys file's content.

    @raise ConfigError: naming the file, the client and the field that is
        wrong.  A hash is never quoted.
    """
    defaults, _, clients = _parse_clients(data, path)
    return defaults, clients


def _parse_clients(data: bytes, path: str) -> tuple[Limits, dict[str, Any], list[Client]]:
    """
    L{parse_clients}, with the defaults' header settings too (for the keys
    of C{OAIPROXY_CLIENT_KEYS}, which get every default).
    """
    document = read_document(data, path, "[defaults] and [[clients]]")
    unknown = set(document) - {"defaults", "clients"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected defaults and clients")
    defaults_table = document.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    unknown = set(defaults_table) - set(_LIMIT_FIELDS) - set(_HEADER_FIELDS) - set(_BUDGET_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) in [defaults]: {sorted(unknown)}")
    defaults = _limits(defaults_table, f"{path} [defaults]", Limits())
    header_defaults = _header_settings(defaults_table, f"{path} [defaults]", {})
    # The budgets ride with the header settings: both are what the keys of
    # OAIPROXY_CLIENT_KEYS take from [defaults] besides the limits.
    header_defaults["budgets"] = _budgets(defaults_table, f"{path} [defaults]", Budgets())
    entries = document.get("clients", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: clients must be a list of [[clients]] tables")
    clients: list[Client] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path} client #{index + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: name must be a non-empty string")
        where = f"{path} client {name!r}"
        unknown = set(entry) - {"name", "key_sha256", "models", *_LIMIT_FIELDS, *_HEADER_FIELDS, *_BUDGET_FIELDS}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        digest = entry.get("key_sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise ConfigError(
                f"{where}: key_sha256 must be the 64-hex-digit SHA-256 of the key (python -m oaiproxy keygen prints it)"
            )
        models = entry.get("models")
        if models is not None and (
            not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models)
        ):
            raise ConfigError(f"{where}: models must be a non-empty list of model names (leave it out to allow any)")
        if name in seen_names:
            raise ConfigError(f"{where}: the name is used twice")
        if digest.lower() in seen_hashes:
            raise ConfigError(f"{where}: the same key is listed twice")
        seen_names.add(name)
        seen_hashes.add(digest.lower())
        clients.append(
            Client(
                name=name,
                key_sha256=bytes.fromhex(digest),
                limits=_limits(entry, where, defaults),
                models=frozenset(models) if models is not None else None,
                **{
                    **_header_settings(entry, where, header_defaults),
                    "budgets": _budgets(entry, where, header_defaults["budgets"]),
                },
            )
        )
    return defaults, header_defaults, clients


def load_clients(keys_file: Optional[str], environ: Mapping[str, str]) -> ClientRegistry:
    """
    All clients: those of the keys file (C{--client-keys-file}, else
    C{OAIPROXY_CLIENT_KEYS_FILE}, else the systemd credential
    C{$CREDENTIALS_DIRECTORY/client_keys} when present) and those of
    C{OAIPROXY_CLIENT_KEYS}.  Unlike the environment, the file can change
    while the proxy runs: it is what a reload (SIGHUP) picks up.

    @raise ConfigError: for a named file that is missing, unreadable or
        malformed.
    """
    path = config_file_path(keys_file, "OAIPROXY_CLIENT_KEYS_FILE", CLIENT_KEYS_CREDENTIAL, environ)
    defaults, header_defaults, clients = Limits(), dict[str, Any](), list[Client]()
    if path:
        defaults, header_defaults, clients = _parse_clients(read_config_file(path, "client keys file"), path)
    names = {client.name for client in clients}
    for index, key in enumerate(client_keys_from_env(environ), 1):
        name = f"env-{index}"
        if name in names:
            raise ConfigError(
                f"the keys file already has a client named {name!r}, the name of a key from OAIPROXY_CLIENT_KEYS"
            )
        clients.append(
            Client(name=name, key_sha256=hashlib.sha256(key.reveal()).digest(), limits=defaults, **header_defaults)
        )
    hashes = [client.key_sha256 for client in clients]
    if len(set(hashes)) != len(hashes):
        raise ConfigError("a key in OAIPROXY_CLIENT_KEYS is also in the keys file")
    return ClientRegistry(clients)


class Credentials:
    """
    The secrets in use, shared by the parts that need them and replaced as
    a whole on reload, so a request never sees half of an old set and half
    of a new one.

    @ivar api_key: the upstream key.
    @ivar clients: who may use the proxy; empty means anyone who can
        connect.
    @ivar admin_key: the key that reads every client's usage and the
        dashboard's data (L{oaiproxy.access.admin}); C{None}: nobody.
    """

    def __init__(
        self, api_key: Secret, clients: Optional[ClientRegistry] = None, admin_key: Optional[Secret] = None
    ) -> None:
        self.api_key = api_key
        self.clients = clients if clients is not None else ClientRegistry()
        self.admin_key = admin_key

    def replace(self, api_key: Secret, clients: ClientRegistry, admin_key: Optional[Secret] = None) -> None:
        self.api_key, self.clients, self.admin_key = api_key, clients, admin_key

    def __repr__(self) -> str:
        return f"Credentials(api_key=<redacted>, clients={self.clients!r})"
