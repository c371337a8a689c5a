# -*- test-case-name: tests.routes.test_chat,tests.e2e.test_proxy -*-
"""
A fake OpenAI API, shared by the tests, the benchmarks and C{twistd
oaiproxy --mock-upstream}.

It answers like the real API (JSON completions, server-sent event streams,
OpenAI-shaped errors, the usual response headers) with deterministic text,
for every route the proxy serves (the others' bodies are built in
L{oaiproxy.fake.routes}), below any base path or in Azure OpenAI's
addressing.  For chat completions it misbehaves on request: the C{model}
of a request picks a scenario, so a test drives a failure through the real
SDK without any side channel.

    =====================  ==============================================
    model                  behaviour
    =====================  ==============================================
    (anything else)        a normal answer, streamed if asked
    C{fake-429}            429 with C{retry-after} and rate-limit headers
    C{fake-429-once}       429 once (C{retry-after-ms: 20}), then normal
    C{fake-500}            500 server error
    C{fake-silent}         never answers
    C{fake-stall}          sends the head and one chunk, then goes silent
    C{fake-crash}          sends the head and one chunk (half the body
                           when not streaming), then drops the
                           connection
    C{fake-gated}          sends the head and one chunk, then waits for
                           C{POST /_fake/release} (control mode)
    C{fake-pause}          streams the head and one chunk, is silent for
                           L{PAUSE_SECONDS}, then sends the rest
    C{fake-linger}         streams normally, then holds the end of the
                           body for L{PAUSE_SECONDS} after C{[DONE]}, as
                           a real upstream's last bytes can lag
    C{fake-redirect}       307 to another URL (a proxy must not follow)
    =====================  ==============================================

In control mode, C{GET /_fake/requests} returns what was received (with
the time each arrived, C{at}), C{POST /_fake/release} releases gated
streams, C{GET /_fake/disconnects?at_least=N&within=S} answers with the
number of client disconnects once it reaches N, or after S seconds, and
C{POST /_fake/mode} makes every API request misbehave alike, whatever its
model, so that one of several upstreams behind a pool can fail while the
others answer the same requests (see L{FakeUpstream.set_mode}).

Run it alone with C{python -m oaiproxy.fake.upstream --port 0}: it prints
the URL it listens on.  It only ever listens on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from oaiproxy.fake import routes as fake_routes

__all__ = ["FakeUpstream", "RecordedRequest", "main"]


#: How long C{fake-pause} streams stay silent.
PAUSE_SECONDS = 1.5


@dataclass
class RecordedRequest:
    """
    One request as the fake upstream received it.
    """

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    #: The client's TCP port: equal ports mean a reused connection.
    peer_port: int = 0
    #: The query string, without C{?}.
    query: str = ""
    #: When it arrived, on the fake's clock (POSIX time when run alone).
    at: float = 0.0


@dataclass
class _Stream:
    request: Request
    events: list[bytes]
    gated_after: Optional[int] = None
    ending: str = "finish"
    sent: int = 0
    call: Optional[IDelayedCall] = None
    done: bool = False


def _error(message: str, type_: str, code: Optional[str]) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class FakeUpstream(Resource):
    """
    The fake API as a twisted.web resource.

    @param clock: paces streamed chunks.
    @param api_key: when set, requests must carry C{Bearer <api_key>}.
    @param chunk_interval: seconds between streamed chunks; 0 sends a whole
        stream in one go.
    @param control: serve the C{/_fake/} control routes.
    @param record: keep every request in L{requests} (tests want it; a
        long-running mock upstream must not, or it grows without bound).
    @param prefix: the path the API is served below (C{/v1}; OpenRouter's
        is C{/api/v1}).
    @param azure: behave like Azure OpenAI instead: paths below
        C{/openai} (most below C{/openai/deployments/{name}}), an
        C{api-version} query parameter required, the key in C{api-key}.
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        api_key: Optional[bytes] = None,
        chunk_interval: float = 0.0,
        control: bool = False,
        record: bool = True,
        prefix: str = "/v1",
        azure: bool = False,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._prefix = prefix.rstrip("/")
        self._azure = azure
        self._stored: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._api_key = api_key
        self.chunk_interval = chunk_interval
        self._control = control
        self._record = record
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self._streams: list[_Stream] = []
        self._limited_once = False
        self._waiters: list[tuple[int, Callable[[], None]]] = []
        self._serial = 0
        self._mode: dict[str, Any] = {"mode": "normal"}

    def set_mode(self, mode: dict[str, Any]) -> None:
        """
        How every API request is answered from now on, whatever its model
        (C{POST /_fake/mode} with this as its JSON body):

            - C{{"mode": "normal"}}: as the model says (the default);
            - C{{"mode": "status", "status": 503, "retry_after": "2"}}: that
              status with an OpenAI-shaped error, and C{retry-after} when
              given;
            - C{{"mode": "hang"}}: never answers (a server that accepted the
              connection and queued the request);
            - C{{"mode": "hang-after-head"}}: a 200 event-stream head, then
              nothing.

        @raise ValueError: for any other mode.
        """
        if mode.get("mode") not in ("normal", "status", "hang", "hang-after-head"):
            raise ValueError(f"unknown mode {mode.get('mode')!r}")
        if mode["mode"] == "status" and not isinstance(mode.get("status"), int):
            raise ValueError("mode status needs an integer status")
        self._mode = dict(mode)

    def _misbehave(self, request: Request) -> bytes | int | None:
        """
        The answer the mode set by L{set_mode} gives instead of the real
        one, if any.
        """
        mode = self._mode
        if mode["mode"] == "status":
            request.setResponseCode(mode["status"])
            if mode.get("retry_after") is not None:
                request.setHeader(b"retry-after", str(mode["retry_after"]).encode("ascii"))
            kind = "requests" if mode["status"] == 429 else "server_error"
            return self._json(request, _error(f"Fake status {mode['status']} (mode).", kind, None))
        if mode["mode"] in ("hang", "hang-after-head"):
            request.notifyFinish().addErrback(lambda _: self._count_disconnect())
            if mode["mode"] == "hang-after-head":
                request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
                request.write(b"")
            return NOT_DONE_YET
        return None

    # Dispatch.

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("ascii")
        if self._control and path.startswith("/_fake/"):
            return self._render_control(request, method, path)
        content: IO[bytes] = request.content  # type: ignore[assignment]
        body = content.read()
        if self._record:
            self.requests.append(
                RecordedRequest(
                    method,
                    path,
                    {
                        name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                        for name, values in request.requestHeaders.getAllRawHeaders()
                    },
                    body,
                    getattr(request.getClientAddress(), "port", 0),
                    request.uri.partition(b"?")[2].decode("latin-1"),
                    self._clock.seconds(),
                )
            )
        api_path = self._api_path(request, path)
        if api_path is None:
            request.setResponseCode(404)
            return self._json(request, _error(f"Invalid URL ({method} {path})", "invalid_request_error", None))
        refused = self._check_key(request)
        if refused is not None:
            return refused
        if self._azure and api_path.startswith("/responses") and self._azure_version(request) < "2025-03-01":
            # As Azure answers an older api-version on the Responses API.
            request.setResponseCode(400)
            return self._json(
                request,
                _error(
                    "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later",
                    "invalid_request_error",
                    "BadRequest",
                ),
            )
        self._serial += 1
        request.setHeader(b"x-request-id", b"req_fake_%d" % (self._serial,))
        request.setHeader(b"openai-processing-ms", b"7")
        instead = self._misbehave(request)
        if instead is not None:
            return instead
        if api_path == "/models" or api_path.startswith("/models/"):
            if method != "GET":
                return self._not_allowed(request)
            return self._render_models(request, api_path)
        if api_path.startswith("/responses/"):
            return self._render_stored(request, method, api_path[len("/responses/") :])
        if method != "POST":
            return self._not_allowed(request)
        if api_path in ("/audio/transcriptions", "/audio/translations"):
            form = fake_routes.parse_form(request.getHeader(b"content-type") or b"", body)
            if form is None or not isinstance(form.get("file"), bytes) or not form.get("model"):
                request.setResponseCode(400)
                return self._json(request, _error("bad multipart body", "invalid_request_error", None))
            if form.get("stream") == "true":
                return self._stream(request, fake_routes.transcription_events(form))
            return self._json(request, json.dumps(fake_routes.transcription(form)).encode())
        try:
            document = json.loads(body)
            assert isinstance(document, dict)
        except (ValueError, AssertionError):
            request.setResponseCode(400)
            return self._json(request, _error("bad body", "invalid_request_error", None))
        if api_path == "/chat/completions":
            try:
                model = document["model"]
                prompt = str(document["messages"][-1].get("content", ""))
            except (KeyError, IndexError, TypeError, AttributeError):
                request.setResponseCode(400)
                return self._json(request, _error("bad body", "invalid_request_error", None))
            request.setHeader(b"set-cookie", b"__cf_bm=fake-session; path=/; HttpOnly")
            request.setHeader(b"x-ratelimit-remaining-requests", b"4999")
            return self._render_chat(request, document, model, prompt)
        return self._render_route(request, api_path, document)

    def _api_path(self, request: Request, path: str) -> Optional[str]:
        """
        The OpenAI path a request asks for (C{/chat/completions}), or
        C{None} where the real service would answer 404.
        """
        if not self._azure:
            return path[len(self._prefix) :] if path.startswith(self._prefix + "/") else None
        args: dict[bytes, list[bytes]] = request.args or {}
        if not args.get(b"api-version"):
            return None
        match = re.match(r"^/openai/deployments/[^/]+(/.*)$", path)
        if match is not None:
            return match.group(1)
        return path[len("/openai") :] if path.startswith("/openai/") else None

    @staticmethod
    def _azure_version(request: Request) -> str:
        args: dict[bytes, list[bytes]] = request.args or {}
        return args.get(b"api-version", [b""])[0].decode("latin-1")

    def _check_key(self, request: Request) -> Optional[bytes]:
        if self._api_key is None:
            return None
        if self._azure:
            if request.getHeader(b"api-key") == self._api_key:
                return None
            request.setResponseCode(401)
            return self._json(
                request,
                _error("Access denied due to invalid subscription key.", "invalid_request_error", "401"),
            )
        presented = request.getHeader(b"authorization") or b""
        if presented == b"Bearer " + self._api_key:
            return None
        # As OpenAI does, quote the end of the key it refused.
        shown = presented[-4:].decode("latin-1")
        request.setResponseCode(401)
        return self._json(
            request,
            _error(f"Incorrect API key provided: sk-****{shown}.", "invalid_request_error", "invalid_api_key"),
        )

    def _not_allowed(self, request: Request) -> bytes:
        request.setResponseCode(405)
        return self._json(request, _error("Method not allowed", "invalid_request_error", None))

    def _render_route(self, request: Request, api_path: str, document: dict[str, Any]) -> bytes | int:
        """
        The JSON routes other than chat.
        """
        created = int(self._clock.seconds())
        stream = document.get("stream") is True
        if api_path == "/embeddings":
            return self._json(request, json.dumps(fake_routes.embeddings(document)).encode())
        if api_path == "/completions":
            ident = f"cmpl-fake{self._serial}"
            if stream:
                return self._stream(request, fake_routes.completion_events(document, ident, created))
            return self._json(request, json.dumps(fake_routes.completion(document, ident, created)).encode())
        if api_path == "/responses":
            ident = f"resp_fake{self._serial}"
            self._stored[ident] = (document, fake_routes.response_object(document, ident, created))
            if stream:
                return self._stream(request, fake_routes.response_events(document, ident, created))
            return self._json(request, json.dumps(self._stored[ident][1]).encode())
        if api_path == "/moderations":
            return self._json(request, json.dumps(fake_routes.moderation(document, f"modr-{self._serial}")).encode())
        if api_path == "/images/generations":
            return self._json(request, json.dumps(fake_routes.image(document, created)).encode())
        if api_path == "/audio/speech":
            request.setHeader(b"content-type", b"audio/mpeg")
            return self._stream(request, fake_routes.speech(document), content_type=b"audio/mpeg")
        request.setResponseCode(404)
        return self._json(request, _error(f"Invalid URL (POST {api_path})", "invalid_request_error", None))

    def _render_stored(self, request: Request, method: str, rest: str) -> bytes | int:
        """
        C{/responses/{id}}, C{.../input_items}, C{.../cancel}.
        """
        ident, _, action = rest.partition("/")
        stored = self._stored.get(ident)
        if stored is None:
            request.setResponseCode(404)
            return self._json(request, _error(f"No response found with id '{ident}'.", "invalid_request_error", None))
        document, response = stored
        if (method, action) == ("GET", ""):
            args: dict[bytes, list[bytes]] = request.args or {}
            if args.get(b"stream") == [b"true"]:
                return self._stream(request, fake_routes.response_events(document, ident, response["created_at"]))
            return self._json(request, json.dumps(response).encode())
        if (method, action) == ("DELETE", ""):
            del self._stored[ident]
            return self._json(request, json.dumps({"id": ident, "object": "response", "deleted": True}).encode())
        if (method, action) == ("GET", "input_items"):
            given = document.get("input")
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": str(given)}]}]
            return self._json(request, json.dumps({"object": "list", "data": items, "has_more": False}).encode())
        if (method, action) == ("POST", "cancel"):
            return self._json(request, json.dumps(dict(response, status="cancelled")).encode())
        return self._not_allowed(request)

    def _stream(
        self,
        request: Request,
        events: list[bytes],
        content_type: bytes = b"",
        gated_after: Optional[int] = None,
        ending: str = "finish",
    ) -> int:
        """
        Send C{events} one by one, paced by C{chunk_interval}, as an event
        stream unless C{content_type} says otherwise.

        @param gated_after: stop after this many events, then end as
            C{ending} says (see L{_pump}); C{linger} waits
            L{PAUSE_SECONDS} after the last event before ending the body.
        """
        stream = _Stream(request, events, gated_after, ending)
        request.setHeader(b"content-type", content_type or b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.notifyFinish().addErrback(lambda _: self._stream_lost(stream))
        self._streams.append(stream)
        request.write(b"")
        self._pump(stream)
        return NOT_DONE_YET

    #: What C{GET /v1/models} lists.
    MODELS = ("gpt-4o", "gpt-4o-mini", "o3")

    def _render_models(self, request: Request, path: str) -> bytes:
        def model(name: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": 1700000000, "owned_by": "openai"}

        _, _, rest = path.partition("/models")
        name = rest.lstrip("/")
        if not name:
            return self._json(request, json.dumps({"object": "list", "data": [model(m) for m in self.MODELS]}).encode())
        if name not in self.MODELS:
            request.setResponseCode(404)
            return self._json(
                request, _error(f"The model '{name}' does not exist", "invalid_request_error", "model_not_found")
            )
        return self._json(request, json.dumps(model(name)).encode())

    def _render_control(self, request: Request, method: str, path: str) -> bytes | int:
        if path == "/_fake/requests" and method == "GET":
            recorded = [
                {
                    "method": r.method,
                    "path": r.path,
                    "headers": r.headers,
                    "body": r.body.decode("utf-8", "replace"),
                    "peer_port": r.peer_port,
                    "query": r.query,
                    "at": r.at,
                }
                for r in self.requests
            ]
            return self._json(request, json.dumps(recorded).encode())
        if path == "/_fake/release" and method == "POST":
            released = self.release()
            return self._json(request, json.dumps({"released": released}).encode())
        if path == "/_fake/disconnects" and method == "GET":
            return self._render_disconnects(request)
        if path == "/_fake/mode" and method == "POST":
            content: IO[bytes] = request.content  # type: ignore[assignment]
            try:
                mode = json.loads(content.read())
                assert isinstance(mode, dict)
                self.set_mode(mode)
            except (ValueError, AssertionError) as e:
                request.setResponseCode(400)
                return self._json(request, _error(f"bad mode: {e}", "invalid_request_error", None))
            return self._json(request, json.dumps(self._mode).encode())
        request.setResponseCode(404)
        return self._json(request, _error("no such control route", "invalid_request_error", None))

    def _render_disconnects(self, request: Request) -> bytes | int:
        """
        Answer with the number of client disconnects seen, once it reaches
        C{at_least} or C{within} seconds have passed, whichever is first:
        a test waits for an event without polling or sleeping.
        """
        args: dict[bytes, list[bytes]] = request.args or {}
        at_least = int(args.get(b"at_least", [b"0"])[0])
        within = float(args.get(b"within", [b"1"])[0])

        def answer() -> bytes:
            return self._json(request, json.dumps({"disconnects": self.disconnects}).encode())

        if self.disconnects >= at_least:
            return answer()

        def respond() -> None:
            if call.active():
                call.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            request.write(answer())
            request.finish()

        waiter = (at_least, respond)
        call = self._clock.callLater(within, respond)
        self._waiters.append(waiter)
        return NOT_DONE_YET

    def _render_chat(self, request: Request, document: dict[str, Any], model: str, prompt: str) -> bytes | int:
        if model == "fake-429" or (model == "fake-429-once" and not self._limited_once):
            self._limited_once = True
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"1" if model == "fake-429" else b"0")
            if model == "fake-429-once":
                request.setHeader(b"retry-after-ms", b"20")
            request.setHeader(b"x-ratelimit-limit-requests", b"5000")
            request.setHeader(b"x-ratelimit-remaining-requests", b"0")
            request.setHeader(b"x-ratelimit-reset-requests", b"1s")
            return self._json(
                request,
                _error("Rate limit reached for requests (fake).", "requests", "rate_limit_exceeded"),
            )
        if model == "fake-500":
            request.setResponseCode(500)
            return self._json(request, _error("The server had an error (fake).", "server_error", None))
        if model == "fake-redirect":
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://127.0.0.1:9/elsewhere")
            return b""
        if model == "fake-silent":
            request.notifyFinish().addErrback(lambda _: self._count_disconnect())
            return NOT_DONE_YET

        text = f"This is a mock reply to: {prompt[:200]}"
        created = int(self._clock.seconds())
        ident = f"chatcmpl-fake{self._serial}"
        usage: dict[str, Any] = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage["prompt_tokens_details"] = {"cached_tokens": 1}
        usage["completion_tokens_details"] = {"reasoning_tokens": 3}
        if document.get("stream") is not True:
            completion = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            body = json.dumps(completion).encode()
            if model == "fake-crash":
                # Announce the whole body, send half, and close.
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"content-length", b"%d" % (len(body),))
                request.write(body[: len(body) // 2])
                request.loseConnection()
                return NOT_DONE_YET
            return self._json(request, body)

        include_usage = bool((document.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: Optional[str] = None, **more: Any) -> bytes:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **more,
            }
            if include_usage:
                # As OpenAI does: with include_usage, every other chunk
                # carries "usage": null.
                payload["usage"] = None
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        words = text.split(" ")
        events += [chunk({"content": (" " if i else "") + w}) for i, w in enumerate(words)]
        events.append(chunk({}, "stop"))
        if include_usage:
            events.append(
                b"data: "
                + json.dumps(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                ).encode()
                + b"\n\n"
            )
        events.append(b"data: [DONE]\n\n")
        if model == "fake-linger":
            return self._stream(request, events, ending="linger")
        ending = {"fake-stall": "stall", "fake-crash": "crash", "fake-gated": "gate", "fake-pause": "pause"}
        if model in ending:
            return self._stream(request, events, gated_after=2, ending=ending[model])
        return self._stream(request, events)

    # Streams.

    def _pump(self, stream: _Stream) -> None:
        stream.call = None
        while not stream.done:
            if stream.gated_after is not None and stream.sent >= stream.gated_after:
                if stream.ending == "crash":
                    # Close without the final chunk, as a dying server
                    # would.  (An abort would also discard what is still
                    # buffered, possibly the response head itself.)
                    stream.done = True
                    stream.request.loseConnection()
                if stream.ending == "pause":
                    # Silent for PAUSE_SECONDS, then the rest.
                    stream.gated_after = None
                    stream.call = self._clock.callLater(PAUSE_SECONDS, self._pump, stream)
                # "stall" and "gate" wait here; release() resumes a gate.
                return
            if stream.sent >= len(stream.events):
                if stream.ending == "linger":
                    stream.ending = "finish"
                    stream.call = self._clock.callLater(PAUSE_SECONDS, self._pump, stream)
                    return
                stream.done = True
                self._streams.remove(stream)
                stream.request.finish()
                return
            stream.request.write(stream.events[stream.sent])
            stream.sent += 1
            # The last event ends the body at once, as OpenAI's does: a
            # client that hangs up right after "data: [DONE]" finds the
            # stream complete.
            if self.chunk_interval > 0 and stream.sent < len(stream.events):
                stream.call = self._clock.callLater(self.chunk_interval, self._pump, stream)
                return

    def release(self) -> int:
        """
        Let every gated stream send the rest of its events.
        """
        gated = [s for s in self._streams if s.ending == "gate" and not s.done]
        for stream in gated:
            stream.gated_after = None
            if stream.call is None:
                self._pump(stream)
        return len(gated)

    def _stream_lost(self, stream: _Stream) -> None:
        self._count_disconnect()
        stream.done = True
        if stream.call is not None and stream.call.active():
            stream.call.cancel()
        if stream in self._streams:
            self._streams.remove(stream)

    def _count_disconnect(self) -> None:
        self.disconnects += 1
        for at_least, respond in list(self._waiters):
            if self.disconnects >= at_least:
                respond()

    @staticmethod
    def _json(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return body


def listen(reactor: Any, upstream: FakeUpstream, port: int = 0, tls_pem: Optional[bytes] = None) -> Any:
    """
    Serve C{upstream} on loopback; return the listening port.

    @param tls_pem: a PEM private key and certificate to serve https with.
    """
    site = _QuietSite(upstream, reactor=reactor)
    if tls_pem is not None:
        from twisted.internet.ssl import PrivateCertificate

        options = PrivateCertificate.loadPEM(tls_pem).options()
        return reactor.listenSSL(port, site, options, interface="127.0.0.1")
    return reactor.listenTCP(port, site, interface="127.0.0.1")


class _QuietSite(Site):
    """
    A site without access log or factory start/stop lines: the proxy in
    front already logs each request.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


def main(argv: Optional[list[str]] = None, reactor: Any = None, out: Callable[[str], None] = print) -> None:
    """
    Run the fake upstream as a real HTTP server until killed.  The key it
    demands, if any, is read from C{OPENAI_API_KEY}.
    """
    parser = argparse.ArgumentParser(prog="python -m oaiproxy.fake.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--chunk-interval", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--tls-pem", help="serve https with this PEM file (private key and certificate)")
    parser.add_argument("--prefix", default="/v1", help="the path the API is served below (default /v1)")
    parser.add_argument("--azure", action="store_true", help="behave like Azure OpenAI (deployments, api-key)")
    args = parser.parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor
    key = os.environ.get("OPENAI_API_KEY")
    upstream = FakeUpstream(
        reactor,
        api_key=key.encode() if key else None,
        chunk_interval=args.chunk_interval,
        control=True,
        prefix=args.prefix,
        azure=args.azure,
    )
    pem = None
    if args.tls_pem:
        with open(args.tls_pem, "rb") as f:
            pem = f.read()
    port = listen(reactor, upstream, args.port, pem)
    scheme = "https" if pem else "http"
    base = "" if args.azure else args.prefix.rstrip("/")
    out(f"fake upstream listening on {scheme}://127.0.0.1:{port.getHost().port}{base}")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
