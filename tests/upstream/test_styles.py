"""
Where each upstream style sends a route, and how it presents the key.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import api_base
from oaiproxy.routetable import BY_NAME
from oaiproxy.upstream.styles import AzureStyle, OpenAIStyle, is_path_segment, route_of


class OpenAIStyleTests(SynchronousTestCase):
    def test_paths_as_sent(self) -> None:
        style = OpenAIStyle()
        self.assertEqual(style.target("/chat/completions", "gpt-4o"), "/chat/completions")
        self.assertEqual(style.target("/responses/r_1", None, b"stream=true"), "/responses/r_1?stream=true")
        self.assertEqual(style.credential(b"sk-x"), (b"authorization", b"Bearer sk-x"))
        self.assertFalse(style.needs_model(BY_NAME["images/generations"]))


class AzureStyleTests(SynchronousTestCase):
    style = AzureStyle("2024-10-21", {"gpt-4o": "prod-4o"})

    def test_deployment_routes(self) -> None:
        """
        Model-scoped routes go below the deployment the map names (or the
        model's own name), with the api-version.
        """
        self.assertEqual(
            self.style.target("/chat/completions", "gpt-4o"),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
        )
        self.assertEqual(
            self.style.target("/audio/transcriptions", "whisper"),
            "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
        )
        self.assertEqual(
            self.style.target("/embeddings", "a/b c"),
            "/openai/deployments/a%2Fb%20c/embeddings?api-version=2024-10-21",
        )

    def test_resource_routes(self) -> None:
        """
        The Responses API and the model list are resource-wide; the client's
        own api-version is replaced, its other parameters kept.
        """
        self.assertEqual(self.style.target("/responses", "gpt-4o"), "/openai/responses?api-version=2024-10-21")
        self.assertEqual(
            self.style.target("/responses/r_1", None, b"api-version=1999&stream=true"),
            "/openai/responses/r_1?stream=true&api-version=2024-10-21",
        )
        self.assertEqual(self.style.target("/models", None), "/openai/models?api-version=2024-10-21")

    def test_default_versions(self) -> None:
        """
        Without --azure-api-version, the Responses API gets the first
        version Azure serves it on; the rest the GA version.  An explicit
        version is used everywhere.
        """
        default = AzureStyle()
        self.assertTrue(default.target("/embeddings", "e").endswith("?api-version=2024-10-21"))
        self.assertTrue(default.target("/responses", "m").endswith("?api-version=2025-04-01-preview"))
        self.assertTrue(AzureStyle("2025-06-01").target("/responses", "m").endswith("?api-version=2025-06-01"))

    def test_body_model(self) -> None:
        """
        Only resource-wide routes need the deployment in the body.
        """
        self.assertEqual(self.style.body_model(BY_NAME["responses"], "gpt-4o"), "prod-4o")
        self.assertIsNone(self.style.body_model(BY_NAME["responses"], "other"))
        self.assertIsNone(self.style.body_model(BY_NAME["chat/completions"], "gpt-4o"))
        self.assertIsNone(OpenAIStyle().body_model(BY_NAME["responses"], "gpt-4o"))

    def test_key_header(self) -> None:
        self.assertEqual(self.style.credential(b"k"), (b"api-key", b"k"))
        self.assertTrue(self.style.needs_model(BY_NAME["images/generations"]))
        self.assertFalse(self.style.needs_model(BY_NAME["responses"]))


class RouteOfTests(SynchronousTestCase):
    def test_longest_match(self) -> None:
        self.assertIs(route_of("/completions"), BY_NAME["completions"])
        self.assertIs(route_of("/chat/completions"), BY_NAME["chat/completions"])
        self.assertIs(route_of("/responses/r/cancel"), BY_NAME["responses"])
        self.assertIsNone(route_of("/files"))


class ApiBaseTests(SynchronousTestCase):
    def test_v1_added_to_a_bare_host(self) -> None:
        """
        A bare host gets /v1 (Ollama, vLLM, LM Studio documented as
        http://host:port); a URL with a path is kept (OpenRouter's
        /api/v1); Azure's host is never changed.
        """
        self.assertEqual(api_base("http://localhost:11434", "openai"), "http://localhost:11434/v1")
        self.assertEqual(api_base("http://localhost:8000/v1", "openai"), "http://localhost:8000/v1")
        self.assertEqual(api_base("https://openrouter.ai/api/v1", "openai"), "https://openrouter.ai/api/v1")
        self.assertEqual(api_base("https://r.openai.azure.com", "azure"), "https://r.openai.azure.com")


class PathSegmentTests(SynchronousTestCase):
    """
    What may stand as one segment of an upstream path (an id, a
    deployment).
    """

    def test_refused(self) -> None:
        for text in [
            "",
            ".",
            "..",
            "../files",
            "a/b",
            "a\\b",
            "..;x",
            "%2e%2e",
            "%2F",
            "\uff0e\uff0e",
            "a\uff0fb",
            "a\x00",
            "a\r\nb",
            "\x7f",
            "\x85",
            # Dots with whitespace around them, which a server that trims
            # its segments (IIS, and Windows paths below it) reads as dots.
            " ..",
            ".. ",
            " . ",
            "\u3000..",
            "..\u00a0",
            " ",
            " ..;x",
            "...",
            "\t",
        ]:
            self.assertFalse(is_path_segment(text), repr(text))

    def test_accepted(self) -> None:
        for text in [
            "o3",
            "ft:gpt-4o-mini:org:custom:abc",
            "llama3.1:8b",
            ".hidden",
            "a b",
            "résumé",
            "resp_1",
            "v1.2.",
            "a .b",
        ]:
            self.assertTrue(is_path_segment(text), repr(text))

    def test_addressable(self) -> None:
        """
        A built path is addressable when each of its segments decodes to
        one; an Azure deployment is one of them.
        """
        openai, azure = OpenAIStyle(), AzureStyle(None, {"m": "../x"})
        self.assertTrue(openai.addressable("/models/o3", None))
        self.assertTrue(openai.addressable("/chat/completions", "../x"))
        for path in ["/models/..", "/models/..%2Ffiles", "/models//x", "/models/%252e", "models", "/models/%ff"]:
            self.assertFalse(openai.addressable(path, None), path)
        self.assertTrue(azure.addressable("/chat/completions", "gpt-4o"))
        self.assertFalse(azure.addressable("/chat/completions", "m"))
        self.assertFalse(azure.addressable("/embeddings", ".."))
        # Resource-wide routes take the model in the body, not the path.
        self.assertTrue(azure.addressable("/responses", ".."))

    def test_addressable_asked_again(self) -> None:
        """
        The answer is the same the second time a path is asked about (short
        paths' answers are kept), and for a path longer than those kept.
        """
        openai = OpenAIStyle()
        long_id = "r" * 300
        for _ in range(2):
            self.assertTrue(openai.addressable("/chat/completions", None))
            self.assertFalse(openai.addressable("/responses/..", None))
            self.assertTrue(openai.addressable("/responses/" + long_id, None))
            self.assertFalse(openai.addressable("/responses/" + long_id + "/..", None))
            self.assertFalse(openai.addressable("/responses/" + long_id + "%2F..", None))

    def test_query_is_inert(self) -> None:
        """
        What is not a query character is encoded, so a raw C{#} cannot cut
        the URL short (dropping an api-version after it).
        """
        self.assertEqual(OpenAIStyle().target("/models", None, b"a=1#/../x"), "/models?a=1%23/../x")
        self.assertEqual(OpenAIStyle().target("/models", None, b"q=\xc3\xa9 x&y=%2F"), "/models?q=%C3%A9%20x&y=%2F")
        self.assertEqual(
            AzureStyle("v").target("/responses/r", None, b"a#b&Api-Version=1&api%2dversion=2"),
            "/openai/responses/r?a%23b&api-version=v",
        )
