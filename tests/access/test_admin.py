"""
Who is asking (L{oaiproxy.access.admin}): the admin key, a client's key,
or nothing the proxy knows; an admin key that is also a client's refused.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.access.admin import ADMIN, caller, check_admin_key, is_admin
from oaiproxy.access.clients import Credentials
from oaiproxy.config import ConfigError, Secret
from oaiproxy.fake.harness import registry

ADMIN_KEY = b"oaiproxy-admin-0123456789abcdefghij"


def bearer(token: bytes) -> Headers:
    return Headers({b"authorization": [b"Bearer " + token]})


class CallerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.credentials = Credentials(Secret(b"sk-up"), registry(b"key-of-alice"), Secret(ADMIN_KEY))

    def test_admin_key(self) -> None:
        """
        The admin key (any case of the scheme) is the admin; nothing else
        is, not a prefix of it, not the key under another scheme.
        """
        self.assertIs(caller(self.credentials, bearer(ADMIN_KEY)), ADMIN)
        self.assertTrue(is_admin(self.credentials, Headers({b"authorization": [b"bearer " + ADMIN_KEY]})))
        self.assertFalse(is_admin(self.credentials, bearer(ADMIN_KEY[:-1])))
        self.assertFalse(is_admin(self.credentials, Headers({b"authorization": [b"Basic " + ADMIN_KEY]})))
        self.assertFalse(is_admin(self.credentials, Headers()))

    def test_admin_key_twice(self) -> None:
        """
        The admin key in two C{Authorization} headers, or beside a client's
        key, is neither the admin nor a client.
        """
        for values in ([ADMIN_KEY, ADMIN_KEY], [ADMIN_KEY, b"key-of-alice"], [b"key-of-alice", ADMIN_KEY]):
            headers = Headers({b"authorization": [b"Bearer " + v for v in values]})
            self.assertFalse(is_admin(self.credentials, headers))
            self.assertIsNone(caller(self.credentials, headers))

    def test_client_key(self) -> None:
        """
        A client's key is that client, never the admin; an unknown key and
        none are nobody.
        """
        found = caller(self.credentials, bearer(b"key-of-alice"))
        self.assertEqual(getattr(found, "name", None), "client-1")
        self.assertFalse(is_admin(self.credentials, bearer(b"key-of-alice")))
        self.assertIsNone(caller(self.credentials, bearer(b"key-of-mallory")))
        self.assertIsNone(caller(self.credentials, Headers()))

    def test_no_admin_key_configured(self) -> None:
        """
        Without an admin key nobody is the admin, whatever they send (an
        empty token included).
        """
        open_credentials = Credentials(Secret(b"sk-up"), registry(b"key-of-alice"))
        for token in (ADMIN_KEY, b"", b"key-of-alice"):
            self.assertFalse(is_admin(open_credentials, bearer(token)))

    def test_rotation(self) -> None:
        """
        Replacing the credentials (a reload) replaces the admin key: the
        old one stops working at once.
        """
        self.credentials.replace(Secret(b"sk-up"), self.credentials.clients, Secret(b"oaiproxy-admin-the-new-one-0000"))
        self.assertFalse(is_admin(self.credentials, bearer(ADMIN_KEY)))
        self.assertTrue(is_admin(self.credentials, bearer(b"oaiproxy-admin-the-new-one-0000")))


class CheckTests(SynchronousTestCase):
    def test_admin_key_that_is_a_clients_key(self) -> None:
        """
        An admin key equal to a client's key is refused, naming the client
        and not the key.
        """
        with self.assertRaises(ConfigError) as caught:
            check_admin_key(Secret(b"key-of-alice"), registry(b"key-of-alice"))
        self.assertIn("client-1", str(caught.exception))
        self.assertNotIn("key-of-alice", str(caught.exception))
        check_admin_key(Secret(ADMIN_KEY), registry(b"key-of-alice"))
        check_admin_key(None, registry(b"key-of-alice"))
