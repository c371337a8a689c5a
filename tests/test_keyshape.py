"""
The shape of a real OpenAI key: found anywhere in a text, and blanked.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.keyshape import OPENAI_KEY_MARKER, contains_openai_key, redact_openai_keys
from oaiproxy.web import shown_path

PROJECT_KEY = b"sk-proj-" + b"Ab1_Cd2-" * 7 + b"Ef" + OPENAI_KEY_MARKER + b"Gh3-Ij4_" * 7 + b"Kl"
LEGACY_KEY = b"sk-" + b"A1b2C3d4e5" * 2 + OPENAI_KEY_MARKER + b"f6G7h8I9j0" * 2


class RedactTests(SynchronousTestCase):
    def test_every_key_blanked(self) -> None:
        """
        Each key in a text is replaced, whatever surrounds it; the rest of
        the text is kept.
        """
        text = b"/v1/models/" + PROJECT_KEY + b"/and/" + LEGACY_KEY
        self.assertTrue(contains_openai_key(text))
        self.assertEqual(redact_openai_keys(text), b"/v1/models/<redacted>/and/<redacted>")

    def test_not_a_key_kept(self) -> None:
        """
        Lookalikes (the marker alone, an sk- dummy key, a LiteLLM key) are
        left as they are.
        """
        for text in (OPENAI_KEY_MARKER, b"sk-1234", b"sk-litellm-" + b"a" * 40, b"/v1/chat/completions"):
            self.assertFalse(contains_openai_key(text), text)
            self.assertEqual(redact_openai_keys(text), text)

    def test_shown_path(self) -> None:
        """
        The path shown in a log line or a 404 has no query string and no
        key.
        """
        self.assertEqual(shown_path(b"/v1/models/" + PROJECT_KEY + b"?api_key=x"), "/v1/models/<redacted>")
        self.assertEqual(shown_path(b"/v1/chat/completions?api_key=sk-QUERY"), "/v1/chat/completions")
        escaped = b"".join(b"%%%02X" % byte for byte in PROJECT_KEY)
        self.assertEqual(shown_path(b"/v1/models/" + escaped), "/v1/models/<redacted>")
        self.assertEqual(shown_path(b"/v1/files/a%20b"), "/v1/files/a%20b")
