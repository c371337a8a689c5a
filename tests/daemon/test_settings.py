"""
Tests for L{oaiproxy.daemon.settings}: the one table the options, the
environment, C{--help} and the README come from.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from twisted.trial.unittest import SynchronousTestCase

import oaiproxy
from oaiproxy.daemon.settings import ENVIRONMENT, FLAG, REFUSED, REPEATABLE, SETTINGS, Setting, markdown_table
from oaiproxy.daemon.tap import Options
from oaiproxy.routetable import BY_NAME, RESPONSES
from oaiproxy.server.build import style_of

KEY = "sk-proj-SETTINGSKEY"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")

#: Azure's settings need an Azure upstream.
AZURE = {"OPENAI_BASE_URL": "https://r.openai.azure.com", "OAIPROXY_UPSTREAM_STYLE": "azure"}

#: The shared-state settings need a shared state.
SHARED = {"OAIPROXY_SHARED_STATE": "redis://127.0.0.1:6379/0"}

#: A value other than the default for every plain setting (field and
#: parser), what it parses to, and the environment it needs.
EXAMPLES: dict[str, tuple[str, object, Mapping[str, str]]] = {
    "routes": ("models", frozenset({"models"}), {}),
    "upstream-style": ("azure", "azure", {"OPENAI_BASE_URL": AZURE["OPENAI_BASE_URL"]}),
    "azure-api-version": (" 2025-01-01 ", "2025-01-01", AZURE),
    "header-timeout": ("3", 3.0, {}),
    "body-timeout": ("4", 4.0, {}),
    "max-connections-per-ip": ("7", 7, {}),
    "drain-timeout": ("5", 5.0, {}),
    "connect-timeout": ("2", 2.0, {}),
    "read-timeout": ("30.5", 30.5, {}),
    "idle-timeout": ("20", 20.0, {}),
    "max-body-bytes": ("1024", 1024, {}),
    "log-format": ("json", "json", {}),
    "metrics-port": ("tcp:9108:interface=127.0.0.1", "tcp:9108:interface=127.0.0.1", {}),
    "sse-keepalive": ("0", 0.0, {}),
    "workers": ("3", 3, {}),
    "worker-share": ("2", 2, {}),
    "max-attempts": ("2", 2, {}),
    "first-byte-timeout": ("1.5", 1.5, {}),
    "shared-state": ("redis://10.0.0.5:6380/2", "redis://10.0.0.5:6380/2", {}),
    "shared-state-ca-file": ("/etc/ca.pem", "/etc/ca.pem", {"OAIPROXY_SHARED_STATE": "rediss://r.internal"}),
    "shared-state-prefix": ("team-a:", "team-a:", SHARED),
    "shared-state-instances": ("6", 6, SHARED),
    "shared-state-deadline": ("20", 20.0, SHARED),
    "shared-state-lease": ("2.5", 2.5, SHARED),
}

#: Variables the package reads that are not settings: what systemd and
#: the supervisor put in a process's environment.
NOT_SETTINGS = {
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "OAIPROXY_WORKER_INDEX",
    "OPENAI_KEY_MARKER",
}


def parse(argv: list[str], env: Mapping[str, str]) -> Options:
    options = Options(environ={"OPENAI_API_KEY": KEY, **env})
    options.parseOptions(argv)
    return options


def plain(setting: Setting) -> bool:
    return setting.field is not None and setting.parse is not None


class TableTests(SynchronousTestCase):
    def test_readme_table_is_generated(self) -> None:
        """
        The README's configuration table is the one the settings table
        makes (regenerate it with python -m oaiproxy.daemon.settings).
        """
        with open(README, encoding="utf-8") as f:
            readme = f.read()
        table = markdown_table()
        self.assertIn(table, readme, "README's table differs: run python -m oaiproxy.daemon.settings")
        header = table.splitlines()[0]
        self.assertEqual(readme.count(header), 1)

    def test_every_option_is_in_the_table(self) -> None:
        """
        Options has exactly the table's options (and twistd's --help and
        --version); each repeatable or refused one has its opt_ method.
        """
        declared = {s.option for s in SETTINGS if s.kind != ENVIRONMENT}
        options = Options(environ={})
        self.assertEqual({o.rstrip("=") for o in options.longOpt} - {"help", "version"}, declared)
        for setting in SETTINGS:
            if setting.kind in (REPEATABLE, REFUSED):
                assert setting.option is not None
                self.assertTrue(hasattr(options, "opt_" + setting.option.replace("-", "_")), setting.option)

    def test_every_variable_is_in_the_table(self) -> None:
        """
        Every environment variable the package's code names (outside the
        table) is a setting's, or one systemd or the supervisor sets: a
        variable read without a row in the table would be missing from
        --help and the README.
        """
        package = os.path.dirname(oaiproxy.__file__)
        named: set[str] = set()
        for directory, _, files in os.walk(package):
            for name in files:
                if name.endswith(".py") and name != "settings.py":
                    with open(os.path.join(directory, name), encoding="utf-8") as f:
                        named.update(re.findall(r'"((?:OAIPROXY|OPENAI)_[A-Z_]+|PORT)"', f.read()))
        variables = {s.env for s in SETTINGS if s.env is not None}
        self.assertLessEqual(named - NOT_SETTINGS, variables)
        self.assertIn("PORT", named)

    def test_help_says_each_variable_and_default(self) -> None:
        """
        --help shows every shown option with the table's help, its variable
        and its default.
        """
        text = " ".join(Options(environ={}).getUsage(width=2000).split())
        for setting in SETTINGS:
            if setting.option is None or not setting.shown:
                continue
            self.assertIn(" ".join(setting.usage().split()), text, setting.option)
            if setting.env is not None and setting.sources is None:
                self.assertIn(f"env {setting.env}", setting.usage())
            default = setting.shown_default()
            if default is not None and setting.kind != FLAG:
                self.assertIn(f"default {default.replace('`', '')}", setting.usage())


class PlainSettingTests(SynchronousTestCase):
    def test_each_from_option_and_environment(self) -> None:
        """
        Every plain setting is read from its option and from its variable,
        the option winning, and is the Config default when neither is set.
        """
        self.assertEqual({s.option for s in SETTINGS if plain(s)}, set(EXAMPLES))
        defaults = parse([], {}).config
        for setting in SETTINGS:
            if not plain(setting):
                continue
            assert setting.option is not None and setting.env is not None and setting.field is not None
            text, value, needs = EXAMPLES[setting.option]
            self.assertNotEqual(getattr(defaults, setting.field), value, setting.option)
            from_env = parse([], {**needs, setting.env: text}).config
            self.assertEqual(getattr(from_env, setting.field), value, setting.env)
            from_option = parse(["--" + setting.option, text], needs).config
            self.assertEqual(getattr(from_option, setting.field), value, setting.option)
            env_loses = parse(["--" + setting.option, text], {**needs, setting.env: "bogus"}).config
            self.assertEqual(getattr(env_loses, setting.field), value, setting.option)

    def test_written_defaults_are_the_defaults(self) -> None:
        """
        The defaults written into the table by hand (the others come from
        Config) are the ones the proxy runs with.
        """
        config = parse([], {}).config
        shown = {s.option: (s.shown_default() or "").replace("`", "") for s in SETTINGS if s.default is not None}
        self.assertEqual(config.ports, (shown["port"],))
        self.assertEqual(config.upstream, shown["upstream"])
        self.assertEqual(config.routes, frozenset(shown["routes"].split(",")))
        self.assertEqual(config.stream_usage, shown["no-stream-usage"] == "on")
        azure = style_of(parse([], AZURE).config)
        self.assertEqual(
            shown["azure-api-version"],
            f"{azure.version(BY_NAME['chat/completions'])} ({azure.version(RESPONSES)} for the Responses API)",
        )
