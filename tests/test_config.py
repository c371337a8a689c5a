"""
Tests for L{oaiproxy.config}: the startup configuration and the parsers
that build it from the command line and the environment.

They cover L{Secret} (never displayed), the number, byte-count, URL and
C{PORT} parsers (good values accepted, junk refused with a message naming
the option and never a credential), client keys from the environment, the
precedence and error reporting of the upstream key lookup, and which listening
addresses count as private.  (Where the upstream base leads is tested through
the daemon, in C{tests.daemon.test_tap}.)
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any, Optional

from twisted.internet import endpoints
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import load_clients
from oaiproxy.config import (
    CREDENTIAL_NAME,
    Config,
    ConfigError,
    Secret,
    client_keys_from_env,
    is_private_address,
    load_api_key,
    parse_byte_count,
    parse_seconds,
    parse_upstream,
    port_from_env,
    unix_listener,
)
from tests.support import temp_dir

KEY = b"sk-proj-UPSTREAMSECRET0123456789"
PASSWORD = "hunter2-PASSWORD-9c1e"


def config(**overrides: Any) -> Config:
    """
    A L{Config} with the given fields and defaults for the required ones.
    """
    fields: dict[str, Any] = {
        "ports": ("tcp:8080:interface=127.0.0.1",),
        "upstream": "https://api.openai.com/v1",
        "api_key": Secret(KEY),
    }
    fields.update(overrides)
    return Config(**fields)


class SecretTests(SynchronousTestCase):
    """
    L{Secret} keeps the key out of logs, tracebacks and messages.
    """

    def test_repr_and_str_hide_value(self) -> None:
        """
        Printing or logging a secret does not show the key.
        """
        secret = Secret(KEY)
        for text in [repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % (secret,)]:
            self.assertNotIn(KEY.decode(), text)
            self.assertIn("redacted", text)

    def test_config_repr_hides_keys(self) -> None:
        """
        A whole configuration can be logged without leaking the upstream
        key or any client key.
        """
        client = b"oai-client-CLIENTSECRET42"
        clients = load_clients(None, {"OAIPROXY_CLIENT_KEYS": client.decode()})
        text = repr(config(clients=clients))
        self.assertIn("env-1", text)
        self.assertNotIn(KEY.decode(), text)
        self.assertNotIn(client.decode(), text)
        self.assertIn("api.openai.com", text)

    def test_reveal(self) -> None:
        """
        L{Secret.reveal} gives back the exact key to send upstream.
        """
        self.assertEqual(Secret(KEY).reveal(), KEY)

    def test_equality(self) -> None:
        """
        Secrets compare by value, so configurations and key sets compare
        as expected; a secret never equals the raw bytes.
        """
        self.assertEqual(Secret(KEY), Secret(KEY))
        self.assertNotEqual(Secret(KEY), Secret(b"other"))
        self.assertNotEqual(Secret(KEY), KEY)
        self.assertEqual(len({Secret(KEY), Secret(KEY), Secret(b"other")}), 2)
        self.assertEqual(config(), config())
        self.assertNotEqual(config(), config(api_key=Secret(b"other")))


class ParseSecondsTests(SynchronousTestCase):
    """
    L{parse_seconds} reads timeouts.
    """

    def test_good(self) -> None:
        """
        Whole and fractional positive numbers are accepted.
        """
        self.assertEqual(parse_seconds("--read-timeout", "600"), 600.0)
        self.assertEqual(parse_seconds("--read-timeout", "0.5"), 0.5)
        self.assertEqual(parse_seconds("--read-timeout", " 10 "), 10.0)

    def test_bad(self) -> None:
        """
        Junk, zero, negative, infinite and NaN values are refused with a
        message naming the option.
        """
        for text in ["", "ten", "10s", "1,5", "0", "0.0", "-0", "-1", "inf", "-inf", "nan", "1e400"]:
            with self.assertRaises(ConfigError, msg=repr(text)) as caught:
                parse_seconds("--connect-timeout", text)
            self.assertIn("--connect-timeout", str(caught.exception))


class ParseByteCountTests(SynchronousTestCase):
    """
    L{parse_byte_count} reads the body size limit.
    """

    def test_good(self) -> None:
        """
        Positive whole numbers are accepted.
        """
        self.assertEqual(parse_byte_count("--max-body-bytes", "1048576"), 1048576)
        self.assertEqual(parse_byte_count("--max-body-bytes", "1"), 1)

    def test_bad(self) -> None:
        """
        Junk, fractions, units, zero, negative, infinite and NaN values are
        refused with a message naming the option.
        """
        for text in ["", "lots", "1.5", "10MB", "1e6", "0", "-5", "inf", "nan"]:
            with self.assertRaises(ConfigError, msg=repr(text)) as caught:
                parse_byte_count("--max-body-bytes", text)
            self.assertIn("--max-body-bytes", str(caught.exception))


class ParseUpstreamTests(SynchronousTestCase):
    """
    L{parse_upstream} checks and normalises the upstream base URL.
    """

    def assertRefused(self, url: str) -> str:
        with self.assertRaises(ConfigError, msg=url) as caught:
            parse_upstream(url)
        message = str(caught.exception)
        self.assertIn("--upstream", message)
        return message

    def test_strips_trailing_slash(self) -> None:
        """
        A trailing slash is removed so paths are not doubled.
        """
        self.assertEqual(parse_upstream("https://api.openai.com/v1/"), "https://api.openai.com/v1")
        self.assertEqual(parse_upstream("https://api.openai.com/v1"), "https://api.openai.com/v1")

    def test_http_and_https_with_port(self) -> None:
        """
        Plain and TLS URLs with a host and optional port are accepted as
        given.
        """
        for url in [
            "http://localhost:8000/v1",
            "https://example.test",
            "https://example.test:8443/openai/v1",
            "http://127.0.0.1:11434/v1",
            "http://[::1]:8080/v1",
        ]:
            self.assertEqual(parse_upstream(url), url)

    def test_other_schemes(self) -> None:
        """
        Only http and https upstreams are accepted.
        """
        for url in ["ftp://example.test/v1", "file:///etc/passwd", "ws://example.test/v1", "api.openai.com/v1"]:
            self.assertRefused(url)

    def test_missing_host(self) -> None:
        """
        A URL without a host is refused.
        """
        for url in ["https:///v1", "https://", "http://:8080/v1"]:
            self.assertRefused(url)

    def test_bad_port(self) -> None:
        """
        A port that is not a number, or out of range, is refused.
        """
        for url in ["https://example.test:http/v1", "https://example.test:70000/v1"]:
            self.assertRefused(url)

    def test_query_or_fragment(self) -> None:
        """
        A query or fragment, which would be silently lost, is refused.
        """
        self.assertRefused("https://example.test/v1?api-version=1")
        self.assertRefused("https://example.test/v1#frag")

    def test_userinfo(self) -> None:
        """
        Credentials in the URL are refused and pointed to the key options.
        """
        self.assertRefused("https://user@example.test/v1")
        message = self.assertRefused(f"https://user:{PASSWORD}@example.test/v1")
        self.assertIn("OPENAI_API_KEY", message)

    def test_password_never_in_message(self) -> None:
        """
        Whatever else is wrong with a URL, its password is not echoed into
        the operator's terminal or logs.
        """
        for url in [
            f"https://user:{PASSWORD}@example.test/v1",
            f"https://user:{PASSWORD}@example.test:badport/v1",
            f"ftp://user:{PASSWORD}@example.test/v1",
            f"https://user:{PASSWORD}@/v1",
            f"https://user:{PASSWORD}@example.test/v1?x=1",
        ]:
            self.assertNotIn(PASSWORD, self.assertRefused(url))

    def test_query_and_fragment_never_in_message(self) -> None:
        """
        A query or fragment may carry a gateway's key (C{?key=...}): the
        refusal says there is one without quoting it.
        """
        for url in [
            f"https://example.test/v1?key={PASSWORD}",
            f"https://example.test/v1?x=1#{PASSWORD}",
            f"https://example.test/v1#{PASSWORD}",
            f"https://example.test?key={PASSWORD}",
            f"https://example.test:badport/v1?key={PASSWORD}",
        ]:
            message = self.assertRefused(url)
            self.assertNotIn(PASSWORD, message)
            self.assertIn("example.test", message)

    def test_malformed_userinfo_never_in_message(self) -> None:
        """
        A password whose user was left out (C{host:password}, read as a
        port), or a URL whose scheme is missing or malformed (perhaps a key
        given in the wrong place), is not echoed either.
        """
        for url in [
            f"https://example.test:{PASSWORD}/v1",
            f"user:{PASSWORD}@example.test/v1",
            f"htt ps://user:{PASSWORD}@example.test/v1",
            PASSWORD,
        ]:
            self.assertNotIn(PASSWORD, self.assertRefused(url))

    def test_message_keeps_what_helps(self) -> None:
        """
        What is not secret stays in the message: the scheme, host, port and
        path, so the operator can see which URL is meant.
        """
        message = self.assertRefused(f"ftp://user:{PASSWORD}@example.test:2121/v1?key={PASSWORD}")
        self.assertIn("ftp://<redacted>@example.test:2121/v1?<redacted>", message)

    def test_password_with_at_sign_never_in_message(self) -> None:
        """
        A password containing C{@} is not partly echoed either.
        """
        password = "hunter2@" + PASSWORD
        for url in [
            f"ftp://user:{password}@example.test/v1",
            f"https://user:{password}@example.test:badport/v1",
        ]:
            self.assertNotIn(PASSWORD, self.assertRefused(url))


class PortFromEnvTests(SynchronousTestCase):
    """
    L{port_from_env} honours a platform's C{PORT} variable, on loopback.
    """

    def test_absent(self) -> None:
        """
        Without C{PORT} (or with it empty) the default applies.
        """
        self.assertIsNone(port_from_env({}))
        self.assertIsNone(port_from_env({"PORT": ""}))

    def test_good(self) -> None:
        """
        A port number becomes a TCP endpoint bound to loopback only.
        """
        self.assertEqual(port_from_env({"PORT": "5000"}), "tcp:5000:interface=127.0.0.1")
        self.assertEqual(port_from_env({"PORT": "65535"}), "tcp:65535:interface=127.0.0.1")
        self.assertEqual(port_from_env({"PORT": "08080"}), "tcp:8080:interface=127.0.0.1")

    def test_bad(self) -> None:
        """
        Junk and out-of-range values are refused with a message naming
        C{PORT}.
        """
        for text in ["http", "80a", " 80", "8.0", "-1", "65536", "99999", "tcp:80"]:
            with self.assertRaises(ConfigError, msg=repr(text)) as caught:
                port_from_env({"PORT": text})
            self.assertIn("PORT", str(caught.exception))

    def test_unicode_digit(self) -> None:
        """
        A non-ASCII digit in C{PORT} is a configuration error, not a crash.
        """
        with self.assertRaises(ConfigError):
            port_from_env({"PORT": "²"})


class ClientKeysFromEnvTests(SynchronousTestCase):
    """
    L{client_keys_from_env} reads C{OAIPROXY_CLIENT_KEYS}.
    """

    def keys(self, text: Optional[str]) -> list[bytes]:
        environ = {} if text is None else {"OAIPROXY_CLIENT_KEYS": text}
        return [secret.reveal() for secret in client_keys_from_env(environ)]

    def test_absent_or_blank(self) -> None:
        """
        No variable, or only blanks and commas, means no client keys (no
        client authentication).
        """
        for text in [None, "", "  ", " , ,, "]:
            self.assertEqual(self.keys(text), [], repr(text))

    def test_split_and_strip(self) -> None:
        """
        Keys are split on commas, trimmed, and empty entries ignored.
        """
        self.assertEqual(self.keys("alpha"), [b"alpha"])
        self.assertEqual(self.keys(" alpha , beta,,\tgamma ,"), [b"alpha", b"beta", b"gamma"])

    def test_secrets(self) -> None:
        """
        Client keys are wrapped as secrets, so they never show in logs.
        """
        keys = client_keys_from_env({"OAIPROXY_CLIENT_KEYS": "client-KEY-1"})
        self.assertEqual(keys, (Secret(b"client-KEY-1"),))
        self.assertNotIn("client-KEY-1", repr(keys))


class LoadApiKeyTests(SynchronousTestCase):
    """
    L{load_api_key} finds the upstream key and reports problems safely.
    """

    def setUp(self) -> None:
        # tempfile rather than self.mktemp(): under pytest, mktemp() would
        # create directories in the working tree.
        self.base = tempfile.mkdtemp(prefix="oaiproxy-test-config-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.count = 0

    def path(self) -> str:
        """
        A fresh path, not yet created, removed after the test.
        """
        self.count += 1
        return os.path.join(self.base, f"p{self.count}")

    def key_file(self, content: bytes, directory: Optional[str] = None) -> str:
        """
        A file holding C{content}: C{openai_api_key} in C{directory} when
        given, else a fresh temporary path.
        """
        path = os.path.join(directory, CREDENTIAL_NAME) if directory else self.path()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def credentials_dir(self, content: Optional[bytes]) -> str:
        """
        A systemd-style credentials directory, holding C{openai_api_key}
        with C{content} unless it is C{None}.
        """
        directory = self.path()
        os.makedirs(directory)
        if content is not None:
            self.key_file(content, directory)
        return directory

    def assertRefused(self, key_file: Optional[str], environ: dict[str, str]) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_api_key(key_file, environ)
        return str(caught.exception)

    def test_key_file_beats_everything(self) -> None:
        """
        C{--api-key-file} wins over the systemd credential and the
        environment.
        """
        environ = {
            "CREDENTIALS_DIRECTORY": self.credentials_dir(b"sk-credential"),
            "OPENAI_API_KEY": "sk-env",
        }
        self.assertEqual(load_api_key(self.key_file(b"sk-file"), environ), Secret(b"sk-file"))

    def test_credential_beats_environment(self) -> None:
        """
        The systemd credential wins over C{OPENAI_API_KEY}.
        """
        environ = {
            "CREDENTIALS_DIRECTORY": self.credentials_dir(b"sk-credential\n"),
            "OPENAI_API_KEY": "sk-env",
        }
        self.assertEqual(load_api_key(None, environ), Secret(b"sk-credential"))

    def test_environment(self) -> None:
        """
        C{OPENAI_API_KEY} is used when nothing else is given, trimmed; a
        credentials directory without the credential falls through to it.
        """
        self.assertEqual(load_api_key(None, {"OPENAI_API_KEY": " sk-env \n"}), Secret(b"sk-env"))
        environ = {"CREDENTIALS_DIRECTORY": self.credentials_dir(None), "OPENAI_API_KEY": "sk-env"}
        self.assertEqual(load_api_key(None, environ), Secret(b"sk-env"))
        self.assertEqual(
            load_api_key("", {"CREDENTIALS_DIRECTORY": "", "OPENAI_API_KEY": "sk-env"}),
            Secret(b"sk-env"),
        )

    def test_key_file_stripped(self) -> None:
        """
        The trailing newline an editor adds (and surrounding blanks) is not
        part of the key.
        """
        for content in [b"sk-file\n", b"  sk-file  \r\n", b"\nsk-file\n\n"]:
            self.assertEqual(load_api_key(self.key_file(content), {}), Secret(b"sk-file"))

    def test_missing_key_file(self) -> None:
        """
        A key file that does not exist is refused without echoing the value:
        it may be a key given to --api-key-file by mistake.
        """
        for value in (self.path(), "sk-proj-MISTAKENKEY"):
            message = self.assertRefused(value, {"OPENAI_API_KEY": "sk-env"})
            self.assertIn("does not exist", message)
            self.assertNotIn(value, message)

    def test_unreadable_key_file(self) -> None:
        """
        A key file that cannot be read (here, a directory) is reported by
        path.
        """
        path = self.path()
        os.makedirs(path)
        self.assertIn(path, self.assertRefused(path, {}))

    def test_empty_key_file(self) -> None:
        """
        An empty or blank key file is an error, not an empty key.
        """
        for content in [b"", b"  \n\n"]:
            path = self.key_file(content)
            message = self.assertRefused(path, {"OPENAI_API_KEY": "sk-env"})
            self.assertIn(path, message)
            self.assertIn("empty", message)

    def test_empty_credential_not_skipped(self) -> None:
        """
        An empty systemd credential is reported rather than silently
        replaced by C{OPENAI_API_KEY}.
        """
        directory = self.credentials_dir(b"")
        message = self.assertRefused(None, {"CREDENTIALS_DIRECTORY": directory, "OPENAI_API_KEY": "sk-env"})
        self.assertIn(os.path.join(directory, CREDENTIAL_NAME), message)

    def test_multi_line_key_file(self) -> None:
        """
        A key file holding more than the key is refused by path, without
        showing any of its content.
        """
        for content in [KEY + b"\nsk-SECONDLINE", KEY + b"\r\nsk-SECONDLINE", KEY + b" sk-SECONDLINE"]:
            path = self.key_file(content)
            message = self.assertRefused(path, {})
            self.assertIn(path, message)
            self.assertNotIn(KEY.decode(), message)
            self.assertNotIn("SECONDLINE", message)

    def test_no_key(self) -> None:
        """
        Without any key the error tells the operator how to provide one or
        how to run without one.
        """
        for environ in [{}, {"OPENAI_API_KEY": "   "}]:
            message = self.assertRefused(None, environ)
            self.assertIn("OPENAI_API_KEY", message)
            self.assertIn("--mock-upstream", message)


class IsPrivateAddressTests(SynchronousTestCase):
    """
    L{is_private_address} decides whether a listener is reachable only from
    this host (so running without client keys is safe).
    """

    def test_loopback(self) -> None:
        """
        Any IPv4 or IPv6 loopback address is private.
        """
        for address in [
            IPv4Address("TCP", "127.0.0.1", 8080),
            IPv4Address("TCP", "127.5.5.5", 8080),
            IPv6Address("TCP", "::1", 8080),
        ]:
            self.assertTrue(is_private_address(address), address)

    def test_reachable_from_elsewhere(self) -> None:
        """
        Wildcard and LAN addresses are not private.
        """
        for address in [
            IPv4Address("TCP", "0.0.0.0", 8080),
            IPv6Address("TCP", "::", 8080),
            IPv4Address("TCP", "192.168.1.10", 8080),
            IPv6Address("TCP", "fe80::1%eth0", 8080),
        ]:
            self.assertFalse(is_private_address(address), address)

    def test_ipv4_mapped(self) -> None:
        """
        An IPv4-mapped IPv6 address is what its IPv4 address is: loopback
        ones are private, whatever the spelling.
        """
        for host in ["::ffff:127.0.0.1", "::ffff:127.1.2.3", "0:0:0:0:0:ffff:7f00:1", "::FFFF:7F00:0001"]:
            self.assertTrue(is_private_address(IPv6Address("TCP", host, 8080)), host)

    def test_nothing_public_is_private(self) -> None:
        """
        Mapped or embedded forms of other IPv4 addresses, LAN ones
        included, stay reachable from elsewhere; so do IPv4-compatible,
        NAT64 and 6to4 spellings of 127.0.0.1, which are not loopback.
        """
        for host in [
            "::ffff:0.0.0.0",
            "::ffff:10.1.2.3",
            "::ffff:192.168.1.10",
            "::ffff:172.16.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "::2",
        ]:
            self.assertFalse(is_private_address(IPv6Address("TCP", host, 8080)), host)
        for host in ["10.0.0.1", "172.16.0.1", "169.254.1.1", "127.000.000.001", "0x7f.1"]:
            self.assertFalse(is_private_address(IPv4Address("TCP", host, 8080)), host)

    def test_unix_socket(self) -> None:
        """
        A UNIX socket, guarded by file permissions, is private.
        """
        self.assertTrue(is_private_address(UNIXAddress(b"/run/oaiproxy.sock")))

    def test_unknown_address(self) -> None:
        """
        An address that is not an IP literal is not assumed private.
        """
        self.assertFalse(is_private_address(IPv4Address("TCP", "localhost", 8080)))
        self.assertFalse(is_private_address(HostnameAddress(b"localhost", 8080)))


class UnixListenerTests(SynchronousTestCase):
    """
    C{unix:} listeners are created mode 660 (owner and group) unless their
    description sets a mode: Twisted's default, 666, would let every local
    user spend the upstream key through a socket the proxy treats as
    private.
    """

    def listened_mode(self, description: str) -> int:
        """
        Listen on C{description} with a reactor of the test's own (never
        run, so nothing is left behind on the global one), and return the
        socket file's permission bits.
        """
        reactor = SelectReactor()

        def close() -> None:
            reactor.removeReader(reactor.waker)
            reactor.waker.connectionLost(None)

        self.addCleanup(close)
        ports: list[Any] = []
        endpoints.serverFromString(reactor, description).listen(Factory.forProtocol(Protocol)).addBoth(ports.append)
        [port] = ports
        self.addCleanup(port.connectionLost, None)
        mode = stat.S_IMODE(os.stat(port.getHost().name).st_mode)
        return mode

    def test_default_mode(self) -> None:
        """
        A C{unix:} description without a mode gets C{mode=660}, and the
        socket file is created so (owner and group may connect).
        """
        path = os.path.join(temp_dir(self), "api.sock")
        self.assertEqual(unix_listener(f"unix:{path}"), f"unix:{path}:mode=660")
        self.assertEqual(self.listened_mode(unix_listener(f"unix:{path}")), 0o660)

    def test_mode_given(self) -> None:
        """
        A mode the operator gives, by name or in its position after the
        path, is kept, and is the mode the socket gets.
        """
        directory = temp_dir(self)
        for name, description in [
            ("a.sock", "unix:{}:mode=600"),
            ("b.sock", "unix:{}:666"),
            ("c.sock", "unix:address={}:mode=640"),
            ("d.sock", "unix:{}:lockfile=0:mode=600"),
        ]:
            description = description.format(os.path.join(directory, name))
            self.assertEqual(unix_listener(description), description)
        self.assertEqual(self.listened_mode(unix_listener(f"unix:{directory}/e.sock:mode=600")), 0o600)
        self.assertEqual(self.listened_mode(unix_listener(f"unix:{directory}/f.sock:666")), 0o666)

    def test_other_parameters(self) -> None:
        """
        Other parameters, and escaped colons in the path, do not count as
        a mode; other endpoints are left alone.
        """
        self.assertEqual(unix_listener("unix:/run/a\\:b.sock"), "unix:/run/a\\:b.sock:mode=660")
        self.assertEqual(unix_listener("unix:/run/a.sock:lockfile=0"), "unix:/run/a.sock:lockfile=0:mode=660")
        self.assertEqual(unix_listener("unix:address=/run/a.sock"), "unix:address=/run/a.sock:mode=660")
        for description in ["tcp:8080", "tcp:8080:interface=127.0.0.1", "systemd:domain=UNIX:index=0", "ssl:443"]:
            self.assertEqual(unix_listener(description), description)

    def test_daemon_listener(self) -> None:
        """
        The daemon's own listeners (the C{--port} services) get the mode.
        """
        from oaiproxy.daemon.lifecycle import ListenerService, StartupReport
        from oaiproxy.daemon.tap import _endpoint

        path = os.path.join(temp_dir(self), "api.sock")
        reactor = SelectReactor()

        def close() -> None:
            reactor.removeReader(reactor.waker)
            reactor.waker.connectionLost(None)

        self.addCleanup(close)
        announced: list[Any] = []
        description = f"unix:{path}"
        report = StartupReport(reactor)
        self.addCleanup(report.done)
        service: Any = ListenerService(
            _endpoint(reactor, description), Factory.forProtocol(Protocol), description, report, announced.append
        )
        service.privilegedStartService()
        [port] = announced
        self.addCleanup(port.connectionLost, None)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
