"""
Tests for L{oaiproxy.upstream.breaker}: every transition on a C{Clock}.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.upstream.breaker import Breaker, BreakerPolicy, State, Transition

_DEFAULTS = BreakerPolicy()


def _breaker(policy: BreakerPolicy = _DEFAULTS, draw: float = 0.0) -> tuple[Breaker, Clock, list[Transition]]:
    clock = Clock()
    seen: list[Transition] = []
    return Breaker("a", clock, policy, lambda: draw, seen.append), clock, seen


def _fail(breaker: Breaker, times: int = 1, retry_after: Optional[float] = None, reason: str = "status 500") -> None:
    for _ in range(times):
        permit = breaker.acquire()
        assert permit is not None, breaker
        breaker.failed(permit, reason, retry_after)


def _succeed(breaker: Breaker) -> None:
    permit = breaker.acquire()
    assert permit is not None, breaker
    breaker.succeeded(permit)


class ClosedTests(SynchronousTestCase):
    def test_threshold_opens(self) -> None:
        """
        Five failures in a row (the default) open the breaker, not four;
        it then refuses requests.
        """
        breaker, _, seen = _breaker()
        _fail(breaker, 4)
        self.assertIs(breaker.state, State.CLOSED)
        _fail(breaker)
        self.assertIs(breaker.state, State.OPEN)
        self.assertIsNone(breaker.acquire())
        self.assertFalse(breaker.admits())
        self.assertEqual([(t.old, t.new) for t in seen], [(State.CLOSED, State.OPEN)])
        self.assertIn("5 failures in a row", seen[0].reason)

    def test_success_resets_the_count(self) -> None:
        """
        A success between failures starts the count again.
        """
        breaker, _, _ = _breaker()
        _fail(breaker, 4)
        _succeed(breaker)
        _fail(breaker, 4)
        self.assertIs(breaker.state, State.CLOSED)

    def test_interleaved_failures_open_by_ratio(self) -> None:
        """
        An upstream that fails every other request never has five failures
        in a row (istio/api#3766: such a host is never ejected by a
        consecutive count), but the ratio over the window opens it once the
        window holds enough requests.
        """
        breaker, _, seen = _breaker()
        for _ in range(9):
            _succeed(breaker)
            _fail(breaker)
        self.assertIs(breaker.state, State.CLOSED)  # 18 requests: below the minimum of 20
        _succeed(breaker)
        _fail(breaker)
        self.assertIs(breaker.state, State.OPEN)
        self.assertIn("10 of 20 requests failed", seen[0].reason)

    def test_ratio_starts_afresh_after_closing(self) -> None:
        """
        Once a probe has closed a breaker the ratio opened, the failures
        that opened it are forgotten: one new failure does not open it
        again.
        """
        breaker, clock, _ = _breaker()
        for _ in range(10):
            _succeed(breaker)
            _fail(breaker)
        self.assertIs(breaker.state, State.OPEN)
        clock.advance(5)
        _succeed(breaker)
        _fail(breaker)
        self.assertIs(breaker.state, State.CLOSED)

    def test_ratio_forgets_old_failures(self) -> None:
        """
        Requests older than the window no longer count: 18 at half failed,
        then 31 s later two more at half failed make 2 in the window, not
        20, and the breaker stays closed.
        """
        breaker, clock, _ = _breaker()
        for _ in range(9):
            _succeed(breaker)
            _fail(breaker)
        clock.advance(31)
        _succeed(breaker)
        _fail(breaker)
        self.assertIs(breaker.state, State.CLOSED)

    def test_retry_after_opens_at_once(self) -> None:
        """
        A 429 with retry-after opens the breaker at once for exactly that
        long, whatever the failure count.
        """
        breaker, clock, seen = _breaker()
        _fail(breaker, retry_after=2, reason="status 429")
        self.assertIs(breaker.state, State.OPEN)
        self.assertEqual(seen[0].cooldown, 2)
        clock.advance(1.999)
        self.assertIsNone(breaker.acquire())
        clock.advance(0.001)
        self.assertIs(breaker.state, State.HALF_OPEN)

    def test_a_bogus_retry_after_is_capped(self) -> None:
        """
        A retry-after of a day is believed for an hour at most.
        """
        breaker, _, seen = _breaker()
        _fail(breaker, retry_after=86400, reason="status 429")
        self.assertEqual(seen[0].cooldown, 3600)


class BackoffTests(SynchronousTestCase):
    def _open_and_fail_probes(self, breaker: Breaker, clock: Clock, seen: list[Transition], rounds: int) -> list[float]:
        _fail(breaker, 5)
        for _ in range(rounds):
            clock.advance(seen[-1].cooldown or 0)
            permit = breaker.acquire()
            self.assertTrue(permit is not None and permit.probe)
            assert permit is not None
            breaker.failed(permit, "connect")
        return [t.cooldown for t in seen if t.new is State.OPEN and t.cooldown is not None]

    def test_backoff_doubles_to_the_cap(self) -> None:
        """
        Without retry-after the cooldowns are 5, 10, 20... seconds, at most
        300.
        """
        breaker, clock, seen = _breaker()
        cooldowns = self._open_and_fail_probes(breaker, clock, seen, 8)
        self.assertEqual(cooldowns, [5, 10, 20, 40, 80, 160, 300, 300, 300])

    def test_jitter_shortens_within_bounds(self) -> None:
        """
        The jitter takes at most a tenth off a step, so the cap holds and
        breakers opened together come back apart.
        """
        breaker, clock, seen = _breaker(draw=0.999)
        cooldowns = self._open_and_fail_probes(breaker, clock, seen, 7)
        for got, nominal in zip(cooldowns, [5, 10, 20, 40, 80, 160, 300, 300]):
            self.assertTrue(nominal * 0.9 <= got < nominal, (got, nominal))
        self.assertNotEqual(cooldowns[0], 5)

    def test_success_resets_the_backoff(self) -> None:
        """
        A probe's success closes the breaker and the next opening starts
        at 5 s again.
        """
        breaker, clock, seen = _breaker()
        self._open_and_fail_probes(breaker, clock, seen, 2)  # 5, 10, 20
        clock.advance(20)
        permit = breaker.acquire()
        assert permit is not None
        breaker.succeeded(permit)
        self.assertIs(breaker.state, State.CLOSED)
        _fail(breaker, 5)
        self.assertEqual(seen[-1].cooldown, 5)

    def test_count_starts_afresh_after_closing(self) -> None:
        """
        After it closes, it takes a full threshold of failures to open it
        again, not one (envoyproxy/envoy#1491: a counter not reset at
        ejection makes the next ejection come at the wrong count).
        """
        breaker, clock, seen = _breaker()
        _fail(breaker, 5)
        clock.advance(5)
        _succeed(breaker)
        _fail(breaker, 4)
        self.assertIs(breaker.state, State.CLOSED)
        _fail(breaker)
        self.assertIs(breaker.state, State.OPEN)


class HalfOpenTests(SynchronousTestCase):
    def test_exactly_one_probe(self) -> None:
        """
        Half-open admits one probe at a time: a second request is refused
        until the probe ends.
        """
        breaker, clock, _ = _breaker()
        _fail(breaker, 5)
        clock.advance(5)
        probe = breaker.acquire()
        assert probe is not None
        self.assertTrue(probe.probe)
        self.assertIsNone(breaker.acquire())
        self.assertFalse(breaker.admits())
        breaker.succeeded(probe)
        self.assertIsNotNone(breaker.acquire())

    def test_released_probe_frees_the_slot(self) -> None:
        """
        A probe the client gave up on says nothing about the upstream: the
        breaker stays half-open and admits the next probe.
        """
        breaker, clock, seen = _breaker()
        _fail(breaker, 5)
        clock.advance(5)
        probe = breaker.acquire()
        assert probe is not None
        breaker.release(probe)
        self.assertIs(breaker.state, State.HALF_OPEN)
        again = breaker.acquire()
        self.assertTrue(again is not None and again.probe)

    def test_probe_failure_reopens_with_next_step(self) -> None:
        """
        A failed probe opens the breaker again for the next step (10 s
        after the first 5 s).
        """
        breaker, clock, seen = _breaker()
        _fail(breaker, 5)
        clock.advance(5)
        probe = breaker.acquire()
        assert probe is not None
        breaker.failed(probe, "status 502")
        self.assertIs(breaker.state, State.OPEN)
        self.assertEqual(seen[-1].cooldown, 10)
        self.assertIn("probe failed (status 502)", seen[-1].reason)

    def test_probe_outcome_counts_even_if_late(self) -> None:
        """
        An early probe whose cooldown runs out while it is in flight still
        decides: the breaker does not admit a second probe meanwhile, and
        the probe's success closes it.
        """
        breaker, clock, _ = _breaker()
        _fail(breaker, 5)
        probe = breaker.acquire_early()
        assert probe is not None
        clock.advance(6)
        self.assertIs(breaker.state, State.HALF_OPEN)
        self.assertIsNone(breaker.acquire())
        breaker.succeeded(probe)
        self.assertIs(breaker.state, State.CLOSED)


class EarlyProbeTests(SynchronousTestCase):
    def test_early_probe_only_for_own_backoff(self) -> None:
        """
        An open breaker may take one early probe when its cooldown is the
        proxy's own backoff, but not while one is in flight, and never when
        upstream set the cooldown with retry-after: that is the rate
        limit's own end.
        """
        breaker, _, _ = _breaker()
        _fail(breaker, 5)
        probe = breaker.acquire_early()
        self.assertIsNotNone(probe)
        self.assertIsNone(breaker.acquire_early())
        told, _, _ = _breaker()
        _fail(told, retry_after=30, reason="status 429")
        self.assertIsNone(told.acquire_early())

    def test_failed_early_probe_never_shortens(self) -> None:
        """
        An early probe answered with a short retry-after does not cut the
        running cooldown short.
        """
        breaker, clock, _ = _breaker()
        _fail(breaker, 5)
        probe = breaker.acquire_early()
        assert probe is not None
        breaker.failed(probe, "status 429", retry_after=1)
        clock.advance(4.9)
        self.assertIs(breaker.state, State.OPEN)


class KeyRefusedTests(SynchronousTestCase):
    def test_refused_key_opens_long_and_critical(self) -> None:
        """
        A 401 opens the breaker at once for five minutes, reported as
        critical, and takes no early probe.
        """
        breaker, clock, seen = _breaker()
        permit = breaker.acquire()
        assert permit is not None
        with capturedLogs() as events:
            breaker.key_refused(permit, "status 401")
        self.assertIs(breaker.state, State.OPEN)
        self.assertTrue(breaker.key_refused_open)
        self.assertEqual(seen[-1].cooldown, 300)
        self.assertTrue(seen[-1].critical)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.critical])
        self.assertIsNone(breaker.acquire_early())
        clock.advance(299)
        self.assertIs(breaker.state, State.OPEN)


class ReportTests(SynchronousTestCase):
    def test_each_transition_reported_once(self) -> None:
        """
        Opening, half-opening and closing are each reported once, with
        their reason, however often the state is read: warning when
        opening, info otherwise.
        """
        breaker, clock, seen = _breaker()
        with capturedLogs() as events:
            _fail(breaker, 5)
            for _ in range(3):
                _ = breaker.state
            clock.advance(5)
            for _ in range(3):
                _ = breaker.state
            _succeed(breaker)
            _ = breaker.state
        self.assertEqual(
            [(t.old, t.new) for t in seen],
            [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN), (State.HALF_OPEN, State.CLOSED)],
        )
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn, LogLevel.info, LogLevel.info])
        self.assertEqual([e["upstream"] for e in events], ["a"] * 3)
        self.assertEqual(events[0]["reason"], "5 failures in a row, the last status 500")
        self.assertEqual(events[2]["reason"], "probe succeeded")

    def test_a_permit_reports_once(self) -> None:
        """
        A second report for the same permit is ignored (it would count a
        failure twice).
        """
        breaker, _, _ = _breaker()
        permit = breaker.acquire()
        assert permit is not None
        for _ in range(5):
            breaker.failed(permit, "status 500")
        self.assertIs(breaker.state, State.CLOSED)


class LiteLLMCases(SynchronousTestCase):
    """
    The ways LiteLLM's router cooldowns failed, as reported on its tracker
    (BerriAI/litellm), each turned into a case this breaker must get right:

      - #40130: re-cooling a deployment kept the first, shorter deadline
        (a 429 with Retry-After: 1, then 429s from requests already in
        flight: the deployment was back after 1 s);
      - PR #34836: twenty-five consecutive 500s left a deployment in
        rotation;
      - #41223 (and PR #41323): a caller's own short timeout put the
        primary deployment into cooldown for everyone;
      - #3646: with every deployment cooling down, requests failed instead
        of going to the first to come back (see tests.upstream.test_pool);
      - #7669: no retry-after honoured and no backoff;
      - PR #7823: a model's only deployment was cooled only when all of
        1,000 or more calls in a minute failed;
      - PR #12108: C{cooldown_time = 0} meant "the default".
    """

    def test_recooling_only_extends(self) -> None:
        """
        #40130: in-flight requests that fail after the breaker opened may
        extend its cooldown with a longer retry-after, never shorten it.
        """
        breaker, clock, _ = _breaker()
        in_flight = [breaker.acquire() for _ in range(4)]
        first, second, third, fourth = (p for p in in_flight if p is not None)
        breaker.failed(first, "status 429", retry_after=1)
        breaker.failed(second, "status 429", retry_after=30)
        breaker.failed(third, "status 429", retry_after=2)
        breaker.failed(fourth, "status 429")
        clock.advance(29.9)
        self.assertIs(breaker.state, State.OPEN)
        self.assertGreater(breaker.cooldown_left(), 0)
        clock.advance(0.1)
        self.assertIs(breaker.state, State.HALF_OPEN)

    def test_consecutive_500s_open(self) -> None:
        """
        PR #34836: 500s in a row take the upstream out of rotation at the
        threshold, and it stays out for the whole cooldown, read at any
        moment (no cache between the state and the decision).
        """
        breaker, clock, _ = _breaker()
        _fail(breaker, 5)
        for _ in range(49):
            clock.advance(0.1)
            self.assertIsNone(breaker.acquire())

    def test_client_cancellation_is_not_a_failure(self) -> None:
        """
        #41223: requests the client gave up on (its own timeout) are
        released, and never open the breaker.
        """
        breaker, _, _ = _breaker()
        for _ in range(50):
            permit = breaker.acquire()
            assert permit is not None
            breaker.release(permit)
        self.assertIs(breaker.state, State.CLOSED)

    def test_backoff_grows_and_retry_after_is_honoured(self) -> None:
        """
        #7669: an upstream that keeps failing is backed off longer each
        time, and one that says retry-after is left alone that long.
        """
        breaker, clock, seen = _breaker()
        _fail(breaker, 5)
        clock.advance(5)
        probe = breaker.acquire()
        assert probe is not None
        breaker.failed(probe, "status 503", retry_after=45)
        self.assertEqual(seen[-1].cooldown, 45)
        clock.advance(44)
        self.assertIsNone(breaker.acquire())

    def test_a_lone_upstream_is_cooled_at_low_volume(self) -> None:
        """
        PR #7823: no traffic volume is needed for the consecutive rule;
        five failures out of five open even a pool's only upstream.
        """
        breaker, _, _ = _breaker()
        _fail(breaker, 5)
        self.assertIs(breaker.state, State.OPEN)

    def test_zero_retry_after_means_zero(self) -> None:
        """
        PR #12108: a retry-after of 0 is a cooldown of 0 (half-open at
        once, one probe), not a default one.
        """
        breaker, _, seen = _breaker()
        _fail(breaker, retry_after=0, reason="status 429")
        self.assertEqual(seen[0].cooldown, 0)
        self.assertIs(breaker.state, State.HALF_OPEN)
        permit = breaker.acquire()
        self.assertTrue(permit is not None and permit.probe)


class PolicyTests(SynchronousTestCase):
    def test_bad_policies_refused(self) -> None:
        """
        A policy that could never open or never close is refused.
        """
        for bad in (
            {"failure_threshold": 0},
            {"failure_ratio": 0},
            {"failure_ratio": 1.5},
            {"jitter": 1},
            {"base_backoff": 0},
            {"base_backoff": 600},
        ):
            with self.assertRaises(ValueError):
                BreakerPolicy(**bad)  # type: ignore[arg-type]


class StubGroup:
    """
    A group whose answers the test sets, recording what it is told.
    """

    def __init__(self) -> None:
        self.probe_allowed = False
        self.elsewhere = False
        self.asked: list[bool] = []
        self.moves: list[Transition] = []
        self.failures = 0

    def may_probe(self, breaker: Breaker, early: bool) -> bool:
        self.asked.append(early)
        return self.probe_allowed

    def probing_elsewhere(self, breaker: Breaker) -> bool:
        return self.elsewhere

    def moved(self, breaker: Breaker, transition: Transition) -> None:
        self.moves.append(transition)

    def failure(self, breaker: Breaker) -> None:
        self.failures += 1

    def join(self, breaker: Breaker) -> None:
        breaker.group = self

    def leave(self, name: str) -> None:
        pass


class GroupTests(SynchronousTestCase):
    """
    What a breaker takes from the other processes of its group, and asks
    them.
    """

    def grouped(self) -> tuple[Breaker, Clock, list[Transition], StubGroup]:
        breaker, clock, seen = _breaker()
        group = StubGroup()
        breaker.group = group
        return breaker, clock, seen, group

    def test_adopt_opens_a_closed_breaker_as_shared(self) -> None:
        """
        An open learnt from the group opens a closed breaker for what is
        left of it, reported as shared, at warning level even for a
        refused key (the process that saw it says so critically).
        """
        breaker, _, seen, group = self.grouped()
        with capturedLogs() as events:
            breaker.adopt(4.0, told=True, key_refused=True, reason="key refused (status 401)")
        self.assertIs(breaker.state, State.OPEN)
        self.assertEqual(breaker.cooldown_left(), 4.0)
        self.assertTrue(breaker.key_refused_open)
        self.assertFalse(breaker.early_probe_allowed)
        [t] = seen
        self.assertTrue(t.shared)
        self.assertEqual(t.reason, "open in the group (key refused (status 401))")
        self.assertEqual(group.moves, [t])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])

    def test_adopt_only_extends(self) -> None:
        breaker, clock, seen, _ = self.grouped()
        _fail(breaker, 5)
        left = breaker.cooldown_left()
        breaker.adopt(1.0, False, False, "shorter")
        self.assertEqual(breaker.cooldown_left(), left)
        breaker.adopt(60.0, False, False, "longer")
        self.assertEqual(breaker.cooldown_left(), 60.0)
        self.assertEqual(len(seen), 1)
        # A half-open breaker told "cooldown over" stays as it is.
        clock.advance(60)
        self.assertIs(breaker.state, State.HALF_OPEN)
        breaker.adopt(0.0, False, False, "over")
        self.assertEqual([t.new for t in seen], [State.OPEN, State.HALF_OPEN])

    def test_close_by_group_resets_the_backoff(self) -> None:
        breaker, clock, seen, _ = self.grouped()
        _fail(breaker, 5)
        clock.advance(5)
        breaker.close_by_group()
        self.assertIs(breaker.state, State.CLOSED)
        self.assertTrue(seen[-1].shared)
        _fail(breaker, 5)
        self.assertEqual(seen[-1].cooldown, 5.0)

    def test_half_open_probes_only_when_the_group_says(self) -> None:
        breaker, clock, _, group = self.grouped()
        self.assertIsNotNone(breaker.acquire())
        self.assertEqual(group.asked, [])  # a closed breaker asks nobody
        _fail(breaker, 5)
        clock.advance(5)
        self.assertFalse(breaker.admits())
        self.assertIsNone(breaker.acquire())
        group.probe_allowed = True
        permit = breaker.acquire()
        self.assertTrue(permit is not None and permit.probe)
        self.assertEqual(group.asked, [False, False, False])

    def test_early_probe_asks_and_probing_elsewhere_counts(self) -> None:
        breaker, _, _, group = self.grouped()
        _fail(breaker, 5)
        self.assertTrue(breaker.early_probe_allowed)
        self.assertIsNone(breaker.acquire_early())
        self.assertEqual(group.asked, [True])
        group.elsewhere = True
        self.assertTrue(breaker.probing)
        self.assertFalse(breaker.probing_here)
        self.assertFalse(breaker.early_probe_allowed)

    def test_a_counted_failure_that_does_not_open_is_told(self) -> None:
        breaker, _, _, group = self.grouped()
        _fail(breaker, 4)
        self.assertEqual(group.failures, 4)
        _fail(breaker)
        self.assertEqual(group.failures, 4)
        self.assertEqual([t.new for t in group.moves], [State.OPEN])

    def test_pool_refuses_when_the_group_keeps_the_early_probe(self) -> None:
        """
        Every candidate open, and the early probe is another process's to
        send: the request gets the refusal with its retry-after, not an
        error; once the group lets it, it is the early probe.
        """
        from oaiproxy.config import Secret
        from oaiproxy.upstream.pool import Choice, Pool, Refusal, Upstream

        clock, group = Clock(), StubGroup()
        pool = Pool(
            [Upstream("a", "https://a.example", Secret(b"k"))],
            clock,
            breaker=lambda name: Breaker(name, clock, draw=lambda: 0.0),
            group=group,
        )
        _fail(pool["a"].breaker, 5)
        refusal = pool.choose(None)
        self.assertIsInstance(refusal, Refusal)
        assert isinstance(refusal, Refusal)
        self.assertEqual(refusal.retry_after, 5.0)
        group.probe_allowed = True
        choice = pool.choose(None)
        self.assertTrue(isinstance(choice, Choice) and choice.early)
