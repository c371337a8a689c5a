"""
Tests for L{oaiproxy.access.limits}: per-client request, token and concurrency
limits.

They cover the token bucket's arithmetic, L{Limiter} admitting and refusing
requests (with the limit named and a useful C{Retry-After}), token
reservations settled against real usage (refunds and debts), clients
without limits, limits changed by a reload, the OpenAI-style
C{x-ratelimit-*} headers, and the token estimate a request reserves.  All
time is a L{Clock}.
"""

from __future__ import annotations

import hashlib
from typing import Any, Union

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Client, Limits
from oaiproxy.access.limits import (
    MAX_COUNT,
    UNLIMITED,
    Bucket,
    Limiter,
    Refusal,
    Reservation,
    estimate_tokens,
    format_reset,
    read_count,
)


def client(name: str = "alice", **limits: Any) -> Client:
    """
    A client with the given limits (the others unlimited).
    """
    return Client(name=name, key_sha256=hashlib.sha256(name.encode()).digest(), limits=Limits(**limits))


class BucketTests(SynchronousTestCase):
    """
    L{Bucket} holds up to a minute's allowance and refills at that pace.
    """

    def test_starts_full(self) -> None:
        """
        A new bucket holds its whole capacity: a client can burst up to its
        limit at once.
        """
        bucket = Bucket(60, now=100.0)
        self.assertEqual(bucket.level, 60)
        self.assertEqual(bucket.wait(60), 0)
        self.assertEqual(bucket.until_full(), 0)

    def test_refill(self) -> None:
        """
        The bucket refills at C{capacity} per minute.
        """
        bucket = Bucket(120, now=0.0)
        bucket.level = 0
        bucket.refill(15.0)
        self.assertAlmostEqual(bucket.level, 30)
        bucket.refill(45.0)
        self.assertAlmostEqual(bucket.level, 90)

    def test_capped(self) -> None:
        """
        Idle time does not bank more than one minute's allowance.
        """
        bucket = Bucket(60, now=0.0)
        bucket.level = 10
        bucket.refill(3600.0)
        self.assertEqual(bucket.level, 60)

    def test_clock_going_back(self) -> None:
        """
        A clock read earlier than the last one adds nothing.
        """
        bucket = Bucket(60, now=100.0)
        bucket.level = 10
        bucket.refill(50.0)
        self.assertEqual(bucket.level, 10)

    def test_wait(self) -> None:
        """
        L{Bucket.wait} is the time until the amount is available, counting
        any debt; L{Bucket.until_full} the time until the bucket is full.
        """
        bucket = Bucket(60, now=0.0)  # one unit per second
        bucket.level = 20
        self.assertEqual(bucket.wait(20), 0)
        self.assertAlmostEqual(bucket.wait(25), 5)
        self.assertAlmostEqual(bucket.until_full(), 40)
        bucket.level = -30
        self.assertAlmostEqual(bucket.wait(10), 40)


class LimiterTestCase(SynchronousTestCase):
    """
    A L{Limiter} on a L{Clock}, with helpers to check its answers.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = Limiter(self.clock)

    def admitted(self, outcome: Union[Reservation, Refusal]) -> Reservation:
        """
        Assert the request was admitted; return its reservation.
        """
        self.assertIsInstance(outcome, Reservation)
        assert isinstance(outcome, Reservation)
        return outcome

    def refused(self, outcome: Union[Reservation, Refusal], limit: str) -> Refusal:
        """
        Assert the request was refused for C{limit}; return the refusal.
        """
        self.assertIsInstance(outcome, Refusal)
        assert isinstance(outcome, Refusal)
        self.assertEqual(outcome.limit, limit)
        return outcome


class RequestLimitTests(LimiterTestCase):
    """
    C{requests_per_minute}.
    """

    def test_burst_then_refusal(self) -> None:
        """
        With 2 requests per minute, two requests pass at once and the third
        is refused for C{requests}, told to retry in 30 seconds; it passes
        then and not before.
        """
        alice = client(requests_per_minute=2)
        self.admitted(self.limiter.admit(alice, 10))
        self.admitted(self.limiter.admit(alice, 10))
        refusal = self.refused(self.limiter.admit(alice, 10), "requests")
        assert refusal.retry_after is not None
        self.assertAlmostEqual(refusal.retry_after, 30)
        self.assertIn("'alice'", refusal.message)
        self.assertIn("2 requests per minute", refusal.message)
        self.clock.advance(29.5)
        self.refused(self.limiter.admit(alice, 10), "requests")
        self.clock.advance(0.5)
        self.admitted(self.limiter.admit(alice, 10))
        self.refused(self.limiter.admit(alice, 10), "requests")

    def test_settling_does_not_refund_requests(self) -> None:
        """
        A finished request still counts against the per-minute limit.
        """
        alice = client(requests_per_minute=1)
        self.admitted(self.limiter.admit(alice, 10)).settle(0)
        self.refused(self.limiter.admit(alice, 10), "requests")

    def test_clients_are_independent(self) -> None:
        """
        One client using up its allowance does not affect another.
        """
        alice, bob = client("alice", requests_per_minute=1), client("bob", requests_per_minute=1)
        self.admitted(self.limiter.admit(alice, 10))
        self.refused(self.limiter.admit(alice, 10), "requests")
        self.admitted(self.limiter.admit(bob, 10))


class ConcurrencyLimitTests(LimiterTestCase):
    """
    C{concurrent_requests}.
    """

    def test_second_request_waits_for_first(self) -> None:
        """
        With one concurrent request allowed, a second is refused for
        C{concurrent} until the first settles, however much time passes.
        """
        alice = client(concurrent_requests=1)
        first = self.admitted(self.limiter.admit(alice, 10))
        refusal = self.refused(self.limiter.admit(alice, 10), "concurrent")
        self.assertIn("the limit is 1", refusal.message)
        assert refusal.retry_after is not None
        self.assertGreater(refusal.retry_after, 0)
        self.clock.advance(600)
        self.refused(self.limiter.admit(alice, 10), "concurrent")
        first.settle(10)
        self.admitted(self.limiter.admit(alice, 10))

    def test_refused_request_takes_no_slot(self) -> None:
        """
        A request refused for another limit does not hold a concurrency
        slot.
        """
        alice = client(concurrent_requests=1, requests_per_minute=1)
        self.admitted(self.limiter.admit(alice, 10)).settle(10)
        self.refused(self.limiter.admit(alice, 10), "requests")
        self.clock.advance(60)
        self.admitted(self.limiter.admit(alice, 10))

    def test_settle_twice_frees_one_slot(self) -> None:
        """
        Settling a reservation twice frees its slot once: it cannot let a
        client exceed its concurrency.
        """
        alice = client(concurrent_requests=2)
        first = self.admitted(self.limiter.admit(alice, 10))
        self.admitted(self.limiter.admit(alice, 10))
        first.settle(10)
        first.settle(10)
        self.admitted(self.limiter.admit(alice, 10))
        self.refused(self.limiter.admit(alice, 10), "concurrent")


class TokenLimitTests(LimiterTestCase):
    """
    C{tokens_per_minute}: admission reserves an estimate, settlement charges
    what was used.
    """

    def test_reservation_and_refund(self) -> None:
        """
        Admission reserves the estimate, so a second request that does not
        fit is refused for C{tokens}, with a wait that would make it fit;
        settling the first for less than it reserved gives the rest back
        and the second fits at once.
        """
        alice = client(tokens_per_minute=6000)  # 100 tokens per second
        first = self.admitted(self.limiter.admit(alice, 5000))
        refusal = self.refused(self.limiter.admit(alice, 1500), "tokens")
        assert refusal.retry_after is not None
        self.assertAlmostEqual(refusal.retry_after, 5)
        self.assertIn("6000 tokens per minute", refusal.message)
        self.assertIn("1500", refusal.message)
        first.settle(800)
        self.admitted(self.limiter.admit(alice, 1500))

    def test_debt_delays_next_request(self) -> None:
        """
        A request that used more than it reserved leaves a debt: the next
        request waits until the debt and its own estimate are covered, and
        C{retry_after} says how long.
        """
        alice = client(tokens_per_minute=6000)
        self.admitted(self.limiter.admit(alice, 1000)).settle(8000)  # 2000 in debt
        refusal = self.refused(self.limiter.admit(alice, 1000), "tokens")
        assert refusal.retry_after is not None
        self.assertAlmostEqual(refusal.retry_after, 30)
        self.clock.advance(29)
        self.refused(self.limiter.admit(alice, 1000), "tokens")
        self.clock.advance(1)
        self.admitted(self.limiter.admit(alice, 1000))

    def test_settle_twice_refunds_once(self) -> None:
        """
        Settling a reservation a second time changes nothing.
        """
        alice = client(tokens_per_minute=6000)
        reservation = self.admitted(self.limiter.admit(alice, 5000))
        reservation.settle(3000)  # 3000 left
        reservation.settle(0)
        self.refused(self.limiter.admit(alice, 3001), "tokens")
        self.admitted(self.limiter.admit(alice, 3000))

    def test_refund_capped(self) -> None:
        """
        Refunds never lift the allowance above one minute's worth.
        """
        alice = client(tokens_per_minute=6000)
        reservation = self.admitted(self.limiter.admit(alice, 1000))
        self.clock.advance(30)  # refilled to the full 6000
        reservation.settle(0)
        self.admitted(self.limiter.admit(alice, 6000))
        self.refused(self.limiter.admit(alice, 1), "tokens")

    def test_too_large_for_the_limit(self) -> None:
        """
        A request whose estimate exceeds the whole per-minute allowance is
        refused with no retry time, since waiting cannot help; one that
        equals it is admitted.
        """
        alice = client(tokens_per_minute=6000)
        refusal = self.refused(self.limiter.admit(alice, 6001), "tokens")
        self.assertIsNone(refusal.retry_after)
        self.assertIn("max_tokens", refusal.message)
        self.admitted(self.limiter.admit(alice, 6000))

    def test_too_large_even_when_waiting(self) -> None:
        """
        An oversized request is told not to retry even while the bucket is
        low, rather than given a wait after which it still would not fit.
        """
        alice = client(tokens_per_minute=6000)
        self.admitted(self.limiter.admit(alice, 6000))
        self.assertIsNone(self.refused(self.limiter.admit(alice, 7000), "tokens").retry_after)

    def test_token_refusal_keeps_request_allowance(self) -> None:
        """
        A request refused for tokens does not use up a request.
        """
        alice = client(tokens_per_minute=6000, requests_per_minute=1)
        self.refused(self.limiter.admit(alice, 9000), "tokens")
        self.admitted(self.limiter.admit(alice, 100))


class UnlimitedAndReloadTests(LimiterTestCase):
    """
    Clients without limits, and limits changed by a reload.
    """

    def test_unlimited_client(self) -> None:
        """
        A client without any limit shares the one no-op reservation and is
        never refused, nor given rate-limit headers.
        """
        free = client(default_max_tokens=100)
        for _ in range(1000):
            reservation = self.limiter.admit(free, 10**9)
            self.assertIs(reservation, UNLIMITED)
            reservation.settle(10**9)
        self.assertEqual(self.limiter.headers(free), [])

    def test_raised_limit_applies(self) -> None:
        """
        After a reload raises a client's limit, its requests pass at once.
        """
        self.admitted(self.limiter.admit(client(requests_per_minute=1), 10))
        self.refused(self.limiter.admit(client(requests_per_minute=1), 10), "requests")
        self.admitted(self.limiter.admit(client(requests_per_minute=5), 10))

    def test_lowered_limit_applies(self) -> None:
        """
        After a reload lowers a client's token limit, requests over the new
        limit are refused.
        """
        self.admitted(self.limiter.admit(client(tokens_per_minute=10000), 5000))
        refusal = self.refused(self.limiter.admit(client(tokens_per_minute=1000), 5000), "tokens")
        self.assertIsNone(refusal.retry_after)

    def test_reload_keeps_requests_in_flight(self) -> None:
        """
        Requests in flight across a reload still count against the
        concurrency limit, and free their slot when they end.
        """
        before = client(concurrent_requests=1)
        after = client(concurrent_requests=1, requests_per_minute=100)
        first = self.admitted(self.limiter.admit(before, 10))
        self.refused(self.limiter.admit(after, 10), "concurrent")
        first.settle(10)
        self.admitted(self.limiter.admit(after, 10))


class HeaderTests(LimiterTestCase):
    """
    L{Limiter.headers}: OpenAI's C{x-ratelimit-*} headers, which SDKs read
    to pace themselves.
    """

    def test_fresh_client(self) -> None:
        """
        A client that has sent nothing has its whole allowance.
        """
        alice = client(requests_per_minute=60, tokens_per_minute=6000)
        self.assertEqual(
            self.limiter.headers(alice),
            [
                (b"x-ratelimit-limit-requests", b"60"),
                (b"x-ratelimit-remaining-requests", b"60"),
                (b"x-ratelimit-reset-requests", b"0ms"),
                (b"x-ratelimit-limit-tokens", b"6000"),
                (b"x-ratelimit-remaining-tokens", b"6000"),
                (b"x-ratelimit-reset-tokens", b"0ms"),
            ],
        )

    def test_after_use(self) -> None:
        """
        Remaining counts go down with use, and reset says when the
        allowance is whole again; time brings it back.
        """
        alice = client(requests_per_minute=60, tokens_per_minute=6000)
        self.admitted(self.limiter.admit(alice, 3000))
        self.assertEqual(
            dict(self.limiter.headers(alice)),
            {
                b"x-ratelimit-limit-requests": b"60",
                b"x-ratelimit-remaining-requests": b"59",
                b"x-ratelimit-reset-requests": b"1s",
                b"x-ratelimit-limit-tokens": b"6000",
                b"x-ratelimit-remaining-tokens": b"3000",
                b"x-ratelimit-reset-tokens": b"30s",
            },
        )
        self.clock.advance(10)
        headers = dict(self.limiter.headers(alice))
        self.assertEqual(headers[b"x-ratelimit-remaining-tokens"], b"4000")
        self.assertEqual(headers[b"x-ratelimit-reset-tokens"], b"20s")

    def test_debt_shows_zero_remaining(self) -> None:
        """
        A client in debt sees zero remaining, not a negative number.
        """
        alice = client(tokens_per_minute=600)
        self.admitted(self.limiter.admit(alice, 100)).settle(1200)
        self.assertEqual(
            self.limiter.headers(alice),
            [
                (b"x-ratelimit-limit-tokens", b"600"),
                (b"x-ratelimit-remaining-tokens", b"0"),
                (b"x-ratelimit-reset-tokens", b"2m0s"),
            ],
        )

    def test_only_configured_limits(self) -> None:
        """
        Only the limits a client has are reported.
        """
        alice = client(requests_per_minute=10, concurrent_requests=2)
        names = [name for name, _ in self.limiter.headers(alice)]
        self.assertEqual(
            names, [b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests"]
        )


class FormatResetTests(SynchronousTestCase):
    """
    L{format_reset} writes durations as OpenAI does.
    """

    def test_examples(self) -> None:
        """
        OpenAI's own examples, and rounding up so a client that waits the
        advertised time is not refused again.
        """
        for seconds, text in [
            (0.02, "20ms"),
            (0.0, "0ms"),
            (-1.0, "0ms"),
            (0.0001, "1ms"),
            (1, "1s"),
            (1.2, "2s"),
            (59.5, "1m0s"),
            (360, "6m0s"),
            (3723, "1h2m3s"),
            (7200, "2h0m0s"),
        ]:
            self.assertEqual(format_reset(seconds), text, seconds)


class EstimateTokensTests(SynchronousTestCase):
    """
    L{estimate_tokens}: the most a request may cost, reserved at admission.
    """

    body = b"x" * 100  # 34 tokens at three bytes per token, rounded up

    def estimate(self, **document: Any) -> tuple[int, int]:
        """
        The estimate for L{body} with C{document}, for a client whose
        C{default_max_tokens} is 500.
        """
        return estimate_tokens(self.body, document, Limits(default_max_tokens=500))

    def test_default_output(self) -> None:
        """
        Without a maximum, the client's C{default_max_tokens} is reserved
        for output, on top of the prompt (body bytes / 3, rounded up).
        """
        self.assertEqual(self.estimate(), (34, 534))
        self.assertEqual(estimate_tokens(b"", {}, Limits()), (0, 4096))
        self.assertEqual(estimate_tokens(b"abc", {}, Limits(default_max_tokens=1)), (1, 2))

    def test_max_tokens(self) -> None:
        """
        C{max_completion_tokens} wins over C{max_tokens}, which wins over
        the default.
        """
        self.assertEqual(self.estimate(max_tokens=50), (34, 84))
        self.assertEqual(self.estimate(max_completion_tokens=20, max_tokens=50), (34, 54))

    def test_n(self) -> None:
        """
        Asking for C{n} choices reserves the output C{n} times.
        """
        self.assertEqual(self.estimate(max_tokens=50, n=3), (34, 184))
        self.assertEqual(self.estimate(n=2), (34, 1034))

    def test_numbers_as_upstream_reads_them(self) -> None:
        """
        A lax upstream (vLLM's pydantic models) reads C{"100000"},
        C{100000.0} and C{1e5} as 100000: so does the estimate, for the
        output bound under each of its names and for C{n} (they used to be
        ignored, and the default reserved instead).
        """
        for value in ("100000", 100000.0, 1e5, " 100000 ", "+100000"):
            for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
                self.assertEqual(self.estimate(**{name: value}), (34, 100034), (name, value))
        self.assertEqual(self.estimate(max_tokens=1000, n=128.0), (34, 128034))
        self.assertEqual(self.estimate(max_tokens=1000, n="3"), (34, 3034))

    def test_best_of(self) -> None:
        """
        Legacy completions generate C{best_of} choices to return C{n}: the
        larger counts.
        """
        self.assertEqual(self.estimate(max_tokens=10, best_of=5), (34, 84))
        self.assertEqual(self.estimate(max_tokens=10, best_of=2, n=4), (34, 74))

    def test_huge_values(self) -> None:
        """
        Huge values are capped at L{MAX_COUNT}, beyond any limit, without
        parsing a long number.
        """
        self.assertEqual(self.estimate(max_tokens=1e300), (34, 34 + MAX_COUNT))
        self.assertEqual(self.estimate(max_tokens="9" * 5000), (34, 34 + MAX_COUNT))
        self.assertEqual(self.estimate(max_tokens=10**40, n=10**40), (34, 34 + MAX_COUNT * MAX_COUNT))

    def test_nonsense_ignored(self) -> None:
        """
        Booleans, zero, negatives, fractions and other strings are not
        counts: they fall back to the next source (validation refuses them
        before the estimate is made, see L{ReadCountTests}).
        """
        for bad in (True, False, 0, -5, 2.5, "5x", "1e5", None, [50], {"n": 1}):
            self.assertEqual(self.estimate(max_completion_tokens=bad, max_tokens=50), (34, 84), bad)
            self.assertEqual(self.estimate(max_tokens=bad), (34, 534), bad)
            self.assertEqual(self.estimate(max_tokens=50, n=bad), (34, 84), bad)


class ReadCountTests(SynchronousTestCase):
    """
    L{read_count}: what validation accepts for the members a reservation
    reads, and what it refuses with a 400.
    """

    def test_counts(self) -> None:
        for value, count in [
            (None, None),
            (0, 0),
            (7, 7),
            (7.0, 7),
            (1e5, 100000),
            ("7", 7),
            (" +7\n", 7),
            (-0.0, 0),
            (2**60, MAX_COUNT),
        ]:
            self.assertEqual(read_count(value), count, value)

    def test_refused(self) -> None:
        """
        A boolean (pydantic reads C{true} as 1, OpenAI refuses it), a
        fraction, a non-finite number, any other string or type, and a
        number below the minimum are refused, saying why.
        """
        for value in (True, False, 2.5, float("nan"), float("inf"), "", "1e5", "7.0", "seven", "٣", [7], {}):
            with self.assertRaises(ValueError, msg=repr(value)) as caught:
                read_count(value)
            self.assertEqual(str(caught.exception), "must be an integer")
        for value, minimum in ((-1, 0), (-1e300, 0), (0, 1), ("0", 1)):
            with self.assertRaises(ValueError) as caught:
                read_count(value, minimum)
            self.assertEqual(str(caught.exception), f"must be at least {minimum}")
