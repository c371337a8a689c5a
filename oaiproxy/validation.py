# -*- test-case-name: tests.test_validation -*-
"""
The checks a chat completions request must pass before it costs an upstream
call.

Only the fields whose absence guarantees an upstream 400 are checked; the
rest of the body is OpenAI's to judge, so new API fields work through the
proxy the day they ship.  The body itself is never rewritten: validation
reads a parsed copy, and the original bytes are what goes upstream.
"""

from __future__ import annotations

from typing import Any, Optional

from oaiproxy import fastjson
from oaiproxy.errors import ApiError, bad_request

__all__ = ["ChatRequest", "parse_chat_request"]


class ChatRequest:
    """
    What the proxy needs to know about a valid request.

    @ivar model: the requested model.
    @ivar stream: whether the client asked for server-sent events.
    @ivar document: the parsed body, for reading (never re-serialised).
    """

    __slots__ = ("model", "stream", "document")

    def __init__(self, model: str, stream: bool, document: Optional[dict[str, Any]] = None) -> None:
        self.model = model
        self.stream = stream
        self.document: dict[str, Any] = document if document is not None else {}

    def __repr__(self) -> str:
        return f"ChatRequest(model={self.model!r}, stream={self.stream!r})"


def parse_chat_request(body: bytes) -> "ChatRequest | ApiError":
    """
    Check a chat completions body.

    @return: a L{ChatRequest} when the body is acceptable, otherwise the
        L{ApiError} to answer with.  Messages name the offending field but
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

    model = document.get("model")
    if not isinstance(model, str) or not model:
        return bad_request(
            "you must provide a model parameter (a non-empty string).",
            "model",
            "missing_required_parameter" if model is None else "invalid_type",
        )

    problem = _messages_problem(document.get("messages"))
    if problem is not None:
        return bad_request(problem, "messages", "invalid_value")

    return ChatRequest(model, document.get("stream") is True, document)


def _messages_problem(messages: Any) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array of message objects."
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"'messages[{index}]' must be an object."
        if not isinstance(message.get("role"), str):
            return f"'messages[{index}].role' must be a string."
    return None
