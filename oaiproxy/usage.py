# -*- test-case-name: tests.test_usage -*-
"""
What a response really cost, read from the bytes on their way through.

Upstream reports token C{usage} at the end of a plain JSON answer, and in
the last event of a stream when the request asked for
C{stream_options.include_usage}.  L{UsageMeter} watches the relayed bytes
without delaying them: an event stream is split into events as it goes
(only the few bytes of an unfinished line are kept), a plain body is kept
up to a bound and parsed once at the end.  When no usage is reported, or a
stream is cut short, the output is estimated from the text streamed so far
at four characters per token, which is how a cancelled stream is charged.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

__all__ = ["UsageMeter"]

#: Plain bodies larger than this are not kept for the usage read.
PLAIN_BODY_LIMIT = 1024 * 1024


class UsageMeter:
    """
    Counts a response's tokens from its body.

    @param event_stream: the body is server-sent events.
    """

    __slots__ = ("_stream", "_pending", "_plain", "_plain_size", "total_tokens", "streamed_chars")

    def __init__(self, event_stream: bool) -> None:
        self._stream = event_stream
        self._pending = b""
        self._plain: list[bytes] = []
        self._plain_size = 0
        #: What upstream reported, once it has.
        self.total_tokens: Optional[int] = None
        #: Characters of generated text seen so far in a stream.
        self.streamed_chars = 0

    def feed(self, data: bytes) -> None:
        if not self._stream:
            self._plain_size += len(data)
            if self._plain_size <= PLAIN_BODY_LIMIT:
                self._plain.append(data)
            return
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, payload: bytes) -> None:
        if not payload or payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self._usage(event.get("usage"))
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                for key in ("content", "reasoning_content", "refusal"):
                    text = delta.get(key)
                    if isinstance(text, str):
                        self.streamed_chars += len(text)

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            total = usage.get("total_tokens")
            if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
                self.total_tokens = total

    def finish(self) -> None:
        """
        The body is complete: read a plain body's usage.
        """
        if self._stream or self._plain_size > PLAIN_BODY_LIMIT:
            return
        try:
            document = json.loads(b"".join(self._plain))
        except ValueError:
            return
        finally:
            self._plain = []
        if isinstance(document, dict):
            self._usage(document.get("usage"))

    def used(self, prompt_estimate: int) -> int:
        """
        The tokens to charge: what upstream reported, or else the prompt
        estimate plus the output seen so far.
        """
        if self.total_tokens is not None:
            return self.total_tokens
        return prompt_estimate + math.ceil(self.streamed_chars / 4)
