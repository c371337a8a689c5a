"""
The twistd plugin's options and service tree: configuration from options
and environment, startup errors as one line, listeners, the startup report
and the open-relay refusal (before binding, and once bound), a worker's
configuration from its supervisor, --help, and the JSON log.  No listening
sockets: a memory reactor records what would be bound.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from typing import Any, Callable, Mapping, Sequence

from treq.testing import StubTreq
from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IFileDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.logger import LogLevel, capturedLogs, textFileLogObserver
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oaiproxy.access.clients import Credentials, file_entry
from oaiproxy.config import DEFAULT_PORT, DEFAULT_UPSTREAM, Secret
from oaiproxy.daemon import lifecycle
from oaiproxy.daemon.allocator import SETTINGS as MALLOC_SETTINGS
from oaiproxy.daemon.lifecycle import Lifecycle, StartupError, StartupReport
from oaiproxy.daemon.tap import (
    Options,
    _Exposure,
    _reloader,
    _SecretsService,
    fd_address,
    logs_to_standard_output,
    makeService,
    planned_address,
)
from oaiproxy.daemon.workers import GroupSecrets, encode_secrets
from oaiproxy.fake.harness import chat_body, registry
from oaiproxy.observe.jsonlog import OBSERVER_NAME, JsonLogObserver
from oaiproxy.observe.metrics import Metrics
from oaiproxy.routetable import BY_NAME
from oaiproxy.server.build import build_site
from tests.support import self_signed_pem, temp_dir

KEY = "sk-proj-TAPSECRET000111222"


def parse(argv: list[str], env: Mapping[str, str] = {"OPENAI_API_KEY": KEY}) -> Options:
    options = Options(environ=dict(env))
    options.parseOptions(argv)
    return options


@implementer(IFileDescriptor)  # the supervisor hands its fileno() to workers
class _Port:
    def __init__(self, address: IPv4Address) -> None:
        self._address = address
        self.listening = True

    def getHost(self) -> IPv4Address:
        return self._address

    def stopListening(self) -> None:
        self.listening = False

    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


class HonestReactor(MemoryReactorClock):
    """
    A memory reactor whose ports report the interface they were given
    (MemoryReactor always says 0.0.0.0), and that records the processes it
    would spawn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[_Port] = []
        self.spawned: list[Any] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Port:
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(_Port(IPv4Address("TCP", interface or "0.0.0.0", port)))
        return self.ports[-1]

    def adoptStreamPort(self, fileno: int, addressFamily: int, factory: Any) -> _Port:
        super().adoptStreamPort(fileno, addressFamily, factory)
        address = fd_address(fileno)
        assert isinstance(address, IPv4Address)
        self.ports.append(_Port(address))
        return self.ports[-1]

    def spawnProcess(self, *args: Any, **kwargs: Any) -> None:
        self.spawned.append((args, kwargs))


class Stderr:
    """
    A pipe standing in for the standard error twistd was started with: what
    a L{StartupReport} on it wrote.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self._read, self.fd = os.pipe()
        case.addCleanup(os.close, self._read)
        case.addCleanup(os.close, self.fd)

    def report(self, reactor: Any) -> StartupReport:
        return StartupReport(reactor, self.fd)

    def written(self) -> str:
        os.set_blocking(self._read, False)
        try:
            return os.read(self._read, 65536).decode()
        except BlockingIOError:
            return ""


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

    def test_usage_ledger_settings(self) -> None:
        """
        The ledger is off by default, in the current directory for a mock
        run, under systemd's state directory when there is one, wherever
        --usage-db says, and off when told; a bad value or prices file
        stops the start in one line.
        """
        self.assertIsNone(parse([]).config.usage_db)
        self.assertEqual(parse(["--mock-upstream"], {}).config.usage_db, os.path.abspath("oaiproxy-usage.sqlite3"))
        directory = temp_dir(self)
        state = {"OPENAI_API_KEY": KEY, "STATE_DIRECTORY": directory}
        self.assertEqual(parse([], state).config.usage_db, os.path.join(directory, "usage.sqlite3"))
        self.assertIsNone(parse(["--usage-db", "off"], state).config.usage_db)
        url = "postgresql://u@db/usage"
        self.assertEqual(parse([], {"OPENAI_API_KEY": KEY, "OAIPROXY_USAGE_DB": url}).config.usage_db, url)
        self.assertStartupError(["--usage-db", "postgresql://u:pw@db/usage"], {"OPENAI_API_KEY": KEY}, "password")
        prices = os.path.join(directory, "prices.toml")
        with open(prices, "w") as f:
            f.write('[models."m"]\ninput = 1\n')
        self.assertStartupError(["--prices-file", prices], {"OPENAI_API_KEY": KEY}, "no output price")

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
        self,
        argv: list[str],
        env: Mapping[str, str] = {"OPENAI_API_KEY": KEY},
        mallopt: Callable[[int, int], int] = lambda parameter, value: 1,
    ) -> tuple[Any, HonestReactor, list[dict[str, Any]]]:
        reactor = HonestReactor()
        # A --mock-upstream run keeps its usage ledger in the current
        # directory: a fresh one, not the checkout.
        here = os.getcwd()
        os.chdir(temp_dir(self))
        self.addCleanup(os.chdir, here)
        with capturedLogs() as events:
            service = makeService(parse(argv, env), reactor=reactor, find_mallopt=lambda: mallopt)
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        return service, reactor, events

    def test_startup_heap_frozen_once_running(self) -> None:
        """
        Once every listener is bound and the reactor runs, the startup heap
        is collected and frozen out of the garbage collector's full
        collections (L{freeze_startup_heap}), not before: an object made
        during startup is frozen with the rest.
        """
        calls: list[str] = []
        self.patch(lifecycle.gc, "collect", lambda: calls.append("collect"))
        self.patch(lifecycle.gc, "freeze", lambda: calls.append("freeze"))
        _, reactor, _ = self.start(["--mock-upstream"])
        self.assertEqual(calls, [])
        reactor.run()
        self.assertEqual(calls, ["collect", "freeze"])

    def test_switch_variables_only_on_or_off(self) -> None:
        """
        The on/off variables of --no-stream-usage and --no-malloc-tuning take
        on or off (any case); anything else (a 0, a typo) stops the start
        with a line naming the variable, instead of meaning on.
        """
        self.assertFalse(parse(["--mock-upstream"], {"OAIPROXY_MALLOC_TUNING": "OFF"}).config.malloc_tuning)
        self.assertTrue(parse(["--mock-upstream"], {"OAIPROXY_STREAM_USAGE": "on"}).config.stream_usage)
        for variable in ("OAIPROXY_MALLOC_TUNING", "OAIPROXY_STREAM_USAGE"):
            with self.assertRaises(SystemExit) as raised:
                parse(["--mock-upstream"], {variable: "0"})
            self.assertIn(f"{variable} must be on or off, not '0'", str(raised.exception.code))

    def test_allocator_tuned_once_running(self) -> None:
        """
        Once the reactor runs, the allocator is tuned to keep freed large
        blocks (L{oaiproxy.daemon.allocator}), not before; an operator's
        own malloc thresholds in the environment are left to stand, and so
        is glibc with C{--no-malloc-tuning} or its variable.
        """
        calls: list[tuple[int, int]] = []

        def mallopt(parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

        _, reactor, _ = self.start(["--mock-upstream"], mallopt=mallopt)
        self.assertEqual(calls, [])
        reactor.run()
        self.assertEqual(calls, list(MALLOC_SETTINGS))
        for argv, env in (
            (["--mock-upstream"], {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}),
            (["--mock-upstream", "--no-malloc-tuning"], {}),
            (["--mock-upstream"], {"OAIPROXY_MALLOC_TUNING": "off"}),
        ):
            calls.clear()
            _, reactor, _ = self.start(argv, env, mallopt)
            reactor.run()
            self.assertEqual(calls, [], (argv, env))

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

    def test_requests_go_below_the_upstream_base(self) -> None:
        """
        A chat request goes to the C{--upstream} base plus
        C{/chat/completions}, one slash between them even when the base
        was given with a trailing one.
        """
        _, reactor, _ = self.start(["--upstream", "http://localhost:8000/v1/"])
        stub = StubTreq(reactor.tcpServers[0][1].resource)
        stub.post("http://p/v1/chat/completions", data=chat_body(), headers={b"content-type": [b"application/json"]})
        [(_, port, factory, *_)] = reactor.tcpClients
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        self.assertEqual(port, 8000)
        self.assertEqual(transport.value().split(b"\r\n", 1)[0], b"POST /v1/chat/completions HTTP/1.1")

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

    def test_open_relay_refused_before_binding(self) -> None:
        """
        Safe by default: a listener reachable from other hosts with no
        client keys stops startup with one line saying what to do, decided
        from the description before anything is bound or announced (twistd
        calls makeService before it daemonizes, so the line reaches the
        terminal).
        """
        pem = self_signed_pem(temp_dir(self))
        for description, base in [
            ("tcp:8080", "http://0.0.0.0:8080"),
            ("tcp:8080:interface=0.0.0.0", "http://0.0.0.0:8080"),
            ("tcp6:8080", "http://[::]:8080"),
            (f"ssl:8443:interface=10.0.0.1:privateKey={pem}", "https://10.0.0.1:8443"),
        ]:
            reactor = HonestReactor()
            with capturedLogs() as events, self.assertRaises(SystemExit) as caught:
                makeService(parse(["--port", description]), reactor=reactor)
            message = str(caught.exception.code)
            self.assertIn(f"refusing to start: {base} is reachable from other hosts", message)
            self.assertIn("--allow-open-relay", message)
            self.assertNotIn("\n", message)
            self.assertEqual((reactor.tcpServers, reactor.sslServers), ([], []))
            self.assertNotIn("listening on", repr(events))

    def test_planned_address(self) -> None:
        """
        The address a description will bind is known beforehand for IP
        literals and UNIX sockets; a host name waits for the bound port.
        """
        self.assertEqual(planned_address("tcp:80:interface=127.0.0.1"), IPv4Address("TCP", "127.0.0.1", 80))
        self.assertEqual(planned_address("tcp:80"), IPv4Address("TCP", "0.0.0.0", 80))
        self.assertEqual(getattr(planned_address(r"tcp6:80:interface=\:\:1"), "host", None), "::1")
        self.assertEqual(getattr(planned_address("unix:/run/p.sock"), "name", None), b"/run/p.sock")
        self.assertIsNone(planned_address("tcp:80:interface=localhost"))
        self.assertIsNone(planned_address("nonsense:1"))

    def test_open_relay_refused_once_bound(self) -> None:
        """
        Where only the bound port tells the address (a host name), the
        check runs on the bound port before anything is accepted or
        announced: the port is closed again and startup ends with status 1
        (an Exception too, so that a daemonized twistd tells its parent),
        the reason on the original standard error.
        """
        reactor = HonestReactor()
        stderr = Stderr(self)
        service = makeService(
            parse(["--port", "tcp:8080:interface=proxy.example"]), reactor=reactor, report=stderr.report(reactor)
        )
        with capturedLogs() as events, self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertIsInstance(caught.exception, Exception)
        self.assertEqual(caught.exception.code, 1)
        [port] = reactor.ports
        self.assertFalse(port.listening)
        self.assertNotIn("listening on", repr(events))
        written = stderr.written()
        self.assertIn("refusing to start: http://proxy.example:8080 is reachable from other hosts", written)
        self.assertEqual(written.count("\n"), 1)

    def test_open_relay_refused_with_workers(self) -> None:
        """
        With --workers the supervisor refuses before binding and before any
        worker starts, and, for a listener only its bound port can judge,
        once bound and still before any worker starts.
        """
        reactor = HonestReactor()
        with self.assertRaises(SystemExit) as caught:
            makeService(parse(["--port", "tcp:8080", "--workers", "2"]), reactor=reactor)
        self.assertIn("refusing to start", str(caught.exception.code))
        self.assertEqual((reactor.tcpServers, reactor.spawned), ([], []))

        stderr = Stderr(self)
        service = makeService(
            parse(["--port", "tcp:8080:interface=proxy.example", "--workers", "2"]),
            reactor=reactor,
            report=stderr.report(reactor),
        )
        with self.assertRaises(StartupError):
            service.privilegedStartService()
        self.assertEqual(reactor.spawned, [])
        self.assertIn("refusing to start: http://proxy.example:8080", stderr.written())

        keyed = makeService(
            parse(
                ["--port", "tcp:8080", "--workers", "2"],
                # (The group's metrics directory: its fake workers never end.)
                {"OPENAI_API_KEY": KEY, "OAIPROXY_CLIENT_KEYS": "k", "RUNTIME_DIRECTORY": temp_dir(self)},
            ),
            reactor=reactor,
        )
        keyed.privilegedStartService()
        keyed.startService()
        self.addCleanup(keyed.stopService)
        self.assertEqual(len(reactor.spawned), 2)

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
        non-zero, which systemd sees), rather than only logging it; the
        reason goes to the standard error twistd was started with, not into
        the log on standard output, and says what to do.
        """
        reactor = RaisingMemoryReactor(
            listenException=CannotListenError("127.0.0.1", 8080, OSError(98, "Address already in use"))
        )
        stderr = Stderr(self)
        service = makeService(parse([]), reactor=reactor, report=stderr.report(reactor))
        with capturedLogs() as events, self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(
            stderr.written(),
            "twistd oaiproxy: error: cannot listen on tcp:8080:interface=127.0.0.1: [Errno 98] Address already in "
            "use; another process holds it: choose another port with --port (or PORT)\n",
        )
        # Not also as a log line: under --nodaemon that is standard output.
        self.assertNotIn("cannot listen", repr(events))

    def test_systemd_socket_missing(self) -> None:
        """
        A socket-activated endpoint whose socket was not passed names the
        socket and the unit setting that passes it.
        """
        with self.assertRaises(SystemExit) as caught:
            makeService(parse(["--port", "systemd:domain=INET:name=oaiproxy"]), reactor=MemoryReactorClock())
        message = str(caught.exception.code)
        self.assertIn("systemd passed no socket named 'oaiproxy'", message)
        self.assertIn("FileDescriptorName=oaiproxy", message)
        with self.assertRaises(SystemExit) as caught:
            makeService(parse(["--port", "systemd:domain=INET:index=3"]), reactor=MemoryReactorClock())
        self.assertIn("systemd passed no socket at that index", str(caught.exception.code))

    def test_empty_clients_file_warns(self) -> None:
        """
        A clients file that lists nobody turns client authentication off:
        said at startup, and again by a reload that leaves it so.
        """
        path = os.path.join(temp_dir(self), "clients.toml")
        open(path, "w").close()
        options = parse(["--client-keys-file", path])
        with capturedLogs() as events:
            makeService(options, reactor=HonestReactor())
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["path"], path)
        self.assertIn("client authentication is OFF", warning["log_format"])
        credentials = Credentials(Secret(KEY.encode()), options.config.clients)
        with capturedLogs() as events:
            self.assertTrue(_reloader(options, credentials, _Exposure())())
        self.assertEqual([e.get("path") for e in events if e["log_level"] == LogLevel.warn], [path])
        with open(path, "w") as f:
            f.write(file_entry("alice", "key-of-alice"))
        with capturedLogs() as events:
            self.assertTrue(_reloader(options, credentials, _Exposure())())
            makeService(parse(["--client-keys-file", path]), reactor=HonestReactor())
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])

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


def inherited_socket(case: SynchronousTestCase, host: str) -> int:
    """
    A descriptor for a socket bound to C{host}, as a supervisor hands one to
    a worker (not listening: nothing can connect).  The worker's endpoint
    closes it once adopted.
    """
    sock = socket.socket()
    case.addCleanup(sock.close)
    sock.bind((host, 0))
    fd = os.dup(sock.fileno())

    def close() -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    case.addCleanup(close)
    return fd


class WorkerTests(SynchronousTestCase):
    """
    A worker (--worker-listener) serves the configuration its supervisor
    writes to its standard input, never what the files say.
    """

    def worker(self, host: str, secrets: GroupSecrets, argv: Sequence[str] = ()) -> tuple[Any, HonestReactor, int]:
        fd = inherited_socket(self, host)
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.write(write, encode_secrets(secrets))
        options = parse(["--worker-listener", f"{fd}:INET", "--worker-share", "2", *argv], {})
        reactor = HonestReactor()
        service = makeService(options, reactor=reactor, supervisor_input=read)
        return service, reactor, write

    def test_public_socket_without_clients_refused(self) -> None:
        """
        A worker handed a socket other hosts can reach, and no clients,
        exits non-zero before it listens.
        """
        with capturedLogs() as events, self.assertRaises(SystemExit) as caught:
            self.worker("0.0.0.0", GroupSecrets(Secret(KEY.encode()), registry()))
        self.assertIn("refusing to start: http://0.0.0.0:", str(caught.exception.code))
        self.assertNotIn("listening on", repr(events))

    def test_no_configuration_no_worker(self) -> None:
        """
        A worker whose supervisor closed the pipe without a configuration
        does not start.
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        os.close(write)
        fd = inherited_socket(self, "127.0.0.1")
        with self.assertRaises(SystemExit) as caught:
            makeService(parse(["--worker-listener", f"{fd}:INET"], {}), reactor=HonestReactor(), supervisor_input=read)
        self.assertIn("before sending the configuration", str(caught.exception.code))

    def test_serves_the_supervisors_configuration(self) -> None:
        """
        The files named on the command line are not read (neither exists);
        the key and clients are the supervisor's, and so are the reloads
        that follow on the pipe; one that would leave a public worker
        without clients is refused there too.  A SIGHUP to the worker
        itself is ignored.
        """
        secrets = GroupSecrets(Secret(b"sk-from-supervisor"), registry(b"key-one"))
        argv = ["--client-keys-file", "/nonexistent/clients.toml", "--api-key-file", "/nonexistent/key"]
        service, reactor, pipe = self.worker("0.0.0.0", secrets, argv)
        installed: list[Any] = []
        [reader_service] = [s for s in service if isinstance(s, _SecretsService)]
        reader_service._install = lambda signum, handler: installed.append((signum, handler))
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(installed, [(signal.SIGHUP, signal.SIG_IGN)])
        [(_, _, site)] = reactor.adoptedPorts
        stub = StubTreq(site.resource)

        def status(key: bytes) -> int:
            response = self.successResultOf(stub.get("http://p/v1/models", headers={"Authorization": b"Bearer " + key}))
            self.successResultOf(stub.content(response))
            return int(response.code)

        self.assertEqual(status(b"key-two"), 401)
        [reader] = reactor.readers
        os.write(pipe, encode_secrets(GroupSecrets(Secret(b"sk-from-supervisor"), registry(b"key-two"))))
        with capturedLogs() as events:
            reader.doRead()
        [reloaded] = events
        self.assertEqual((reloaded["key"], reloaded["count"]), ("unchanged", 1))
        self.assertEqual(status(b"key-one"), 401)
        os.write(pipe, encode_secrets(GroupSecrets(Secret(b"sk-from-supervisor"), registry())))
        with capturedLogs() as events:
            reader.doRead()
        self.assertEqual([e["log_level"] for e in events], [LogLevel.error])
        self.assertEqual(status(b"anything"), 401)


class HelpTests(SynchronousTestCase):
    def test_help_shows_the_main_options_first(self) -> None:
        """
        --help starts with the options a new user needs, leaves out the
        internal ones and those that exist only to be refused (which still
        work or refuse), and says how to mint a client key.
        """
        text = Options(environ={}).getUsage(width=2000)
        shown = [line.split()[0].strip("-=") for line in text.splitlines() if line.startswith("  --")]
        self.assertEqual(shown[:5], ["port", "upstream", "api-key-file", "client-keys-file", "mock-upstream"])
        for hidden in ("worker-listener", "worker-share", "api-key", "client-keys"):
            self.assertNotIn(hidden, shown)
        self.assertIn("python -m oaiproxy keygen", text)
        self.assertIn("max-body-bytes", shown)
        self.assertEqual(parse(["--worker-share", "3"]).config.worker_share, 3)
        with self.assertRaises(SystemExit):
            parse(["--api-key", "sk-x"])
        # The options' own list is intact after --help.
        self.assertIn("worker-share=", Options(environ={}).longOpt)


class JsonLogTests(SynchronousTestCase):
    def test_events_as_json_lines(self) -> None:
        """
        Each event is one JSON object on a line: time, level, namespace and
        the text a text log shows; a failure adds its traceback.
        """
        stream = io.StringIO()
        observer = JsonLogObserver(stream, now=lambda: 12.5)
        observer(
            {
                "log_format": "listening on {base}",
                "base": "http://a",
                "log_level": LogLevel.info,
                "log_namespace": "oaiproxy.daemon.tap",
                "log_time": 1.23456,
            }
        )
        observer({"log_format": "{log_io}", "log_io": "a\nb", "log_level": LogLevel.error, "log_namespace": "stderr"})
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            observer({"log_format": "boom", "log_failure": Failure(), "log_level": LogLevel.critical})
        lines = stream.getvalue().splitlines()
        records = [json.loads(line) for line in lines]
        self.assertEqual(
            records[0],
            {"time": 1.235, "level": "info", "namespace": "oaiproxy.daemon.tap", "message": "listening on http://a"},
        )
        self.assertEqual((records[1]["time"], records[1]["message"]), (12.5, "a\nb"))
        self.assertIn("ZeroDivisionError", records[2]["traceback"])
        self.assertEqual(len(lines), 3)

    def test_selected_where_twistd_logs_to_stdout(self) -> None:
        """
        --log-format json makes twistd log as JSON when it would log to
        standard output (--nodaemon, no --logfile), as --logger would; an
        operator's own --logger, --logfile or --syslog is left alone (a
        daemon is refused: test_refused_daemonizing).
        """

        def logger(*twistd: str, log_format: str = "json") -> Any:
            config = ServerOptions()
            config.parseOptions([*twistd, "oaiproxy", "--mock-upstream", "--log-format", log_format])
            return config["logger"]

        self.assertEqual(getattr(logger("--nodaemon"), "__name__", None), "observer")
        self.assertIsNone(logger("--nodaemon", log_format="text"))
        self.assertIsNone(logger("--nodaemon", "--logfile", "x.log"))
        self.assertIsNone(logger("--nodaemon", "--syslog"))
        self.assertEqual(
            logger("--nodaemon", "--logger", "twisted.logger.textFileLogObserver"),
            textFileLogObserver,
        )
        self.assertEqual(OBSERVER_NAME, "oaiproxy.observe.jsonlog.observer")

    def test_refused_daemonizing(self) -> None:
        """
        --log-format json while twistd daemonizes is refused before it
        does: its lines would go to the /dev/null twistd makes standard
        output, every access entry lost.
        """
        config = ServerOptions()
        with self.assertRaises(SystemExit) as raised:
            config.parseOptions(["oaiproxy", "--mock-upstream", "--log-format", "json"])
        self.assertIn("add -n (--nodaemon", str(raised.exception.code))
        config = ServerOptions()
        config.parseOptions(["--nodaemon", "oaiproxy", "--mock-upstream", "--log-format", "json"])

    def test_where_workers_log(self) -> None:
        """
        The workers' lines pass through the supervisor's standard output
        only where its own log is that output; daemonised, or logging to a
        file, syslog or an operator's observer, they are relayed into its
        log.
        """

        def through(*twistd: str) -> bool:
            config = ServerOptions()
            config.parseOptions([*twistd, "oaiproxy", "--mock-upstream", "--workers", "2"])
            return logs_to_standard_output(config)

        self.assertTrue(through("--nodaemon"))
        self.assertTrue(through("--nodaemon", "--logfile", "-"))
        self.assertTrue(logs_to_standard_output(None))
        self.assertTrue(logs_to_standard_output({}))
        self.assertFalse(through())
        self.assertFalse(through("--logfile", "x.log"))
        self.assertFalse(through("--nodaemon", "--logfile", "x.log"))
        self.assertFalse(through("--nodaemon", "--syslog"))
        self.assertFalse(through("--nodaemon", "--logger", "twisted.logger.textFileLogObserver"))
        config = ServerOptions()
        config.parseOptions(["--nodaemon", "oaiproxy", "--mock-upstream", "--log-format", "json"])
        self.assertTrue(logs_to_standard_output(config))


class UpstreamsFileTests(SynchronousTestCase):
    """
    --upstreams-file: loaded at startup in place of the single-upstream
    options, and again on SIGHUP.
    """

    def write(self, text: str) -> str:
        directory = temp_dir(self)
        for name in ("one", "two", "three"):
            with open(os.path.join(directory, name + ".key"), "w") as f:
                f.write(f"sk-{name}-key\n")
        path = os.path.join(directory, "upstreams.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    ENTRIES = (
        '[[upstreams]]\nname = "one"\nurl = "https://one.test/v1"\nkey_file = "one.key"\n'
        '[[upstreams]]\nname = "two"\nurl = "https://two.test/v1"\nkey_file = "two.key"\npriority = 1\n'
    )

    def test_loaded_into_the_pool(self) -> None:
        """
        The file's entries are the pool, from the option or the variable;
        no upstream key is needed besides theirs.
        """
        path = self.write(self.ENTRIES)
        for options in (parse(["--upstreams-file", path], {}), parse([], {"OAIPROXY_UPSTREAMS_FILE": path})):
            self.assertEqual([u.name for u in options.config.upstreams], ["one", "two"])
            self.assertEqual(options.config.max_attempts, 3)
            self.assertIsNone(options.config.first_byte_timeout)

    def test_single_upstream_options_clash(self) -> None:
        """
        The file and a single-upstream option at once: one line naming both.
        """
        path = self.write(self.ENTRIES)
        for argv, env, named in [
            (["--upstream", "https://x.test/v1"], {}, "--upstream"),
            (["--api-key-file", path], {}, "--api-key-file"),
            (["--upstream-header", "X-A:b"], {}, "--upstream-header"),
            ([], {"OPENAI_BASE_URL": "https://x.test/v1"}, "OPENAI_BASE_URL"),
        ]:
            with self.assertRaises(SystemExit) as caught:
                parse(["--upstreams-file", path, *argv], env)
            message = str(caught.exception.code)
            self.assertIn(path, message)
            self.assertIn(named, message)

    def test_mistake_names_file_entry_field(self) -> None:
        """
        A mistake in the file stops startup naming the file, the entry and
        the field.
        """
        path = self.write(self.ENTRIES + '[[upstreams]]\nname = "three"\nurl = "https://3.test"\nkey_file = "nope"\n')
        with self.assertRaises(SystemExit) as caught:
            parse(["--upstreams-file", path], {})
        message = str(caught.exception.code)
        self.assertIn(path, message)
        self.assertIn("three", message)
        self.assertIn("key_file", message)

    def test_allow_list_model_nobody_serves(self) -> None:
        """
        A client allowed a model that no upstream serves stops startup,
        naming the file, the client and the model.
        """
        path = self.write(self.ENTRIES.replace("priority = 1\n", 'priority = 1\nmodels = ["gpt-4o*"]\n', 1))
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace('key_file = "one.key"\n', 'key_file = "one.key"\nmodels = ["gpt-4o*"]\n', 1))
        clients = os.path.join(os.path.dirname(path), "clients.toml")
        with open(clients, "w") as f:
            f.write(file_entry("alice", "key-of-alice", ["gpt-4o-mini", "o3"]))
        with self.assertRaises(SystemExit) as caught:
            parse(["--upstreams-file", path, "--client-keys-file", clients], {})
        message = str(caught.exception.code)
        for named in (path, "'alice'", "'o3'"):
            self.assertIn(named, message)

    def test_reload_keeps_breakers_and_a_failed_one_keeps_the_pool(self) -> None:
        """
        SIGHUP reads the file again: a name that stays keeps its breaker; a
        file with a mistake changes nothing and says why.
        """
        path = self.write(self.ENTRIES)
        options = parse(["--upstreams-file", path, "--port", "tcp:0:interface=127.0.0.1"], {})
        config = options.config
        credentials = Credentials(Secret(b"unused"), config.clients)
        built = build_site(
            config,
            http=object(),
            credentials=credentials,
            clock=Clock(),
            lifecycle=Lifecycle(),
            metrics=Metrics(),
            access_log=lambda record: None,
        )
        upstreams = built.upstreams
        breaker = upstreams.pool["one"].breaker
        with open(path, "a") as f:
            f.write('[[upstreams]]\nname = "three"\nurl = "https://three.test/v1"\nkey_file = "three.key"\n')
        self.assertTrue(_reloader(options, credentials, _Exposure(), upstreams=upstreams)())
        self.assertEqual([m.name for m in upstreams.pool.members], ["one", "two", "three"])
        self.assertIs(upstreams.pool["one"].breaker, breaker)
        with open(path, "a") as f:
            f.write('[[upstreams]]\nname = "three"\nurl = "https://again.test/v1"\nkey_file = "three.key"\n')
        with capturedLogs() as events:
            self.assertFalse(_reloader(options, credentials, _Exposure(), upstreams=upstreams)())
        self.assertEqual([m.name for m in upstreams.pool.members], ["one", "two", "three"])
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("keeping the upstreams", error["log_format"])
        self.assertIn("names are unique", error["why"])
