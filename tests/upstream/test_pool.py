"""
Tests for L{oaiproxy.upstream.pool}: choosing an upstream, failing over,
the bounds on attempts; on a C{Clock}, with a seeded random source.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Secret
from oaiproxy.upstream.breaker import State
from oaiproxy.upstream.pool import (
    Advice,
    Attempts,
    Choice,
    Decision,
    Health,
    Kind,
    Outcome,
    Pool,
    Refusal,
    Upstream,
    Verdict,
    advice,
    decide,
    outcome_label,
    refusal_error,
    retry_after_seconds,
    worst_case_upstream_requests,
)

_KEY = Secret(b"k")


def _upstream(name: str, **fields: Any) -> Upstream:
    return Upstream(name=name, url=f"https://{name}.example", key=_KEY, **fields)


def _pool(*upstreams: Upstream, seed: int = 1) -> tuple[Pool, Clock]:
    clock = Clock()
    return Pool(upstreams, clock, draw=random.Random(seed).random), clock


def _chosen(pool: Pool, model: Optional[str] = "gpt-4o") -> Choice:
    choice = pool.choose(model)
    assert isinstance(choice, Choice), choice
    return choice


ANSWERED_200 = Outcome(Kind.ANSWERED, 200)
ANSWERED_503 = Outcome(Kind.ANSWERED, 503)


class UpstreamTests(SynchronousTestCase):
    def test_models_globs(self) -> None:
        """
        C{models} takes globs, case-sensitively; no list serves any model,
        and a request naming no model goes only where no list is set.
        """
        listed = _upstream("a", models=("gpt-4o*", "o3"))
        self.assertTrue(listed.serves("gpt-4o-mini"))
        self.assertTrue(listed.serves("o3"))
        self.assertFalse(listed.serves("o3-mini"))
        self.assertFalse(listed.serves("GPT-4o"))
        self.assertFalse(listed.serves(None))
        self.assertTrue(_upstream("b").serves(None))

    def test_model_map(self) -> None:
        mapped = _upstream("a", model_map={"gpt-4o": "prod-4o"})
        self.assertEqual(mapped.upstream_model("gpt-4o"), "prod-4o")
        self.assertEqual(mapped.upstream_model("o3"), "o3")


class DecideTests(SynchronousTestCase):
    def test_the_table(self) -> None:
        """
        Which outcomes fail over, and what each tells the breaker.
        """
        fail_over = Decision(True, Verdict.FAILURE)
        table = {
            Outcome(Kind.CONNECT): fail_over,
            Outcome(Kind.NO_HEAD): fail_over,
            Outcome(Kind.FIRST_BYTE): fail_over,
            Outcome(Kind.ANSWERED, 429): fail_over,
            Outcome(Kind.ANSWERED, 500): fail_over,
            Outcome(Kind.ANSWERED, 502): fail_over,
            Outcome(Kind.ANSWERED, 503): fail_over,
            Outcome(Kind.ANSWERED, 504): fail_over,
            Outcome(Kind.ANSWERED, 401): Decision(True, Verdict.KEY_REFUSED),
            Outcome(Kind.ANSWERED, 403): Decision(True, Verdict.KEY_REFUSED),
            Outcome(Kind.ANSWERED, 501): Decision(False, Verdict.FAILURE),
            Outcome(Kind.BROKEN): Decision(False, Verdict.FAILURE),
            Outcome(Kind.CANCELLED): Decision(False, Verdict.NONE),
        }
        for status in (200, 201, 204, 301, 400, 404, 408, 409, 413, 422):
            table[Outcome(Kind.ANSWERED, status)] = Decision(False, Verdict.SUCCESS)
        for outcome, expected in table.items():
            self.assertEqual(decide(outcome), expected, outcome)

    def test_never_after_the_first_byte(self) -> None:
        """
        Once a byte reached the client nothing fails over, whatever it was.
        """
        for outcome in (Outcome(Kind.ANSWERED, 503), Outcome(Kind.NO_HEAD), Outcome(Kind.ANSWERED, 401)):
            reached = Outcome(outcome.kind, outcome.status, reached_client=True)
            self.assertFalse(decide(reached).fail_over, reached)


class TierTests(SynchronousTestCase):
    def test_lowest_tier_first(self) -> None:
        """
        Priority 0 takes every request while it has a ready upstream; the
        fallback tier gets them only once all of tier 0 is open.
        """
        pool, _ = _pool(_upstream("primary"), _upstream("fallback", priority=1))
        names = Counter()
        for _ in range(50):
            choice = _chosen(pool)
            names[choice.member.name] += 1
            pool.finish(choice, ANSWERED_200)
        self.assertEqual(names, {"primary": 50})
        for _ in range(5):
            pool.finish(_chosen(pool), ANSWERED_503)
        self.assertIs(pool["primary"].breaker.state, State.OPEN)
        self.assertEqual(_chosen(pool).member.name, "fallback")

    def test_model_decides_candidates(self) -> None:
        """
        An upstream that does not serve the model is never chosen, even in
        a lower tier; a model nobody serves is refused with no retry.
        """
        pool, _ = _pool(_upstream("vllm", models=("llama-*",)), _upstream("openai", priority=1))
        self.assertEqual(_chosen(pool, "gpt-4o").member.name, "openai")
        self.assertEqual(_chosen(pool, "llama-3").member.name, "vllm")
        only, _ = _pool(_upstream("vllm", models=("llama-*",)))
        self.assertEqual(only.choose("gpt-4o"), Refusal("gpt-4o", False, None))

    def test_max_concurrent(self) -> None:
        """
        An upstream at its C{max_concurrent} is skipped: the next tier
        takes the request.
        """
        pool, _ = _pool(_upstream("small", max_concurrent=2), _upstream("big", priority=1))
        self.assertEqual([_chosen(pool).member.name for _ in range(3)], ["small", "small", "big"])


class WeightTests(SynchronousTestCase):
    def test_weights_share_the_traffic(self) -> None:
        """
        With equal loads, each upstream of a tier gets its weight's share:
        over 20,000 seeded draws, within 2 points of 1/6, 2/6, 3/6.
        """
        pool, _ = _pool(_upstream("a", weight=1), _upstream("b", weight=2), _upstream("c", weight=3), seed=7)
        names: Counter[str] = Counter()
        runs = 20000
        for _ in range(runs):
            choice = _chosen(pool)
            names[choice.member.name] += 1
            pool.finish(choice, ANSWERED_200)
        for name, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
            self.assertLess(abs(names[name] / runs - share), 0.02, (name, names))

    def test_least_loaded_per_weight_wins(self) -> None:
        """
        Of the two drawn, the one with fewer requests in flight per unit of
        weight is taken: with "a" busy, nearly all new requests go to "b".
        """
        pool, _ = _pool(_upstream("a"), _upstream("b"), seed=3)
        pool["a"].in_flight = 10
        names = Counter(_chosen(pool).member.name for _ in range(10))
        self.assertEqual(names["b"], 10)

    def test_in_flight_counted(self) -> None:
        """
        A choice counts in flight until finished, once.
        """
        pool, _ = _pool(_upstream("a"))
        choice = _chosen(pool)
        self.assertEqual(pool["a"].in_flight, 1)
        pool.finish(choice, ANSWERED_200)
        pool.finish(choice, ANSWERED_200)
        self.assertEqual(pool["a"].in_flight, 0)


class AllOpenTests(SynchronousTestCase):
    def _open(self, pool: Pool, name: str, retry_after: Optional[float] = None) -> None:
        member = pool[name]
        for _ in range(5):
            permit = member.breaker.acquire()
            if permit is None:
                break
            member.breaker.failed(permit, "status 503", retry_after)

    def test_early_probe_goes_to_the_first_back(self) -> None:
        """
        LiteLLM #3646: when every candidate is open, a request is not
        refused outright: the one whose cooldown ends first gets one early
        probe; the others are refused with the retry-after of that
        cooldown, until the probe succeeds and closes it.
        """
        pool, clock = _pool(_upstream("a"), _upstream("b"))
        self._open(pool, "a")
        clock.advance(3)
        self._open(pool, "b")  # a is back in 2 s, b in 5 s
        probe = _chosen(pool)
        self.assertEqual((probe.member.name, probe.early), ("a", True))
        refusal = pool.choose("gpt-4o")
        self.assertEqual(refusal, Refusal("gpt-4o", True, 2.0))
        pool.finish(probe, ANSWERED_200)
        self.assertIs(pool["a"].breaker.state, State.CLOSED)
        self.assertEqual(_chosen(pool).member.name, "a")

    def test_no_early_probe_into_a_rate_limit(self) -> None:
        """
        An upstream that said retry-after gets nothing before it: the early
        probe goes to one on the proxy's own backoff, or none does and the
        refusal says when the first admits again.
        """
        pool, _ = _pool(_upstream("limited"), _upstream("down"))
        self._open(pool, "limited", retry_after=2)
        self._open(pool, "down")
        self.assertEqual(_chosen(pool).member.name, "down")
        self.assertEqual(pool.choose("gpt-4o"), Refusal("gpt-4o", True, 2.0))

    def test_refused_keys_say_do_not_retry(self) -> None:
        """
        With every candidate's key refused, waiting cannot help: the
        refusal carries no retry-after (the client gets
        x-should-retry: false).
        """
        pool, _ = _pool(_upstream("a"))
        choice = _chosen(pool)
        pool.finish(choice, Outcome(Kind.ANSWERED, 401))
        self.assertEqual(pool.choose("gpt-4o"), Refusal("gpt-4o", True, None))


class AttemptsTests(SynchronousTestCase):
    def test_each_upstream_once_and_at_most_three(self) -> None:
        """
        A request fails over from upstream to upstream, never twice to the
        same one, and stops after three attempts (the default) even with
        five upstreams.
        """
        pool, _ = _pool(*(_upstream(n) for n in "abcde"))
        attempts = Attempts(pool, "gpt-4o")
        while True:
            choice = attempts.next()
            if not isinstance(choice, Choice):
                break
            if not attempts.report(ANSWERED_503):
                break
        self.assertEqual(len(attempts.tried), 3)
        self.assertEqual(len(set(attempts.tried)), 3)
        self.assertIsNone(attempts.next())
        self.assertEqual(attempts.last, ANSWERED_503)
        self.assertEqual([reason for _, reason in attempts.failovers], ["status 503"] * 2)

    def test_no_failover_on_client_error(self) -> None:
        pool, _ = _pool(_upstream("a"), _upstream("b"))
        attempts = Attempts(pool, "gpt-4o")
        attempts.next()
        self.assertFalse(attempts.report(Outcome(Kind.ANSWERED, 400)))
        self.assertEqual(len(attempts.tried), 1)

    def test_fewer_upstreams_than_attempts(self) -> None:
        """
        With two upstreams the request makes two attempts, then the pool
        has no untried candidate.
        """
        pool, _ = _pool(_upstream("a"), _upstream("b"))
        attempts = Attempts(pool, "gpt-4o")
        for _ in range(2):
            self.assertIsInstance(attempts.next(), Choice)
            self.assertTrue(attempts.report(Outcome(Kind.CONNECT)) or len(attempts.tried) == 2)
        self.assertIsInstance(attempts.next(), Refusal)

    def test_overall_deadline(self) -> None:
        """
        No new attempt starts once the read timeout, counted from the
        first, has passed.
        """
        pool, clock = _pool(_upstream("a"), _upstream("b"))
        attempts = Attempts(pool, "gpt-4o", timeout=10)
        attempts.next()
        clock.advance(10)
        self.assertFalse(attempts.report(Outcome(Kind.NO_HEAD)))
        self.assertIsNone(attempts.next())

    def test_first_byte_deadline_spares_the_last(self) -> None:
        """
        The first-byte deadline is armed while another candidate remains,
        never for the last one (it runs to its read timeout).
        """
        pool, _ = _pool(_upstream("a"), _upstream("b"))
        attempts = Attempts(pool, "gpt-4o")
        attempts.next()
        self.assertEqual(attempts.first_byte_deadline(2.0), 2.0)
        attempts.report(Outcome(Kind.FIRST_BYTE))
        attempts.next()
        self.assertIsNone(attempts.first_byte_deadline(2.0))
        lone, _ = _pool(_upstream("a"))
        only = Attempts(lone, "gpt-4o")
        only.next()
        self.assertIsNone(only.first_byte_deadline(2.0))

    def test_no_deadline_when_the_others_cannot_take_it(self) -> None:
        """
        An untried upstream that is rate-limited (open on its retry-after)
        or full is no candidate to fail over to: the current attempt is the
        last one and gets no first-byte deadline.
        """
        pool, _ = _pool(_upstream("a"), _upstream("limited"), _upstream("full", max_concurrent=1))
        limited = pool["limited"].breaker
        permit = limited.acquire()
        assert permit is not None
        limited.failed(permit, "status 429", retry_after=60)
        pool["full"].in_flight = 1
        attempts = Attempts(pool, "gpt-4o")
        choice = attempts.next()
        self.assertEqual(choice.member.name if isinstance(choice, Choice) else choice, "a")
        self.assertIsNone(attempts.first_byte_deadline(2.0))

    def test_per_upstream_first_byte_timeout(self) -> None:
        """
        An entry's own first_byte_timeout wins over the global one; 0
        turns it off for that upstream.
        """
        pool, _ = _pool(_upstream("slow", first_byte_timeout=30.0, priority=0), _upstream("b", priority=1))
        attempts = Attempts(pool, "gpt-4o")
        attempts.next()
        self.assertEqual(attempts.first_byte_deadline(2.0), 30.0)
        off, _ = _pool(_upstream("vllm", first_byte_timeout=0.0), _upstream("b", priority=1))
        attempts = Attempts(off, "gpt-4o")
        attempts.next()
        self.assertIsNone(attempts.first_byte_deadline(2.0))
        unset, _ = _pool(_upstream("a"), _upstream("b", priority=1))
        attempts = Attempts(unset, "gpt-4o")
        attempts.next()
        self.assertIsNone(attempts.first_byte_deadline(None))

    def test_last_attempt_by_bound_gets_no_deadline(self) -> None:
        """
        The third attempt is the last by the attempt bound, whatever the
        pool still holds: no first-byte deadline.
        """
        pool, _ = _pool(*(_upstream(n) for n in "abcd"))
        attempts = Attempts(pool, "gpt-4o", max_attempts=1)
        attempts.next()
        self.assertIsNone(attempts.first_byte_deadline(2.0))


class WorstCaseTests(SynchronousTestCase):
    def _sdk_call(self, pool: Pool, clock: Clock, answer: Outcome, sdk_attempts: int = 3) -> int:
        sent, _ = self._sdk_call_tries(pool, clock, answer, sdk_attempts)
        return sent

    def _sdk_call_tries(self, pool: Pool, clock: Clock, answer: Outcome, sdk_attempts: int = 3) -> tuple[int, int]:
        """
        One openai SDK call (its default C{max_retries=2}): each attempt
        reaches the proxy, which fails over within its bounds; between
        attempts the SDK waits the proxy's retry-after when it is at most
        60 s, else about a second of its own backoff, and it stops when
        told not to retry.
        """
        sent = tries = 0
        for _ in range(sdk_attempts):
            tries += 1
            attempts = Attempts(pool, "gpt-4o")
            while True:
                choice = attempts.next()
                if not isinstance(choice, Choice):
                    break
                sent += 1
                if not attempts.report(answer):
                    break
            told = advice(pool, "gpt-4o", attempts.last)
            if not told.retry:
                break
            clock.advance(told.after if told.after is not None and told.after <= 60 else 1.0)
        return sent, tries

    def test_documented_bound(self) -> None:
        """
        The README's figure: 3 SDK attempts times 3 proxy attempts.
        """
        self.assertEqual(worst_case_upstream_requests(3, 3, 5), 9)
        self.assertEqual(worst_case_upstream_requests(3, 3, 2), 6)

    def test_all_down_stays_within_the_bound(self) -> None:
        """
        With four upstreams all answering 503, one SDK call causes at most
        the documented number of upstream requests.
        """
        pool, clock = _pool(*(_upstream(n) for n in "abcd"))
        sent = self._sdk_call(pool, clock, ANSWERED_503)
        self.assertLessEqual(sent, worst_case_upstream_requests(3, 3, 4))
        self.assertEqual(sent, 9)

    def test_rate_limited_everywhere_sends_far_fewer(self) -> None:
        """
        With every upstream answering 429 with retry-after 120, the first
        SDK attempt tries three and opens their breakers; the later ones
        reach only the fourth upstream once, then are refused outright.
        """
        pool, clock = _pool(*(_upstream(n) for n in "abcd"))
        sent = self._sdk_call(pool, clock, Outcome(Kind.ANSWERED, 429, retry_after=120))
        self.assertEqual(sent, 4)

    def test_refused_keys_stop_the_sdk(self) -> None:
        """
        With every key refused, the SDK is told not to retry after its
        first attempt: two upstream requests in all, for two upstreams.
        """
        pool, clock = _pool(_upstream("a"), _upstream("b"))
        self.assertEqual(self._sdk_call_tries(pool, clock, Outcome(Kind.ANSWERED, 403)), (2, 1))


class AdviceTests(SynchronousTestCase):
    def test_advice(self) -> None:
        """
        What a client whose request failed is told: no retry when nothing
        serves the model; the last upstream's own retry-after when it gave
        one; else the time the first breaker admits again, or nothing while
        an upstream is ready.
        """
        pool, _ = _pool(_upstream("a"), _upstream("b", models=("o3",)))
        self.assertEqual(advice(pool, "gpt-4o"), Advice(True))
        limited = Outcome(Kind.ANSWERED, 429, retry_after=7)
        self.assertEqual(advice(pool, "gpt-4o", limited), Advice(True, 7))
        self.assertEqual(advice(pool, "gpt-4o", Outcome(Kind.ANSWERED, 500, retry_after=7)), Advice(True))
        for _ in range(5):
            pool.finish(_chosen(pool, "gpt-4o"), ANSWERED_503)
        self.assertEqual(advice(pool, "gpt-4o"), Advice(True, 5.0))
        nobody, _ = _pool(_upstream("b", models=("o3",)))
        self.assertEqual(advice(nobody, "gpt-4o"), Advice(False))
        refused, _ = _pool(_upstream("a"))
        refused.finish(_chosen(refused), Outcome(Kind.ANSWERED, 401))
        self.assertEqual(advice(refused, "gpt-4o", Outcome(Kind.ANSWERED, 401)), Advice(False))


class RefusalErrorTests(SynchronousTestCase):
    def test_answers(self) -> None:
        """
        A refusal becomes OpenAI's 404 for a model nobody serves (no
        retry), or a 503 upstreams_unavailable with the retry-after, or
        with x-should-retry: false when waiting cannot help.
        """
        unserved = refusal_error(Refusal("o3", False, None))
        self.assertEqual((unserved.status, unserved.code), (404, "model_not_found"))
        self.assertIn((b"x-should-retry", b"false"), unserved.headers)
        waiting = refusal_error(Refusal("gpt-4o", True, 2.4))
        self.assertEqual((waiting.status, waiting.code, waiting.type), (503, "upstreams_unavailable", "api_error"))
        self.assertEqual(waiting.headers, ((b"retry-after", b"3"),))
        self.assertIn("gpt-4o", waiting.message)
        hopeless = refusal_error(Refusal("gpt-4o", True, None))
        self.assertEqual(hopeless.headers, ((b"x-should-retry", b"false"),))


class HealthTests(SynchronousTestCase):
    def test_health(self) -> None:
        """
        What /health/upstreams will show per upstream: state and gauge
        value, in flight, the last failure and when, the cooldown left; no
        URL or key.
        """
        pool, clock = _pool(_upstream("a"))
        clock.advance(100)
        held = _chosen(pool)
        self.assertEqual(pool["a"].health(), Health("a", "closed", 0, 1, None, None, 0.0))
        pool.finish(held, Outcome(Kind.ANSWERED, 429, retry_after=2.5))
        clock.advance(1)
        health = pool["a"].health()
        self.assertEqual(health, Health("a", "open", 2, 0, "status 429", 100.0, 1.5))
        self.assertNotIn("example", json.dumps(asdict(health)))


class _Seen:
    """
    A pool observer that keeps what it is told.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []
        self.failovers: list[tuple[str, str]] = []

    def attempt_finished(self, upstream: str, outcome: str) -> None:
        self.attempts.append((upstream, outcome))

    def failed_over(self, upstream: str, reason: str) -> None:
        self.failovers.append((upstream, reason))


class ObserverTests(SynchronousTestCase):
    def test_outcome_labels(self) -> None:
        """
        Every outcome maps to one of a few fixed words, whatever the
        status: the metrics label stays bounded.
        """
        answered = {
            status: outcome_label(Outcome(Kind.ANSWERED, status))
            for status in (200, 204, 307, 400, 401, 403, 404, 429, 500, 501, 503, 599)
        }
        self.assertEqual(
            answered,
            {
                200: "ok",
                204: "ok",
                307: "ok",
                400: "client_error",
                401: "key_refused",
                403: "key_refused",
                404: "client_error",
                429: "rate_limited",
                500: "server_error",
                501: "server_error",
                503: "server_error",
                599: "server_error",
            },
        )
        self.assertEqual(
            [outcome_label(Outcome(kind)) for kind in Kind if kind is not Kind.ANSWERED],
            ["connect", "no_head", "first_byte", "broken", "cancelled"],
        )

    def test_attempts_and_failovers_reported(self) -> None:
        """
        The observer hears each attempt's end once, under the upstream that
        made it, and a failover only when the request really moved on: the
        last attempt's failure is an attempt, not a failover.
        """
        seen = _Seen()
        pool, _ = _pool(_upstream("a"), _upstream("b"), _upstream("c"))
        pool.observer = seen
        attempts = Attempts(pool, "gpt-4o")
        outcomes = [Outcome(Kind.CONNECT), Outcome(Kind.ANSWERED, 429), ANSWERED_503]
        for outcome in outcomes:
            self.assertIsInstance(attempts.next(), Choice)
            attempts.report(outcome)
        tried = attempts.tried
        self.assertEqual(seen.attempts, list(zip(tried, ["connect", "rate_limited", "server_error"])))
        self.assertEqual(seen.failovers, list(zip(tried[:2], ["connect", "rate_limited"])))
        pool.finish(_chosen(pool), ANSWERED_200)
        self.assertEqual(len(seen.attempts), 4)
        self.assertEqual(seen.attempts[-1][1], "ok")


class ReloadTests(SynchronousTestCase):
    def test_breakers_survive_by_name(self) -> None:
        """
        A reload keeps the breaker (and in-flight count) of an entry whose
        name stays, even if its other fields changed; a new name starts
        closed; a dropped one is gone.
        """
        pool, _ = _pool(_upstream("a"), _upstream("b"))
        member = pool["a"]
        for _ in range(5):
            permit = member.breaker.acquire()
            assert permit is not None
            member.breaker.failed(permit, "connect")
        pool.replace([_upstream("a", weight=5), _upstream("c")])
        self.assertIs(pool["a"], member)
        self.assertEqual(pool["a"].upstream.weight, 5)
        self.assertIs(pool["a"].breaker.state, State.OPEN)
        self.assertIs(pool["c"].breaker.state, State.CLOSED)
        self.assertRaises(KeyError, pool.__getitem__, "b")

    def test_duplicate_names_refused(self) -> None:
        pool, _ = _pool(_upstream("a"))
        self.assertRaises(ValueError, pool.replace, [_upstream("a"), _upstream("a")])


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        C{retry-after-ms} first, then C{retry-after} in seconds or as an
        HTTP date; nonsense is no wait.
        """
        self.assertEqual(retry_after_seconds(b"2", b"1500"), 1.5)
        self.assertEqual(retry_after_seconds(b"2"), 2.0)
        self.assertEqual(retry_after_seconds(b"0.5"), 0.5)
        self.assertEqual(retry_after_seconds(b"Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0), 10.0)
        self.assertIsNone(retry_after_seconds(b"soon", now=0.0))
        self.assertIsNone(retry_after_seconds(b"-1"))
        self.assertIsNone(retry_after_seconds(None))
