"""
Breakers shared through a real redis-server (Debian's, started on a free
port with persistence off and stopped by PID).

L{TwoPoolsTests}: two pools in this process, each with its own link (its
own connection), stand for two processes; the Lua scripts run for real, on
Redis's clock, with short cooldowns and a fast read interval.

L{TwoProxiesTests}: two daemons (on 127.0.0.1 and 127.0.0.2, as two hosts)
with one upstreams file of two fake upstreams, one of which fails, sharing
the Redis through C{--shared-state}: the fake upstreams count what reaches
them.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any, Optional

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaiproxy.config import Secret
from oaiproxy.fake.processes import RedisServer, start_proxy
from oaiproxy.sharedstate.link import KeySpace, RedisLink, RedisTarget, redis_connector
from oaiproxy.upstream.breaker import Breaker, BreakerPolicy, State, Transition
from oaiproxy.upstream.pool import Choice, Kind, Outcome, Pool, Upstream
from oaiproxy.upstream.shared import SharedBreakers
from tests.e2e.test_pool import CLIENT_KEY, KEYS, MESSAGES, Fake, http, until
from tests.e2e.test_shared_redis import RedisCase, until_up
from tests.support import temp_dir

SERVER = shutil.which("redis-server")
FAILED = Outcome(Kind.ANSWERED, 500)
OK = Outcome(Kind.ANSWERED, 200)
#: Short cooldowns (0.5 s, then 1 s), no jitter.
POLICY = BreakerPolicy(jitter=0.0, base_backoff=0.5)
INTERVAL = 0.05


def pause(seconds: float = INTERVAL) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class Host:
    """
    One "process": a link of its own, its shared breakers, a pool of C{a}
    and C{b}.
    """

    def __init__(self, case: TestCase, port: int) -> None:
        target = RedisTarget("127.0.0.1", port)
        self.link = RedisLink(redis_connector(reactor, target), reactor, deadline=0.5, retry=(0.1, 0.2))
        self.link.startService()
        self.group = SharedBreakers(self.link, reactor, KeySpace("t:"), interval=INTERVAL, lease=0.5)
        upstreams = [Upstream(name, f"https://{name}.example", Secret(b"k")) for name in ("a", "b")]
        self.transitions: list[Transition] = []
        self.pool = Pool(
            upstreams,
            reactor,
            breaker=lambda name: Breaker(name, reactor, POLICY, observer=self.transitions.append),
            group=self.group,
        )
        case.addCleanup(self.link.stopService)
        case.addCleanup(self.group.stop)

    def breaker(self) -> Breaker:
        return self.pool["a"].breaker

    def choose(self) -> Optional[Choice]:
        choice = self.pool.choose(None)
        return choice if isinstance(choice, Choice) else None


@defer.inlineCallbacks
def soon(condition: Any, what: str, within: float = 10.0) -> Any:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out waiting for {what}")
        yield pause(0.01)


class TwoPoolsTests(RedisCase):
    @defer.inlineCallbacks
    def hosts(self) -> Any:
        one, two = Host(self, self.redis.port), Host(self, self.redis.port)
        yield until_up(one.link)
        yield until_up(two.link)
        return one, two

    @defer.inlineCallbacks
    def probes(self, one: Host, two: Host, outcome: Outcome) -> Any:
        """
        Requests through both, alternately, until C{a} has been tried once
        and answered C{outcome}, then for 10 more read intervals: every
        attempt on C{a} meanwhile (it must be the one probe).
        """
        tried = []
        started = time.monotonic()
        while time.monotonic() - started < 10:
            for host in (one, two):
                choice = host.choose()
                if choice is None:
                    continue
                if choice.member.name == "a":
                    tried.append((host, choice.permit.probe))
                    host.pool.finish(choice, outcome)
                else:
                    host.pool.finish(choice, OK)
            if tried and time.monotonic() - started > 10 * INTERVAL:
                break
            yield pause(0.005)
        return tried

    @defer.inlineCallbacks
    def test_open_spreads_one_probe_reopens_then_closes_for_both(self):
        one, two = yield self.hosts()
        for _ in range(5):
            choice = one.pool.choose(None, exclude=("b",))
            one.pool.finish(choice, FAILED)
        assert one.breaker().state is State.OPEN
        # The other learns it within a read or two, without a failure.
        yield soon(lambda: two.breaker().state is not State.CLOSED, "two to hold a open")
        assert two.breaker().cooldown_left() > 0.2
        # Logged there with the reason the first gave, as text.
        [learnt] = [t for t in two.transitions if t.new is State.OPEN]
        assert learnt.shared and learnt.reason == "open in the group (5 failures in a row, the last status 500)", learnt
        for _ in range(20):
            choice = two.choose()
            assert choice is not None and choice.member.name == "b"
            two.pool.finish(choice, OK)
        # Cooldown over: one probe across both; it fails, and both hold it
        # open again, for the prober's next step (1 s).
        tried = yield self.probes(one, two, FAILED)
        assert len(tried) == 1 and tried[0][1], tried
        prober = tried[0][0]
        other = two if prober is one else one
        assert 0.8 < prober.breaker().cooldown_left() <= 1.0
        yield soon(lambda: other.breaker().cooldown_left() > 0.5, "the other to re-open")
        # The next probe, again one across both, succeeds: both close.
        tried = yield self.probes(one, two, OK)
        assert len(tried) == 1 and tried[0][1], tried
        yield soon(lambda: one.breaker().state is State.CLOSED and two.breaker().state is State.CLOSED, "both to close")

    @defer.inlineCallbacks
    def test_redis_restart_republishes_the_open(self):
        """
        Redis restarts and forgets: the process holding C{a} open publishes
        it again, and a process that learns only then holds it open too.
        """
        one, two = yield self.hosts()
        two.group.stop()
        for _ in range(5):
            one.pool.finish(one.pool.choose(None, exclude=("b",)), FAILED)
        one.breaker().adopt(30.0, False, False, "a longer cooldown, for the test")
        self.redis.stop()
        yield soon(lambda: not one.link.up, "one to see Redis gone")
        self.redis.start()
        yield until_up(one.link)
        three = Host(self, self.redis.port)
        yield until_up(three.link)
        yield soon(lambda: three.breaker().state is State.OPEN, "three to hold a open")
        assert three.breaker().cooldown_left() > 20


class TwoProxiesTests(SynchronousTestCase):
    """
    Two daemons (two hosts) over one Redis, each with the upstreams file of
    C{a} (made to fail with 500s) and C{b}; the README's default breaker
    policy (5 failures in a row, 5 s then 10 s, up to 10% jitter).
    """

    if SERVER is None:
        skip = "redis-server is not on PATH (Debian package redis-server)"

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.remove)
        self.fakes = {name: Fake(self, self.cwd, name) for name in ("a", "b")}
        path = f"{self.cwd}/upstreams.toml"
        with open(path, "w") as f:
            for name, fake in self.fakes.items():
                f.write(f'[[upstreams]]\nname = "{name}"\nurl = "{fake.url}"\nkey_env = "POOL_KEY_{name.upper()}"\n\n')
        env = {f"POOL_KEY_{name.upper()}": KEYS[name] for name in self.fakes}
        env["OAIPROXY_CLIENT_KEYS"] = CLIENT_KEY
        args = ["--upstreams-file", path, "--shared-state", f"redis://127.0.0.1:{self.redis.port}/0"]
        self.bases = []
        for host in ("127.0.0.1", "127.0.0.2"):
            proxy, base = start_proxy(self.cwd, args, env, port=f"tcp:0:interface={host}")
            self.addCleanup(proxy.stop)
            proxy.wait_for(r"shared state at 127\.0\.0\.1:\d+ connected")
            self.bases.append(base)

    def chat(self, base: str) -> None:
        body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
        headers = {"Authorization": "Bearer " + CLIENT_KEY, "Content-Type": "application/json"}
        status, answer = http("POST", base + "/v1/chat/completions", body, headers)
        self.assertEqual(status, 200, answer)

    def a_seen_by(self, base: str) -> dict[str, Any]:
        status, body = http("GET", base + "/health/upstreams", headers={"Authorization": "Bearer " + CLIENT_KEY})
        assert status == 200, body
        return next(u for u in json.loads(body)["upstreams"] if u["name"] == "a")

    def hits(self) -> int:
        return len(self.fakes["a"].chats())

    def test_opened_by_one_not_tried_by_the_other_one_probe_across_both(self) -> None:
        """
        C{a} opened by the first proxy's requests: the second's requests
        never reach it while it is open; when the cooldown ends, requests
        through both let exactly one probe reach it, whose failure opens
        it again for both.  Every client gets C{b}'s answer throughout.
        """
        first, second = self.bases
        self.fakes["a"].mode(mode="status", status=500)
        # Through the first proxy until a has failed there 5 times in a
        # row: it opens there (every client still gets b's answer).
        until(lambda: self.a_seen_by(first)["state"] == "open", "a to open on the first", lambda: self.chat(first))
        self.assertEqual(self.hits(), 5)
        # The second hears of it without a request (a read every second),
        # and shows it in /health/upstreams and /metrics.
        until(lambda: self.a_seen_by(second)["state"] != "closed", "the second to hold a open")
        self.assertRegex(self.metrics(second), r'oaiproxy_upstream_breaker_state\{upstream="a"\} [12]\.0')
        # While its cooldown lasts, the second sends a nothing.
        left, started, sent = self.a_seen_by(second)["cooldown_left"], time.monotonic(), 0
        while sent < 20 and time.monotonic() - started < left - 1.0:
            self.chat(second)
            sent += 1
        self.assertGreater(sent, 5)
        self.assertEqual(self.hits(), 5)
        # Cooldown over (at most 5 s): requests through both, alternately;
        # exactly one reaches a (the probe), which fails: open again for
        # both, for the next step (9 s at least).
        until(lambda: all(self.a_seen_by(base)["state"] == "half-open" for base in self.bases), "the cooldown's end")
        started = time.monotonic()
        while time.monotonic() - started < 3:
            for base in self.bases:
                self.chat(base)
        self.assertEqual(self.hits(), 6)
        for base in self.bases:
            self.assertEqual(self.a_seen_by(base)["state"], "open")

    def metrics(self, base: str) -> str:
        status, body = http("GET", base + "/metrics", headers={"Authorization": "Bearer " + CLIENT_KEY})
        assert status == 200
        return body.decode()
