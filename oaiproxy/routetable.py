# -*- test-case-name: tests.test_routetable -*-
"""
The OpenAI API routes the proxy can serve, and which of them an operator
turned on (C{--routes}).

One table says, for each route, what the rest of the proxy needs to know:
its path below C{/v1}, how its request body is checked, whether it names a
model (so allow-lists and token limits apply), whether it generates text
(so a token reservation counts output), and where its streamed text and
usage are.  The resources, the site and the Azure mapping all read it, so
adding a route is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from oaiproxy.config import ConfigError

__all__ = ["CHAT_TEXT_KEYS", "Route", "ROUTES", "BY_NAME", "DEFAULT_ROUTES", "parse_routes", "route_label", "in_order"]


#: Where a chat completion chunk carries generated text: the message, the
#: reasoning (C{reasoning_content}, and C{reasoning} as vLLM and
#: OpenRouter name it), a refusal, tool and function calls (C{name},
#: C{arguments}) and the transcript of generated audio.
CHAT_TEXT_KEYS = ("content", "reasoning_content", "reasoning", "refusal", "name", "arguments", "transcript")


@dataclass(frozen=True)
class Route:
    """
    One API route.

    @ivar name: the C{--routes} name, which is also its path below C{/v1}
        (C{audio/speech}).
    @ivar body: C{json} (validated, then forwarded as sent), C{multipart}
        (an upload, streamed upstream as it arrives) or C{none} (GET).
    @ivar required: the JSON members without which upstream always answers
        400, checked before any upstream call.
    @ivar generates: the response is generated text, so a token
        reservation counts the requested output (not just the prompt).
    @ivar stream_usage: the route takes C{stream_options.include_usage}
        (chat and legacy completions); usage can then be asked for on a
        stream and stripped again.
    @ivar text_keys: the JSON string members of a stream event that carry
        generated output (every one of them: a client must not escape its
        charge by asking for tool calls instead of text), counted to
        estimate the output of a stream without a usage report.
    @ivar azure: how Azure OpenAI addresses the route: C{deployment}
        (C{/openai/deployments/{name}/<route>}), C{resource}
        (C{/openai/<route>}, the model in the body), or C{None} (Azure does
        not serve it).
    """

    name: str
    body: str = "json"
    required: tuple[str, ...] = ("model",)
    generates: bool = False
    stream_usage: bool = False
    text_keys: tuple[str, ...] = ()
    azure: "str | None" = "deployment"

    @property
    def path(self) -> str:
        """
        The path below the API base, as the SDKs append it.
        """
        return "/" + self.name

    @property
    def label(self) -> str:
        """
        The route's name in metrics and logs.
        """
        return route_label(self.name)


def route_label(name: str) -> str:
    return name.replace("/", "_")


CHAT = Route(
    "chat/completions",
    required=("model", "messages"),
    generates=True,
    stream_usage=True,
    # Every generated field: text, reasoning, refusals, tool and function
    # calls, audio transcripts.
    text_keys=CHAT_TEXT_KEYS,
)
MODELS = Route("models", body="none", required=(), azure="resource")
RESPONSES = Route("responses", required=(), generates=True, text_keys=("delta",), azure="resource")

ROUTES: tuple[Route, ...] = (
    CHAT,
    MODELS,
    Route("completions", required=("model", "prompt"), generates=True, stream_usage=True, text_keys=("text",)),
    Route("embeddings", required=("model", "input")),
    RESPONSES,
    # The model is optional (OpenAI picks its default moderation model);
    # Azure has no moderations endpoint.
    Route("moderations", required=("input",), azure=None),
    # Both generate output tokens (gpt-image-1, gpt-4o-mini-tts report
    # them), so a reservation counts the requested output too.
    Route("images/generations", required=("prompt",), generates=True),
    Route("audio/speech", required=("model", "input", "voice"), generates=True),
    Route("audio/transcriptions", body="multipart", required=(), text_keys=("delta",)),
    Route("audio/translations", body="multipart", required=(), text_keys=("delta",)),
)

BY_NAME: dict[str, Route] = {route.name: route for route in ROUTES}

#: What a proxy serves unless told otherwise: chat, and the model list
#: every chat UI asks for at startup.
DEFAULT_ROUTES: tuple[str, ...] = ("chat/completions", "models")


def parse_routes(name: str, text: str) -> frozenset[str]:
    """
    Parse a C{--routes} value: route names separated by commas, or C{all}.

    @raise ConfigError: naming the unknown route and listing the known ones.
    """
    names = [part.strip().strip("/") for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return frozenset(BY_NAME)
    if not names:
        raise ConfigError(f"{name} needs at least one route name (or 'all') from: {', '.join(BY_NAME)}")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(
            f"{name} takes route names separated by commas, or 'all'; "
            f"{', '.join(repr(u) for u in unknown)} is not one of: {', '.join(BY_NAME)}"
        )
    return frozenset(names)


def in_order(names: Iterable[str]) -> list[Route]:
    """
    The routes called C{names}, in the table's order.
    """
    wanted = set(names)
    return [route for route in ROUTES if route.name in wanted]
