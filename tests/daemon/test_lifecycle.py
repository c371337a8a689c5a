"""
Life under a service manager: sd_notify messages, readiness, SIGHUP reload
and the graceful drain, with fake clocks and real datagram sockets on the
file system (no systemd needed); and how a failed startup is told and ends
the process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from typing import Any, Callable

import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.access.clients import Credentials, file_entry
from oaiproxy.config import Secret
from oaiproxy.daemon.lifecycle import (
    DrainService,
    ListenerService,
    ReadinessService,
    ReloadService,
    StartupError,
    StartupReport,
)
from oaiproxy.daemon.sdnotify import Notifier, encode, notify_address
from oaiproxy.daemon.tap import Options, _Exposure, _reloader
from oaiproxy.drain import CLOSE_GRACE_SECONDS, Lifecycle
from oaiproxy.fake.harness import Harness, chat_body
from oaiproxy.server.site import ProxySite
from oaiproxy.server.tree import HealthResource, build_root
from oaiproxy.web import Endpoint
from tests.support import temp_dir


def entries(*names: str) -> str:
    """
    A keys file for clients whose key is C{key-of-<name>}.
    """
    return "\n".join(file_entry(name, f"key-of-{name}") for name in names)


class RecordingNotifier(Notifier):
    """
    A notifier that keeps what it would have sent.
    """

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, str]] = []

    def notify(self, **fields: str) -> None:
        self.sent.append(fields)


def datagram_socket(case: SynchronousTestCase, address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    case.addCleanup(sock.close)
    sock.bind(address)
    sock.settimeout(5)
    return sock


class NotifyTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        """
        A path is used as is, an '@' name is an abstract socket, and no
        variable (not under systemd) means no notifications.
        """
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_address("@sd-notify/1"), b"\0sd-notify/1")
        self.assertIsNone(notify_address(None))
        self.assertIsNone(notify_address(""))
        self.assertIsNone(notify_address("relative/path"))

    def test_one_line_values(self) -> None:
        """
        A value with a newline would smuggle in another assignment; it is
        refused.
        """
        self.assertEqual(encode({"READY": "1", "STATUS": "ok"}), b"READY=1\nSTATUS=ok")
        self.assertRaises(ValueError, encode, {"STATUS": "a\nREADY=1"})

    def test_sends_to_path_socket(self) -> None:
        """
        Notifications arrive as one datagram on a file system socket.
        """
        path = os.path.join(temp_dir(self), "notify")
        sock = datagram_socket(self, path)
        Notifier.from_environ({"NOTIFY_SOCKET": path}).ready("serving")
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=serving")

    def test_sends_to_abstract_socket(self) -> None:
        """
        An abstract socket name (systemd's usual choice in containers)
        works too.
        """
        name = f"oaiproxy-test-{uuid.uuid4().hex}"
        sock = datagram_socket(self, b"\0" + name.encode())
        Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).stopping("bye")
        self.assertEqual(sock.recv(4096), b"STOPPING=1\nSTATUS=bye")

    def test_reloading_carries_monotonic_time(self) -> None:
        """
        RELOADING=1 comes with MONOTONIC_USEC, which systemd 253+ requires.
        """
        path = os.path.join(temp_dir(self), "notify")
        sock = datagram_socket(self, path)
        Notifier.from_environ({"NOTIFY_SOCKET": path}).reloading()
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
        self.assertEqual(fields["RELOADING"], "1")
        self.assertGreater(int(fields["MONOTONIC_USEC"]), 0)

    def test_send_failure_is_logged_not_raised(self) -> None:
        """
        A notify socket that has gone away costs a warning, never the
        proxy.
        """
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": os.path.join(temp_dir(self), "gone")})
        with capturedLogs() as events:
            notifier.ready("x")
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])


class Pending:
    """
    A stand-in request for the drain.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.cut = 0
        self._lifecycle = lifecycle

    def cut_off_for_shutdown(self) -> None:
        self.cut += 1


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lifecycle = Lifecycle()
        self.notifier = RecordingNotifier()
        self.service = DrainService(self.lifecycle, self.clock, 30.0, self.notifier)
        self.service.startService()

    def test_idle_proxy_stops_at_once(self) -> None:
        """
        With nothing in flight, stopping is immediate, and systemd hears
        STOPPING=1.
        """
        self.successResultOf(self.service.stopService())
        self.assertTrue(self.lifecycle.draining)
        self.assertEqual(self.notifier.sent[0]["STOPPING"], "1")

    def test_waits_for_requests_in_flight(self) -> None:
        """
        The stop waits until the last request in flight ends, and no
        longer.
        """
        first, second = Pending(self.lifecycle), Pending(self.lifecycle)
        self.lifecycle.started(first)
        self.lifecycle.started(second)
        d = self.service.stopService()
        self.lifecycle.ended(first)
        self.assertNoResult(d)
        self.clock.advance(10)
        self.lifecycle.ended(second)
        self.successResultOf(d)
        self.assertEqual((first.cut, second.cut), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_cuts_off_the_rest(self) -> None:
        """
        What is still running at the drain timeout is cut off, and the stop
        completes.
        """
        stuck = Pending(self.lifecycle)
        self.lifecycle.started(stuck)
        d = self.service.stopService()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(stuck.cut, 1)


class Connection:
    """
    A stand-in client connection.
    """

    def __init__(self) -> None:
        self.closing = 0

    def close_gracefully(self) -> None:
        self.closing += 1


class ConnectionDrainTests(SynchronousTestCase):
    def test_connections_closed_and_awaited(self) -> None:
        """
        Once no request is in flight, every connection is closed gracefully
        (so the end of the last response is sent, not dropped by shutdown),
        and the drain ends when they are gone.
        """
        clock, lifecycle = Clock(), Lifecycle()
        busy, idle = Connection(), Connection()
        lifecycle.opened(busy)
        lifecycle.opened(idle)
        request = Pending(lifecycle)
        lifecycle.started(request)
        d = lifecycle.drain(clock, 30)
        self.assertEqual((busy.closing, idle.closing), (0, 0))
        lifecycle.ended(request)
        self.assertEqual((busy.closing, idle.closing), (1, 1))
        lifecycle.closed(idle)
        self.assertNoResult(d)
        lifecycle.closed(busy)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_closing_is_bounded(self) -> None:
        """
        A connection that will not close (a client that stopped reading)
        holds the shutdown for the grace period only.
        """
        clock, lifecycle = Clock(), Lifecycle()
        lifecycle.opened(Connection())
        d = lifecycle.drain(clock, 30)
        clock.advance(CLOSE_GRACE_SECONDS - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)


class ReadinessTests(SynchronousTestCase):
    def test_ready_only_when_every_listener_is_bound(self) -> None:
        """
        READY=1 waits for the last listener: systemd must not route traffic
        to a port that is not open yet.
        """
        notifier = RecordingNotifier()
        first: Deferred[None] = Deferred()
        second: Deferred[None] = Deferred()
        ReadinessService(notifier, [first, second], lambda: "serving", lambda f: f()).startService()
        first.callback(None)
        self.assertEqual(notifier.sent, [])
        second.callback(None)
        self.assertEqual(notifier.sent, [{"READY": "1", "STATUS": "serving"}])

    def test_ready_only_once_the_reactor_runs(self) -> None:
        """
        READY=1 waits for the reactor to run, when twistd has installed its
        SIGTERM handler: a service manager that stops the proxy as soon as
        it is ready must get a drain, not the default action's death.
        """
        notifier = RecordingNotifier()
        reactor = MemoryReactorClock()
        bound: Deferred[None] = Deferred()
        ReadinessService(notifier, [bound], lambda: "serving", reactor.callWhenRunning).startService()
        bound.callback(None)
        self.assertEqual(notifier.sent, [])
        reactor.run()
        self.assertEqual(notifier.sent, [{"READY": "1", "STATUS": "serving"}])


class Pipe:
    """
    A pipe standing in for a process's standard error.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.read, self.write = os.pipe()
        case.addCleanup(os.close, self.read)
        case.addCleanup(os.close, self.write)
        os.set_blocking(self.read, False)

    def written(self) -> bytes:
        try:
            return os.read(self.read, 65536)
        except BlockingIOError:
            return b""


class StartupReportTests(SynchronousTestCase):
    def test_reason_goes_where_the_process_was_started(self) -> None:
        """
        A failure during startup is written once to the standard error the
        report was made with, and raised as a StartupError (status 1, no
        text of its own for Python to print).
        """
        stderr = Pipe(self)
        report = StartupReport(MemoryReactorClock(), stderr.write)
        with capturedLogs() as events, self.assertRaises(StartupError) as caught:
            report.fail("cannot listen on tcp:1: busy")
        self.assertEqual(stderr.written(), b"twistd oaiproxy: error: cannot listen on tcp:1: busy\n")
        self.assertEqual(caught.exception.code, 1)
        self.assertIsInstance(caught.exception, Exception)
        self.assertEqual(caught.exception.reason, "twistd oaiproxy: error: cannot listen on tcp:1: busy")
        self.assertEqual(events, [])

    def test_after_daemonizing_also_logged(self) -> None:
        """
        Once the descriptor no longer points where it did (twistd's daemon
        mode puts /dev/null there), the reason still reaches the original
        file, and the log too, which is then the daemon's only record.
        """
        stderr = Pipe(self)
        watched = os.dup(stderr.write)
        self.addCleanup(os.close, watched)
        report = StartupReport(MemoryReactorClock(), watched)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, watched)
        os.close(null)
        with capturedLogs() as events, self.assertRaises(StartupError):
            report.fail("refusing to start: open")
        self.assertEqual(stderr.written(), b"twistd oaiproxy: error: refusing to start: open\n")
        self.assertEqual([e["line"] for e in events], ["twistd oaiproxy: error: refusing to start: open"])

    def test_once_running_stops_with_status_1(self) -> None:
        """
        A failure once the reactor runs (an endpoint that bound late) stops
        it and exits 1 afterwards.
        """
        reactor = _unstopped_reactor()
        reactor.running = True
        stderr = Pipe(self)
        with capturedLogs():
            StartupReport(reactor, stderr.write).fail("cannot listen on x: late")
        self.assertTrue(reactor.hasStopped)
        [(leave, args, _)] = reactor.triggers["after"]["shutdown"]
        self.assertEqual((leave.__name__, args), ("leave", ()))
        self.assertEqual(stderr.written(), b"twistd oaiproxy: error: cannot listen on x: late\n")


def _unstopped_reactor() -> MemoryReactorClock:
    """
    A memory reactor whose C{hasStopped} only C{stop()} sets: Twisted 25.5's
    starts out C{True}, which would make these assertions vacuous (or
    wrong) on the oldest Twisted setup.py allows.
    """
    reactor = MemoryReactorClock()
    reactor.hasStopped = False
    return reactor


class _LateEndpoint:
    def __init__(self) -> None:
        self.listening: Deferred[Any] = Deferred()

    def listen(self, factory: Any) -> "Deferred[Any]":
        return self.listening


class ListenerServiceTests(SynchronousTestCase):
    def test_late_failure_ends_the_process(self) -> None:
        """
        An endpoint that fails after startup returned (twistd's
        StreamServerEndpointService would only log it and serve on without
        the listener) ends the process with status 1.
        """
        from twisted.internet.error import CannotListenError

        reactor = _unstopped_reactor()
        stderr = Pipe(self)
        endpoint = _LateEndpoint()
        service = ListenerService(endpoint, object(), "tcp:1", StartupReport(reactor, stderr.write), lambda p: None)
        service.privilegedStartService()
        reactor.running = True
        with capturedLogs():
            endpoint.listening.errback(CannotListenError("", 1, OSError(98, "Address already in use")))
        self.assertTrue(reactor.hasStopped)
        self.assertIn(b"cannot listen on tcp:1: [Errno 98] Address already in use", stderr.written())

    def test_stopped_before_bound(self) -> None:
        """
        Stopping before a late endpoint binds cancels it quietly: the
        listen is abandoned, and nothing is reported, logged or stopped.
        """
        reactor = _unstopped_reactor()
        endpoint = _LateEndpoint()
        stderr = Pipe(self)
        service = ListenerService(endpoint, object(), "tcp:1", StartupReport(reactor, stderr.write), lambda p: None)
        service.startService()
        with capturedLogs() as events:
            self.assertIsNone(service.stopService())
        # Cancelled, and the CancelledError consumed rather than reported.
        self.assertIsNone(self.successResultOf(endpoint.listening))
        self.assertFalse(reactor.hasStopped)
        self.assertEqual((stderr.written(), list(events)), (b"", []))


class ReloadServiceTests(SynchronousTestCase):
    def test_sighup_reloads_between_notifications(self) -> None:
        """
        SIGHUP runs the reload in the reactor (not in the signal handler),
        bracketed by RELOADING=1 and READY=1.  Stopping does not restore
        the handler found at start (nor the default, which kills): from
        then on SIGHUP is ignored, so one during the drain neither reloads
        nor cuts the streams still finishing.
        """
        installed: dict[int, Any] = {signal.SIGHUP: "previous"}

        def install(signum: int, handler: Any) -> Any:
            previous, installed[signum] = installed.get(signum), handler
            return previous

        queued: list[Callable[[], Any]] = []
        reloads: list[int] = []
        notifier = RecordingNotifier()
        service = ReloadService(lambda: reloads.append(1) or True, notifier, lambda: "ok", queued.append, install)
        service.startService()
        installed[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(reloads, [])
        queued.pop()()
        self.assertEqual(reloads, [1])
        self.assertEqual([list(f)[0] for f in notifier.sent], ["RELOADING", "READY"])
        service.stopService()
        # During shutdown a SIGHUP (logrotate, an operator) must neither
        # reload nor kill the process, as the default action would.
        self.assertNotIn(installed[signal.SIGHUP], ("previous", signal.SIG_DFL))
        installed[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual((queued, reloads), ([], [1]))


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = temp_dir(self)
        self.key_file = os.path.join(directory, "key")
        self.keys_file = os.path.join(directory, "clients.toml")
        self.write(self.key_file, "sk-OLD\n")
        self.write(self.keys_file, entries("alice", "bob"))
        options = Options(environ={"OAIPROXY_CLIENT_KEYS": "env-key"})
        options.parseOptions(["--api-key-file", self.key_file, "--client-keys-file", self.keys_file])
        self.config = options.config
        self.credentials = Credentials(self.config.api_key, self.config.clients)  # type: ignore[arg-type]
        self.exposure = _Exposure()
        self.reload = _reloader(options, self.credentials, self.exposure)

    def write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    def names(self) -> tuple[str, ...]:
        return tuple(self.credentials.clients.names)

    def test_initial_clients(self) -> None:
        """
        Clients come from the keys file and the environment.
        """
        self.assertEqual(self.names(), ("alice", "bob", "env-1"))
        self.assertEqual(self.credentials.clients.identify(b"key-of-alice").name, "alice")

    def test_reload_picks_up_new_files(self) -> None:
        """
        After the files change, a reload swaps in the new upstream key and
        clients.
        """
        self.write(self.key_file, "sk-NEW\n")
        self.write(self.keys_file, entries("carol"))
        with capturedLogs() as events:
            self.assertTrue(self.reload())
        self.assertEqual(self.credentials.api_key, Secret(b"sk-NEW"))
        self.assertEqual(self.names(), ("carol", "env-1"))
        self.assertIsNone(self.credentials.clients.identify(b"key-of-alice"))
        self.assertNotIn("sk-NEW", repr(events))

    def test_broken_reload_keeps_old_credentials(self) -> None:
        """
        A key file emptied (or made unreadable) by mistake fails the reload
        with a logged reason; the keys in use stay.
        """
        self.write(self.key_file, "")
        self.write(self.keys_file, entries("carol"))
        with capturedLogs() as events:
            self.assertFalse(self.reload())
        self.assertEqual(self.credentials.api_key, Secret(b"sk-OLD"))
        self.assertEqual(self.names(), ("alice", "bob", "env-1"))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("is empty", error["why"])

    def test_broken_keys_file_keeps_old_clients(self) -> None:
        """
        A keys file with a mistake fails the reload; the clients stay.
        """
        self.write(self.keys_file, "[[clients]]\nname = 'carol'\nkey_sha256 = 'not-a-hash'\n")
        self.assertFalse(self.reload())
        self.assertEqual(self.names(), ("alice", "bob", "env-1"))

    def test_reload_cannot_open_a_public_proxy(self) -> None:
        """
        A proxy reachable from other hosts refuses a reload that would leave
        it without any client key.
        """
        self.exposure.public = True
        self.write(self.keys_file, "")
        options = Options(environ={})
        options.parseOptions(["--api-key-file", self.key_file, "--client-keys-file", self.keys_file])
        reload = _reloader(options, self.credentials, self.exposure)
        with capturedLogs() as events:
            self.assertFalse(reload())
        self.assertEqual(self.names(), ("alice", "bob", "env-1"))
        self.assertIn("no client keys", repr(events))


class DrainingTreeTests(SynchronousTestCase):
    def test_health_says_draining(self) -> None:
        """
        During a drain /health answers 503 draining, so a load balancer
        stops sending traffic.
        """
        h = Harness()
        h.lifecycle.draining = True
        d = h.proxy.request("GET", "http://proxy.test/health")
        h.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(self.successResultOf(treq.content(response))), {"status": "draining"})

    def test_new_request_gets_retryable_503(self) -> None:
        """
        A new request on a connection still open during the drain gets a
        503 the SDKs retry, and nothing goes upstream.
        """
        h = Harness()
        h.lifecycle.draining = True
        response = self.successResultOf(h.post(chat_body()))
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual(response.code, 503)
        self.assertEqual(error["code"], "proxy_draining")
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"true"])
        self.assertEqual(h.fake.requests, [])


class StreamingEndpoint(Endpoint):
    """
    Starts an event stream and never ends it.
    """

    def render_POST(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: {}\n\n")
        return NOT_DONE_YET


class DrainingSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.lifecycle = Lifecycle()
        self.site = ProxySite(
            build_root(StreamingEndpoint(), HealthResource(self.lifecycle)),
            max_body_bytes=1000,
            idle_timeout=60,
            lifecycle=self.lifecycle,
            reactor=self.clock,
        )

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_stream_cut_at_deadline_ends_with_error_event(self) -> None:
        """
        A stream still open when the drain times out gets a final error
        event (the SDK raises APIError) and its connection is closed.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.lifecycle.in_flight, 1)
        records: list[Any] = []
        self.site.access_log = records.append
        d = self.lifecycle.drain(self.clock, 5)
        self.clock.advance(5)
        body = transport.value().split(b"\r\n\r\n", 1)[1]
        self.assertIn(b'"code": "proxy_shutting_down"', body)
        self.assertTrue(transport.disconnecting)
        # The drain ends when the connection has flushed and closed.
        self.assertNoResult(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        # Logged as a shutdown, not blamed on the upstream or the client.
        self.assertEqual([r.ended for r in records], ["shutdown"])

    def test_requests_during_drain_close_their_connection(self) -> None:
        """
        A request that arrives during the drain is answered with
        Connection: close, so the client's next request goes elsewhere.
        """
        self.lifecycle.draining = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n")
        head = transport.value().split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"HTTP/1.1 503", head)
        self.assertIn(b"Connection: close", head)
        self.assertTrue(transport.disconnecting)
