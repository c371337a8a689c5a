# -*- test-case-name: tests.server.test_tree -*-
"""
The twisted.web helpers every layer shares, below all of them: a request's
body read whole, an error answered as OpenAI-shaped JSON, the query string,
and the resources every endpoint is built on (JSON 404s and 405s).

twisted.web's own answers for unknown paths and methods are HTML pages,
which an SDK reports as an undecodable body; here every answer is JSON.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from oaiproxy.errors import ApiError, method_not_allowed, not_found
from oaiproxy.keyshape import contains_openai_key, redact_openai_keys

__all__ = [
    "read_body",
    "error_response",
    "send_error",
    "query_of",
    "JSONResource",
    "Endpoint",
    "NotFound",
]


def read_body(request: Request) -> bytes:
    """
    The whole request body.  L{oaiproxy.server.site.ProxyRequest} keeps it in
    memory; a plain twisted.web request may have spooled it to a file.
    """
    content: Any = request.content
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        body: bytes = getvalue()
        return body
    content.seek(0)
    data: bytes = content.read()
    return data


def error_response(request: Request, error: ApiError) -> bytes:
    """
    Set the status and headers for C{error} on C{request} and return the
    body, for a C{render_*} method to return.
    """
    request.setResponseCode(error.status)
    body = error.body()
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    for name, value in error.headers:
        headers.setRawHeaders(name, [value])
    # The record (oaiproxy.observe.records, above this module) if the site made one.
    record = getattr(request, "record", None)
    if record is not None:
        record.error_code = error.code or error.type
    return body


def send_error(request: Request, error: ApiError) -> None:
    """
    Answer a request that was left pending (C{NOT_DONE_YET}) with C{error}.
    """
    request.write(error_response(request, error))
    request.finish()


def query_of(request: Request) -> bytes:
    """
    The query string of the request's URI, without the C{?}: passed on
    upstream as the client sent it.
    """
    return request.uri.partition(b"?")[2]


def shown_path(path: bytes) -> str:
    """
    A request path as the access log, the live views and a 404 show it:
    without its query string (where credentials end up), and with any real
    OpenAI key in it blanked (a client that pasted one into the URL is
    refused, and its key must not then sit in the log line or the answer).
    A key hidden in percent escapes, which the refusal decodes to find, is
    shown decoded and so blanked too.
    """
    path = path.split(b"?", 1)[0]
    if b"%" in path:
        decoded = unquote_to_bytes(path)
        if contains_openai_key(decoded):
            path = decoded
    return redact_openai_keys(path).decode("latin-1")


def _path(request: Request) -> str:
    return shown_path(request.path)


_ALLOWED: dict[type, list[str]] = {}


def _allowed_methods(cls: type) -> list[str]:
    # Twisted's Resource defines render_HEAD ("GET without the body") on
    # every resource, so HEAD is derived from GET, not taken from the class.
    # Cached per class: dir() on every request would be a waste.
    cached = _ALLOWED.get(cls)
    if cached is not None:
        return cached
    methods = {
        name[len("render_") :] for name in dir(cls) if name.startswith("render_") and name[len("render_") :].isupper()
    }
    methods.discard("HEAD")
    if "GET" in methods:
        methods.add("HEAD")
    _ALLOWED[cls] = sorted(methods)
    return _ALLOWED[cls]


class JSONResource(Resource):
    """
    A resource whose unsupported methods get a JSON 405 with C{Allow}, and
    whose unknown children get a JSON 404.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()

    def allowed_methods(self) -> list[str]:
        """
        The methods with a C{render_*} handler, plus HEAD wherever GET is.
        """
        return _allowed_methods(type(self))

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        allowed = self.allowed_methods()
        if method not in allowed:
            return error_response(request, method_not_allowed(method, _path(request), allowed))
        if method == "HEAD":
            method = "GET"  # twisted.web drops the body of a HEAD response
        result: bytes | int = getattr(self, "render_" + method)(request)
        return result


class NotFound(JSONResource):
    """
    Everything at and below an unknown path: a 404 that hints at C{/v1}.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        return error_response(request, not_found(method, _path(request)))


class Endpoint(JSONResource):
    """
    A leaf endpoint: any path below it (C{/health/x}) is a 404.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.postpath:
            return NotFound().render(request)
        return super().render(request)
