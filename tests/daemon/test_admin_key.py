"""
The admin key in the daemon: read from a file or the systemd credential
(never the command line, never shown), refused when short or a client's
key, read again by a reload, handed to workers by the supervisor, and
opening /metrics.
"""

from __future__ import annotations

import os

from treq.testing import StubTreq
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Credentials, file_entry
from oaiproxy.config import Secret
from oaiproxy.daemon.tap import _Exposure, _reloader, makeService
from oaiproxy.daemon.workers import GroupSecrets, Supervisor, encode_secrets
from oaiproxy.fake.harness import registry
from tests.daemon.test_shared_state import password_file
from tests.daemon.test_tap import KEY, HonestReactor, inherited_socket, parse
from tests.support import temp_dir

ADMIN_KEY = "oaiproxy-admin-SESAME-0123456789abcdef"


def key_file(case: SynchronousTestCase, name: str = "admin_key", value: str = ADMIN_KEY) -> str:
    return password_file(case, name, value)


def write(path: str, value: str) -> str:
    with open(path, "w") as f:
        f.write(value + "\n")
    return path


class OptionTests(SynchronousTestCase):
    def test_from_file_variable_or_credential(self) -> None:
        """
        The key comes from --admin-key-file, else OAIPROXY_ADMIN_KEY_FILE
        (a path), else the systemd credential admin_key; none: no admin.
        The configuration never shows it.
        """
        path = key_file(self)
        config = parse(["--admin-key-file", path]).config
        self.assertEqual(config.admin_key, Secret(ADMIN_KEY.encode()))
        self.assertNotIn(ADMIN_KEY, repr(config))
        env = {"OPENAI_API_KEY": KEY, "OAIPROXY_ADMIN_KEY_FILE": path}
        self.assertEqual(parse([], env).config.admin_key, Secret(ADMIN_KEY.encode()))
        credentials = os.path.dirname(key_file(self, "admin_key", "oaiproxy-admin-from-the-credential-0"))
        env = {"OPENAI_API_KEY": KEY, "CREDENTIALS_DIRECTORY": credentials}
        self.assertEqual(parse([], env).config.admin_key, Secret(b"oaiproxy-admin-from-the-credential-0"))
        self.assertIsNone(parse([]).config.admin_key)

    def test_refused_without_showing_it(self) -> None:
        """
        A key given instead of a path, a short key, and a key that is also
        a client's stop the start; no message shows the key.
        """
        short = "oaiproxy-admin-short"
        clients = os.path.join(temp_dir(self), "clients.toml")
        with open(clients, "w") as f:
            f.write(file_entry("alice", ADMIN_KEY))
        for argv, needle in (
            (["--admin-key-file", ADMIN_KEY], "does not exist"),
            (["--admin-key-file", key_file(self, "short", short)], "shorter than 24"),
            (["--admin-key-file", key_file(self), "--client-keys-file", clients], "client 'alice'"),
        ):
            with self.assertRaises(SystemExit) as caught:
                parse(argv)
            message = str(caught.exception.code)
            self.assertIn(needle, message)
            self.assertNotIn(ADMIN_KEY, message)
            self.assertNotIn(short, message)


class ReloadTests(SynchronousTestCase):
    def test_reload_rotates_it(self) -> None:
        """
        SIGHUP reads the file again: the new key is the admin's, the old
        one stops working; a reload that would make it a client's key is
        refused and keeps the one in use.
        """
        path = key_file(self)
        clients = os.path.join(temp_dir(self), "clients.toml")
        with open(clients, "w") as f:
            f.write(file_entry("alice", "key-of-alice"))
        options = parse(["--admin-key-file", path, "--client-keys-file", clients])
        config = options.config
        credentials = Credentials(Secret(KEY.encode()), config.clients, config.admin_key)
        write(path, "oaiproxy-admin-rotated-0123456789")
        with capturedLogs():
            self.assertTrue(_reloader(options, credentials, _Exposure())())
        self.assertEqual(credentials.admin_key, Secret(b"oaiproxy-admin-rotated-0123456789"))
        write(path, "key-of-alice-and-long-enough-000")
        with open(clients, "a") as f:
            f.write(file_entry("bob", "key-of-alice-and-long-enough-000"))
        with capturedLogs() as events:
            self.assertFalse(_reloader(options, credentials, _Exposure())())
        self.assertIn("client 'bob'", repr(events))
        self.assertNotIn("key-of-alice-and-long-enough-000", repr(events))
        self.assertEqual(credentials.admin_key, Secret(b"oaiproxy-admin-rotated-0123456789"))


class GroupTests(SynchronousTestCase):
    def test_supervisor_hands_it_over(self) -> None:
        """
        With --workers, the supervisor reads the key and hands it over
        with the other secrets.
        """
        argv = ["--admin-key-file", key_file(self), "--workers", "2"]
        env = {"OPENAI_API_KEY": KEY, "OAIPROXY_CLIENT_KEYS": "k"}
        service = makeService(parse(argv, env), reactor=HonestReactor())
        [supervisor] = [s for s in service if isinstance(s, Supervisor)]
        self.assertEqual(supervisor.secrets.admin_key, Secret(ADMIN_KEY.encode()))

    def test_worker_uses_the_handed_key(self) -> None:
        """
        A worker never reads the file (it does not exist here): the
        handed key opens /metrics on its API port; a client key still
        does, a wrong key does not.
        """
        secrets = GroupSecrets(Secret(KEY.encode()), registry(b"k"), admin_key=Secret(ADMIN_KEY.encode()))
        fd = inherited_socket(self, "127.0.0.1")
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.write(write, encode_secrets(secrets))
        argv = ["--worker-listener", f"{fd}:INET", "--worker-share", "2", "--admin-key-file", "/nonexistent/admin"]
        reactor = HonestReactor()
        service = makeService(parse(argv, {}), reactor=reactor, supervisor_input=read)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        [(_, _, site)] = reactor.adoptedPorts
        stub = StubTreq(site.resource)

        def status(key: str) -> int:
            response = self.successResultOf(stub.get("http://p/metrics", headers={"Authorization": "Bearer " + key}))
            self.successResultOf(stub.content(response))
            return int(response.code)

        self.assertEqual([status(ADMIN_KEY), status("k"), status(ADMIN_KEY + "x")], [200, 200, 401])
