# -*- test-case-name: tests.test_validation -*-
"""
The checks a JSON request must pass before it costs an upstream call.

Only the members whose absence guarantees an upstream 400 are checked (a
route's C{required} members, see L{oaiproxy.routetable}); the rest of the body
is OpenAI's to judge, so new API fields work through the proxy the day
they ship.  The body itself is never rewritten: validation reads a parsed
copy, and the original bytes are what goes upstream.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from oaiproxy import fastjson
from oaiproxy.access.limits import NOT_A_COUNT, read_count
from oaiproxy.errors import ApiError, bad_request
from oaiproxy.routetable import RESPONSES, Route

__all__ = ["JsonRequest", "parse_json_request", "COUNT_MEMBERS"]


class JsonRequest:
    """
    What the proxy needs to know about a valid request.

    @ivar model: the requested model, or C{None} where the route lets
        upstream pick its default.
    @ivar stream: whether the client asked for server-sent events.
    @ivar document: the parsed body, for reading (never re-serialised).
    """

    __slots__ = ("model", "stream", "document")

    def __init__(self, model: Optional[str], stream: bool, document: Optional[dict[str, Any]] = None) -> None:
        self.model = model
        self.stream = stream
        self.document: dict[str, Any] = document if document is not None else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, stream={self.stream!r})"


def parse_json_request(body: bytes, route: Route) -> "JsonRequest | ApiError":
    """
    Check a JSON request body for C{route}.

    @return: a L{JsonRequest} when the body is acceptable, otherwise the
        L{ApiError} to answer with.  Messages name the offending member but
        never quote the body: it may hold private data.
    """
    try:
        document: Any = fastjson.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers malformed JSON and invalid UTF-8; RecursionError
        # is what absurdly deep nesting ("[[[[...") raises.
        return bad_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
            "invalid_json",
        )
    if not isinstance(document, dict):
        return bad_request("The request body must be a JSON object.", None, "invalid_json")
    repeated = _repeated_member(body, document)
    if repeated is not None:
        return _repeated(repeated)

    model = document.get("model")
    if model is not None or "model" in route.required or _needs_model(route, document):
        if not isinstance(model, str) or not model:
            return bad_request(
                "you must provide a model parameter (a non-empty string).",
                "model",
                "missing_required_parameter" if model is None else "invalid_type",
            )
    for name in route.required:
        if name == "model":
            continue
        problem = _CHECKS.get(name, _present)(document.get(name), name)
        if problem is not None:
            message, code = problem
            return bad_request(message, name, code)

    if route.generates:
        for name in COUNT_MEMBERS:
            try:
                read_count(document.get(name), minimum=1 if name in ("n", "best_of") else 0)
            except ValueError as e:
                return bad_request(f"'{name}' {e}.", name, "invalid_type" if str(e) == NOT_A_COUNT else "invalid_value")

    return JsonRequest(model, document.get("stream") is True, document)


#: The members the proxy decides on (the allow-list, streaming, usage, the
#: token reservation, the Responses template): one given twice, or under
#: two spellings, could be read one way here and another way upstream, so
#: it is refused.  (The route's other required members are checked only to
#: spare a certain upstream 400; a repeated one can cost no more than
#: that 400, so it is left to upstream.)
_repeated_member = fastjson.RepeatedMembers(
    frozenset(
        {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "prompt"}
    ),
    {"stream_options": frozenset({"include_usage"})},
)


def _repeated(name: str) -> ApiError:
    shown = f"'{name}'" if name else "a member the proxy reads"
    return bad_request(
        f"The request body gives {shown} more than once (or under two spellings): the proxy and the upstream "
        "could read different values. Give it once.",
        name or None,
        "duplicate_parameter",
    )


def _needs_model(route: Route, document: dict[str, Any]) -> bool:
    # A Responses request may leave the model to a stored prompt template.
    return route is RESPONSES and document.get("prompt") is None


Problem = Optional[tuple[str, str]]


def _present(value: Any, name: str) -> Problem:
    """
    A required member that is missing, null, empty, or of a type no route
    takes (a number or a boolean where text or a list is expected).
    """
    if value is None:
        return f"you must provide a '{name}' parameter.", "missing_required_parameter"
    if isinstance(value, (bool, int, float)):
        return f"'{name}' must be a string or an array.", "invalid_type"
    if not value:
        return f"'{name}' must not be empty.", "invalid_value"
    return None


def _messages(messages: Any, name: str) -> Problem:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array of message objects.", "invalid_value"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"'messages[{index}]' must be an object.", "invalid_value"
        if not isinstance(message.get("role"), str):
            return f"'messages[{index}].role' must be a string.", "invalid_value"
    return None


_CHECKS: dict[str, Callable[[Any, str], Problem]] = {"messages": _messages}


#: The members a token reservation reads (see L{oaiproxy.access.limits}): the
#: output bound under its three names, and the number of choices.
COUNT_MEMBERS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "n", "best_of")
