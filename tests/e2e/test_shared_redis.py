"""
The shared limit store against a real redis-server (Debian's), started on a
free port with persistence off and stopped by PID.  Two stores stand for two
hosts: each has its own link (its own connection).
"""

from __future__ import annotations

import shutil
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from oaiproxy.access.clients import Client, Limits
from oaiproxy.access.limits import Refusal
from oaiproxy.access.shared import SharedLimitStore, SharedReservation
from oaiproxy.fake.processes import RedisServer
from oaiproxy.sharedstate.link import (
    KeySpace,
    RedisLink,
    RedisTarget,
    SharedStateError,
    check_shared_state,
    redis_connector,
)

SERVER = shutil.which("redis-server")


class Greeter(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"-ERR not TLS\r\n" * 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until_up(link: RedisLink, within: float = 10.0) -> defer.Deferred:
    """
    Fires when C{link} is up (at once if it is), told by the link itself;
    fails after C{within} seconds.
    """
    if link.up:
        return defer.succeed(None)
    d: defer.Deferred = defer.Deferred()

    def changed(up: bool) -> None:
        if up and not d.called:
            link.watchers.remove(changed)
            d.callback(None)

    link.watchers.append(changed)
    return d.addTimeout(within, reactor)


@defer.inlineCallbacks
def until_admitted(store: SharedLimitStore, client: Client, within: float = 10.0):
    """
    Ask C{store} to admit C{client} until it does (a lease expiring on
    Redis's clock, which no test clock can advance), every 50 ms, at most
    C{within} seconds; the reservation, and how long it took.
    """
    started = time.monotonic()
    while time.monotonic() - started < within:
        admitted = yield store.admit(client, 1)
        if not isinstance(admitted, Refusal):
            return admitted, time.monotonic() - started
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{client.name} not admitted within {within} s")


def started_link(port: int, deadline: float = 0.05) -> RedisLink:
    """
    A started link to the redis-server on C{port}, retrying fast.
    """
    link = RedisLink(
        redis_connector(reactor, RedisTarget("127.0.0.1", port)), reactor, deadline=deadline, retry=(0.1, 0.2)
    )
    link.startService()
    return link


@defer.inlineCallbacks
def host(port: int, instances: int = 2, lease: float = 30.0, deadline: float = 0.05, prefix: str = "t:"):
    link = started_link(port, deadline)
    yield until_up(link)
    return SharedLimitStore(link, reactor, KeySpace(prefix), instances=instances, lease=lease)


class RedisCase(TestCase):
    """
    A real redis-server for each test (C{self.redis}), on a free port,
    stopped by PID; skipped where Debian's redis-server is not installed.
    """

    if SERVER is None:
        skip = "redis-server is not on PATH (Debian package redis-server)"

    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.remove)


class SharedRedisTests(RedisCase):
    """
    Two stores standing for two hosts, each with its own connection, in
    front of one real redis-server.
    """

    @defer.inlineCallbacks
    def test_thirty_admits_over_two_hosts_exactly_ten(self):
        a = yield host(self.redis.port)
        b = yield host(self.redis.port)
        client = Client("alice", b"", limits=Limits(requests_per_minute=10))
        results = yield defer.gatherResults([(a if i % 2 else b).admit(client, 1) for i in range(30)])
        admitted = [r for r in results if not isinstance(r, Refusal)]
        assert len(admitted) == 10
        assert a.fallback_admitted == b.fallback_admitted == 0
        refusal = next(r for r in results if isinstance(r, Refusal))
        assert refusal.limit == "requests" and refusal.retry_after is not None and refusal.retry_after > 0
        assert (b"x-ratelimit-remaining-requests", b"0") in refusal.headers
        a.link.stopService()
        b.link.stopService()

    @defer.inlineCallbacks
    def test_concurrent_token_reservations_never_exceed(self):
        a = yield host(self.redis.port)
        b = yield host(self.redis.port)
        client = Client("bob", b"", limits=Limits(tokens_per_minute=1000))
        results = yield defer.gatherResults([(a if i % 2 else b).admit(client, 70) for i in range(40)])
        admitted = [r for r in results if isinstance(r, SharedReservation)]
        assert len(admitted) * 70 <= 1000 and len(admitted) == 14
        # Settling with less than reserved gives the rest back to everyone.
        for r in admitted:
            r.settle(10)
        yield defer.gatherResults([r.settled for r in admitted])
        more = yield defer.gatherResults([a.admit(client, 70) for _ in range(12)])
        assert sum(isinstance(r, SharedReservation) for r in more) == 12
        a.link.stopService()
        b.link.stopService()

    @defer.inlineCallbacks
    def test_expired_lease_frees_slot(self):
        a = yield host(self.redis.port, lease=0.3)
        b = yield host(self.redis.port, lease=0.3)
        client = Client("carol", b"", limits=Limits(concurrent_requests=2))
        first = yield a.admit(client, 1)
        second = yield b.admit(client, 1)
        assert isinstance(first, SharedReservation) and isinstance(second, SharedReservation)
        third = yield b.admit(client, 1)
        assert isinstance(third, Refusal) and third.limit == "concurrent"
        # Host a "dies": its renewals stop, nothing settles; b's keeps renewing.
        first._renewer.stop()
        fourth, took = yield until_admitted(b, client)
        assert isinstance(fourth, SharedReservation) and fourth.local is None
        # Freed by the lease's expiry (0.3 s), not at once, and not much later.
        assert 0.1 < took < 5
        # b's own running request kept its slot through renewals.
        fifth = yield b.admit(client, 1)
        assert isinstance(fifth, Refusal)
        second.settle(0)
        fourth.settle(0)
        a.link.stopService()
        b.link.stopService()

    @defer.inlineCallbacks
    def test_redis_stopped_falls_back_within_bound_then_recovers(self):
        a = yield host(self.redis.port, instances=2)
        b = yield host(self.redis.port, instances=2)
        client = Client("dave", b"", limits=Limits(requests_per_minute=10))
        shared = yield defer.gatherResults([(a if i % 2 else b).admit(client, 1) for i in range(10)])
        assert all(isinstance(r, SharedReservation) for r in shared)
        self.redis.stop()
        results = []
        for i in range(30):
            results.append((yield (a if i % 2 else b).admit(client, 1)))
        # The bound: each of the 2 hosts admits its share, 10 // 2, as a burst
        # (plus 5 per minute; this run takes well under a second).
        fallback = [r for r in results if isinstance(r, SharedReservation)]
        assert len(fallback) == 10
        assert a.fallback_admitted == 5 and b.fallback_admitted == 5
        assert not a.up and not b.up and a.link.episodes == 1
        self.redis.start()
        yield defer.gatherResults([until_up(a.link), until_up(b.link)])
        # Redis restarted empty: the shared limit is exact again, 10 for both.
        back = yield defer.gatherResults([(a if i % 2 else b).admit(client, 1) for i in range(30)])
        assert sum(isinstance(r, SharedReservation) for r in back) == 10
        assert a.fallback_admitted == 5
        a.link.stopService()
        b.link.stopService()

    @defer.inlineCallbacks
    def test_paused_redis_calls_return_within_deadline(self):
        a = yield host(self.redis.port, deadline=0.05)
        client = Client("erin", b"", limits=Limits(requests_per_minute=100))
        self.redis.pause()
        try:
            started = time.monotonic()
            first = yield a.admit(client, 1)
            took = time.monotonic() - started
            assert isinstance(first, SharedReservation) and first.local is not None
            assert took < 0.5
            # A missed deadline alone leaves the link up; Redis's silence
            # takes it down within the link's silence interval...
            started = time.monotonic()
            while a.link.up:
                assert time.monotonic() - started < a.link.silence + 2.0
                yield task.deferLater(reactor, 0.05, lambda: None)
            # ...and once down, the next call is decided at once.
            second = a.admit(client, 1)
            assert second.called
            assert (yield second).local is not None
        finally:
            self.redis.pause(False)
        yield until_up(a.link)
        a.link.stopService()

    @defer.inlineCallbacks
    def test_startup_check_names_reasons(self):
        def check(target: RedisTarget) -> defer.Deferred:
            return check_shared_state(redis_connector(reactor, target), reactor)

        yield check(RedisTarget("127.0.0.1", self.redis.port))
        refused = yield self.assertFailure(check(RedisTarget("127.0.0.1", free_port())), SharedStateError)
        assert refused.reason == "refused"
        # A server that answers a TLS hello in plain text: the handshake fails.
        port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
        try:
            target = RedisTarget("localhost", port.getHost().port, tls=True)
            tls = yield self.assertFailure(check(target), SharedStateError)
            assert tls.reason == "tls"
        finally:
            yield port.stopListening()
        locked = RedisServer(password="sesame").start()
        try:
            target = RedisTarget("127.0.0.1", locked.port, password="wrong")
            auth = yield self.assertFailure(check(target), SharedStateError)
            assert auth.reason == "auth" and "wrong" not in str(auth)
            none = yield self.assertFailure(check(RedisTarget("127.0.0.1", locked.port)), SharedStateError)
            assert none.reason == "auth"
            yield check(RedisTarget("127.0.0.1", locked.port, password="sesame"))
        finally:
            locked.remove()
