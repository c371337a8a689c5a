"""
The shared limit store in memory: a fake txredisapi connection on a Clock,
for deadlines, fallback, its share and its log, and recovery.  The scripts
themselves run against a real Redis in tests/e2e/test_shared_redis.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Client, Limits
from oaiproxy.access.limits import Limiter, LocalLimitStore, Refusal, Reservation
from oaiproxy.access.shared import SharedLimitStore, SharedReservation
from oaiproxy.sharedstate.link import KeySpace, RedisLink, RedisTarget, SharedStateError, check_shared_state


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeRedis:
    """
    A connection whose replies the test gives: C{answer} (a list, or
    C{None} for never).
    """

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.answer: Any = [0, 0, 9, 0, 0, 0]
        self.calls: list[tuple[bytes, list[str], list[Any]]] = []

    def eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred:
        self.calls.append((script, keys, args))
        return Deferred() if self.answer is None else succeed(self.answer)

    def ping(self) -> Deferred:
        return Deferred() if self.answer is None else succeed("PONG")


class Connector:
    def __init__(self) -> None:
        self.connections: list[FakeRedis] = []
        self.pending: list[Deferred] = []
        self.refuse = False

    def __call__(self) -> Deferred:
        if self.refuse:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        conn = FakeRedis()
        self.connections.append(conn)
        return succeed(conn)


def client(**limits: Any) -> Client:
    return Client("alice", b"", limits=Limits(**limits))


class SharedStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.connector = Connector()
        self.link = RedisLink(self.connector, self.clock, deadline=0.05, retry=(1.0, 4.0), keepalive=0)
        self.link.startService()
        self.store = SharedLimitStore(self.link, self.clock, KeySpace("p:"), instances=2)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def admit(self, c: Client, estimate: int = 1) -> Any:
        results: list[Any] = []
        self.store.admit(c, estimate).addCallback(results.append)
        return results

    def criticals(self) -> list[dict]:
        return [e for e in self.events if e.get("log_level") == LogLevel.critical]

    def test_admitted_in_one_round_trip_with_prefixed_keys(self) -> None:
        [r] = self.admit(client(requests_per_minute=10, concurrent_requests=2), 5)
        self.assertIsInstance(r, SharedReservation)
        [(_, keys, args)] = self.connector.connections[0].calls
        self.assertEqual(keys, ["p:limits:{alice}:buckets", "p:limits:{alice}:leases"])
        self.assertEqual(args[:5], [10, 0, 2, 5, 30000])
        self.assertTrue(args[5])
        # The lease is renewed while the request runs, then freed on settle.
        self.clock.advance(10)
        self.assertEqual(len(self.connector.connections[0].calls), 2)
        r.settle(3)
        calls = self.connector.connections[0].calls
        self.assertEqual((calls[-1][1], calls[-1][2]), (keys, [0, 0, args[5]]))
        self.clock.advance(30)
        self.assertEqual(len(calls), 3)

    def test_refusal_carries_reason_and_headers(self) -> None:
        self.connector.connections[0].answer = [2, 6000, 0, 60000, 0, 0]
        [r] = self.admit(client(requests_per_minute=10))
        self.assertIsInstance(r, Refusal)
        self.assertEqual((r.limit, r.retry_after), ("requests", 6.0))
        self.assertIn((b"x-ratelimit-remaining-requests", b"0"), r.headers)
        self.assertIn((b"x-ratelimit-reset-requests", b"1m0s"), r.headers)

    def test_slow_redis_answers_within_deadline_then_locally(self) -> None:
        c = client(requests_per_minute=10)
        self.connector.connections[0].answer = None
        results = self.admit(c)
        self.assertEqual(results, [])
        self.clock.advance(0.05)
        [r] = results
        self.assertIsInstance(r.local, Reservation)
        # One missed deadline leaves the link up; Redis silent for the
        # link's silence interval takes it down.
        self.assertTrue(self.store.up)
        self.clock.advance(self.link.silence)
        self.assertFalse(self.store.up)
        self.assertTrue(self.connector.connections[0].transport.aborted)
        # Down: decided at once, at the share (10 // 2), never unlimited.
        more = [self.admit(c)[0] for _ in range(10)]
        self.assertEqual(sum(isinstance(m, SharedReservation) for m in more), 4)
        self.assertEqual(self.store.fallback_admitted, 5)
        self.assertEqual(len(self.criticals()), 1)
        self.assertNotIn("alice", self.criticals()[0]["log_format"])

    def test_recovers_by_itself_with_backoff_one_log_per_episode(self) -> None:
        c = client(requests_per_minute=100)
        self.connector.connections[0].answer = None
        self.admit(c)
        self.clock.advance(0.05)  # missed: decided locally, the link up...
        self.assertTrue(self.store.up)
        self.clock.advance(self.link.silence - 0.05)  # ...until 1 s of silence
        self.assertFalse(self.store.up)
        self.connector.refuse = True
        self.clock.advance(1.0)  # first retry: hangs, its own deadline ends it
        self.assertEqual(len(self.connector.pending), 1)
        self.clock.advance(1.0)
        self.assertFalse(self.store.up)
        self.clock.advance(1.9)  # backoff doubled: not yet
        self.assertEqual(len(self.connector.pending), 1)
        self.connector.refuse = False
        self.clock.advance(0.1)
        self.assertTrue(self.store.up)
        [r] = self.admit(c)
        self.assertIsNone(r.local)
        self.assertEqual(len(self.criticals()), 1)
        self.assertEqual(self.link.episodes, 1)
        # A second episode logs again, once.
        self.connector.connections[-1].answer = None
        self.admit(c)
        self.clock.advance(0.05)
        self.clock.advance(self.link.silence)
        self.admit(c)
        self.assertEqual(len(self.criticals()), 2)

    def test_fallback_bound_two_instances(self) -> None:
        """
        Redis down for F seconds: the group (two stores, instances=2)
        admits at most 2 * (10 // 2) * (1 + F / 60), here with F = 30.
        """
        other_link = RedisLink(Connector(), self.clock, retry=(1000.0, 1000.0), keepalive=0)
        stores = [self.store, SharedLimitStore(other_link, self.clock, instances=2)]
        self.link.stopService()
        c = client(requests_per_minute=10)
        admitted = 0
        for _ in range(30):
            for s in stores:
                got: list[Any] = []
                s.admit(c, 1).addCallback(got.append)
                admitted += isinstance(got[0], SharedReservation)
            self.clock.advance(1)
        bound = 2 * (10 // 2) * (1 + 30 / 60)
        self.assertLessEqual(admitted, bound)
        # Each: its burst of 5, then 5 per minute for the 29 s it asked.
        self.assertEqual(admitted, 2 * (5 + 2))

    def test_startup_check_times_out_with_reason(self) -> None:
        self.connector.refuse = True
        failures: list[Any] = []
        check_shared_state(self.connector, self.clock, deadline=2).addErrback(failures.append)
        self.clock.advance(2)
        [f] = failures
        self.assertIsInstance(f.value, SharedStateError)
        self.assertEqual(f.value.reason, "timeout")


class TargetTests(SynchronousTestCase):
    def test_urls(self) -> None:
        t = RedisTarget.from_url("rediss://redis.lan:6380/2", password="pw")
        self.assertEqual((t.host, t.port, t.db, t.tls, t.password), ("redis.lan", 6380, 2, True, "pw"))
        self.assertNotIn("pw", repr(t))
        self.assertEqual(RedisTarget.from_url("redis://h").port, 6379)
        self.assertRaises(ValueError, RedisTarget.from_url, "http://h")
        self.assertRaises(ValueError, RedisTarget.from_url, "redis://h/x")


class LocalStoreTests(SynchronousTestCase):
    def test_same_decisions_as_the_limiter(self) -> None:
        """
        The in-process store answers at once (no Deferred) with the
        limiter's decisions, a refusal with the limiter's headers.
        """
        store = LocalLimitStore(Limiter(Clock()))
        c = client(requests_per_minute=1)
        got: list[Any] = [store.admit(c, 1), store.admit(c, 1)]
        self.assertIsInstance(got[0], Reservation)
        self.assertIsInstance(got[1], Refusal)
        self.assertIn((b"x-ratelimit-remaining-requests", b"0"), got[1].headers)
