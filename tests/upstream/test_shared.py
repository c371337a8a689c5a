"""
Tests for L{oaiproxy.upstream.shared}: two processes' pools sharing their
breakers, in memory.  Each "process" has its own L{RedisLink} (with its
deadline and its down/up episodes) to one fake Redis on the same
C{Clock}, whose scripts are modelled here in Python; the Lua itself runs
against a real redis-server in tests/e2e/test_shared_breaker.py.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Secret
from oaiproxy.sharedstate.link import SCRIPTS, KeySpace, RedisLink, script
from oaiproxy.upstream.breaker import Breaker, BreakerPolicy, State
from oaiproxy.upstream.pool import Choice, Kind, Outcome, Pool, Refusal, Upstream
from oaiproxy.upstream.shared import SharedBreakers

_NAMES = {script(name): name for name in SCRIPTS}
FAILED = Outcome(Kind.ANSWERED, 500)
OK = Outcome(Kind.ANSWERED, 200)
#: No jitter: the cooldowns are exactly 5 s, 10 s...
POLICY = BreakerPolicy(jitter=0.0)


class FakeRedis:
    """
    The keys of one Redis and the breaker scripts over them, on the test's
    clock (Redis's C{TIME}).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[Any, Optional[float]]] = {}
        self.calls: list[str] = []

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def get(self, key: str) -> Any:
        entry = self.data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= self.clock.seconds():
            del self.data[key]
            return None
        return entry[0]

    def put(self, key: str, value: Any, px: int) -> None:
        self.data[key] = (value, self.clock.seconds() + px / 1000)

    def pttl(self, key: str) -> int:
        if self.get(key) is None:
            return -2
        expiry = self.data[key][1]
        return -1 if expiry is None else int(round((expiry - self.clock.seconds()) * 1000))

    def run(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        self.calls.append(name)
        return getattr(self, name)(self._now(), keys[0], keys[1], *args)

    def breaker_read(self, now: int, state: str, probe: str, me: str, renew: int) -> list[Any]:
        holder, left, mine = self.get(probe), -1, 0
        if holder is not None:
            mine = int(holder == me)
            if mine and renew:
                self.put(probe, holder, renew)
            left = self.pttl(probe)
        record = self.get(state)
        if record is None:
            return [0, 0, 0, 0, 0, left, mine, ""]
        kind = 2 if record["closed"] else 1
        return [
            kind,
            record["until"] - now,
            record["gen"],
            record["told"],
            record["refused"],
            left,
            mine,
            record["reason"],
        ]

    def breaker_open(
        self, now: int, state: str, probe: str, cooldown: int, told: int, refused: int, reason: str, me: str, keep: int
    ) -> list[Any]:
        until, gen = now + cooldown, now * 1000 + len(self.calls)
        record = self.get(state)
        if record is not None and not record["closed"] and record["until"] > now:
            gen = record["gen"]
            if record["until"] >= until:
                until, reason = record["until"], record["reason"]
            told, refused = max(told, record["told"]), max(refused, record["refused"])
        if self.get(probe) == me:
            del self.data[probe]
        fields = {"until": until, "gen": gen, "told": told, "refused": refused, "reason": reason, "closed": 0}
        self.put(state, fields, max(1, until - now) + keep)
        return [until - now, gen, told, refused]

    def breaker_close(self, now: int, state: str, probe: str, gen: int, me: str, keep: int) -> list[Any]:
        if self.get(probe) == me:
            del self.data[probe]
        record = self.get(state)
        if record is not None and not record["closed"] and record["gen"] != gen:
            r = record
            return [0, r["until"] - now, r["gen"], r["told"], r["refused"], r["reason"]]
        if record is None or not record["closed"]:
            fields = {"until": now, "gen": gen, "told": 0, "refused": 0, "reason": "probe succeeded", "closed": 1}
            self.put(state, fields, keep)
        return [1]

    def breaker_probe(self, now: int, state: str, probe: str, me: str, lease: int, early: int) -> list[Any]:
        record, gen = self.get(state), 0
        if record is not None and not record["closed"]:
            gen = record["gen"]
            left = record["until"] - now
            if left > 0 and (not early or record["told"]):
                return [0, left, gen]
        holder = self.get(probe)
        if holder is not None and holder != me:
            return [-1, self.pttl(probe), gen]
        self.put(probe, me, lease)
        return [1, lease, gen]


class FakeTransport:
    def abortConnection(self) -> None:
        pass


class Connection:
    """
    One process's connection to the fake Redis; C{hang} makes it answer
    nothing (a paused server).
    """

    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.transport = FakeTransport()
        self.hang = False

    def eval(self, source: bytes, keys: list[str], args: list[Any]) -> Deferred:
        if self.hang:
            return Deferred()
        return succeed(self.redis.run(_NAMES[source], keys, args))

    def ping(self) -> Deferred:
        return Deferred() if self.hang else succeed("PONG")


class Process:
    """
    One proxy process: its link, its shared breakers, its pool of two
    upstreams, C{a} (the one that fails) and C{b}, at one priority.
    """

    def __init__(self, clock: Clock, redis: FakeRedis, seed: int, names: tuple[str, ...] = ("a", "b")) -> None:
        self.clock = clock
        self.refuse = False
        self.connections: list[Connection] = []

        def connect() -> Deferred:
            if self.refuse:
                return fail(ConnectionRefusedError())
            connection = Connection(redis)
            self.connections.append(connection)
            return succeed(connection)

        self.link = RedisLink(connect, clock, deadline=0.05, retry=(1.0, 1.0), keepalive=0)
        self.link.startService()
        self.group = SharedBreakers(self.link, clock, KeySpace("t:"))
        upstreams = [Upstream(name, f"https://{name}.example", Secret(b"k")) for name in names]
        draw = random.Random(seed).random
        self.pool = Pool(
            upstreams, clock, draw=draw, breaker=lambda name: Breaker(name, clock, POLICY, draw), group=self.group
        )

    def breaker(self, name: str = "a") -> Breaker:
        return self.pool[name].breaker

    def send(self, outcomes: dict[str, Outcome]) -> Optional[str]:
        """
        One attempt: the upstream chosen, which answers as C{outcomes}
        says (200 by default); C{None} when the pool refused it.
        """
        choice = self.pool.choose(None)
        if isinstance(choice, Refusal):
            return None
        assert isinstance(choice, Choice)
        name = choice.member.name
        self.pool.finish(choice, outcomes.get(name, OK))
        return name

    def down(self) -> None:
        """
        Redis stops answering this process: its next call misses the
        deadline (the link stays up), and after the link's silence
        interval without a reply the link is down until C{back}.
        """
        self.refuse = True
        self.connections[-1].hang = True
        self.link.call("breaker_read", ["x", "y"], ["me", 0]).addErrback(lambda _: None)
        self.clock.advance(0.05)
        assert self.link.up
        self.clock.advance(self.link.silence)
        assert not self.link.up

    def back(self) -> None:
        """
        Redis answers again: the link reconnects by itself (its next retry
        is at most 1 s away).
        """
        self.refuse = False
        for _ in range(40):
            if self.link.up:
                return
            self.clock.advance(0.05)
        raise AssertionError("the link did not come back")


class SharedBreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.redis = FakeRedis(self.clock)
        self.one = Process(self.clock, self.redis, 1)
        self.two = Process(self.clock, self.redis, 2)
        for process in (self.one, self.two):
            self.addCleanup(process.group.stop)
            self.addCleanup(process.link.stopService)

    def fail_a(self, process: Process, until_open: bool = True) -> list[Optional[str]]:
        """
        Requests through C{process} while C{a} fails, until its breaker
        there opens; where each went.
        """
        sent = []
        for _ in range(100):
            sent.append(process.send({"a": FAILED}))
            if process.breaker().state is State.OPEN:
                return sent
        raise AssertionError("a never opened")

    def test_open_spreads_to_the_other_process(self) -> None:
        """
        C{a} opened by one process: the other stops sending to it within a
        read interval (1 s), for what is left of the cooldown, without a
        failure of its own.
        """
        self.fail_a(self.one)
        self.assertIs(self.two.breaker().state, State.CLOSED)
        self.clock.advance(1.0)
        self.assertIs(self.two.breaker().state, State.OPEN)
        self.assertAlmostEqual(self.two.breaker().cooldown_left(), 4.0, places=2)
        sent = [self.two.send({"a": FAILED}) for _ in range(50)]
        self.assertEqual(set(sent), {"b"})

    def test_first_failure_elsewhere_learns_at_once(self) -> None:
        """
        A process that fails on C{a} after another opened it asks the group
        at once, so it sends no second request there even before the
        next read.
        """
        self.clock.advance(0.5)
        self.fail_a(self.one)
        sent: list[Optional[str]] = []
        while "a" not in sent:
            sent.append(self.two.send({"a": FAILED}))
        self.assertIs(self.two.breaker().state, State.OPEN)
        more = [self.two.send({"a": FAILED}) for _ in range(20)]
        self.assertNotIn("a", more)

    def half_open(self) -> None:
        """
        C{a} opened by process one, seen by two, and its cooldown over.
        """
        self.fail_a(self.one)
        self.clock.advance(1.0)
        self.assertIs(self.two.breaker().state, State.OPEN)
        self.clock.advance(4.0)
        self.assertIs(self.one.breaker().state, State.HALF_OPEN)
        self.assertIs(self.two.breaker().state, State.HALF_OPEN)

    def test_one_probe_across_two_processes(self) -> None:
        """
        Once the cooldown is over, requests through both processes: exactly
        one reaches C{a} (the probe) while it is in flight, whichever
        process wins the lease.
        """
        self.half_open()
        choices = []
        for _ in range(20):
            for process in (self.one, self.two):
                choice = process.pool.choose(None)
                if isinstance(choice, Choice) and choice.member.name == "a":
                    choices.append((process, choice))
                elif isinstance(choice, Choice):
                    process.pool.finish(choice, OK)
            self.clock.advance(0.01)
        self.assertEqual(len(choices), 1)
        [(prober, choice)] = choices
        self.assertTrue(choice.permit.probe)
        other = self.two if prober is self.one else self.one
        # The other holds it as open, with a probe in flight in the group.
        self.assertTrue(other.breaker().probing)
        self.assertFalse(other.breaker().admits())
        # A slow probe keeps its lease (renewed at each read) past 10 s.
        self.clock.pump([1.0] * 15)
        self.assertEqual([other.send({}) for _ in range(10)], ["b"] * 10)
        prober.pool.finish(choice, OK)

    def probe(self) -> tuple[Process, Process, Choice]:
        """
        The half-open C{a}'s one probe, through whichever process wins it.
        """
        self.half_open()
        return self.first_probe()

    def first_probe(self) -> tuple[Process, Process, Choice]:
        """
        Requests through both processes until one is C{a}'s probe: that
        process, the other, and the probe's choice.
        """
        for _ in range(10):
            for process in (self.one, self.two):
                choice = process.pool.choose(None)
                if isinstance(choice, Choice) and choice.member.name == "a":
                    other = self.two if process is self.one else self.one
                    return process, other, choice
                if isinstance(choice, Choice):
                    process.pool.finish(choice, OK)
            self.clock.advance(0.01)
        raise AssertionError("no probe")

    def test_probe_success_closes_for_all(self) -> None:
        prober, other, choice = self.probe()
        prober.pool.finish(choice, OK)
        self.assertIs(prober.breaker().state, State.CLOSED)
        self.assertIs(other.breaker().state, State.HALF_OPEN)
        self.clock.advance(1.0)
        self.assertIs(other.breaker().state, State.CLOSED)
        self.assertIn("a", [other.send({}) for _ in range(20)])

    def test_probe_failure_reopens_for_all(self) -> None:
        """
        The probe fails: both hold C{a} open for the prober's next backoff
        step (10 s), and the next probe is again one across both.
        """
        prober, other, choice = self.probe()
        prober.pool.finish(choice, FAILED)
        self.assertIs(prober.breaker().state, State.OPEN)
        self.assertAlmostEqual(prober.breaker().cooldown_left(), 10.0, places=2)
        # Published at once: the other's very next read (one it makes now,
        # as after a failure of its own) sees it.
        other.group.failure(other.breaker())
        self.assertIs(other.breaker().state, State.OPEN)
        self.clock.advance(1.0)
        self.assertIs(other.breaker().state, State.OPEN)
        self.assertAlmostEqual(other.breaker().cooldown_left(), 9.0, places=2)
        self.assertEqual({other.send({"a": FAILED}) for _ in range(20)}, {"b"})
        self.clock.advance(9.0)
        reached = 0
        for _ in range(30):
            for process in (self.one, self.two):
                reached += process.send({"a": FAILED}) == "a"
            self.clock.advance(0.01)
        self.assertEqual(reached, 1)

    def test_dead_prober_frees_the_probe_within_the_lease(self) -> None:
        """
        The prober dies with its probe in flight (nothing more from it):
        the other process probes once the lease (10 s) ran out.
        """
        prober, other, _ = self.probe()
        prober.group.stop()
        prober.link.stopService()
        self.clock.advance(9.0)
        self.assertNotIn("a", [other.send({}) for _ in range(5)])
        self.clock.advance(1.5)
        sent = []
        for _ in range(5):
            sent.append(other.send({}))
            self.clock.advance(0.01)
        self.assertIn("a", sent)

    def test_link_down_breakers_local(self) -> None:
        """
        While this process cannot reach Redis its breakers are its own:
        another process's open does not reach it, and its own half-open
        breaker probes without asking anyone.
        """
        self.two.down()
        self.fail_a(self.one)
        self.clock.advance(1.0)
        self.assertIs(self.two.breaker().state, State.CLOSED)
        self.assertIn("a", [self.two.send({}) for _ in range(20)])
        self.fail_a(self.two)
        self.clock.advance(5.0)
        self.assertIs(self.two.breaker().state, State.HALF_OPEN)
        self.assertTrue(self.two.breaker().admits())
        # A request that the pool would send is not held for Redis.
        self.assertEqual(self.two.send({}), "a")
        self.assertIs(self.two.breaker().state, State.CLOSED)

    def test_link_back_publishes_what_opened_meanwhile(self) -> None:
        """
        C{a} opened in a process while it could not reach Redis: when the
        link is back it publishes it, and the other process holds it open
        too.
        """
        self.one.down()
        self.fail_a(self.one)
        self.clock.advance(1.0)
        self.assertIs(self.two.breaker().state, State.CLOSED)
        self.one.back()
        self.assertIs(self.one.breaker().state, State.OPEN)
        self.clock.advance(1.0)
        self.assertIs(self.two.breaker().state, State.OPEN)
        self.assertLess(abs(self.two.breaker().cooldown_left() - self.one.breaker().cooldown_left()), 0.01)
        self.assertGreater(self.two.breaker().cooldown_left(), 1.0)

    def test_link_back_adopts_and_closes(self) -> None:
        """
        Back from an episode, a process adopts the group's open, and a
        later close by the group's probe closes it there too.
        """
        self.two.down()
        self.fail_a(self.one)
        self.two.back()
        self.assertIs(self.two.breaker().state, State.OPEN)
        self.clock.advance(4.0)
        # One probe, one process; its success closes both.
        prober, _, choice = self.first_probe()
        prober.pool.finish(choice, OK)
        self.clock.advance(1.0)
        self.assertIs(self.one.breaker().state, State.CLOSED)
        self.assertIs(self.two.breaker().state, State.CLOSED)

    def test_slow_redis_never_holds_a_request(self) -> None:
        """
        Redis answers nothing: every choice is made at once, closed
        breakers never ask, and once the link is down (its silence
        interval after the deadline) a half-open one probes locally.
        """
        self.half_open()
        calls = len(self.redis.calls)
        for process in (self.one, self.two):
            process.connections[-1].hang = True
        # Closed "b" is chosen without a call; half-open "a" starts taking
        # its lease (which never comes), so this request goes to "b".
        self.assertEqual(self.one.send({}), "b")
        self.assertEqual(len(self.redis.calls), calls)
        self.clock.advance(0.05)
        self.assertTrue(self.one.link.up)
        self.clock.advance(self.one.link.silence)
        self.assertFalse(self.one.link.up)
        sent = {self.one.send({}) for _ in range(10)}
        self.assertIn("a", sent)

    def test_a_closed_pool_costs_no_calls_per_request(self) -> None:
        """
        With every breaker closed, requests make no Redis call: only the
        reads, one per upstream per second.
        """
        before = len(self.redis.calls)
        for _ in range(1000):
            self.one.send({})
        self.assertEqual(len(self.redis.calls), before)
        self.clock.advance(1.0)
        self.assertEqual(self.redis.calls[before:], ["breaker_read"] * 4)

    def test_reload_joins_and_leaves(self) -> None:
        """
        A reload's new member shares its breaker; a dropped one no longer
        does.
        """
        pool = self.one.pool
        upstreams = [m.upstream for m in pool.members] + [Upstream("c", "https://c.example", Secret(b"k"))]
        pool.replace(upstreams[1:])
        self.assertIsNone(self.one.group._members.get("a"))
        self.assertIs(pool["c"].breaker.group, self.one.group)
        for _ in range(5):
            pool.finish(pool.choose(None, exclude=("b",)), FAILED)  # type: ignore[arg-type]
        self.assertIs(pool["c"].breaker.state, State.OPEN)
        self.assertIn("t:breaker:{c}:state", self.redis.data)


class WiringTests(SynchronousTestCase):
    def build(self, upstreams: Optional[tuple[Upstream, ...]]) -> Any:
        from dataclasses import replace

        from oaiproxy.access.clients import ClientRegistry, Credentials
        from oaiproxy.drain import Lifecycle
        from oaiproxy.fake.harness import harness_config
        from oaiproxy.observe.metrics import Metrics
        from oaiproxy.server.build import build_site
        from oaiproxy.sharedstate.link import SharedState

        clock = Clock()
        process = Process(clock, FakeRedis(clock), 1)
        self.addCleanup(process.link.stopService)
        config = replace(harness_config(clients=ClientRegistry()), upstreams=upstreams)
        built = build_site(
            config,
            http=None,  # type: ignore[arg-type]
            credentials=Credentials(Secret(b"k"), ClientRegistry()),
            clock=clock,
            lifecycle=Lifecycle(),
            metrics=Metrics(),
            shared=SharedState(process.link, KeySpace("t:")),
        )
        return built.upstreams.pool

    def test_an_upstreams_file_pool_shares_its_breakers(self) -> None:
        """
        With C{--shared-state}, the breakers of an upstreams file's pool
        are the group's; the single-upstream options' pool of one (whose
        breaker never opens) shares nothing.
        """
        pool = self.build(tuple(Upstream(n, f"https://{n}.example", Secret(b"k")) for n in "ab"))
        self.assertIsInstance(pool.group, SharedBreakers)
        self.assertEqual([m.breaker.group for m in pool.members], [pool.group] * 2)
        pool.group.stop()
        self.assertIsNone(self.build(None).group)
