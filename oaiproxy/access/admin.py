# -*- test-case-name: tests.access.test_admin -*-
"""
Who is asking: the operator holding the admin key, a client, or nobody
known.

The admin key reads every client's usage (C{GET /usage}) and the
dashboard's data; a client key reads only its own usage.  The key is
compared in constant time and never echoed; the admin key is refused at
startup when it is also a client key (L{check_admin_key}), so one token
never means two callers.
"""

from __future__ import annotations

import hmac
from typing import Optional, Union

from twisted.web.http_headers import Headers

from oaiproxy.access.clients import Client, ClientRegistry, Credentials
from oaiproxy.config import ConfigError, Secret
from oaiproxy.upstream.headers import bearer_token

__all__ = ["ADMIN", "Admin", "Caller", "caller", "is_admin", "check_admin_key"]


class Admin:
    """
    The holder of the admin key (one instance, L{ADMIN}).
    """

    def __repr__(self) -> str:
        return "ADMIN"


ADMIN = Admin()

#: What L{caller} finds: the admin, a client, or C{None} (no key, or one
#: the proxy does not know).
Caller = Union[Admin, Client, None]


def is_admin(credentials: Credentials, headers: Headers) -> bool:
    """
    Whether C{headers} carry the admin key as C{Authorization: Bearer}.
    Always C{False} while no admin key is configured.
    """
    key = credentials.admin_key
    token = bearer_token(headers)
    return key is not None and token is not None and hmac.compare_digest(token, key.reveal())


def caller(credentials: Credentials, headers: Headers) -> Caller:
    """
    The admin, the client whose key C{headers} carry, or C{None}.
    """
    if is_admin(credentials, headers):
        return ADMIN
    token = bearer_token(headers)
    if token is None:
        return None
    return credentials.clients.identify(token)


def check_admin_key(admin_key: Optional[Secret], clients: ClientRegistry) -> None:
    """
    Refuse an admin key that is also a client's key: that client would
    read everyone's usage.

    @raise ConfigError: naming the client, never the key.
    """
    if admin_key is None:
        return
    client = clients.identify(admin_key.reveal())
    if client is not None:
        raise ConfigError(f"the admin key is also the key of client {client.name!r}: give the admin its own key")
