# -*- test-case-name: tests.upstream.test_poolfile -*-
"""
The upstreams file (C{--upstreams-file}, env C{OAIPROXY_UPSTREAMS_FILE},
systemd credential C{upstreams}): the pool's entries, checked in full
before any is used.

It is TOML (or JSON with the same structure, like the clients file)::

    [[upstreams]]
    name = "openai-1"                       # unique: the label in logs and metrics
    url = "https://api.openai.com/v1"
    key_credential = "openai-key-1"         # or key_file = PATH, or key_env = NAME
    weight = 2                              # default 1
    priority = 0                            # default 0; lower is tried first
    models = ["gpt-4o*", "o3"]              # optional globs; absent serves any
    model_map = { "gpt-4o" = "gpt-4o-2024-11-20" }
    headers = { "OpenAI-Project" = "proj_..." }
    connect_timeout = 5                     # and read_timeout, first_byte_timeout,
    max_concurrent = 64                     # where they differ from the global ones

Keys never appear in it: a key is read from C{key_file} (a path, relative
to the upstreams file's directory), C{key_credential} (a name under
C{$CREDENTIALS_DIRECTORY}) or C{key_env} (an environment variable).  A
field that looks like a key (C{api_key}, C{token}...), a credential header,
or any value holding an OpenAI key is refused with a message that says
why.  Every mistake names the file, the entry and the field, and never
quotes a key.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from oaiproxy.config import (
    ConfigError,
    Secret,
    config_file_path,
    load_api_key,
    parse_interval,
    parse_seconds,
    parse_style,
    parse_upstream,
    read_config_file,
    read_document,
)
from oaiproxy.keyshape import contains_openai_key
from oaiproxy.upstream.headers import is_credential_header, parse_static_header
from oaiproxy.upstream.pool import Upstream

__all__ = [
    "UPSTREAMS_CREDENTIAL",
    "UPSTREAMS_VARIABLE",
    "parse_upstreams",
    "load_upstreams",
    "upstreams_file_path",
    "check_allow_lists",
]

#: The systemd credential holding the upstreams file.
UPSTREAMS_CREDENTIAL = "upstreams"
UPSTREAMS_VARIABLE = "OAIPROXY_UPSTREAMS_FILE"

_KEY_SOURCES = ("key_file", "key_credential", "key_env")
_TIMEOUTS = ("connect_timeout", "read_timeout")
_FIELDS = frozenset(
    {
        "name",
        "url",
        "style",
        *_KEY_SOURCES,
        "weight",
        "priority",
        "models",
        "model_map",
        "headers",
        *_TIMEOUTS,
        "first_byte_timeout",
        "max_concurrent",
    }
)
#: Field names someone would write a key under.
_KEY_WORDS = re.compile(r"(?:^|_|-)(?:api_?key|apikey|key|token|secret|password|authorization|bearer)$", re.I)
_WHY = (
    "a key is never written in the upstreams file, which gets copied, backed up and committed "
    "where a key must not go; give key_file (a path), key_credential (a systemd credential under "
    "$CREDENTIALS_DIRECTORY) or key_env (an environment variable) instead"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def upstreams_file_path(given: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """
    The upstreams file: C{--upstreams-file}, else C{OAIPROXY_UPSTREAMS_FILE},
    else the systemd credential C{upstreams} when present; C{None} when
    there is none (the single-upstream options apply).
    """
    return config_file_path(given, UPSTREAMS_VARIABLE, UPSTREAMS_CREDENTIAL, environ)


def load_upstreams(path: str, environ: Mapping[str, str]) -> tuple[Upstream, ...]:
    """
    Read and check the upstreams file at C{path}, with the keys it points
    to.  A reload calls it again; when it raises, the pool in use stays.

    @raise ConfigError: naming the file, the entry and the field.
    """
    return parse_upstreams(read_config_file(path, "upstreams file"), path, environ)


def parse_upstreams(data: bytes, path: str, environ: Mapping[str, str]) -> tuple[Upstream, ...]:
    """
    The entries of an upstreams file's content (see the module's
    docstring).

    @param path: the file's name, for messages and for C{key_file} paths
        relative to it.
    @param environ: for C{key_env} and C{$CREDENTIALS_DIRECTORY}.
    """
    document = read_document(data, path, "[[upstreams]] entries")
    unknown = set(document) - {"upstreams"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected [[upstreams]]")
    entries = document.get("upstreams")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: needs at least one [[upstreams]] entry")
    upstreams: list[Upstream] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries, 1):
        upstream = _entry(entry, f"{path} upstream #{index}", path, environ)
        if upstream.name in seen:
            raise ConfigError(
                f"{path} upstream {upstream.name!r}: name: entry #{seen[upstream.name]} has it too; names are unique"
            )
        seen[upstream.name] = index
        upstreams.append(upstream)
    return tuple(upstreams)


def check_allow_lists(upstreams: Sequence[Upstream], allow_lists: Mapping[str, Optional[frozenset[str]]]) -> None:
    """
    Every model in a client's allow-list must be served by some upstream:
    otherwise that client would be let in and then get nowhere.

    @param allow_lists: client name -> its models (C{None}: any).
    @raise ConfigError: naming the client and the model.
    """
    for client, models in sorted(allow_lists.items()):
        for model in sorted(models or ()):
            if not any(u.serves(model) for u in upstreams):
                raise ConfigError(f"client {client!r} may use model {model!r}, which no upstream serves (models)")


def _entry(entry: Any, where: str, path: str, environ: Mapping[str, str]) -> Upstream:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise ConfigError(f"{where}: name: must be a non-empty string (the upstream's label)")
    where = f"{path} upstream {name!r}"
    _refuse_written_keys(entry, where)
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    url = entry.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: url: is required (the base URL, as --upstream takes it)")
    style = parse_style(f"{where}: style", _string(entry, "style", where) or "openai")
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models)
    ):
        raise ConfigError(f"{where}: models: must be a non-empty list of model names or globs (leave it out for any)")
    upstream = Upstream(
        name=name,
        url=_url(url, where),
        key=_key(entry, where, path, environ),
        style=style,
        key_source=next(f"{field} {entry[field]}" for field in _KEY_SOURCES if field in entry),
        weight=_number(entry, "weight", where, 1.0),
        priority=_whole(entry, "priority", where, 0, minimum=None) or 0,
        models=tuple(models) if models is not None else None,
        model_map=_model_map(entry, where),
        headers=_headers(entry, where),
        connect_timeout=_seconds(entry, "connect_timeout", where),
        read_timeout=_seconds(entry, "read_timeout", where),
        first_byte_timeout=_seconds(entry, "first_byte_timeout", where, off_allowed=True),
        max_concurrent=_whole(entry, "max_concurrent", where, None, minimum=1),
    )
    for model in upstream.model_map:
        if not upstream.serves(model):
            raise ConfigError(f"{where}: model_map: maps {model!r}, which its models list does not serve")
    return upstream


def _refuse_written_keys(entry: Mapping[str, Any], where: str) -> None:
    for field, value in entry.items():
        if field not in _FIELDS and _KEY_WORDS.search(str(field)):
            raise ConfigError(f"{where}: {field}: {_WHY}")
        for text in _strings(value):
            if contains_openai_key(text.encode("utf-8", "replace")):
                raise ConfigError(f"{where}: {field}: holds an OpenAI key (not shown); {_WHY}")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _string(entry: Mapping[str, Any], field: str, where: str) -> Optional[str]:
    value = entry.get(field)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{where}: {field}: must be a non-empty string")
    return value


def _url(url: str, where: str) -> str:
    try:
        parts = urlsplit(url)
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:
        userinfo = False  # parse_upstream says what is wrong with it
    if userinfo:
        raise ConfigError(f"{where}: url: must not carry credentials; {_WHY}")
    try:
        return parse_upstream(url)
    except ConfigError as e:
        # parse_upstream speaks of --upstream; here it is this field.
        raise ConfigError(f"{where}: url: {str(e).replace('--upstream ', '', 1)}") from None


def _key(entry: Mapping[str, Any], where: str, path: str, environ: Mapping[str, str]) -> Secret:
    given = [field for field in _KEY_SOURCES if field in entry]
    if len(given) != 1:
        said = " and ".join(given) if given else "none"
        raise ConfigError(f"{where}: needs exactly one of key_file, key_credential or key_env ({said} given)")
    field = given[0]
    value = _string(entry, field, where)
    assert value is not None
    if field == "key_env":
        if not _ENV_NAME.match(value):
            raise ConfigError(f"{where}: key_env: must be an environment variable's name ({_WHY})")
        key = environ.get(value, "").strip()
        if not key:
            raise ConfigError(f"{where}: key_env: the variable {value} is not set or empty")
        return Secret(key.encode("utf-8"))
    if field == "key_credential":
        if "/" in value or value in (".", ".."):
            raise ConfigError(f"{where}: key_credential: must be a credential's name, not a path (use key_file)")
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            raise ConfigError(
                f"{where}: key_credential: $CREDENTIALS_DIRECTORY is not set (systemd's LoadCredential= sets it)"
            )
        key_path = os.path.join(credentials, value)
    else:
        key_path = os.path.join(os.path.dirname(path), os.path.expanduser(value))
    try:
        return load_api_key(key_path, {})
    except ConfigError as e:
        raise ConfigError(f"{where}: {field}: {e}") from None


def _number(entry: Mapping[str, Any], field: str, where: str, default: float) -> float:
    value = entry.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ConfigError(f"{where}: {field}: must be a positive number")
    return float(value)


def _whole(
    entry: Mapping[str, Any], field: str, where: str, default: Optional[int], minimum: Optional[int]
) -> Optional[int]:
    value = entry.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        kind = "a whole number" if minimum is None else f"a whole number of at least {minimum}"
        raise ConfigError(f"{where}: {field}: must be {kind}")
    return value


def _seconds(entry: Mapping[str, Any], field: str, where: str, off_allowed: bool = False) -> Optional[float]:
    if field not in entry:
        return None
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {field}: must be a number of seconds")
    parse = parse_interval if off_allowed else parse_seconds
    return parse(f"{where}: {field}", str(value))


def _model_map(entry: Mapping[str, Any], where: str) -> dict[str, str]:
    value = entry.get("model_map", {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in value.items()
    ):
        raise ConfigError(f"{where}: model_map: must be a table of client model = upstream model (or deployment)")
    return {k.strip(): v.strip() for k, v in value.items()}


def _headers(entry: Mapping[str, Any], where: str) -> tuple[tuple[bytes, bytes], ...]:
    value = entry.get("headers", {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: headers: must be a table of header name = value")
    headers = []
    for name, text in value.items():
        if is_credential_header(name.strip().lower().encode("latin-1", "replace")):
            raise ConfigError(f"{where}: headers: {name} carries a credential; {_WHY}")
        try:
            raw_name, raw_value = parse_static_header(f"{name}:{text}")
        except ValueError as e:
            raise ConfigError(f"{where}: headers: {e}") from None
        headers.append((raw_name, raw_value))
    return tuple(headers)
