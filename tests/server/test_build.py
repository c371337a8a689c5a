"""
Tests for L{oaiproxy.server.build}: the daemon and the in-memory harness
serve one wiring.
"""

from __future__ import annotations

import json
from types import FunctionType, MethodType
from typing import Any, Mapping

import treq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent

from oaiproxy.config import Secret
from oaiproxy.daemon.lifecycle import ListenerService
from oaiproxy.daemon.tap import Options, makeService
from oaiproxy.fake.harness import AZURE_URL, CLIENT_KEY, UPSTREAM_URL, Harness
from oaiproxy.routetable import BY_NAME
from oaiproxy.upstream.styles import AzureStyle

_PLAIN = (str, bytes, int, float, bool, type(None))


def describe(value: Any, seen: dict[int, str]) -> Any:
    """
    What C{value} is made of, as plain data two wirings can be compared by:
    values as they are, every object of ours (resources, the site, the
    upstream client, limits...) field by field, and any other collaborator
    (a clock, a treq client, a metrics registry) by where it was first met,
    so that which object is shared with which is compared too.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Secret):
        return "<secret>"
    if isinstance(value, (list, tuple)):
        return [describe(item, seen) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((describe(item, seen) for item in value), key=repr)
    if isinstance(value, dict):
        return [(describe(k, seen), describe(v, seen)) for k, v in value.items()]
    if id(value) in seen:
        return f"<as {seen[id(value)]}>"
    label = seen[id(value)] = f"#{len(seen)}"
    if isinstance(value, (FunctionType, MethodType)):
        return f"<function {value.__qualname__}>"
    kind = type(value)
    # (The HTTP agent is the transport, which the harness replaces by design.)
    if kind.__module__.startswith("oaiproxy.") and hasattr(value, "__dict__") and not IAgent.providedBy(value):
        fields = {name: describe(field, seen) for name, field in sorted(vars(value).items())}
        return {"type": kind.__qualname__, **fields}
    return f"<{label}>"


def shape(site: Any) -> Any:
    """
    A site described (see L{describe}), but for its access log.
    """
    return describe(site, {id(site.access_log): "the access log"})


def daemon_sites(options: Options) -> list[Any]:
    """
    The factory of every listener makeService made (API first, then
    --metrics-port's), without starting anything.
    """
    service = makeService(options, reactor=MemoryReactorClock())
    return [child.factory for child in service if isinstance(child, ListenerService)]


def parse(argv: list[str], env: Mapping[str, str]) -> Options:
    options = Options(environ={"OPENAI_API_KEY": "sk-proj-BUILDKEY", **env})
    upstream = AZURE_URL if "azure" in argv else UPSTREAM_URL
    options.parseOptions(["--upstream", upstream, *argv])
    return options


CASES: list[tuple[list[str], dict[str, str]]] = [
    ([], {}),
    (["--routes", "all", "--read-timeout", "7", "--sse-keepalive", "0", "--no-stream-usage"], {}),
    (["--routes", "embeddings,audio/transcriptions", "--max-body-bytes", "1000"], {"OAIPROXY_CLIENT_KEYS": "k"}),
    (["--upstream-style", "azure", "--routes", "all", "--azure-deployment", "gpt-4o=prod"], {}),
    (["--metrics-port", "tcp:9108:interface=127.0.0.1", "--upstream-header", "X-Title: A"], {}),
    (["--header-timeout", "3", "--body-timeout", "4", "--idle-timeout", "5", "--max-connections-per-ip", "6"], {}),
    (["--worker-share", "3", "--log-format", "json"], {"OAIPROXY_METRICS_KEY": "scrape"}),
]


class OneWiringTests(SynchronousTestCase):
    def test_harness_serves_what_the_daemon_serves(self) -> None:
        """
        For the same options, the harness's Site and makeService's are made
        of the same tree, the same route resources, the same upstream client
        settings and the same site limits (and so is the --metrics-port
        Site); only the access log differs, which the harness records.
        """
        for argv, env in CASES:
            options = parse(argv, env)
            daemon = daemon_sites(options)
            harness = Harness(config=options.config)
            built = [harness.site] + ([harness.built.metrics_site] if harness.built.metrics_site else [])
            self.assertEqual(len(daemon), len(built), argv)
            for theirs, ours in zip(daemon, built):
                self.assertEqual(shape(theirs), shape(ours), argv)

    def test_describe_sees_a_difference(self) -> None:
        """
        The comparison is not vacuous: one setting apart, or one route,
        and the shapes differ.
        """
        base = shape(Harness(config=parse([], {}).config).site)
        for argv in (["--read-timeout", "8"], ["--routes", "models"], ["--header-timeout", "9"]):
            self.assertNotEqual(shape(Harness(config=parse(argv, {}).config).site), base, argv)


class DriftFixedTests(SynchronousTestCase):
    """
    Where the harness's copy of the wiring had drifted from the daemon's.
    """

    def get(self, h: Harness, path: str, headers: Mapping[bytes, list[bytes]] = {}) -> tuple[int, bytes]:
        d = h.proxy.get("http://proxy.test" + path, headers=dict(headers))
        h.pump()
        response = self.successResultOf(d)
        body = treq.content(response)
        h.pump()
        return int(response.code), self.successResultOf(body)

    def test_metrics_need_a_key_when_clients_are_set(self) -> None:
        """
        With client keys, the harness's /metrics refuses a request without
        one, as the daemon's does (the copy served it to anyone).
        """
        h = Harness(client_keys=[CLIENT_KEY])
        self.assertEqual(self.get(h, "/metrics")[0], 401)
        code, body = self.get(h, "/metrics", {b"authorization": [b"Bearer " + CLIENT_KEY]})
        self.assertEqual(code, 200)
        self.assertIn(b"oaiproxy_", body)

    def test_azure_lacks_moderations(self) -> None:
        """
        On an Azure upstream the harness answers moderations with
        route_not_available, as the daemon does (the copy said
        route_not_enabled, naming an option that cannot enable it).
        """
        routes = [name for name in BY_NAME if BY_NAME[name].azure is not None]
        h = Harness(routes=routes, style=AzureStyle(None, {"gpt-4o": "prod"}))
        code, body = self.get(h, "/v1/moderations")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (404, "route_not_available"))
