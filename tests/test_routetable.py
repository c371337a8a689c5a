"""
The routes beyond chat completions (C{--routes}): disabled routes, each JSON
route's validation, allow-lists, limits and usage, the Responses API's
stored responses, and binary responses.  In memory, through the same
wiring as the daemon.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Limits
from oaiproxy.config import ConfigError
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, registry
from oaiproxy.fake.routes import speech
from oaiproxy.routetable import BY_NAME, ROUTES, parse_routes
from oaiproxy.upstream.styles import AzureStyle
from tests.support import exchange, form
from tests.tricks import ID_TRICKS

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [b"application/json"]}
ALL = [route.name for route in ROUTES]


def post(case: SynchronousTestCase, h: Harness, path: str, document: Any, headers: Any = BEARER) -> tuple[Any, Any]:
    response, body = exchange(case, h, "POST", path, json.dumps(document).encode(), headers)
    return response, body


def error_of(case: SynchronousTestCase, response: Any, body: bytes, status: int, code: str) -> dict[str, Any]:
    case.assertEqual(response.code, status, body)
    error: dict[str, Any] = json.loads(body)["error"]
    case.assertEqual(set(error), {"message", "type", "param", "code"})
    case.assertEqual(error["code"], code)
    return error


class ParseRoutesTests(SynchronousTestCase):
    def test_names(self) -> None:
        """
        Route names are the paths below /v1, comma-separated; 'all' is
        every route; a leading slash or spaces are forgiven.
        """
        self.assertEqual(parse_routes("--routes", "chat/completions, /embeddings"), {"chat/completions", "embeddings"})
        self.assertEqual(parse_routes("--routes", "all"), set(BY_NAME))

    def test_unknown(self) -> None:
        """
        An unknown name is refused with the list of known ones.
        """
        with self.assertRaises(ConfigError) as caught:
            parse_routes("OAIPROXY_ROUTES", "chat/completions,embedding")
        self.assertIn("'embedding'", str(caught.exception))
        self.assertIn("audio/transcriptions", str(caught.exception))
        self.assertRaises(ConfigError, parse_routes, "--routes", " , ")


class DisabledRouteTests(SynchronousTestCase):
    def test_disabled_route_names_the_option(self) -> None:
        """
        A known route that is not enabled is a 404 naming --routes and
        OAIPROXY_ROUTES, for every method and with or without /v1, and
        nothing goes upstream.
        """
        h = Harness(client_keys=[CLIENT_KEY])
        for method, path in [
            ("POST", "/v1/embeddings"),
            ("POST", "/embeddings"),
            ("GET", "/v1/responses/resp_1"),
            ("POST", "/v1/audio/transcriptions"),
        ]:
            response, body = exchange(self, h, method, path, b"{}", BEARER)
            error = error_of(self, response, body, 404, "route_not_enabled")
            self.assertIn("--routes", error["message"])
            self.assertIn("OAIPROXY_ROUTES", error["message"])
        self.assertEqual(h.fake.requests, [])

    def test_unknown_path_keeps_the_v1_hint(self) -> None:
        """
        A path that is no route at all still gets the base URL hint.
        """
        h = Harness(routes=ALL)
        response, body = exchange(self, h, "POST", "/v2/embeddings", b"{}", BEARER)
        message = error_of(self, response, body, 404, "unknown_url")["message"]
        self.assertIn("Set the SDK's base URL to http://<proxy-host>:<port>/v1.", message)

    def test_doubled_v1_is_named(self) -> None:
        """
        C{/v1/v1/...} (a base URL ending in /v1 and a client that adds /v1
        again) is a 404 that says so and names the path that is served,
        not the generic hint that would say to use /v1; nothing goes
        upstream.
        """
        h = Harness(routes=ALL)
        for method, path, served, below in [
            ("POST", "/v1/v1/embeddings", "/v1/embeddings", "/embeddings"),
            ("POST", "/v1/v1/chat/completions", "/v1/chat/completions", "/chat/completions"),
            ("GET", "/v1/v1/v1/models", "/v1/models", "/models"),
        ]:
            response, body = exchange(self, h, method, path, b"{}" if method == "POST" else None, BEARER)
            message = error_of(self, response, body, 404, "unknown_url")["message"]
            self.assertIn(f"({method} {path}): /v1 is doubled. The base URL already ends in /v1", message)
            self.assertIn(f"this is served at {served}.", message)
            self.assertIn(f"http://<proxy-host>:<port>/v1 for a client that adds {below},", message)
            self.assertNotIn("Set the SDK's base URL to http://<proxy-host>:<port>/v1.", message)
        self.assertEqual(h.fake.requests, [])


class ValidationTests(SynchronousTestCase):
    """
    Each JSON route checks its required members before any upstream call.
    """

    cases = [
        ("/v1/embeddings", {"model": "m"}, "input", "missing_required_parameter"),
        ("/v1/embeddings", {"model": "m", "input": ""}, "input", "invalid_value"),
        ("/v1/embeddings", {"model": "m", "input": 5}, "input", "invalid_type"),
        ("/v1/embeddings", {"input": "x"}, "model", "missing_required_parameter"),
        ("/v1/completions", {"model": "m"}, "prompt", "missing_required_parameter"),
        ("/v1/audio/speech", {"model": "tts-1", "input": "hi"}, "voice", "missing_required_parameter"),
        ("/v1/images/generations", {"model": "dall-e-3"}, "prompt", "missing_required_parameter"),
        ("/v1/moderations", {"model": "omni-moderation-latest"}, "input", "missing_required_parameter"),
        ("/v1/moderations", {"model": 3, "input": "x"}, "model", "invalid_type"),
        ("/v1/responses", {"input": "hi"}, "model", "missing_required_parameter"),
    ]

    def test_required_members(self) -> None:
        h = Harness(routes=ALL)
        for path, document, param, code in self.cases:
            response, body = post(self, h, path, document, {b"content-type": [b"application/json"]})
            self.assertEqual(error_of(self, response, body, 400, code)["param"], param, path)
        self.assertEqual(h.fake.requests, [])

    def test_optional_model(self) -> None:
        """
        Moderations and image generation may leave the model to upstream;
        a Responses request may take it from a stored prompt.
        """
        h = Harness(routes=ALL)
        for path, document in [
            ("/v1/moderations", {"input": "hello"}),
            ("/v1/images/generations", {"prompt": "a cat"}),
            ("/v1/responses", {"prompt": {"id": "pmpt_1"}, "input": "hi"}),
        ]:
            response, body = post(self, h, path, document, {b"content-type": [b"application/json"]})
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(h.fake.requests), 3)


class ForwardingTests(SynchronousTestCase):
    def test_embeddings(self) -> None:
        """
        An embeddings request goes upstream byte for byte, and its reported
        usage is recorded and charged.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(tokens_per_minute=10_000)), routes=ALL)
        sent = b'{"model": "text-embedding-3-small",  "input": ["one two", "three"]}'
        response, body = exchange(self, h, "POST", "/v1/embeddings", sent, BEARER)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(json.loads(body)["data"]), 2)
        self.assertEqual(h.fake.requests[0].body, sent)
        self.assertEqual(h.fake.requests[0].path, "/v1/embeddings")
        record = h.records[-1]
        self.assertEqual((record.route, record.model), ("embeddings", "text-embedding-3-small"))
        assert record.usage is not None
        self.assertEqual((record.usage.prompt, record.usage.completion, record.usage.exact), (3, 0, True))

    def test_allow_list_on_every_route(self) -> None:
        """
        A client's allow-list applies to any route naming a model, and a
        client with one must name its model where upstream has a default.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["text-embedding-3-small"]), routes=ALL)
        for path, document in [
            ("/v1/embeddings", {"model": "text-embedding-3-large", "input": "x"}),
            ("/v1/responses", {"model": "gpt-4o", "input": "x"}),
            ("/v1/moderations", {"input": "x"}),
            ("/v1/audio/speech", {"model": "tts-1", "input": "x", "voice": "alloy"}),
        ]:
            response, body = post(self, h, path, document)
            error_of(self, response, body, 403, "model_not_allowed")
        self.assertEqual(h.fake.requests, [])
        response, body = post(self, h, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        self.assertEqual(response.code, 200)

    def test_token_limit_on_embeddings(self) -> None:
        """
        An embeddings input larger than the client's token allowance is
        refused with a 429 before upstream sees it.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(tokens_per_minute=100)), routes=ALL)
        response, body = post(self, h, "/v1/embeddings", {"model": "m", "input": "word " * 400})
        error_of(self, response, body, 429, "rate_limit_exceeded")
        self.assertEqual(h.fake.requests, [])

    def test_embeddings_reserve_no_output(self) -> None:
        """
        A route that generates nothing reserves only its input: a small
        embeddings request fits an allowance a chat request's default
        output reservation would not.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(tokens_per_minute=200)), routes=ALL)
        response, body = post(self, h, "/v1/embeddings", {"model": "m", "input": "a few words"})
        self.assertEqual(response.code, 200, body)

    def test_completions_stream_usage_is_stripped(self) -> None:
        """
        Legacy completions take include_usage like chat: the proxy asks for
        it, records the exact usage, and the client's stream has no trace
        of it.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        response, body = post(
            self, h, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say", "stream": True}
        )
        self.assertEqual(response.code, 200)
        self.assertIn(b'"text": " completion"', body)
        self.assertNotIn(b'"usage"', body)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertIn(b'"include_usage":true', h.fake.requests[0].body)
        usage = h.records[-1].usage
        assert usage is not None
        self.assertTrue(usage.exact)

    def test_speech_is_binary_and_unchanged(self) -> None:
        """
        Speech comes back as the audio bytes upstream sent, with its type.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        response, body = post(self, h, "/v1/audio/speech", {"model": "tts-1", "input": "x" * 40, "voice": "alloy"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"audio/mpeg"])
        self.assertEqual(body, b"".join(speech({"input": "x" * 40})))

    def test_images_usage(self) -> None:
        """
        Image generation reports usage in the Responses API's naming.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        response, body = post(self, h, "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"})
        self.assertEqual(response.code, 200)
        usage = h.records[-1].usage
        assert usage is not None
        self.assertEqual((usage.prompt, usage.completion, usage.exact), (2, 100, True))

    def test_query_string_passed_on(self) -> None:
        """
        A client's query string goes upstream with its request, on every
        route.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        response, _ = exchange(self, h, "POST", "/v1/embeddings?trace=1", b'{"model": "m", "input": "x"}', BEARER)
        self.assertEqual(response.code, 200)
        self.assertEqual(h.fake.requests[-1].query, "trace=1")

    def test_route_labels(self) -> None:
        """
        Each route has its own label in the records (and so the metrics).
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        post(self, h, "/v1/moderations", {"input": "x"})
        post(self, h, "/embeddings", {"model": "m", "input": "x"})
        self.assertEqual([r.route for r in h.records], ["moderations", "embeddings"])
        self.assertIn(b'route="moderations"', exchange(self, h, "GET", "/metrics", None, BEARER)[1])


class ResponsesTests(SynchronousTestCase):
    def test_create_and_usage(self) -> None:
        """
        A response is created upstream; its usage (input/output tokens) is
        recorded exactly.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=["responses"])
        response, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hello there"})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "response")
        usage = h.records[-1].usage
        assert usage is not None
        self.assertEqual((usage.prompt, usage.reasoning, usage.exact), (2, 2, True))

    def test_stream_usage_from_completed_event(self) -> None:
        """
        A streamed response is relayed as events; the usage is read from
        the response.completed event.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=["responses"])
        response, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertIn(b"event: response.output_text.delta", body)
        self.assertIn(b"event: response.completed", body)
        usage = h.records[-1].usage
        assert usage is not None
        self.assertTrue(usage.exact)
        self.assertEqual(usage.prompt, 1)

    def test_stored_response_routes(self) -> None:
        """
        GET, DELETE, input_items and cancel below a response id are
        forwarded with their query strings; other paths and methods are
        JSON 404 and 405.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=["responses"])
        _, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        ident = json.loads(body)["id"]
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}?include[]=x", None, BEARER)
        self.assertEqual((response.code, json.loads(body)["id"]), (200, ident))
        self.assertEqual(unquote(h.fake.requests[-1].query), "include[]=x")
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}/input_items?limit=5", None, BEARER)
        self.assertEqual(json.loads(body)["object"], "list")
        response, body = exchange(self, h, "POST", f"/v1/responses/{ident}/cancel", b"", BEARER)
        self.assertEqual(json.loads(body)["status"], "cancelled")
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}?stream=true", None, BEARER)
        self.assertIn(b"event: response.completed", body)
        response, body = exchange(self, h, "DELETE", f"/v1/responses/{ident}", None, BEARER)
        self.assertEqual(json.loads(body)["deleted"], True)
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}", None, BEARER)
        self.assertEqual(response.code, 404)
        response, body = exchange(self, h, "PUT", f"/v1/responses/{ident}", b"{}", BEARER)
        error_of(self, response, body, 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, DELETE"])
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}/nope", None, BEARER)
        error_of(self, response, body, 404, "unknown_url")

    def test_reading_is_not_charged_again(self) -> None:
        """
        Reading a stored response back does not take from the client's
        token allowance again: the response was charged when it was made.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(tokens_per_minute=100_000)), routes=["responses"])
        client = h.credentials.clients.identify(CLIENT_KEY)
        assert client is not None

        def remaining() -> int:
            return int(dict(h.limiter.headers(client))[b"x-ratelimit-remaining-tokens"])

        _, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        charged = remaining()
        self.assertLess(charged, 100_000)
        exchange(self, h, "GET", f"/v1/responses/{json.loads(body)['id']}", None, BEARER)
        self.assertEqual(h.records[-1].status, 200)
        self.assertEqual(remaining(), charged)

    def test_id_tricks_never_go_upstream(self) -> None:
        """
        A stored response's id is one path segment: every trick, for every
        method and action below it, is an OpenAI-shaped 404 (not to be
        retried) and nothing goes upstream.  (C{../cancel} would otherwise
        POST to /v1/cancel, C{..%2Ffiles} read /v1/files where an upstream
        decodes the slash.)
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL)
        actions = [("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")]
        for trick, why in ID_TRICKS:
            if not trick:
                continue
            for method, action in actions:
                path = "/v1/responses/" + trick + action
                response, body = exchange(self, h, method, path, b"" if method == "POST" else None, BEARER)
                self.assertEqual(response.code, 404, f"{method} {path} ({why})")
                error = json.loads(body)["error"]
                self.assertEqual(set(error), {"message", "type", "param", "code"})
                self.assertIn(error["code"], ("not_found", "unknown_url"), f"{method} {path} ({why})")
                self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])
        self.assertEqual(h.fake.requests, [])

    def test_query_string_cannot_change_the_path(self) -> None:
        """
        A query goes on after the proxy's path, whatever it holds: dots and
        slashes in it stay in the query.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=["responses"])
        _, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        ident = json.loads(body)["id"]
        exchange(self, h, "GET", f"/v1/responses/{ident}?x=/../../files&y=..%2Ffiles", None, BEARER)
        sent = h.fake.requests[-1]
        self.assertEqual((sent.path, sent.query), (f"/v1/responses/{ident}", "x=/../../files&y=..%2Ffiles"))

    def test_stored_routes_need_a_key(self) -> None:
        """
        Reading a stored response is authenticated like creating one.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=["responses"])
        response, body = exchange(self, h, "GET", "/v1/responses/resp_1", None, {})
        error_of(self, response, body, 401, "invalid_api_key")
        self.assertEqual(h.fake.requests, [])


class AzureTests(SynchronousTestCase):
    """
    With the Azure style, the fake upstream behaves like Azure OpenAI: it
    answers 404 to any path outside /openai or without an api-version,
    and 401 without the api-key header.
    """

    def harness(self, **kwargs: Any) -> Harness:
        return Harness(client_keys=[CLIENT_KEY], routes=ALL_AZURE, style=AzureStyle(None, MAP), **kwargs)

    def test_chat_to_the_mapped_deployment(self) -> None:
        h = self.harness()
        response, body = post(
            self, h, "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        )
        self.assertEqual(response.code, 200, body)
        sent = h.fake.requests[0]
        self.assertEqual(
            (sent.path, sent.query), ("/openai/deployments/prod-4o/chat/completions", "api-version=2024-10-21")
        )
        self.assertEqual(sent.headers["api-key"], [UPSTREAM_KEY.decode()])
        self.assertNotIn("authorization", sent.headers)
        # The client's key never goes upstream, under either header.
        self.assertNotIn(CLIENT_KEY.decode(), json.dumps(sent.headers))

    def test_unmapped_model_is_its_own_deployment(self) -> None:
        h = self.harness()
        response, _ = post(self, h, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        self.assertEqual(response.code, 200)
        self.assertEqual(h.fake.requests[0].path, "/openai/deployments/text-embedding-3-small/embeddings")

    def test_model_needed_for_a_deployment(self) -> None:
        """
        Where OpenAI would pick a default model, Azure needs one to find
        the deployment: the request is refused before upstream.
        """
        h = self.harness()
        response, body = post(self, h, "/v1/images/generations", {"prompt": "a cat"})
        self.assertIn("Azure", error_of(self, response, body, 400, "missing_required_parameter")["message"])
        self.assertEqual(h.fake.requests, [])

    def test_responses_and_uploads(self) -> None:
        """
        The Responses API is resource-wide, with its own api-version and
        the deployment named in the body; an upload waits for its model
        field to find its deployment.
        """
        h = self.harness()
        response, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        self.assertEqual(response.code, 200, body)
        sent = h.fake.requests[-1]
        # Azure serves the Responses API from 2025-03-01-preview on, and
        # wants the deployment's name as the model.
        self.assertEqual((sent.path, sent.query), ("/openai/responses", "api-version=2025-04-01-preview"))
        self.assertEqual(json.loads(sent.body), {"model": "prod-4o", "input": "hi"})
        body, content_type = form([("file", b"RIFF" * 1000), ("model", "whisper")])
        headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
        response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", body, headers)
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(h.fake.requests[-1].path, "/openai/deployments/whisper-prod/audio/transcriptions")

    def test_model_is_one_path_segment(self) -> None:
        """
        Azure puts the model's deployment in the path: a model that is not
        one segment (C{../../responses}, C{a/b}, C{..}) is a 404
        model_not_found on every route that names a deployment, the JSON
        routes and uploads alike, and nothing goes upstream.
        """
        h = self.harness()
        for model in ["..", ".", "../../responses", "a/b", "a\\b", "%2e%2e", "\uff0e\uff0e", "x\r\ny"]:
            for path, document in [
                ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                ("/v1/embeddings", {"model": model, "input": "x"}),
            ]:
                response, body = post(self, h, path, document)
                error_of(self, response, body, 404, "model_not_found")
            upload, content_type = form([("model", model), ("file", b"RIFF" * 100)])
            headers = {b"authorization": [b"Bearer " + CLIENT_KEY], b"content-type": [content_type]}
            response, answer = exchange(self, h, "POST", "/v1/audio/transcriptions", upload, headers)
            error_of(self, response, answer, 404, "model_not_found")
        self.assertEqual(h.fake.requests, [])

    def test_mapped_deployment_is_checked_too(self) -> None:
        """
        The last check is on the path as built, so even a deployment name
        from the operator's map cannot leave its segment.
        """
        h = Harness(client_keys=[CLIENT_KEY], routes=ALL_AZURE, style=AzureStyle(None, {"gpt-4o": "../x"}))
        response, body = post(self, h, "/v1/embeddings", {"model": "gpt-4o", "input": "x"})
        error_of(self, response, body, 404, "model_not_found")
        self.assertEqual(h.fake.requests, [])

    def test_client_api_version_replaced_however_spelt(self) -> None:
        """
        The proxy's api-version is the only one upstream sees, however the
        client encodes the name.
        """
        h = self.harness()
        _, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        ident = json.loads(body)["id"]
        exchange(self, h, "GET", f"/v1/responses/{ident}?api%2Dversion=1999&API-Version=1&x=1", None, BEARER)
        self.assertEqual(h.fake.requests[-1].query, "x=1&api-version=2025-04-01-preview")

    def test_model_list_is_the_map(self) -> None:
        """
        Azure lists what a resource could deploy, not its deployments: with
        a map, the client sees the models the map serves.
        """
        h = self.harness()
        response, body = exchange(self, h, "GET", "/v1/models", None, BEARER)
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["gpt-4o", "whisper"])
        response, body = exchange(self, h, "GET", "/v1/models/whisper", None, BEARER)
        self.assertEqual(json.loads(body)["id"], "whisper")
        response, body = exchange(self, h, "GET", "/v1/models/o3", None, BEARER)
        self.assertEqual(response.code, 404)
        self.assertEqual(h.fake.requests, [])


MAP = {"gpt-4o": "prod-4o", "whisper": "whisper-prod"}
ALL_AZURE = [route.name for route in ROUTES if route.azure is not None]


class StoredResponseLimitTests(SynchronousTestCase):
    def test_counted_against_requests_per_minute(self) -> None:
        """
        Reading stored responses names no model (no allow-list applies) but
        counts against the client's request rate.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["gpt-4o"], limits=Limits(requests_per_minute=2)), routes=ALL)
        _, body = post(self, h, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        ident = json.loads(body)["id"]
        response, _ = exchange(self, h, "GET", f"/v1/responses/{ident}", None, BEARER)
        self.assertEqual(response.code, 200)
        response, body = exchange(self, h, "GET", f"/v1/responses/{ident}", None, BEARER)
        error_of(self, response, body, 429, "rate_limit_exceeded")
