"""
Tests for L{oaiproxy.upstream.poolfile}: the upstreams file, and every
mistake an operator can make in it (each a L{ConfigError} naming the file,
the entry and the field, never quoting a key).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, Secret
from oaiproxy.keyshape import OPENAI_KEY_MARKER
from oaiproxy.upstream.poolfile import (
    check_allow_lists,
    load_upstreams,
    parse_upstreams,
    upstreams_file_path,
)
from tests.support import temp_dir

KEY_1 = "sk-first-SECRET-0123456789"
KEY_2 = "sk-second-SECRET-9876543210"
#: An OpenAI-shaped key, built from parts so that no scanner takes this
#: file for a leak.
REAL_SHAPE = "sk-proj-" + "Ab1_Cd2-" * 7 + "Ef" + OPENAI_KEY_MARKER.decode() + "Gh3-Ij4_" * 7 + "Kl"


def entry(**fields: Any) -> str:
    """
    An C{[[upstreams]]} table with the given fields, as TOML.
    """
    lines = ["[[upstreams]]"]
    for name, value in fields.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{name} = {{ {inner} }}")
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class ParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.path = os.path.join(self.dir, "upstreams.toml")
        for name, key in (("openai-1", KEY_1), ("openai-2", KEY_2), ("azure", "azure-SECRET-key"), ("vllm-key", "v")):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(key + "\n")
        self.environ = {"CREDENTIALS_DIRECTORY": self.dir, "AZURE_KEY": "azure-SECRET-key"}

    def parse(self, text: str, path: str = "") -> Any:
        return parse_upstreams(text.encode("utf-8"), path or self.path, self.environ)

    def assertRefused(self, text: str, *needles: str, path: str = "") -> str:
        """
        Parsing C{text} fails with a message holding the file's name and
        every one of C{needles}, and no key.
        """
        with self.assertRaises(ConfigError) as caught:
            self.parse(text, path)
        message = str(caught.exception)
        for needle in (path or self.path, *needles):
            self.assertIn(needle, message)
        for secret in (KEY_1, KEY_2, "azure-SECRET-key", REAL_SHAPE, "SECRET"):
            self.assertNotIn(secret, message)
        return message

    def test_the_readme_example(self) -> None:
        """
        The README's example file: OpenAI with two keys, Azure as the
        fallback, a local vLLM for one model; every field read.
        """
        readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        start = text.index("```toml\n# upstreams.toml")
        example = text[start + len("```toml\n") : text.index("```", start + 7)]
        upstreams = self.parse(example)
        self.assertEqual([u.name for u in upstreams], ["openai-1", "openai-2", "azure", "vllm"])
        one, two, azure, vllm = upstreams
        self.assertEqual((one.key, two.key), (Secret(KEY_1.encode()), Secret(KEY_2.encode())))
        self.assertEqual(one.key_source, "key_credential openai-1")
        self.assertEqual((one.weight, two.weight, azure.priority, vllm.priority), (2.0, 1.0, 1, 0))
        self.assertEqual(azure.style, "azure")
        self.assertEqual(azure.key, Secret(b"azure-SECRET-key"))
        self.assertEqual(azure.upstream_model("gpt-4o"), "prod-gpt4o")
        self.assertEqual(vllm.models, ("llama-3.1-8b",))
        self.assertEqual(vllm.key, Secret(b"v"))
        self.assertFalse(one.serves("llama-3.1-8b"))
        self.assertTrue(vllm.serves("llama-3.1-8b"))
        self.assertFalse(vllm.serves("gpt-4o"))
        self.assertEqual(vllm.upstream_model("llama-3.1-8b"), "meta-llama/Llama-3.1-8B-Instruct")
        self.assertEqual((vllm.connect_timeout, vllm.first_byte_timeout, vllm.max_concurrent), (2.0, 0.0, 16))
        self.assertEqual(one.headers, ((b"OpenAI-Project", b"proj_example"),))
        self.assertEqual(one.first_byte_timeout, 10.0)

    def test_json_too(self) -> None:
        """
        The same structure in JSON.
        """
        text = json.dumps({"upstreams": [{"name": "a", "url": "http://h:8000", "key_env": "AZURE_KEY"}]})
        (upstream,) = self.parse(text, os.path.join(self.dir, "upstreams.json"))
        self.assertEqual((upstream.name, upstream.url, upstream.weight), ("a", "http://h:8000", 1.0))

    def test_key_file_relative_to_the_file(self) -> None:
        """
        A relative C{key_file} is read from the upstreams file's directory.
        """
        (upstream,) = self.parse(entry(name="a", url="https://x", key_file="openai-2"))
        self.assertEqual(upstream.key, Secret(KEY_2.encode()))

    def test_key_written_in_the_file(self) -> None:
        """
        A key written in the file is refused, saying why and what to use
        instead, without quoting it: under a key-like field, in a
        credential header, or anywhere as an OpenAI key.
        """
        base = {"name": "a", "url": "https://x", "key_env": "AZURE_KEY"}
        for field in ("key", "api_key", "token", "secret", "password"):
            message = self.assertRefused(entry(**base, **{field: "SECRET"}), "upstream 'a'", field, "key_file")
            self.assertIn("never written in the upstreams file", message)
        self.assertRefused(
            entry(**base, headers={"X-Api-Key": "SECRET"}), "headers", "X-Api-Key", "credential", "key_credential"
        )
        self.assertRefused(entry(**base, headers={"X-Title": REAL_SHAPE}), "headers", "OpenAI key", "key_env")
        self.assertRefused(entry(**base, model_map={"a": REAL_SHAPE}), "model_map", "OpenAI key")
        self.assertRefused(
            entry(name="a", url="https://u:SECRET@x", key_env="AZURE_KEY"), "url", "credentials", "key_file"
        )
        self.assertRefused(entry(**base, headers={"Authorization": "Bearer SECRET"}), "Authorization", "never written")

    def test_exactly_one_key_source(self) -> None:
        self.assertRefused(entry(name="a", url="https://x"), "upstream 'a'", "exactly one of", "none given")
        self.assertRefused(
            entry(name="a", url="https://x", key_env="AZURE_KEY", key_file="openai-1"),
            "key_file and key_env given",
        )

    def test_missing_keys(self) -> None:
        """
        A key that cannot be read stops startup naming the entry and field.
        """
        self.assertRefused(entry(name="a", url="https://x", key_file="nope"), "upstream 'a'", "key_file", "not exist")
        self.assertRefused(entry(name="a", url="https://x", key_credential="nope"), "key_credential", "not exist")
        self.assertRefused(entry(name="a", url="https://x", key_credential="../x"), "key_credential", "not a path")
        self.assertRefused(entry(name="a", url="https://x", key_env="UNSET"), "key_env", "UNSET", "not set")
        self.assertRefused(entry(name="a", url="https://x", key_env="A KEY"), "key_env", "variable's name")
        self.environ.pop("CREDENTIALS_DIRECTORY")
        self.assertRefused(
            entry(name="a", url="https://x", key_credential="openai-1"), "CREDENTIALS_DIRECTORY", "LoadCredential"
        )

    def test_unknown_field_and_section(self) -> None:
        self.assertRefused(entry(name="a", url="https://x", key_env="AZURE_KEY", wieght=2), "upstream 'a'", "wieght")
        self.assertRefused("[server]\nport = 1\n", "unknown section", "server")
        self.assertRefused("", "at least one [[upstreams]]")

    def test_duplicate_name(self) -> None:
        """
        A name used twice stops startup, naming it, the field and the
        first entry that has it.
        """
        one = entry(name="a", url="https://x", key_env="AZURE_KEY")
        self.assertRefused(one + one, "upstream 'a'", "name", "entry #1")

    def test_bad_values(self) -> None:
        """
        Each wrong value names the entry and the field.
        """
        base = {"name": "a", "url": "https://x", "key_env": "AZURE_KEY"}
        cases = [
            ({"url": "ftp://x"}, "url"),
            ({"style": "bedrock"}, "style"),
            ({"weight": 0}, "weight"),
            ({"weight": True}, "weight"),
            ({"priority": 1.5}, "priority"),
            ({"models": []}, "models"),
            ({"models": "gpt-4o"}, "models"),
            ({"model_map": {"x": ""}}, "model_map"),
            ({"models": ["o3"], "model_map": {"gpt-4o": "d"}}, "model_map"),
            ({"headers": {"Host": "x"}}, "headers"),
            ({"headers": {"X-T": 1}}, "headers"),
            ({"connect_timeout": 0}, "connect_timeout"),
            ({"read_timeout": "10"}, "read_timeout"),
            ({"first_byte_timeout": -1}, "first_byte_timeout"),
            ({"max_concurrent": 0}, "max_concurrent"),
        ]
        for fields, field in cases:
            self.assertRefused(entry(**{**base, **fields}), "upstream 'a'", field)
        self.assertRefused(entry(url="https://x"), "upstream #1", "name")
        self.assertRefused(entry(name="a", key_env="AZURE_KEY"), "url", "required")

    def test_load_and_path(self) -> None:
        """
        C{load_upstreams} reads the file; a missing one is named by what it
        is, not by the value given (which may be a key by mistake); the
        file is found from the option, the variable or the credential.
        """
        with open(self.path, "w") as f:
            f.write(entry(name="a", url="https://x", key_file="openai-1"))
        (upstream,) = load_upstreams(self.path, self.environ)
        self.assertEqual(upstream.key, Secret(KEY_1.encode()))
        with self.assertRaises(ConfigError) as caught:
            load_upstreams("SECRET", self.environ)
        self.assertEqual(
            str(caught.exception),
            "the upstreams file given does not exist (the value is not shown in case it is a key)",
        )
        self.assertEqual(upstreams_file_path("x", {"OAIPROXY_UPSTREAMS_FILE": "y"}), "x")
        self.assertEqual(upstreams_file_path(None, {"OAIPROXY_UPSTREAMS_FILE": "y"}), "y")
        self.assertIsNone(upstreams_file_path(None, self.environ))
        with open(os.path.join(self.dir, "upstreams"), "w") as f:
            f.write("")
        self.assertEqual(upstreams_file_path(None, self.environ), os.path.join(self.dir, "upstreams"))

    def test_repr_hides_keys(self) -> None:
        upstreams = self.parse(entry(name="a", url="https://x", key_file="openai-1"))
        self.assertNotIn(KEY_1, repr(upstreams))


class AllowListTests(SynchronousTestCase):
    def test_unserved_model(self) -> None:
        """
        A model in a client's allow-list that no upstream serves stops
        startup, naming the client and the model.
        """
        upstreams = parse_upstreams(
            (entry(name="vllm", url="http://h", key_env="K", models=["llama-*"])).encode(), "u.toml", {"K": "k"}
        )
        check_allow_lists(upstreams, {"alice": frozenset({"llama-3"}), "bob": None})
        with self.assertRaises(ConfigError) as caught:
            check_allow_lists(upstreams, {"alice": frozenset({"llama-3", "gpt-4o"})})
        self.assertIn("client 'alice'", str(caught.exception))
        self.assertIn("'gpt-4o'", str(caught.exception))
