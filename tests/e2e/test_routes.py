"""
End to end, the routes beyond chat completions and the upstream kinds: the
real daemon in front of the fake upstream (as a real server, as an
OpenAI-compatible server below another base path, or as Azure OpenAI),
driven by the official C{openai} SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry, mint_key
from oaiproxy.fake.processes import start_fake_upstream, start_proxy
from oaiproxy.fake.routes import speech
from tests.e2e.test_proxy import CLIENT_KEY, MESSAGES, REPLY, UPSTREAM_KEY, E2ETestCase, http
from tests.support import temp_dir
from tests.tricks import ID_TRICKS


class AllRoutesTests(E2ETestCase):
    proxy_args: Sequence[str] = ("--routes", "all", "--read-timeout", "5")

    def test_embeddings(self) -> None:
        """
        client.embeddings.create() gets its vectors (the SDK asks for
        base64 and decodes it) and upstream got the request unchanged.
        """
        result = self.client().embeddings.create(model="text-embedding-3-small", input=["one", "two"])
        self.assertEqual([d.embedding for d in result.data], [[0.25, -0.5, 1.0], [0.5, -0.5, 1.0]])
        self.assertEqual(result.usage.prompt_tokens, 2)
        [seen] = self.upstream_requests()
        self.assertEqual(seen["path"], "/v1/embeddings")
        self.assertEqual(json.loads(seen["body"])["input"], ["one", "two"])

    def test_responses(self) -> None:
        """
        client.responses.create(), plain and streamed, then the stored
        response read back and deleted.
        """
        client = self.client()
        response = client.responses.create(model="gpt-4o", input="hello proxy")
        self.assertEqual(response.output_text, "This is a mock response to: hello proxy")
        assert response.usage is not None
        self.assertEqual(response.usage.input_tokens, 2)
        events = list(client.responses.create(model="gpt-4o", input="hello proxy", stream=True))
        kinds = [event.type for event in events]
        self.assertEqual((kinds[0], kinds[-1]), ("response.created", "response.completed"))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        self.assertEqual(text, "This is a mock response to: hello proxy")
        completed = events[-1]
        assert completed.type == "response.completed"
        assert completed.response.usage is not None
        self.assertEqual(completed.response.usage.output_tokens, 8)
        self.assertEqual(client.responses.retrieve(response.id).id, response.id)
        client.responses.delete(response.id)
        with self.assertRaises(openai.NotFoundError):
            client.responses.retrieve(response.id)

    def test_transcription_upload_larger_than_the_read_buffer(self) -> None:
        """
        A 3 MiB upload (many times any socket read) arrives upstream whole:
        the fake upstream reports its size and digest.
        """
        audio = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)
        client = self.client()
        result = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", audio, "audio/wav"))
        self.assertEqual(
            result.text, f"received {len(audio)} bytes sha256 {hashlib.sha256(audio).hexdigest()} for whisper-1"
        )
        with warnings.catch_warnings():
            # The SDK marks translations deprecated (whisper-1 only); the
            # route is still served.
            warnings.simplefilter("ignore", DeprecationWarning)
            translated = client.audio.translations.create(
                model="whisper-1", file=("talk.wav", audio[:1000], "audio/wav")
            )
        self.assertIn("received 1000 bytes", translated.text)

    def test_streamed_transcription(self) -> None:
        """
        A transcription with stream=True comes back as events the SDK
        iterates, ending with the whole text.
        """
        events = list(
            self.client().audio.transcriptions.create(
                model="gpt-4o-transcribe", file=("talk.wav", b"RIFF" * 50_000, "audio/wav"), stream=True
            )
        )
        self.assertEqual(events[-1].type, "transcript.text.done")
        self.assertTrue(events[-1].text.startswith("received 200000 bytes"))
        self.assertEqual("".join(e.delta for e in events[:-1]), events[-1].text)

    def test_speech_moderation_images_completions(self) -> None:
        """
        The remaining routes, each through its SDK method.
        """
        client = self.client()
        audio = client.audio.speech.create(model="tts-1", voice="alloy", input="hello there")
        self.assertEqual(audio.content, b"".join(speech({"input": "hello there"})))
        moderation = client.moderations.create(input="I will kill the process")
        self.assertTrue(moderation.results[0].flagged)
        image = client.images.generate(model="gpt-image-1", prompt="a cat")
        assert image.data is not None
        self.assertTrue(image.data[0].b64_json)
        completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
        self.assertEqual(completion.choices[0].text, "This is a mock completion of: Say hi")
        chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks if c.choices), completion.choices[0].text)

    def test_refusal_then_serving(self) -> None:
        """
        A body refused on a new route (an empty embeddings input) is an
        error the SDK raises with its param, nothing goes upstream, and the
        proxy goes on serving.
        """
        client = self.client()
        with self.assertRaises(openai.BadRequestError) as caught:
            client.embeddings.create(model="text-embedding-3-small", input="")
        self.assertEqual(caught.exception.param, "input")
        self.assertEqual(self.upstream_requests(), [])
        self.assertEqual(client.embeddings.create(model="m", input="ok").data[0].index, 0)


class DisabledRouteTests(E2ETestCase):
    def test_disabled_route(self) -> None:
        """
        With the default routes, embeddings are a 404 that tells the SDK's
        user which option enables them; chat still works.
        """
        client = self.client()
        with self.assertRaises(openai.NotFoundError) as caught:
            client.embeddings.create(model="text-embedding-3-small", input="x")
        self.assertEqual(caught.exception.code, "route_not_enabled")
        self.assertIn("--routes", caught.exception.message)
        self.assertEqual(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content, REPLY
        )


class AzureTests(E2ETestCase):
    """
    The fake upstream as Azure OpenAI: it answers only below /openai, with
    an api-version, to the api-key header.
    """

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.upstream, self.upstream_url = start_fake_upstream(self.cwd, UPSTREAM_KEY, "--azure")
        self.addCleanup(self.upstream.stop)
        self.proxy, self.base = self.start_proxy(
            [
                "--upstream",
                self.upstream_url,
                "--upstream-style",
                "azure",
                "--azure-deployment",
                "gpt-4o=prod-4o",
                "--routes",
                "chat/completions,embeddings,models,responses,audio/transcriptions",
            ]
        )

    def upstream_requests(self) -> list[dict[str, Any]]:
        status, _, body = http("GET", self.upstream_url + "/_fake/requests")
        assert status == 200
        recorded: list[dict[str, Any]] = json.loads(body)
        return recorded

    def test_azure_mapping(self) -> None:
        """
        The SDK talks OpenAI to the proxy; Azure sees its deployment path,
        api-version and api-key, and never the client's key or an
        Authorization header.
        """
        client = self.client()
        completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(completion.choices[0].message.content, REPLY)
        streamed = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in streamed if c.choices), REPLY)
        client.embeddings.create(model="text-embedding-3-small", input="x")
        self.assertEqual([m.id for m in client.models.list()], ["gpt-4o"])
        response = client.responses.create(model="gpt-4o", input="hello proxy")
        self.assertEqual(response.output_text, "This is a mock response to: hello proxy")
        upload = client.audio.transcriptions.create(model="gpt-4o", file=("a.wav", b"RIFF" * 100_000, "audio/wav"))
        self.assertIn("received 400000 bytes", upload.text)
        seen = self.upstream_requests()
        self.assertEqual(
            [(r["path"], r["query"]) for r in seen],
            [
                ("/openai/deployments/prod-4o/chat/completions", "api-version=2024-10-21"),
                ("/openai/deployments/prod-4o/chat/completions", "api-version=2024-10-21"),
                ("/openai/deployments/text-embedding-3-small/embeddings", "api-version=2024-10-21"),
                ("/openai/responses", "api-version=2025-04-01-preview"),
                ("/openai/deployments/prod-4o/audio/transcriptions", "api-version=2024-10-21"),
            ],
        )
        self.assertEqual(json.loads(seen[3]["body"])["model"], "prod-4o")
        for request in seen:
            self.assertEqual(request["headers"]["api-key"], [UPSTREAM_KEY])
            self.assertNotIn("authorization", request["headers"])
            self.assertNotIn(CLIENT_KEY, json.dumps(request["headers"]))


class UpstreamKindTests(SynchronousTestCase):
    """
    The README's example for each OpenAI-compatible server, run against
    the fake upstream serving below that server's base path.
    """

    def kind(self, prefix: str, upstream: str, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
        """
        Start a fake serving below C{prefix} and a proxy given
        C{--upstream} as C{upstream} (C{{host}} filled in), make one
        chat completion and one model list call, return what upstream got.
        """
        cwd = temp_dir(self)
        fake, url = start_fake_upstream(cwd, UPSTREAM_KEY, "--prefix", prefix)
        self.addCleanup(fake.stop)
        host = url[: -len(prefix)]
        env: Mapping[str, str] = {"OPENAI_API_KEY": UPSTREAM_KEY, "OAIPROXY_CLIENT_KEYS": CLIENT_KEY}
        proxy, base = start_proxy(cwd, ["--upstream", upstream.format(host=host), *extra], env)
        self.addCleanup(proxy.stop)
        client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20.0)
        reply = client.chat.completions.create(model="llama3.1", messages=MESSAGES)
        self.assertEqual(reply.choices[0].message.content, REPLY)
        self.assertEqual(len(client.models.list().data), 3)
        status, _, body = http("GET", host + "/_fake/requests")
        recorded: list[dict[str, Any]] = json.loads(body)
        self.assertEqual([r["path"] for r in recorded], [prefix + "/chat/completions", prefix + "/models"])
        return recorded

    def test_vllm(self) -> None:
        self.kind("/v1", "{host}/v1")

    def test_ollama_bare_host(self) -> None:
        """
        Ollama's documented address is the bare host; /v1 is added.
        """
        self.kind("/v1", "{host}")

    def test_lm_studio(self) -> None:
        self.kind("/v1", "{host}/v1/")

    def test_openrouter(self) -> None:
        """
        OpenRouter serves below /api/v1 and wants to know the calling app.
        """
        recorded = self.kind(
            "/api/v1",
            "{host}/api/v1",
            ["--upstream-header", "HTTP-Referer:https://app.example", "--upstream-header", "X-Title:Example App"],
        )
        for request in recorded:
            self.assertEqual(request["headers"]["http-referer"], ["https://app.example"])
            self.assertEqual(request["headers"]["x-title"], ["Example App"])


def raw_request(base: str, method: str, target: bytes, key: str = CLIENT_KEY) -> tuple[int, dict[str, str], bytes]:
    """
    One request with C{target} sent byte for byte on a socket (HTTP
    clients, curl without --path-as-is included, normalise dot-segments
    away), on a connection closed after it.
    """
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=20) as s:
        s.sendall(
            method.encode()
            + b" "
            + target
            + b" HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while body:
            size, _, rest = body.partition(b"\r\n")
            length = int(size, 16)
            decoded, body = decoded + rest[:length], rest[length + 2 :]
            if length == 0:
                break
        body = decoded
    return int(status_line.split()[1]), headers, body


class PathTrickTests(E2ETestCase):
    """
    The path tricks of the in-memory tests, once more on the wire against
    the real daemon: none reaches the upstream.
    """

    proxy_args: Sequence[str] = ("--routes", "all", "--read-timeout", "5")

    def test_no_trick_reaches_upstream(self) -> None:
        """
        Every trick below /v1/models, /models and /v1/responses (each
        action), plus an absolute-form target, is a JSON 404 (not to be
        retried); the upstream has received nothing at the end, while a
        real id sent the same way is forwarded.
        """
        targets: list[tuple[str, str]] = []
        for trick, _ in ID_TRICKS + [("", "empty")]:
            targets += [("GET", "/v1/models/" + trick), ("GET", "/models/" + trick)]
            if trick:
                targets += [
                    ("GET", "/v1/responses/" + trick),
                    ("DELETE", "/v1/responses/" + trick),
                    ("GET", "/v1/responses/" + trick + "/input_items"),
                    ("POST", "/v1/responses/" + trick + "/cancel"),
                ]
        targets.append(("GET", "http://127.0.0.1/v1/models/../files"))
        for method, target in targets:
            status, headers, body = raw_request(self.base, method, target.encode("latin-1"))
            self.assertEqual(status, 404, f"{method} {target}: {body!r}")
            self.assertEqual(set(json.loads(body)["error"]), {"message", "type", "param", "code"})
            self.assertEqual(headers.get("x-should-retry"), "false", f"{method} {target}")
        self.assertEqual(self.upstream_requests(), [])
        status, _, body = raw_request(self.base, "GET", b"/v1/models/o3")
        self.assertEqual((status, json.loads(body)["id"]), (200, "o3"))
        self.assertEqual([r["path"] for r in self.upstream_requests()], ["/v1/models/o3"])


class RefusedUpstreamKeyTests(E2ETestCase):
    """
    The upstream refuses the proxy's key (the fake answers 401, quoting its
    end, to any other key than its own).
    """

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.upstream, self.upstream_url = start_fake_upstream(self.cwd, UPSTREAM_KEY)
        self.addCleanup(self.upstream.stop)
        self.listed = mint_key()
        keys_file = os.path.join(self.cwd, "clients.toml")
        with open(keys_file, "w") as f:
            f.write(file_entry("open", CLIENT_KEY))
            f.write(file_entry("listed", self.listed, ["gpt-4o-mini"]))
        env = {"OPENAI_API_KEY": "sk-proj-REVOKEDREVOKED0123456789wxyz"}
        self.proxy, self.base = self.start_proxy(
            ["--upstream", self.upstream_url, "--client-keys-file", keys_file, "--read-timeout", "5"], env
        )

    def test_one_call_one_upstream_request(self) -> None:
        """
        With the SDK's default retries (two), a chat call, a model list and
        an allow-listed client's filtered list each make exactly one
        upstream request and raise the 502 upstream_auth_failed, without
        upstream's message or the end of the proxy's key.
        """
        calls = [
            lambda: self.client(max_retries=2).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
            lambda: self.client(max_retries=2).models.list(),
            lambda: self.client(max_retries=2, api_key=self.listed).models.list(),
        ]
        for n, call in enumerate(calls, 1):
            with self.assertRaises(openai.InternalServerError) as caught:
                call()
            self.assertEqual(caught.exception.status_code, 502)
            self.assertEqual(caught.exception.code, "upstream_auth_failed")
            self.assertEqual(caught.exception.response.headers["x-should-retry"], "false")
            self.assertNotIn("wxyz", caught.exception.response.text)
            self.assertEqual(len(self.upstream_requests()), n)
        self.proxy.stop()
        self.assertIn("rejected the proxy's API key", self.proxy.output)
