"""
The twistd plugin's options and service tree: configuration from options
and environment, startup errors as one line, listeners, the startup report
and the open-relay warning.  No sockets: a memory reactor records what
would be bound.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from treq.testing import StubTreq
from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import DEFAULT_PORT, DEFAULT_UPSTREAM, Secret
from oaiproxy.routes import BY_NAME
from oaiproxy.tap import Options, makeService
from tests.support import temp_dir

KEY = "sk-proj-TAPSECRET000111222"


def parse(argv: list[str], env: Mapping[str, str] = {"OPENAI_API_KEY": KEY}) -> Options:
    options = Options(environ=dict(env))
    options.parseOptions(argv)
    return options


class _Port:
    def __init__(self, address: IPv4Address) -> None:
        self._address = address

    def getHost(self) -> IPv4Address:
        return self._address

    def stopListening(self) -> None:
        pass


class HonestReactor(MemoryReactorClock):
    """
    A memory reactor whose ports report the interface they were given
    (MemoryReactor always says 0.0.0.0).
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Port:
        super().listenTCP(port, factory, backlog, interface)
        return _Port(IPv4Address("TCP", interface or "0.0.0.0", port))


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        With only a key, the proxy listens on loopback port 8080 and
        forwards to OpenAI with the documented timeouts.
        """
        config = parse([]).config
        self.assertEqual(config.ports, (DEFAULT_PORT,))
        self.assertEqual(config.upstream, DEFAULT_UPSTREAM)
        self.assertEqual(config.api_key, Secret(KEY.encode()))
        self.assertEqual(
            (config.connect_timeout, config.read_timeout, config.max_body_bytes, config.clients.names),
            (10.0, 600.0, 67108864, ()),
        )

    def test_environment(self) -> None:
        """
        Every setting can come from the environment.
        """
        config = parse(
            [],
            {
                "OPENAI_API_KEY": KEY,
                "PORT": "9000",
                "OPENAI_BASE_URL": "http://127.0.0.1:4000/v1/",
                "OAIPROXY_CLIENT_KEYS": "a, b",
                "OAIPROXY_CONNECT_TIMEOUT": "3",
                "OAIPROXY_READ_TIMEOUT": "30.5",
                "OAIPROXY_IDLE_TIMEOUT": "20",
                "OAIPROXY_MAX_BODY_BYTES": "1024",
            },
        ).config
        self.assertEqual(config.ports, ("tcp:9000:interface=127.0.0.1",))
        self.assertEqual(config.upstream, "http://127.0.0.1:4000/v1")
        self.assertEqual(config.clients.names, ("env-1", "env-2"))
        self.assertEqual(config.clients.identify(b"b").name, "env-2")
        self.assertEqual(
            (config.connect_timeout, config.read_timeout, config.idle_timeout, config.max_body_bytes),
            (3.0, 30.5, 20.0, 1024),
        )

    def test_options_win_over_environment(self) -> None:
        """
        A command-line option beats the environment variable.
        """
        env = {"OPENAI_API_KEY": KEY, "PORT": "9000", "OPENAI_BASE_URL": "http://a.test", "OAIPROXY_READ_TIMEOUT": "5"}
        config = parse(
            ["--port", "tcp:1", "--port", "unix:/tmp/s", "--upstream", "https://b.test/v1", "--read-timeout", "9"],
            env,
        ).config
        self.assertEqual(config.ports, ("tcp:1", "unix:/tmp/s"))
        self.assertEqual(config.upstream, "https://b.test/v1")
        self.assertEqual(config.read_timeout, 9.0)

    def test_key_file_option(self) -> None:
        """
        --api-key-file beats OPENAI_API_KEY.
        """
        path = os.path.join(temp_dir(self), "key")
        with open(path, "w") as f:
            f.write("sk-from-file\n")
        config = parse(["--api-key-file", path]).config
        self.assertEqual(config.api_key, Secret(b"sk-from-file"))

    def test_mock_upstream_needs_no_key(self) -> None:
        """
        --mock-upstream starts without any key.
        """
        config = parse(["--mock-upstream"], {}).config
        self.assertTrue(config.mock_upstream)
        self.assertIsNone(config.api_key)

    def assertStartupError(self, argv: list[str], env: Mapping[str, str], *fragments: str) -> str:
        with self.assertRaises(SystemExit) as caught:
            parse(argv, env)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("twistd oaiproxy: error: "), message)
        self.assertNotIn("\n", message)
        self.assertNotIn("Traceback", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_startup_errors_are_one_line(self) -> None:
        """
        Each configuration mistake stops startup with one line saying what
        is wrong (SystemExit with a message: stderr, exit status 1).
        """
        keyed = {"OPENAI_API_KEY": KEY}
        self.assertStartupError([], {}, "no upstream API key", "OPENAI_API_KEY", "--mock-upstream")
        self.assertStartupError(["--bogus"], keyed, "bogus")
        self.assertStartupError(["--read-timeout", "soon"], keyed, "--read-timeout", "soon")
        self.assertStartupError(["--connect-timeout", "-1"], keyed, "--connect-timeout")
        self.assertStartupError(["--max-body-bytes", "1e9"], keyed, "--max-body-bytes")
        self.assertStartupError(["--upstream", "ftp://x"], keyed, "--upstream")
        self.assertStartupError([], {**keyed, "OAIPROXY_READ_TIMEOUT": "x"}, "OAIPROXY_READ_TIMEOUT")
        self.assertStartupError([], {**keyed, "PORT": "http"}, "PORT")
        self.assertStartupError(["--api-key-file", "/nonexistent/key"], keyed, "does not exist")

    def test_key_on_command_line_refused_without_echo(self) -> None:
        """
        --api-key (a natural guess) is refused with a pointer to the safe
        ways, and the key is not repeated: getopt would otherwise take it as
        a prefix of --api-key-file and print it as a path.
        """
        for argv in (["--api-key", "sk-proj-ARGVKEY"], ["--api-key=sk-proj-ARGVKEY"], ["--api-key-file", "sk-ARGVKEY"]):
            message = self.assertStartupError(argv, {})
            self.assertNotIn("ARGVKEY", message)
        self.assertStartupError(["--api-key", "sk-proj-ARGVKEY"], {}, "--api-key-file", "OPENAI_API_KEY", "ps")
        for argv in (["--client-keys", "oaiproxy-ARGVKEY"], ["--client-keys-file", "oaiproxy-ARGVKEY"]):
            message = self.assertStartupError(argv, {"OPENAI_API_KEY": KEY})
            self.assertNotIn("ARGVKEY", message)

    def test_startup_error_never_shows_a_key(self) -> None:
        """
        A malformed key file is reported by path, never by content.
        """
        path = os.path.join(temp_dir(self), "key")
        with open(path, "w") as f:
            f.write("sk-LEAKY one\nsk-LEAKY two\n")
        message = self.assertStartupError(["--api-key-file", path], {}, path)
        self.assertNotIn("LEAKY", message)


class ServiceTests(SynchronousTestCase):
    def start(
        self, argv: list[str], env: Mapping[str, str] = {"OPENAI_API_KEY": KEY}
    ) -> tuple[Any, HonestReactor, list[dict[str, Any]]]:
        reactor = HonestReactor()
        with capturedLogs() as events:
            service = makeService(parse(argv, env), reactor=reactor)
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        return service, reactor, events

    def test_routes_in_the_tree(self) -> None:
        """
        The daemon's tree answers a route it does not serve with
        route_not_enabled, and streams the bodies of enabled upload routes
        only.
        """
        _, reactor, _ = self.start(["--routes", "embeddings,audio/transcriptions"])
        site = reactor.tcpServers[0][1]
        stub = StubTreq(site.resource)
        response = self.successResultOf(stub.post("http://p/v1/chat/completions", data=b"{}"))
        error = json.loads(self.successResultOf(stub.content(response)))["error"]
        self.assertEqual((response.code, error["code"]), (404, "route_not_enabled"))
        self.assertTrue(site.streams_body(b"POST", b"/v1/audio/transcriptions?x=1"))
        self.assertFalse(site.streams_body(b"POST", b"/v1/audio/translations"))
        self.assertFalse(site.streams_body(b"POST", b"/v1/embeddings"))

    def test_route_azure_lacks(self) -> None:
        """
        On an Azure proxy, moderations is not a route an operator could
        enable: its 404 says the upstream does not serve it.
        """
        _, reactor, _ = self.start(["--upstream-style", "azure", "--upstream", "https://r.openai.azure.com"])
        stub = StubTreq(reactor.tcpServers[0][1].resource)
        response = self.successResultOf(stub.post("http://p/v1/moderations", data=b"{}"))
        error = json.loads(self.successResultOf(stub.content(response)))["error"]
        self.assertEqual((response.code, error["code"]), (404, "route_not_available"))
        self.assertIn("Azure OpenAI", error["message"])

    def test_one_listener_per_port(self) -> None:
        """
        Every --port becomes a listener on the Site, bound when the service
        starts.
        """
        service, reactor, _ = self.start(
            ["--port", "tcp:8081:interface=127.0.0.1", "--port", "tcp:8082:interface=127.0.0.2"]
        )
        self.assertTrue(IServiceCollection.providedBy(service))
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(8081, "127.0.0.1"), (8082, "127.0.0.2")],
        )
        factories = {factory for _, factory, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1)

    def test_startup_report(self) -> None:
        """
        Startup logs the upstream, and for each listener the chat
        completions and health URLs; the key appears nowhere.
        """
        _, _, events = self.start(["--port", "tcp:8081:interface=127.0.0.1"])
        listening = [e for e in events if e.get("base")]
        self.assertEqual([e["base"] for e in listening], ["http://127.0.0.1:8081"])
        from twisted.logger import formatEvent

        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("http://127.0.0.1:8081/v1/chat/completions", text)
        self.assertIn("http://127.0.0.1:8081/health", text)
        self.assertIn("forwarding chat/completions, models to https://api.openai.com/v1 (openai)", text)
        self.assertNotIn("TAPSECRET", text + repr(events))

    def test_open_relay_refused(self) -> None:
        """
        Safe by default: a listener reachable from other hosts with no
        client keys stops startup with one line saying what to do.
        """
        reactor = HonestReactor()
        service = makeService(parse(["--port", "tcp:8080"]), reactor=reactor)
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        message = str(caught.exception.code)
        self.assertIn("refusing to start: http://0.0.0.0:8080 is reachable from other hosts", message)
        self.assertIn("--allow-open-relay", message)
        self.assertNotIn("\n", message)

    def test_open_relay_warning(self) -> None:
        """
        With --allow-open-relay such a listener starts, with a critical
        warning; loopback, or client keys, need neither.
        """

        def warnings(argv: list[str], env: Mapping[str, str]) -> list[str]:
            _, _, events = self.start(argv, env)
            return [e["base"] for e in events if e["log_level"] == LogLevel.critical]

        keyed = {"OPENAI_API_KEY": KEY}
        self.assertEqual(warnings(["--port", "tcp:8080", "--allow-open-relay"], keyed), ["http://0.0.0.0:8080"])
        self.assertEqual(warnings(["--port", "tcp:8080:interface=127.0.0.1"], keyed), [])
        self.assertEqual(warnings(["--port", "tcp:8080"], {**keyed, "OAIPROXY_CLIENT_KEYS": "k"}), [])

    def test_bad_endpoint_is_one_line(self) -> None:
        """
        An unparsable --port stops startup with one line naming it.
        """
        with self.assertRaises(SystemExit) as caught:
            makeService(parse(["--port", "carrier-pigeon:1"]), reactor=MemoryReactorClock())
        message = str(caught.exception.code)
        self.assertIn("carrier-pigeon:1", message)
        self.assertNotIn("\n", message)

    def test_busy_port_fails_startup(self) -> None:
        """
        A port that cannot be bound makes startup fail (twistd exits
        non-zero, which systemd sees), rather than only logging it.
        """
        reactor = RaisingMemoryReactor(
            listenException=CannotListenError("127.0.0.1", 8080, OSError(98, "Address already in use"))
        )
        service = makeService(parse([]), reactor=reactor)
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(
            caught.exception.code,
            "twistd oaiproxy: error: cannot listen on tcp:8080:interface=127.0.0.1: [Errno 98] Address already in use",
        )

    def test_mock_upstream(self) -> None:
        """
        --mock-upstream serves the fake API on a loopback port before the
        proxy's own listener opens, and forwards there.
        """
        _, reactor, events = self.start(["--mock-upstream", "--port", "tcp:8080:interface=127.0.0.1"], {})
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(0, "127.0.0.1"), (8080, "127.0.0.1")],
        )
        self.assertIn("http://127.0.0.1:0/v1", [e.get("url") for e in events])


class UpstreamHeaderOptionTests(SynchronousTestCase):
    def test_option(self) -> None:
        """
        --upstream-header is repeatable; a bad one stops startup with one
        line.
        """
        config = parse(
            ["--upstream-header", "HTTP-Referer: https://a.example", "--upstream-header", "X-Title: A"]
        ).config
        self.assertEqual(config.upstream_headers, ((b"HTTP-Referer", b"https://a.example"), (b"X-Title", b"A")))
        with self.assertRaises(SystemExit) as caught:
            parse(["--upstream-header", "Authorization: Bearer sk-x"])
        self.assertIn("cannot set Authorization", str(caught.exception.code))


class RouteOptionTests(SynchronousTestCase):
    def test_default_and_choice(self) -> None:
        """
        Chat and models by default; --routes or OAIPROXY_ROUTES choose
        others (the option wins); an unknown route stops startup.
        """
        self.assertEqual(parse([]).config.routes, {"chat/completions", "models"})
        self.assertEqual(parse(["--routes", "embeddings,responses"]).config.routes, {"embeddings", "responses"})
        env = {"OPENAI_API_KEY": KEY, "OAIPROXY_ROUTES": "all"}
        self.assertIn("audio/speech", parse([], env).config.routes)
        self.assertEqual(parse(["--routes", "models"], env).config.routes, {"models"})
        with self.assertRaises(SystemExit) as caught:
            parse(["--routes", "chat/completions,files"])
        self.assertIn("'files'", str(caught.exception.code))


class AzureOptionTests(SynchronousTestCase):
    def test_options(self) -> None:
        """
        --upstream-style azure takes --azure-deployment (repeatable) or
        OAIPROXY_AZURE_DEPLOYMENTS, and --azure-api-version; the base URL
        is kept as given (no /v1 added).
        """
        config = parse(
            [
                "--upstream-style",
                "azure",
                "--upstream",
                "https://r.openai.azure.com",
                "--azure-deployment",
                "gpt-4o=prod-4o",
                "--azure-deployment",
                "o3 = reasoning",
                "--azure-api-version",
                "2025-04-01-preview",
            ]
        ).config
        self.assertEqual(config.upstream, "https://r.openai.azure.com")
        self.assertEqual(config.azure_deployments, (("gpt-4o", "prod-4o"), ("o3", "reasoning")))
        self.assertEqual(config.azure_api_version, "2025-04-01-preview")
        env = {
            "OPENAI_API_KEY": KEY,
            "OPENAI_BASE_URL": "https://r.openai.azure.com",
            "OAIPROXY_UPSTREAM_STYLE": "azure",
            "OAIPROXY_AZURE_DEPLOYMENTS": "a=b, c=d",
        }
        self.assertEqual(parse([], env).config.azure_deployments, (("a", "b"), ("c", "d")))

    def test_refusals(self) -> None:
        """
        Azure has no moderations endpoint; Azure settings without the azure
        style are a mistake, and so is the azure style pointed at OpenAI; a
        malformed mapping is named.
        """
        azure = ["--upstream-style", "azure", "--upstream", "https://r.openai.azure.com"]
        for argv, said in [
            ([*azure, "--routes", "chat/completions,moderations"], "moderations"),
            (["--azure-deployment", "a=b"], "--upstream-style azure"),
            ([*azure, "--azure-deployment", "nomapping"], "MODEL=DEPLOYMENT"),
            (["--upstream-style", "azure"], "needs --upstream https://RESOURCE.openai.azure.com"),
            (["--routes", ""], "at least one route"),
            (["--upstream-header", "Content-Type:text/plain"], "cannot set Content-Type"),
            (["--upstream-style", "aws"], "'openai' or 'azure'"),
        ]:
            with self.assertRaises(SystemExit) as caught:
                parse(argv)
            self.assertIn(said, str(caught.exception.code))

    def test_all_means_all_azure_serves(self) -> None:
        """
        --routes all with Azure is every route but moderations, which
        Azure does not have.
        """
        config = parse(
            ["--upstream-style", "azure", "--upstream", "https://r.openai.azure.com", "--routes", "all"]
        ).config
        self.assertEqual(config.routes, frozenset(BY_NAME) - {"moderations"})

    def test_bare_host_gets_v1(self) -> None:
        """
        An OpenAI-style upstream given as a bare host is addressed below
        /v1, as every OpenAI-compatible server serves it.
        """
        self.assertEqual(parse(["--upstream", "http://127.0.0.1:11434"]).config.upstream, "http://127.0.0.1:11434/v1")
        self.assertEqual(
            parse(["--upstream", "https://openrouter.ai/api/v1/"]).config.upstream, "https://openrouter.ai/api/v1"
        )
