"""
Tests for L{oaiproxy.access.clients} and the C{python -m oaiproxy keygen} command
in L{oaiproxy.__main__}: who may use the proxy.

They cover the keys file (TOML or JSON, defaults merged into each client,
model allow-lists), every mistake an operator can make in it (each one a
L{ConfigError} naming the file and the client, never quoting a hash), how a
key is recognised, where L{load_clients} finds the file and how it merges
the keys of C{OAIPROXY_CLIENT_KEYS}, that no repr shows a key or hash,
minting keys, and the keys-file entry that C{keygen} prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.__main__ import main
from oaiproxy.access.clients import (
    KEY_PREFIX,
    Budgets,
    Client,
    ClientRegistry,
    Credentials,
    Limits,
    file_entry,
    hash_key,
    load_clients,
    mint_key,
    parse_clients,
)
from oaiproxy.config import ConfigError, Secret
from oaiproxy.keyshape import OPENAI_KEY_MARKER, contains_openai_key
from oaiproxy.upstream.headers import looks_like_openai_key
from tests.support import temp_dir

ALICE_KEY = "oaiproxy-ALICE-secret-key-0123456789abcdef"
BOB_KEY = "oaiproxy-BOB-secret-key-fedcba9876543210"
UPSTREAM_KEY = b"sk-proj-UPSTREAMSECRET0123456789"

DEFAULTS = """\
[defaults]
requests_per_minute = 600
tokens_per_minute = 400000
concurrent_requests = 16
default_max_tokens = 2048
"""

#: Any run of hex digits this long in a message would be (part of) a hash.
HEX_RUN = re.compile(r"[0-9a-fA-F]{16}")


def toml_entry(**fields: Any) -> str:
    """
    A C{[[clients]]} table with the given fields, in the given order.
    """
    return "[[clients]]\n" + "".join(f"{name} = {json.dumps(value)}\n" for name, value in fields.items())


def alice(**more: Any) -> str:
    """
    The entry for alice, whose key is L{ALICE_KEY}, plus C{more} fields.
    """
    return toml_entry(name="alice", key_sha256=hash_key(ALICE_KEY), **more)


def bob(**more: Any) -> str:
    """
    The entry for bob, whose key is L{BOB_KEY}, plus C{more} fields.
    """
    return toml_entry(name="bob", key_sha256=hash_key(BOB_KEY), **more)


def openai_keys() -> list[bytes]:
    """
    Keys of every OpenAI shape, built from parts so that no secret scanner
    takes this file for a leak.
    """
    marker = OPENAI_KEY_MARKER
    return [
        b"sk-" + b"A1b2C3d4e5" * 2 + marker + b"f6G7h8I9j0" * 2,
        b"sk-proj-" + b"Ab1_Cd2-" * 7 + b"Ef" + marker + b"Gh3-Ij4_" * 7 + b"Kl",
        b"sk-proj-" + b"Ab1_Cd2-Ef" * 7 + b"Gh3-" + marker + b"Ij4_Kl5-Mn" * 7 + b"Op6_",
        b"sk-svcacct-" + b"Ab1_Cd2-Ef" * 7 + b"Gh3-" + marker + b"Ij4_Kl5-Mn" * 7 + b"Op6_",
        b"sk-admin-" + b"Ab1_Cd2-" * 7 + b"Ef" + marker + b"Gh3-Ij4_" * 7 + b"Kl",
    ]


def parse(text: str, path: str = "clients.toml") -> tuple[Limits, list[Client]]:
    return parse_clients(text.encode("utf-8"), path)


def write(directory: str, name: str, text: str) -> str:
    """
    Write a file in C{directory}; return its path.
    """
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ParseClientsTests(SynchronousTestCase):
    """
    A well-formed keys file gives each client its name, hash, limits and
    models.
    """

    def test_defaults_merged_into_clients(self) -> None:
        """
        A client's own limits override C{[defaults]}, the ones it does not
        set come from C{[defaults]}, and a client that sets nothing gets
        the defaults exactly: operators write common limits once.
        """
        defaults, (a, b) = parse(DEFAULTS + alice(tokens_per_minute=100000, models=["gpt-4o-mini"]) + bob())
        self.assertEqual(defaults, Limits(600, 400000, 16, 2048))
        self.assertEqual(a.limits, Limits(600, 100000, 16, 2048))
        self.assertEqual(b.limits, defaults)
        self.assertEqual((a.name, b.name), ("alice", "bob"))
        self.assertEqual(a.key_sha256.hex(), hash_key(ALICE_KEY))

    def test_no_defaults_means_unlimited(self) -> None:
        """
        Without C{[defaults]}, a client without limits is unlimited (and
        gets the built-in output reservation).
        """
        defaults, [a] = parse(alice())
        self.assertEqual(a.limits, Limits())
        self.assertFalse(a.limits.any)
        self.assertEqual(defaults, Limits())

    def test_models_allow_list(self) -> None:
        """
        C{models} becomes a frozenset allow-list: listed models are
        allowed, others are not.
        """
        _, [a] = parse(alice(models=["gpt-4o-mini", "gpt-4o"]))
        self.assertEqual(a.models, frozenset({"gpt-4o-mini", "gpt-4o"}))
        self.assertTrue(a.allows("gpt-4o"))
        self.assertFalse(a.allows("o1"))

    def test_no_models_allows_any(self) -> None:
        """
        A client without C{models} may use any model.
        """
        _, [a] = parse(alice())
        self.assertIsNone(a.models)
        self.assertTrue(a.allows("gpt-4o"))
        self.assertTrue(a.allows("anything-at-all"))

    def test_json_by_suffix(self) -> None:
        """
        A file whose name ends in C{.json} is read as JSON, with the same
        meaning as the TOML form.
        """
        toml = parse(DEFAULTS + alice(tokens_per_minute=100000, models=["gpt-4o-mini"]) + bob())
        document = {
            "defaults": {
                "requests_per_minute": 600,
                "tokens_per_minute": 400000,
                "concurrent_requests": 16,
                "default_max_tokens": 2048,
            },
            "clients": [
                {
                    "name": "alice",
                    "key_sha256": hash_key(ALICE_KEY),
                    "tokens_per_minute": 100000,
                    "models": ["gpt-4o-mini"],
                },
                {"name": "bob", "key_sha256": hash_key(BOB_KEY)},
            ],
        }
        self.assertEqual(parse(json.dumps(document), "clients.json"), toml)

    def test_json_by_leading_brace(self) -> None:
        """
        A file of any name whose first non-blank character is C{{} is read
        as JSON, so a JSON systemd credential needs no special name.
        """
        document = {"clients": [{"name": "alice", "key_sha256": hash_key(ALICE_KEY)}]}
        _, [a] = parse("\n  " + json.dumps(document), "client_keys")
        self.assertEqual(a.name, "alice")
        self.assertEqual(a.key_sha256.hex(), hash_key(ALICE_KEY))

    def test_uppercase_hash(self) -> None:
        """
        A hash written in upper case (as some tools print it) is the same
        hash: the client is still recognised.
        """
        _, clients = parse(toml_entry(name="alice", key_sha256=hash_key(ALICE_KEY).upper()))
        self.assertIs(ClientRegistry(clients).identify(ALICE_KEY.encode()), clients[0])

    def test_empty_file(self) -> None:
        """
        An empty keys file is valid and lists nobody.
        """
        self.assertEqual(parse(""), (Limits(), []))


class ParseClientsErrorTests(SynchronousTestCase):
    """
    Every mistake in a keys file is a L{ConfigError} that says which file
    and which client, so the operator can fix it, and never quotes a hash.
    """

    def assertRefused(self, text: str, *needles: str, path: str = "clients.toml") -> str:
        """
        Parsing C{text} fails with a message holding C{path} and every one
        of C{needles}, and no hash or part of one.
        """
        with self.assertRaises(ConfigError) as caught:
            parse(text, path)
        message = str(caught.exception)
        for needle in (path, *needles):
            self.assertIn(needle, message)
        self.assertNotRegex(message, HEX_RUN)
        return message

    def test_bad_toml(self) -> None:
        """
        A file that is not TOML is refused, naming the file.
        """
        self.assertRefused(alice() + "tokens_per_minute = \n", "neither valid TOML nor JSON")

    def test_bad_json(self) -> None:
        """
        A C{.json} file that is not JSON is refused, naming the file.
        """
        self.assertRefused('{"clients": [', "neither valid TOML nor JSON", path="clients.json")

    def test_not_a_table(self) -> None:
        """
        A JSON document that is not an object is refused.
        """
        self.assertRefused("[1, 2]", "must hold a table", path="clients.json")

    def test_unknown_section(self) -> None:
        """
        A misspelt top-level section (C{[default]}) is refused rather than
        silently ignored, which would leave every client unlimited.
        """
        self.assertRefused("[default]\nrequests_per_minute = 10\n" + alice(), "'default'")

    def test_wrong_shapes(self) -> None:
        """
        C{[defaults]} that is not a table, C{clients} that is not a list,
        and a client that is not a table are refused.
        """
        self.assertRefused("defaults = 5\n", "[defaults] must be a table")
        self.assertRefused('clients = "alice"\n', "clients must be a list")
        self.assertRefused('{"clients": [5]}', "client #1 must be a table", path="clients.json")

    def test_unknown_client_field(self) -> None:
        """
        A typo in a client's field (C{requests_per_min}) is refused with the
        client's name and the field, rather than ignored (which would leave
        the client without the intended limit).
        """
        self.assertRefused(DEFAULTS + alice(requests_per_min=10), "'alice'", "requests_per_min")

    def test_unknown_default(self) -> None:
        """
        A typo in C{[defaults]} is refused, naming the setting.
        """
        self.assertRefused("[defaults]\ntokens_per_min = 10\n" + alice(), "[defaults]", "tokens_per_min")

    def test_missing_or_empty_name(self) -> None:
        """
        A client without a name, or with an empty or blank one, is refused;
        the message says which entry (by position) it is.
        """
        self.assertRefused(alice() + toml_entry(key_sha256=hash_key(BOB_KEY)), "client #2", "name")
        for name in ("", "   "):
            self.assertRefused(toml_entry(name=name, key_sha256=hash_key(BOB_KEY)), "client #1", "name")
        self.assertRefused(toml_entry(name=7, key_sha256=hash_key(BOB_KEY)), "client #1", "name")

    def test_bad_hash(self) -> None:
        """
        A C{key_sha256} that is missing, too short, too long, not hex, or
        not a string is refused naming the client, and the bad value is not
        echoed (it could be a pasted key).
        """
        digest = hash_key(ALICE_KEY)
        self.assertRefused(toml_entry(name="alice"), "'alice'", "key_sha256")
        for value in (digest[:-1], digest + "0", "g" + digest[1:], ALICE_KEY, 12345):
            self.assertRefused(toml_entry(name="alice", key_sha256=value), "'alice'", "key_sha256")
        message = self.assertRefused(toml_entry(name="alice", key_sha256=ALICE_KEY), "'alice'")
        self.assertNotIn(ALICE_KEY, message)

    def test_bad_client_limit(self) -> None:
        """
        A limit that is zero, negative, a boolean, fractional or a string
        is refused, naming the client and the limit.
        """
        for value in (0, -5, True, 1.5, "10"):
            for name in ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "default_max_tokens"):
                self.assertRefused(alice(**{name: value}), "'alice'", name, "positive whole number")

    def test_bad_default_limit(self) -> None:
        """
        A bad limit in C{[defaults]} is refused the same way.
        """
        for value in (0, -1, False, 2.5):
            self.assertRefused(
                f"[defaults]\nrequests_per_minute = {json.dumps(value)}\n" + alice(),
                "[defaults]",
                "requests_per_minute",
            )

    def test_bad_models(self) -> None:
        """
        C{models} must be a list of non-empty model names.
        """
        for value in ("gpt-4o", 5, [1], ["gpt-4o", ""]):
            self.assertRefused(alice(models=value), "'alice'", "models")

    def test_duplicate_name(self) -> None:
        """
        Two clients with one name are refused: logs and limits could not
        tell them apart.
        """
        self.assertRefused(alice() + toml_entry(name="alice", key_sha256=hash_key(BOB_KEY)), "'alice'", "twice")

    def test_duplicate_hash(self) -> None:
        """
        One key listed for two clients is refused (even in another case),
        naming the second client and not the hash.
        """
        again = toml_entry(name="bob", key_sha256=hash_key(ALICE_KEY).upper())
        self.assertRefused(alice() + again, "'bob'", "same key")

    def test_json_errors_name_the_client(self) -> None:
        """
        Mistakes in a JSON file are reported the same way.
        """
        document = {"clients": [{"name": "alice", "key_sha256": hash_key(ALICE_KEY), "concurrent_requests": 0}]}
        self.assertRefused(json.dumps(document), "'alice'", "concurrent_requests", path="clients.json")


class OpenAIHeaderSettingsTests(SynchronousTestCase):
    """
    What a client's entry says about C{OpenAI-Organization} and
    C{OpenAI-Project}: nothing by default (the client's own are dropped),
    fixed values, or C{pass_openai_headers}; per client or in
    C{[defaults]}.
    """

    def test_default_drops(self) -> None:
        """
        An entry that says nothing sets no value and passes nothing.
        """
        _, [client] = parse(alice())
        self.assertEqual((client.organization, client.project, client.pass_openai_headers), (None, None, False))

    def test_per_client(self) -> None:
        """
        Fixed values and C{pass_openai_headers} are read per client.
        """
        _, [a, b] = parse(alice(organization="org-alice", project="proj_alice") + bob(pass_openai_headers=True))
        self.assertEqual((a.organization, a.project, a.pass_openai_headers), ("org-alice", "proj_alice", False))
        self.assertEqual((b.organization, b.project, b.pass_openai_headers), (None, None, True))

    def test_defaults(self) -> None:
        """
        C{[defaults]} sets them for every client that does not say
        otherwise, the keys of C{OAIPROXY_CLIENT_KEYS} included.
        """
        text = (
            '[defaults]\npass_openai_headers = true\nproject = "proj_shared"\n'
            + alice()
            + bob(pass_openai_headers=False, project="proj_bob")
        )
        _, [a, b] = parse(text)
        self.assertEqual((a.project, a.pass_openai_headers), ("proj_shared", True))
        self.assertEqual((b.project, b.pass_openai_headers), ("proj_bob", False))
        path = os.path.join(temp_dir(self), "clients.toml")
        with open(path, "w") as f:
            f.write(text)
        registry = load_clients(path, {"OAIPROXY_CLIENT_KEYS": "env-key-0123456789"})
        env = registry.identify(b"env-key-0123456789")
        assert env is not None
        self.assertEqual((env.name, env.project, env.pass_openai_headers), ("env-1", "proj_shared", True))

    def test_bad_values(self) -> None:
        """
        A value that is not a usable header value, or a flag that is not a
        boolean, is refused with the client and the field named.
        """
        for fields, field in [
            ({"organization": ""}, "organization"),
            ({"organization": 42}, "organization"),
            ({"project": "proj\nInjected: 1"}, "project"),
            ({"project": "proj_\u00e9"}, "project"),
            ({"pass_openai_headers": "yes"}, "pass_openai_headers"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse(alice(**fields))
            self.assertIn("'alice'", str(caught.exception))
            self.assertIn(field, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            parse("[defaults]\npass_openai_headers = 1\n" + alice())
        self.assertIn("[defaults]", str(caught.exception))


class BudgetSettingsTests(SynchronousTestCase):
    """
    Budgets (tokens and dollars, per day and month, in a time zone) are
    read per client and from C{[defaults]}, and every mistake is refused
    with the client and the field named.
    """

    def test_none_by_default(self) -> None:
        """
        An entry that sets no budget has none, over UTC days.
        """
        _, [client] = parse(alice())
        self.assertEqual(client.budgets, Budgets())
        self.assertFalse(client.budgets.any)
        self.assertEqual(str(client.budgets.zone), "UTC")

    def test_defaults_and_overrides(self) -> None:
        """
        C{[defaults]} sets budgets for every client, the keys of
        C{OAIPROXY_CLIENT_KEYS} included; a client's own values override
        them one by one.
        """
        text = (
            '[defaults]\ntokens_per_day = 1000\nusd_per_month = 5\nbudget_timezone = "Europe/Paris"\n'
            + alice(usd_per_month=7.5, tokens_per_month=20000)
            + bob()
        )
        _, [a, b] = parse(text)
        self.assertEqual(a.budgets, Budgets(1000, 20000, None, 7.5, "Europe/Paris"))
        self.assertEqual(b.budgets, Budgets(1000, None, None, 5.0, "Europe/Paris"))
        self.assertTrue(b.budgets.in_usd)
        self.assertFalse(Budgets(tokens_per_day=1).in_usd)
        path = write(temp_dir(self), "clients.toml", text)
        registry = load_clients(path, {"OAIPROXY_CLIENT_KEYS": "env-key-0123456789"})
        env = registry.identify(b"env-key-0123456789")
        assert env is not None
        self.assertEqual(env.budgets, b.budgets)

    def test_bad_values(self) -> None:
        """
        A budget that is not a positive amount, or a zone that is not an
        IANA name, is refused naming the client and the field.
        """
        for fields, field in [
            ({"tokens_per_day": 0}, "tokens_per_day"),
            ({"tokens_per_month": 1.5}, "tokens_per_month"),
            ({"tokens_per_day": True}, "tokens_per_day"),
            ({"usd_per_day": -1}, "usd_per_day"),
            ({"usd_per_month": "10"}, "usd_per_month"),
            ({"budget_timezone": "Mars/Olympus"}, "budget_timezone"),
            ({"budget_timezone": "../etc/passwd"}, "budget_timezone"),
            ({"budget_timezone": 1}, "budget_timezone"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse(alice(**fields))
            self.assertIn("'alice'", str(caught.exception))
            self.assertIn(field, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            parse("[defaults]\nusd_per_day = 0\n" + alice())
        self.assertIn("[defaults]", str(caught.exception))
        self.assertIn("usd_per_day", str(caught.exception))


class IdentifyTests(SynchronousTestCase):
    """
    L{ClientRegistry.identify} maps a presented key to its client.
    """

    def setUp(self) -> None:
        _, clients = parse(alice() + bob())
        self.registry = ClientRegistry(clients)

    def test_known_keys(self) -> None:
        """
        Each key finds its own client.
        """
        a, b = self.registry.identify(ALICE_KEY.encode()), self.registry.identify(BOB_KEY.encode())
        assert a is not None and b is not None
        self.assertEqual((a.name, b.name), ("alice", "bob"))
        self.assertEqual(len(self.registry), 2)

    def test_unknown_key(self) -> None:
        """
        A key that is not listed, or differs by one character, finds
        nobody.
        """
        self.assertIsNone(self.registry.identify(b"oaiproxy-not-a-client"))
        self.assertIsNone(self.registry.identify(ALICE_KEY[:-1].encode() + b"X"))
        self.assertIsNone(self.registry.identify(b""))

    def test_hash_is_not_a_key(self) -> None:
        """
        Whoever reads the keys file cannot use a hash in it as a key.
        """
        self.assertIsNone(self.registry.identify(hash_key(ALICE_KEY).encode()))
        self.assertIsNone(self.registry.identify(bytes.fromhex(hash_key(ALICE_KEY))))


class ReprTests(SynchronousTestCase):
    """
    Clients, registries and credentials can be logged: their reprs show
    names, never a key or hash.
    """

    def assertNoSecrets(self, text: str) -> None:
        for secret in (ALICE_KEY, BOB_KEY, hash_key(ALICE_KEY), hash_key(BOB_KEY), UPSTREAM_KEY.decode()):
            self.assertNotIn(secret, text)
        self.assertNotIn(repr(bytes.fromhex(hash_key(ALICE_KEY)))[2:-1], text)
        self.assertNotRegex(text, HEX_RUN)

    def test_reprs(self) -> None:
        """
        repr of a L{Client}, a L{ClientRegistry} and L{Credentials} names
        the clients and hides every secret.
        """
        _, clients = parse(DEFAULTS + alice() + bob())
        registry = ClientRegistry(clients)
        credentials = Credentials(Secret(UPSTREAM_KEY), registry)
        for text in (repr(clients[0]), repr(registry), repr(credentials), str(credentials)):
            self.assertIn("alice", text)
            self.assertNoSecrets(text)

    def test_replaced_credentials(self) -> None:
        """
        After a reload replaces the credentials, the repr shows the new
        clients and still no secret.
        """
        credentials = Credentials(Secret(b"sk-proj-OLD0123456789012345"))
        self.assertEqual(len(credentials.clients), 0)
        _, clients = parse(bob())
        credentials.replace(Secret(UPSTREAM_KEY), ClientRegistry(clients))
        text = repr(credentials)
        self.assertIn("bob", text)
        self.assertNoSecrets(text)
        self.assertEqual(credentials.api_key, Secret(UPSTREAM_KEY))


class LoadClientsTests(SynchronousTestCase):
    """
    L{load_clients} finds the keys file and adds the keys of
    C{OAIPROXY_CLIENT_KEYS}.
    """

    def setUp(self) -> None:
        self.directory = temp_dir(self)

    def test_file_from_argument(self) -> None:
        """
        The file given on the command line is read, and beats
        C{OAIPROXY_CLIENT_KEYS_FILE}.
        """
        path = write(self.directory, "clients.toml", alice())
        other = write(self.directory, "other.toml", bob())
        self.assertEqual(load_clients(path, {}).names, ("alice",))
        self.assertEqual(load_clients(path, {"OAIPROXY_CLIENT_KEYS_FILE": other}).names, ("alice",))

    def test_file_from_environment(self) -> None:
        """
        Without an argument, C{OAIPROXY_CLIENT_KEYS_FILE} names the file,
        and beats a systemd credential.
        """
        path = write(self.directory, "clients.toml", alice())
        credentials = os.path.join(self.directory, "credentials")
        os.mkdir(credentials)
        write(credentials, "client_keys", bob())
        environ = {"OAIPROXY_CLIENT_KEYS_FILE": path, "CREDENTIALS_DIRECTORY": credentials}
        self.assertEqual(load_clients(None, environ).names, ("alice",))

    def test_systemd_credential(self) -> None:
        """
        Without either, the systemd credential C{client_keys} is read when
        present.
        """
        write(self.directory, "client_keys", bob())
        registry = load_clients(None, {"CREDENTIALS_DIRECTORY": self.directory})
        client = registry.identify(BOB_KEY.encode())
        assert client is not None
        self.assertEqual(client.name, "bob")

    def test_systemd_credential_absent(self) -> None:
        """
        A credentials directory without C{client_keys} (the unit loads only
        the upstream key) is not an error: there are no file clients.
        """
        registry = load_clients(None, {"CREDENTIALS_DIRECTORY": self.directory})
        self.assertEqual(len(registry), 0)
        self.assertEqual(len(load_clients(None, {})), 0)

    def test_environment_keys(self) -> None:
        """
        Keys from C{OAIPROXY_CLIENT_KEYS} are added after the file's clients
        as C{env-1}, C{env-2}..., with the file's defaults as limits.
        """
        path = write(self.directory, "clients.toml", DEFAULTS + alice(tokens_per_minute=5))
        registry = load_clients(path, {"OAIPROXY_CLIENT_KEYS": "first-env-key, second-env-key"})
        self.assertEqual(registry.names, ("alice", "env-1", "env-2"))
        first, second = registry.identify(b"first-env-key"), registry.identify(b"second-env-key")
        assert first is not None and second is not None
        self.assertEqual((first.name, second.name), ("env-1", "env-2"))
        self.assertEqual(first.limits, Limits(600, 400000, 16, 2048))
        self.assertIsNone(first.models)

    def test_environment_keys_without_file(self) -> None:
        """
        Without a keys file, environment keys are unlimited.
        """
        registry = load_clients(None, {"OAIPROXY_CLIENT_KEYS": "only-key"})
        client = registry.identify(b"only-key")
        assert client is not None
        self.assertEqual(client.limits, Limits())

    def test_environment_name_clash(self) -> None:
        """
        A file client named like an environment key (C{env-1}) is refused:
        two clients would share a name in logs and limits.
        """
        path = write(self.directory, "clients.toml", toml_entry(name="env-1", key_sha256=hash_key(BOB_KEY)))
        with self.assertRaises(ConfigError) as caught:
            load_clients(path, {"OAIPROXY_CLIENT_KEYS": "some-key"})
        self.assertIn("'env-1'", str(caught.exception))

    def test_key_in_environment_and_file(self) -> None:
        """
        A key both in C{OAIPROXY_CLIENT_KEYS} and in the file is refused,
        without quoting the key.
        """
        path = write(self.directory, "clients.toml", alice())
        with self.assertRaises(ConfigError) as caught:
            load_clients(path, {"OAIPROXY_CLIENT_KEYS": ALICE_KEY})
        message = str(caught.exception)
        self.assertIn("OAIPROXY_CLIENT_KEYS", message)
        self.assertNotIn(ALICE_KEY, message)

    def test_missing_file(self) -> None:
        """
        A keys file that does not exist is an error, whether it was given as
        an argument or in the environment, rather than a proxy that starts
        without its clients; the value is not echoed (it may be a key given
        by mistake).
        """
        path = os.path.join(self.directory, "nope.toml")
        for keys_file, environ in ((path, {}), (None, {"OAIPROXY_CLIENT_KEYS_FILE": path}), ("oaiproxy-KEY", {})):
            with self.assertRaises(ConfigError) as caught:
                load_clients(keys_file, environ)
            self.assertIn("does not exist", str(caught.exception))
            self.assertNotIn(keys_file or path, str(caught.exception))

    def test_malformed_file(self) -> None:
        """
        A malformed file is an error naming the file and the client.
        """
        path = write(self.directory, "clients.toml", alice(tokens_per_minute=-1))
        with self.assertRaises(ConfigError) as caught:
            load_clients(path, {})
        self.assertIn(path, str(caught.exception))
        self.assertIn("'alice'", str(caught.exception))


class KeyTests(SynchronousTestCase):
    """
    Minted keys, and telling them apart from OpenAI keys.
    """

    def test_openai_keys(self) -> None:
        """
        OpenAI secret keys are recognised by their real shape (the marker
        C{T3BlbkFJ} between two random halves, as gitleaks'
        C{openai-api-key} rule has it): legacy, project, service-account
        and admin keys, alone or inside a longer value.
        """
        for key in openai_keys():
            self.assertTrue(looks_like_openai_key(key), key)
            for around in (b"Bearer " + key, key + b",x", b"api_key=" + key + b"&stream=true", b'{"k":"' + key + b'"}'):
                self.assertTrue(contains_openai_key(around), around)

    def test_not_openai_keys(self) -> None:
        """
        Other C{sk-} tokens (LiteLLM virtual keys, local servers' dummy
        keys, the 48-character legacy length without the marker), minted
        keys, and the marker without a key around it are not taken for
        OpenAI keys: only real ones are refused.
        """
        marker = OPENAI_KEY_MARKER
        for token in (
            mint_key().encode(),
            b"sk-1234",
            b"sk-litellm-" + b"A1b2C3d4" * 4,
            b"sk-" + b"A1b2C3d4" * 6,
            b"sk-proj-" + b"Xy9_Zw-8" * 20,
            b"sk-no-key-required",
            b"sk-",
            b"",
            b"pk-" + b"A" * 20 + marker + b"B" * 20,
            b"sk-" + b"A" * 19 + marker + b"B" * 20,
            b"sk-" + b"A" * 20 + marker + b"B" * 19,
            b"sk-" + b"A" * 20 + marker.lower() + b"B" * 20,
            b"sk-" + b"A" * 10 + b"." + b"A" * 10 + marker + b"B" * 20,
            b"SK-" + b"A" * 20 + marker + b"B" * 20,
            marker * 10,
        ):
            self.assertFalse(looks_like_openai_key(token), token)

    def test_search_is_linear(self) -> None:
        """
        A header made to look almost like many keys (the largest a request
        may carry) is searched in bounded time.
        """
        hostile = (b"sk-" * 5000 + OPENAI_KEY_MARKER) * 1
        self.assertFalse(contains_openai_key(hostile))
        hostile = b"sk-" + b"a" * 16000 + OPENAI_KEY_MARKER + b"b" * 19
        self.assertFalse(contains_openai_key(hostile))

    def test_mint_key(self) -> None:
        """
        Minted keys carry the prefix, hold at least 256 bits of URL-safe
        randomness (no comma, so they fit C{OAIPROXY_CLIENT_KEYS}), and
        never repeat.
        """
        keys = [mint_key() for _ in range(200)]
        self.assertEqual(len(set(keys)), len(keys))
        for key in keys:
            self.assertTrue(key.startswith(KEY_PREFIX))
            self.assertRegex(key[len(KEY_PREFIX) :], r"^[A-Za-z0-9_-]{43,}$")

    def test_hash_key(self) -> None:
        """
        L{hash_key} is the hex SHA-256 that C{sha256sum} prints, so an
        operator can compute an entry by hand.
        """
        self.assertEqual(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


class FileEntryTests(SynchronousTestCase):
    """
    L{file_entry} writes an entry that the keys file accepts.
    """

    def test_round_trip(self) -> None:
        """
        An entry parses back to the client, whose key it recognises, and
        holds the hash, not the key.
        """
        key = mint_key()
        entry = file_entry("alice", key, ["gpt-4o", "gpt-4o-mini"])
        self.assertNotIn(key, entry)
        _, [client] = parse(entry)
        self.assertEqual(client.name, "alice")
        self.assertEqual(client.models, frozenset({"gpt-4o", "gpt-4o-mini"}))
        self.assertIs(ClientRegistry([client]).identify(key.encode()), client)

    def test_appended_entries(self) -> None:
        """
        Entries appended to a file with C{[defaults]} (C{keygen >>
        clients.toml}) parse together and get the defaults.
        """
        keys = [mint_key(), mint_key()]
        text = DEFAULTS + file_entry("alice", keys[0]) + file_entry("bob", keys[1], ["gpt-4o"])
        defaults, clients = parse(text)
        registry = ClientRegistry(clients)
        for key, name in zip(keys, ("alice", "bob")):
            client = registry.identify(key.encode())
            assert client is not None
            self.assertEqual((client.name, client.limits), (name, defaults))

    def test_awkward_names(self) -> None:
        """
        Names with quotes, backslashes, accents or tabs survive the trip.
        """
        for name in ('say "hi"', "back\\slash", "José", "tab\there"):
            _, [client] = parse(file_entry(name, mint_key()))
            self.assertEqual(client.name, name)

    def test_name_outside_basic_plane(self) -> None:
        """
        A name with an emoji survives the trip too.
        """
        name = "\N{UNICORN FACE} team"
        _, [client] = parse(file_entry(name, mint_key()))
        self.assertEqual(client.name, name)


class KeygenTests(SynchronousTestCase):
    """
    C{python -m oaiproxy keygen} shows a new key once and prints its
    keys-file entry.
    """

    def keygen(self, *argv: str) -> tuple[int, str, str]:
        """
        Run the command; return its exit code, standard output and
        standard error.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(["keygen", *argv], out, err)
        return code, out.getvalue(), err.getvalue()

    def shown_key(self, err: str) -> str:
        """
        The key shown on standard error.
        """
        [key] = re.findall(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]+", err)
        return key

    def test_prints_entry_and_shows_key_once(self) -> None:
        """
        The command succeeds, shows the key exactly once on standard error,
        and prints exactly its entry on standard output, which holds no
        key, so C{>> clients.toml} never writes the key to the file.
        """
        code, out, err = self.keygen("--name", "alice")
        self.assertEqual(code, 0)
        key = self.shown_key(err)
        self.assertEqual(err.count(key), 1)
        self.assertIn("alice", err)
        self.assertNotIn(key, out)
        self.assertEqual(out, file_entry("alice", key))
        _, [client] = parse(out)
        self.assertIsNone(client.models)
        self.assertIs(ClientRegistry([client]).identify(key.encode()), client)

    def test_models(self) -> None:
        """
        C{--models} becomes the client's allow-list (blanks trimmed, empty
        items dropped).
        """
        code, out, err = self.keygen("--name", " bob ", "--models", "gpt-4o, gpt-4o-mini,,")
        self.assertEqual(code, 0)
        _, [client] = parse(out)
        self.assertEqual(client.name, "bob")
        self.assertEqual(client.models, frozenset({"gpt-4o", "gpt-4o-mini"}))
        self.assertIs(ClientRegistry([client]).identify(self.shown_key(err).encode()), client)

    def keygen_stdin(self, stdin: str, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["keygen", "--stdin", *argv], out, err, io.StringIO(stdin))
        return code, out.getvalue(), err.getvalue()

    def test_stdin_hashes_an_existing_key(self) -> None:
        """
        C{--stdin} hashes the key read from standard input (a team keeping
        the keys it already hands out, an C{sk-} LiteLLM-style one here)
        and prints its entry, never the key; the entry identifies it.
        """
        existing = "sk-team-existing-0123456789abcdef"
        code, out, err = self.keygen_stdin(existing + "\n", "--name", "alice", "--models", "gpt-4o")
        self.assertEqual(code, 0)
        self.assertNotIn(existing, out + err)
        self.assertNotIn(KEY_PREFIX, err)
        self.assertEqual(out, file_entry("alice", existing, ["gpt-4o"]))
        _, [client] = parse(out)
        self.assertIs(ClientRegistry([client]).identify(existing.encode()), client)

    def test_stdin_real_openai_key_warns(self) -> None:
        """
        A real OpenAI key is accepted (a configured key always is) but
        draws a warning, without being echoed.
        """
        key = openai_keys()[1].decode()
        code, out, err = self.keygen_stdin(key + "\n", "--name", "alice")
        self.assertEqual(code, 0)
        self.assertIn("real OpenAI API key", err)
        self.assertNotIn(key, out + err)
        self.assertEqual(out, file_entry("alice", key))

    def test_stdin_empty(self) -> None:
        """
        Nothing on standard input is an error, and prints no entry.
        """
        for stdin in ("", "\n", "   \n"):
            code, out, err = self.keygen_stdin(stdin, "--name", "alice")
            self.assertEqual((code, out), (2, ""))
            self.assertIn("no key", err)

    def test_empty_name(self) -> None:
        """
        An empty or blank C{--name} fails with a usage error and mints
        nothing.
        """
        for name in ("", "   "):
            usage = io.StringIO()
            with contextlib.redirect_stderr(usage), self.assertRaises(SystemExit) as caught:
                self.keygen("--name", name)
            self.assertNotEqual(caught.exception.code, 0)
            self.assertIn("--name", usage.getvalue())
            self.assertNotIn(KEY_PREFIX, usage.getvalue())
