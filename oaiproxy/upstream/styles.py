# -*- test-case-name: tests.test_styles -*-
"""
How an upstream addresses the OpenAI API: where a route's request goes and
which header carries the key.

OpenAI and the OpenAI-compatible servers (vLLM, Ollama, OpenRouter, LM
Studio) take the same paths below their base URL and a C{Bearer} key.
Azure OpenAI puts most routes under a deployment
(C{/openai/deployments/{deployment}/chat/completions}), requires an
C{api-version} query parameter on every request, and takes its key in an
C{api-key} header.  Both are pure mappings, so they are tested without a
network.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Mapping, Optional, Union
from urllib.parse import quote, quote_from_bytes, unquote, unquote_to_bytes

from oaiproxy.routetable import ROUTES, Route

__all__ = [
    "OpenAIStyle",
    "AzureStyle",
    "UpstreamStyle",
    "route_of",
    "is_path_segment",
    "DEFAULT_AZURE_API_VERSION",
    "DEFAULT_AZURE_RESPONSES_API_VERSION",
]

#: The newest generally available Azure OpenAI data-plane API version when
#: this was written; override with C{--azure-api-version}.
DEFAULT_AZURE_API_VERSION = "2024-10-21"
#: Azure serves the Responses API only from 2025-03-01-preview on, so that
#: route gets a newer default of its own.
DEFAULT_AZURE_RESPONSES_API_VERSION = "2025-04-01-preview"


def route_of(path: str) -> Optional[Route]:
    """
    The route a path below the API base belongs to (C{/responses/r_1}
    belongs to C{responses}), or C{None}.
    """
    best: Optional[Route] = None
    for route in ROUTES:
        if path == route.path or path.startswith(route.path + "/"):
            if best is None or len(route.path) > len(best.path):
                best = route
    return best


def is_path_segment(text: str) -> bool:
    """
    Whether C{text}, a client's id as decoded from its request path, can be
    one segment of an upstream path and mean nothing but itself.

    The proxy puts ids (a model, a stored response, an Azure deployment)
    into upstream URLs that carry the shared key, so an id that an upstream
    or a front end in its path could read as a path of its own would let a
    client reach any endpoint of the account.  Refused: an id made only of
    dots and whitespace (C{.}, C{..}, C{...}, C{" .."}: servers that trim
    segments, IIS and Windows paths below it, read those as C{.} or C{..}),
    also before a C{;} (C{..;x}, which some servers read as C{..}),
    C{/} and C{\\} (some servers take it for C{/}), a C{%} (a server that
    decodes twice would find C{%2e%2e} in C{%252e%252e}), control
    characters, and anything that becomes one of these under Unicode
    compatibility normalisation (fullwidth dots and solidus, U+FF0E and
    U+FF0F, which some servers fold).
    """
    for form in (text, unicodedata.normalize("NFKC", text)):
        if not form.split(";", 1)[0].replace(".", "").strip():
            return False
        if any(c in "/\\%" or unicodedata.category(c) == "Cc" for c in form):
            return False
    return True


#: Paths up to this long have their L{_path_is_segments} answer cached.
_CACHED_PATH = 256


def _path_is_segments(path: str) -> bool:
    """
    Whether every segment of C{path} (as the proxy built it, percent-encoded,
    with its leading C{/}) decodes to a L{is_path_segment}.

    Asked twice for every request, almost always of the same few paths
    (C{/chat/completions}); the answer for a short path is cached, since
    the character-by-character check was about 4% of a plain request's CPU
    (bench/README.md, issue 17).  The cache is bounded in entries and in
    length, so clients' ids in paths cannot grow it.
    """
    if len(path) <= _CACHED_PATH:
        return _cached_path_is_segments(path)
    return _check_path_segments(path)


def _check_path_segments(path: str) -> bool:
    if not path.startswith("/"):
        return False
    try:
        return all(is_path_segment(unquote(segment, errors="strict")) for segment in path[1:].split("/"))
    except UnicodeDecodeError:
        return False


_cached_path_is_segments = functools.lru_cache(maxsize=512)(_check_path_segments)


#: What a query may hold as it is (RFC 3986's query characters, and C{%}
#: for what the client encoded already).
_QUERY_SAFE = "!$&'()*+,;=:@/?%-._~"


def _join_query(query: bytes, extra: str = "") -> str:
    # A client's query goes on as sent, but for what is not a query
    # character: a raw "#" would end the URL there (and drop an
    # api-version after it), a space or a control character is not a URL.
    parts = [p for p in (quote_from_bytes(query, safe=_QUERY_SAFE), extra) if p]
    return ("?" + "&".join(parts)) if parts else ""


class OpenAIStyle:
    """
    The OpenAI API's own addressing: paths as the SDKs send them, relative
    to the base URL, and a C{Bearer} key.
    """

    name = "openai"

    def __init__(self, model_map: Optional[Mapping[str, str]] = None) -> None:
        #: Client model -> the model this upstream knows it as (an
        #: upstreams file entry's C{model_map}); the body is rewritten only
        #: for a model listed.
        self.model_map = dict(model_map or {})

    def target(self, path: str, model: Optional[str], query: bytes = b"") -> str:
        """
        The path and query, relative to the base URL, for a request the
        client sent to C{path} (below C{/v1}) naming C{model}.
        """
        return path + _join_query(query)

    def addressable(self, path: str, model: Optional[str]) -> bool:
        """
        Whether L{target} for C{path} and C{model} stays where it says: every
        segment of the upstream path it builds is one L{is_path_segment}.
        The last check before a request goes upstream with the shared key.
        """
        return _path_is_segments(path)

    def credential(self, key: bytes) -> tuple[bytes, bytes]:
        """
        The header that carries the upstream key.
        """
        return b"authorization", b"Bearer " + key

    def needs_model(self, route: Route) -> bool:
        """
        Whether a request on C{route} must name its model to be addressed.
        """
        return False

    def body_model(self, route: Route, model: Optional[str]) -> Optional[str]:
        """
        The model name upstream needs in the body instead of C{model}, if
        any.
        """
        if model is not None and model in self.model_map:
            return self.model_map[model]
        return None


def _is_api_version(parameter: bytes) -> bool:
    name = parameter.split(b"=", 1)[0].replace(b"+", b" ")
    return unquote_to_bytes(name).strip().lower() == b"api-version"


class AzureStyle:
    """
    Azure OpenAI: deployment-scoped paths and an C{api-version}.

    @param api_version: sent as C{api-version} on every request; by
        default L{DEFAULT_AZURE_API_VERSION}, and
        L{DEFAULT_AZURE_RESPONSES_API_VERSION} for the Responses API.
    @param deployments: model name to deployment name; a model not listed
        is taken to be deployed under its own name.
    """

    name = "azure"

    def __init__(self, api_version: Optional[str] = None, deployments: Optional[Mapping[str, str]] = None) -> None:
        self.api_version = api_version
        self.deployments = dict(deployments or {})

    def deployment(self, model: str) -> str:
        return self.deployments.get(model, model)

    def version(self, route: Optional[Route]) -> str:
        """
        The api-version for a request on C{route}.
        """
        if self.api_version is not None:
            return self.api_version
        if route is not None and route.name == "responses":
            return DEFAULT_AZURE_RESPONSES_API_VERSION
        return DEFAULT_AZURE_API_VERSION

    def target(self, path: str, model: Optional[str], query: bytes = b"") -> str:
        route = route_of(path)
        version = "api-version=" + quote(self.version(route), safe="")
        if route is not None and route.azure == "deployment" and model is not None:
            prefix = "/openai/deployments/" + quote(self.deployment(model), safe="")
        else:
            prefix = "/openai"
        # The proxy's api-version wins over one the client sent, however it
        # spelt the name (api%2Dversion decodes to the same for Azure).
        kept = b"&".join(p for p in query.split(b"&") if p and not _is_api_version(p))
        return prefix + path + _join_query(kept, version)

    def addressable(self, path: str, model: Optional[str]) -> bool:
        # The deployment a model names is a segment of the path too.
        route = route_of(path)
        if route is not None and route.azure == "deployment" and model is not None:
            if not is_path_segment(self.deployment(model)):
                return False
        return _path_is_segments(path)

    def credential(self, key: bytes) -> tuple[bytes, bytes]:
        return b"api-key", key

    def needs_model(self, route: Route) -> bool:
        return route.azure == "deployment"

    def body_model(self, route: Route, model: Optional[str]) -> Optional[str]:
        # Resource-wide routes (the Responses API) take the deployment's
        # name as the body's model: map it, so a client's model name means
        # the same deployment on every route.
        if route.azure == "resource" and model is not None and model in self.deployments:
            return self.deployments[model]
        return None


#: Either style.
UpstreamStyle = Union[OpenAIStyle, AzureStyle]
