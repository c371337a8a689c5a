# -*- test-case-name: tests.routes,tests.e2e.test_routes -*-
"""
The fake upstream's answers for the routes beyond chat completions: pure
functions from a request to the body (or the events) the real API would
send, shaped closely enough that the openai SDK parses them.

Answers are deterministic and say what was received (an upload's size and
digest, the model, the input's length), so a test can check that the
proxy delivered a request intact by reading the SDK's result.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from typing import Any, Optional

__all__ = [
    "embeddings",
    "completion",
    "completion_events",
    "response_object",
    "response_events",
    "moderation",
    "image",
    "speech",
    "parse_form",
    "transcription",
    "transcription_events",
]


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _words(value: Any) -> int:
    if isinstance(value, str):
        return max(len(value.split()), 1)
    if isinstance(value, list):
        return sum(_words(v) if isinstance(v, str) else 1 for v in value) or 1
    return 1


def embeddings(document: dict[str, Any]) -> dict[str, Any]:
    """
    One three-dimensional embedding per input, as floats or, when asked
    (the Python SDK asks by default), base64 of little-endian float32.
    """
    inputs = document.get("input")
    items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
    data = []
    for index, _ in enumerate(items):
        vector = [0.25 * (index + 1), -0.5, 1.0]
        embedding: Any = vector
        if document.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack("<3f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = _words(inputs)
    return {
        "object": "list",
        "data": data,
        "model": document.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _completion_text(document: dict[str, Any]) -> str:
    prompt = document.get("prompt")
    return f"This is a mock completion of: {str(prompt)[:200]}"


def completion(document: dict[str, Any], ident: str, created: int) -> dict[str, Any]:
    """
    A legacy text completion.
    """
    text = _completion_text(document)
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": document.get("model"),
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(_words(document.get("prompt")), len(text.split())),
    }


def completion_events(document: dict[str, Any], ident: str, created: int) -> list[bytes]:
    """
    A streamed legacy completion, with the usage-only chunk (and C{"usage":
    null} on the others) when C{stream_options.include_usage} is set.
    """
    include_usage = bool((document.get("stream_options") or {}).get("include_usage"))
    text = _completion_text(document)

    def chunk(text: str, finish: Optional[str] = None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": document.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    words = text.split(" ")
    payloads = [chunk((" " if i else "") + w) for i, w in enumerate(words)] + [chunk("", "stop")]
    if include_usage:
        final = chunk("")
        final["choices"] = []
        final["usage"] = _usage(_words(document.get("prompt")), len(words))
        payloads.append(final)
    return [b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads] + [b"data: [DONE]\n\n"]


def _response_text(document: dict[str, Any]) -> str:
    given = document.get("input")
    if isinstance(given, list) and given and isinstance(given[-1], dict):
        given = given[-1].get("content")
    return f"This is a mock response to: {str(given)[:200]}"


def response_object(document: dict[str, Any], ident: str, created: int, status: str = "completed") -> dict[str, Any]:
    """
    A Responses API response, completed, with its usage.
    """
    text = _response_text(document)
    prompt = _words(document.get("input"))
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": document.get("model"),
        "output": [
            {
                "type": "message",
                "id": "msg_" + ident,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(text.split()),
            "output_tokens_details": {"reasoning_tokens": 2},
            "total_tokens": prompt + len(text.split()),
        },
    }


def response_events(document: dict[str, Any], ident: str, created: int) -> list[bytes]:
    """
    A streamed response: C{response.created}, one C{output_text.delta} per
    word, then C{response.completed} carrying the whole response (and the
    usage).
    """
    final = response_object(document, ident, created)
    started = dict(final, status="in_progress", output=[], usage=None)
    words = _response_text(document).split(" ")
    events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": started})]
    for i, word in enumerate(words):
        events.append(
            (
                "response.output_text.delta",
                {"item_id": "msg_" + ident, "output_index": 0, "content_index": 0, "delta": (" " if i else "") + word},
            )
        )
    events.append(("response.completed", {"response": final}))
    out = []
    for sequence, (kind, payload) in enumerate(events):
        data = json.dumps({"type": kind, "sequence_number": sequence, **payload}).encode()
        out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
    return out


def moderation(document: dict[str, Any], ident: str) -> dict[str, Any]:
    flagged = "kill" in json.dumps(document.get("input"))
    return {
        "id": ident,
        "model": document.get("model") or "omni-moderation-latest",
        "results": [{"flagged": flagged, "categories": {"violence": flagged}, "category_scores": {"violence": 0.9}}],
    }


#: A 1x1 transparent PNG.
_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def image(document: dict[str, Any], created: int) -> dict[str, Any]:
    n = document.get("n")
    count = n if isinstance(n, int) and 0 < n <= 10 else 1
    return {
        "created": created,
        "data": [{"b64_json": base64.b64encode(_PNG).decode("ascii")} for _ in range(count)],
        "usage": {
            "input_tokens": _words(document.get("prompt")),
            "output_tokens": 100,
            "total_tokens": _words(document.get("prompt")) + 100,
        },
    }


#: Bytes of fake audio per character of speech input.
SPEECH_BYTES_PER_CHAR = 1000


def speech(document: dict[str, Any]) -> list[bytes]:
    """
    Deterministic "audio" for the input, in 16 KiB chunks: its length says
    how much input arrived.
    """
    size = len(str(document.get("input"))) * SPEECH_BYTES_PER_CHAR
    pattern = hashlib.sha256(str(document.get("input")).encode()).digest() * 512
    audio = (pattern * (size // len(pattern) + 1))[:size]
    return [audio[i : i + 16384] for i in range(0, len(audio), 16384)]


_BOUNDARY = re.compile(rb'boundary="?([^";,\s]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'name="([^"]*)"')
_FILENAME = re.compile(rb'filename="([^"]*)"')


def parse_form(content_type: bytes, body: bytes) -> Optional[dict[str, Any]]:
    """
    A multipart body's fields (text) and files (bytes), or C{None} when it
    is not well-formed multipart.
    """
    match = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith(b"multipart/form-data") or match is None:
        return None
    delimiter = b"--" + match.group(1)
    parts = body.split(b"\r\n" + delimiter)
    if not parts[0].startswith(delimiter) or not parts[-1].startswith(b"--"):
        return None
    fields: dict[str, Any] = {}
    for part in [parts[0][len(delimiter) :]] + parts[1:-1]:
        head, sep, value = part.partition(b"\r\n\r\n")
        name = _NAME.search(head)
        if not sep or name is None:
            return None
        filename = _FILENAME.search(head)
        fields[name.group(1).decode()] = value if filename else value.decode("utf-8", "replace")
    return fields


def transcription(form: dict[str, Any]) -> dict[str, Any]:
    """
    What a transcription of the uploaded file says: its size and SHA-256,
    and the model, so a test can tell the upload arrived whole.
    """
    audio = form.get("file", b"")
    digest = hashlib.sha256(audio).hexdigest() if isinstance(audio, bytes) else "none"
    text = f"received {len(audio)} bytes sha256 {digest} for {form.get('model')}"
    output = len(text.split())
    return {
        "text": text,
        "usage": {"type": "tokens", "input_tokens": 50, "output_tokens": output, "total_tokens": 50 + output},
    }


def transcription_events(form: dict[str, Any]) -> list[bytes]:
    """
    A streamed transcription (C{stream=true}): a C{transcript.text.delta}
    event per word, then C{transcript.text.done} with the text and usage.
    """
    done = transcription(form)
    words = done["text"].split(" ")
    payloads: list[dict[str, Any]] = [
        {"type": "transcript.text.delta", "delta": (" " if i else "") + w} for i, w in enumerate(words)
    ]
    payloads.append({"type": "transcript.text.done", "text": done["text"], "usage": done["usage"]})
    return [b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads]
