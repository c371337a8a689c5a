"""
C{--shared-state} in the daemon: its options (the password never on the
command line nor in a message), the startup check before anything is bound
(once per group, before any worker), the link in the service tree, the
password handed to workers instead of read by them, and the shared state's
metrics.  In memory: the link talks to a StringTransport.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.application.service import MultiService
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry
from oaiproxy.config import Config, Secret
from oaiproxy.daemon import tap
from oaiproxy.daemon.tap import Options, makeService, shared_instances
from oaiproxy.daemon.workers import GroupSecrets, Supervisor, encode_secrets
from oaiproxy.fake.harness import registry
from oaiproxy.sharedstate.link import SCRIPTS, RedisLink
from tests.daemon.test_tap import KEY, HonestReactor, inherited_socket
from tests.support import temp_dir

URL = "redis://127.0.0.1:6390/0"
PASSWORD = "redis-SESAME-4711"


def parse(argv: list[str], env: Mapping[str, str] = {"OPENAI_API_KEY": KEY}) -> Options:
    options = Options(environ=dict(env))
    options.parseOptions(argv)
    return options


def password_file(case: SynchronousTestCase, name: str = "password", value: str = PASSWORD) -> str:
    path = os.path.join(temp_dir(case), name)
    with open(path, "w") as f:
        f.write(value + "\n")
    return path


class OptionTests(SynchronousTestCase):
    def test_password_never_on_the_command_line(self) -> None:
        """
        A password in the URL is refused without being shown, and so is
        --shared-state-password (which getopt would otherwise take for a
        prefix of --shared-state-password-file).
        """
        for argv in (
            ["--shared-state", f"redis://:{PASSWORD}@127.0.0.1:6390/0"],
            ["--shared-state", f"redis://oaiproxy:{PASSWORD}@127.0.0.1/0"],
            ["--shared-state", URL, "--shared-state-password", PASSWORD],
        ):
            with self.assertRaises(SystemExit) as caught:
                parse(argv)
            message = str(caught.exception.code)
            self.assertIn("password", message)
            self.assertNotIn(PASSWORD, message)

    def test_password_from_file_or_credential(self) -> None:
        """
        The password comes from the file, else the systemd credential, and
        the configuration never shows it.
        """
        path = password_file(self)
        config = parse(["--shared-state", URL, "--shared-state-password-file", path]).config
        self.assertEqual(config.shared_state_password, Secret(PASSWORD.encode()))
        self.assertNotIn(PASSWORD, repr(config))
        credentials = os.path.dirname(password_file(self, "shared_state_password", "from-credential"))
        env = {"OPENAI_API_KEY": KEY, "CREDENTIALS_DIRECTORY": credentials}
        self.assertEqual(parse(["--shared-state", URL], env).config.shared_state_password, Secret(b"from-credential"))
        self.assertIsNone(parse(["--shared-state", URL]).config.shared_state_password)
        with self.assertRaises(SystemExit) as caught:
            parse(["--shared-state", URL, "--shared-state-password-file", "/nonexistent/" + PASSWORD])
        self.assertNotIn(PASSWORD, str(caught.exception.code))

    def test_options_need_the_shared_state(self) -> None:
        """
        The shared-state options without --shared-state are a mistake, and
        the CA file needs rediss://.
        """
        for argv in (
            ["--shared-state-prefix", "a:"],
            ["--shared-state-instances", "4", "--shared-state-lease", "3"],
            ["--shared-state-password-file", "/etc/x"],
        ):
            with self.assertRaises(SystemExit) as caught:
                parse(argv)
            self.assertIn("--shared-state (OAIPROXY_SHARED_STATE)", str(caught.exception.code))
        with self.assertRaises(SystemExit) as caught:
            parse(["--shared-state", URL, "--shared-state-ca-file", "/etc/ca.pem"])
        self.assertIn("rediss://", str(caught.exception.code))
        with self.assertRaises(SystemExit) as caught:
            parse(["--shared-state", "redis://127.0.0.1/zero"])
        self.assertIn("must be a number", str(caught.exception.code))

    def test_instances_default_to_the_workers(self) -> None:
        """
        The group size the fallback divides by: the option, else the
        workers (a worker knows them as its share), else 1.
        """
        base = Config(ports=(), upstream="", api_key=None, shared_state=URL)
        self.assertEqual(shared_instances(base), 1)
        self.assertEqual(shared_instances(Config(**{**base.__dict__, "workers": 4})), 4)
        self.assertEqual(shared_instances(Config(**{**base.__dict__, "worker_share": 3})), 3)
        self.assertEqual(shared_instances(Config(**{**base.__dict__, "workers": 4, "shared_state_instances": 8})), 8)


def find(service: Any, kind: type) -> list[Any]:
    """
    The services of C{kind} anywhere in a service tree.
    """
    found = []
    for child in service:
        if isinstance(child, kind):
            found.append(child)
        elif isinstance(child, MultiService):
            found += find(child, kind)
    return found


def links(service: Any) -> list[RedisLink]:
    return find(service, RedisLink)


def answer_connect(reactor: HonestReactor, auth: bool = False, index: int = -1) -> StringTransport:
    """
    Play the Redis server for the link's connection attempt: every reply
    the connect sequence waits for (AUTH, PING, a SCRIPT LOAD per script).
    """
    _, _, factory, _, _ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    # One at a time: each is the answer to the command the last one let
    # the connect sequence send.
    for reply in [b"+OK\r\n"] * auth + [b"+PONG\r\n"] + [b"$2\r\nab\r\n"] * len(SCRIPTS):
        protocol.dataReceived(reply)
    return transport


class ServiceTests(SynchronousTestCase):
    def checked(self) -> tuple[list[Config], Any]:
        calls: list[Config] = []
        return calls, calls.append

    def test_checked_before_binding(self) -> None:
        """
        The check runs once, before anything is bound; its refusal ends
        startup with nothing bound.
        """
        reactor = HonestReactor()

        def refuse(config: Config) -> None:
            raise SystemExit("twistd oaiproxy: error: cannot use the shared state at 127.0.0.1:6390 (refused): ...")

        with self.assertRaises(SystemExit):
            makeService(parse(["--shared-state", URL]), reactor=reactor, check_shared=refuse)
        self.assertEqual(reactor.tcpServers, [])
        calls, check = self.checked()
        service = makeService(parse(["--shared-state", URL]), reactor=reactor, check_shared=check)
        self.assertEqual([c.shared_state for c in calls], [URL])
        self.assertEqual(reactor.tcpServers, [])
        [link] = links(service)
        self.assertEqual(link.deadline, 0.05)

    def test_supervisor_checks_once_before_any_worker(self) -> None:
        """
        With --workers, the supervisor checks (once) before binding and
        before any worker starts, and holds no link of its own; the
        password goes to the workers with the other secrets.
        """
        reactor = HonestReactor()
        calls, check = self.checked()
        argv = ["--shared-state", URL, "--shared-state-password-file", password_file(self), "--workers", "2"]
        env = {"OPENAI_API_KEY": KEY, "OAIPROXY_CLIENT_KEYS": "k"}
        service = makeService(parse(argv, env), reactor=reactor, check_shared=check)
        self.assertEqual((len(calls), reactor.tcpServers, reactor.spawned), (1, [], []))
        self.assertEqual(links(service), [])
        [supervisor] = [s for s in service if isinstance(s, Supervisor)]
        self.assertEqual(supervisor.secrets.shared_state_password, Secret(PASSWORD.encode()))

    def test_worker_uses_the_handed_password(self) -> None:
        """
        A worker never reads the password file (it does not exist here):
        its link authenticates with the password the supervisor handed
        it, and it does not check again.
        """
        secrets = GroupSecrets(Secret(KEY.encode()), registry(b"k"), None, Secret(b"handed-password"))
        fd = inherited_socket(self, "127.0.0.1")
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.write(write, encode_secrets(secrets))
        argv = ["--shared-state", URL, "--shared-state-password-file", "/nonexistent/password"]
        options = parse(["--worker-listener", f"{fd}:INET", "--worker-share", "2", *argv], {})
        self.patch(tap, "check_shared_state_now", lambda config: self.fail("a worker checked again"))
        reactor = HonestReactor()
        service = makeService(options, reactor=reactor, supervisor_input=read)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        transport = answer_connect(reactor, auth=True)
        self.assertIn(b"handed-password", transport.value())

    def test_metrics_follow_the_link(self) -> None:
        """
        /metrics shows the shared state: 0 until connected, 1 once up,
        0 again when it goes down (one episode counted), and the requests
        admitted by the local share meanwhile.
        """
        from treq.testing import StubTreq

        reactor = HonestReactor()
        clients = os.path.join(temp_dir(self), "clients.toml")
        with open(clients, "w") as f:
            f.write(file_entry("team", "k") + "requests_per_minute = 10\n")
        argv = ["--shared-state", URL, "--client-keys-file", clients]
        service = makeService(parse(argv), reactor=reactor, check_shared=lambda c: None)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        [(_, site, _, _)] = reactor.tcpServers
        [link] = links(service)
        stub = StubTreq(site.resource)

        def metrics() -> str:
            response = self.successResultOf(stub.get("http://p/metrics", headers={"Authorization": b"Bearer k"}))
            return str(self.successResultOf(stub.content(response)).decode())

        self.assertIn("oaiproxy_shared_state_up 0.0", metrics())
        answer_connect(reactor)
        self.assertTrue(link.up)
        self.assertIn("oaiproxy_shared_state_up 1.0", metrics())
        self.assertIn("oaiproxy_shared_state_episodes_total 0.0", metrics())
        with capturedLogs() as events:
            reactor.advance(5)  # the keepalive PING...
            reactor.advance(0.1)  # ...gets no answer within the deadline:
            self.assertTrue(link.up)  # counted late, the link still up...
            self.assertIn("oaiproxy_shared_state_late_total 1.0", metrics())
            reactor.advance(link.silence)  # ...until Redis is silent that long
        self.assertFalse(link.up)
        self.assertEqual([e["log_level"].name for e in events if "unreachable" in e["log_format"]], ["critical"])
        text = metrics()
        self.assertIn("oaiproxy_shared_state_up 0.0", text)
        self.assertIn("oaiproxy_shared_state_episodes_total 1.0", text)
        self.assertIn("oaiproxy_shared_state_fallback_admitted_total 0.0", text)
        # Admitted at this process's share while Redis is down (the request
        # then waits on an upstream the memory reactor never connects).
        with capturedLogs():
            stub.post(
                "http://p/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": b"Bearer k"},
            )
        self.assertIn("oaiproxy_shared_state_fallback_admitted_total 1.0", metrics())


class _InFlight:
    """
    A request in flight, as the drain sees it.
    """

    def cut_off_for_shutdown(self) -> None:
        pass


class StopTests(SynchronousTestCase):
    def test_link_outlives_the_drain(self) -> None:
        """
        On stop, the link stays up while requests drain (their
        settlements, which free their concurrency slots, go through it),
        and closes a deadline after the drain is over.
        """
        from oaiproxy.daemon.lifecycle import DrainService

        reactor = HonestReactor()
        env = {"OPENAI_API_KEY": KEY, "OAIPROXY_CLIENT_KEYS": "k"}
        service = makeService(parse(["--shared-state", URL], env), reactor=reactor, check_shared=lambda c: None)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        answer_connect(reactor)
        [link] = links(service)
        [drain] = find(service, DrainService)
        request = _InFlight()
        drain._lifecycle.started(request)
        with capturedLogs():
            stopped = service.stopService()
        self.assertTrue(link.running and link.up)
        self.assertNoResult(stopped)
        with capturedLogs():
            drain._lifecycle.ended(request)
        # Drained; the settlements the drain's end set off still go out.
        self.assertTrue(link.running and link.up)
        reactor.advance(link.deadline)
        self.successResultOf(stopped)
        self.assertFalse(link.running or link.up)
