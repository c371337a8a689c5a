"""
End to end, the routes beyond chat completions and the upstream kinds: the
real daemon in front of the fake upstream (as a real server, as an
OpenAI-compatible server below another base path, or as Azure OpenAI),
driven by the official C{openai} SDK.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Mapping, Sequence

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake_routes import speech
from oaiproxy.testing import start_fake_upstream, start_proxy
from tests.support import temp_dir
from tests.test_e2e import CLIENT_KEY, MESSAGES, REPLY, UPSTREAM_KEY, E2ETestCase, http


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
