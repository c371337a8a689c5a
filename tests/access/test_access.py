"""
Who gets through and how much: client keys, OpenAI keys sent by mistake,
model allow-lists and per-client limits, through the real Resource tree
(in memory, with a fake clock) in front of the fake upstream.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import Limits
from oaiproxy.fake.harness import CLIENT_KEY, Harness, chat_body, registry

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


def answer(case: SynchronousTestCase, h: Harness, body: bytes, headers: Any = BEARER) -> tuple[Any, dict[str, Any]]:
    response = case.successResultOf(h.post(body, headers=headers))
    return response, json.loads(case.successResultOf(treq.content(response)))


class OpenAIKeyTests(SynchronousTestCase):
    def test_openai_key_refused_and_not_forwarded(self) -> None:
        """
        A request carrying what looks like a real OpenAI key gets a 401
        telling the user to use a proxy key, with or without client keys
        configured, and never reaches upstream.
        """
        for h in (Harness(), Harness(client_keys=[CLIENT_KEY])):
            # Built from parts, so that no secret scanner takes this file for a leak.
            key = b"sk-proj-" + b"abcdefghijklmnop12" * 4 + b"T3Blbk" + b"FJ" + b"A1b2" * 15
            response, body = answer(self, h, chat_body(), {b"authorization": [b"Bearer " + key]})
            self.assertEqual(response.code, 401)
            self.assertEqual(body["error"]["code"], "openai_key_not_accepted")
            self.assertIn("client key", body["error"]["message"])
            self.assertNotIn("abcdefghijklmnop", json.dumps(body))
            self.assertEqual(h.fake.requests, [])


class EarlyRefusalTests(SynchronousTestCase):
    def test_wrong_key_is_refused_before_the_body_and_recorded(self) -> None:
        """
        Through the daemon's wiring, a body sent with a wrong key is
        refused by the site on its headers: a 401 that reaches no resource
        and no upstream, with one access record for its route.
        """
        h = Harness(client_keys=[CLIENT_KEY])
        response, body = answer(self, h, chat_body(), {b"authorization": [b"Bearer oai-not-a-client"]})
        self.assertEqual((response.code, body["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(h.fake.requests, [])
        [record] = h.records
        self.assertEqual((record.status, record.route, record.client), (401, "chat_completions", "-"))
        # Not one byte of the body was taken in.
        self.assertEqual(record.bytes_in, 0)

    def test_two_authorization_headers_are_refused(self) -> None:
        """
        Two C{Authorization} headers are refused on the headers even when
        one (or both) carries a valid key: which one counts must not depend
        on who reads them, a proxy in front or this one.
        """
        h = Harness(client_keys=[CLIENT_KEY])
        valid = b"Bearer " + CLIENT_KEY
        for values in ([valid, b"Bearer oai-other"], [b"Bearer oai-other", valid], [valid, valid]):
            response, body = answer(self, h, chat_body(), {b"authorization": values})
            self.assertEqual((response.code, body["error"]["code"]), (401, "invalid_api_key"))
            self.assertIn("one 'Authorization: Bearer <key>' header", body["error"]["message"])
            self.assertNotIn(CLIENT_KEY.decode(), json.dumps(body))
        self.assertEqual(h.fake.requests, [])
        self.assertEqual(answer(self, h, chat_body())[0].code, 200)


class AllowListTests(SynchronousTestCase):
    def test_model_outside_allow_list_is_403(self) -> None:
        """
        A client limited to some models gets a 403 naming the model
        parameter for any other, before any upstream call.
        """
        h = Harness(clients=registry(CLIENT_KEY, models=["gpt-4o-mini"]))
        response, body = answer(self, h, chat_body(model="gpt-4o"))
        self.assertEqual(response.code, 403)
        self.assertEqual(
            (body["error"]["type"], body["error"]["param"], body["error"]["code"]),
            ("invalid_request_error", "model", "model_not_allowed"),
        )
        self.assertEqual(h.fake.requests, [])
        response, _ = answer(self, h, chat_body(model="gpt-4o-mini"))
        self.assertEqual(response.code, 200)


class RequestLimitTests(SynchronousTestCase):
    def test_over_requests_per_minute_is_429_with_retry_headers(self) -> None:
        """
        Past its requests per minute a client gets an OpenAI-shaped 429
        with retry-after and x-ratelimit headers the SDK paces its retry
        by, costing no upstream call; after the wait it is served again.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(requests_per_minute=2)))
        for _ in range(2):
            self.assertEqual(answer(self, h, chat_body())[0].code, 200)
        response, body = answer(self, h, chat_body())
        self.assertEqual(response.code, 429)
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertEqual(body["error"]["code"], "rate_limit_exceeded")
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual(headers.getRawHeaders(b"retry-after-ms"), [b"30000"])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-limit-requests"), [b"2"])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-reset-requests"), [b"1m0s"])
        self.assertEqual(len(h.fake.requests), 2)
        h.clock.advance(30)
        self.assertEqual(answer(self, h, chat_body())[0].code, 200)

    def test_concurrency_limit(self) -> None:
        """
        A client at its concurrency limit is refused until one of its
        requests ends.
        """
        h = Harness(clients=registry(CLIENT_KEY, limits=Limits(concurrent_requests=1)), read_timeout=5)
        pending = h.post(chat_body(model="fake-silent"), headers=BEARER)
        self.assertNoResult(pending)
        response, body = answer(self, h, chat_body())
        self.assertEqual(response.code, 429)
        self.assertIn("concurrent", body["error"]["message"])
        h.clock.advance(5)  # the first one times out upstream (504) and ends
        h.pump()
        self.assertEqual(self.successResultOf(pending).code, 504)
        self.assertEqual(answer(self, h, chat_body())[0].code, 200)


class TokenLimitTests(SynchronousTestCase):
    """
    chat_body() is about 90 bytes (a prompt estimate of ~30 tokens); with
    max_tokens=20 a request reserves ~50 tokens.  The fake upstream reports
    a usage of about 10 tokens.
    """

    def harness(self, **limits: int) -> Harness:
        return Harness(clients=registry(CLIENT_KEY, limits=Limits(**limits)), chunk_interval=1.0)

    def remaining(self, h: Harness) -> int:
        [client] = [c for c in (h.credentials.clients.identify(CLIENT_KEY),) if c is not None]
        headers = dict(h.limiter.headers(client))
        return int(headers[b"x-ratelimit-remaining-tokens"])

    def test_reservation_settled_against_reported_usage(self) -> None:
        """
        After an answer, the client is charged what upstream reported, not
        the reservation: requests that would not fit on reservations alone
        are admitted.
        """
        h = self.harness(tokens_per_minute=120)
        for _ in range(5):
            response, _ = answer(self, h, chat_body(max_tokens=20))
            self.assertEqual(response.code, 200)
        # 5 requests reserving ~50 each would need ~250; usage was ~10 each.
        self.assertGreater(self.remaining(h), 50)

    def test_reservation_blocks_overshoot(self) -> None:
        """
        Requests in flight hold their whole reservation, so concurrent
        requests cannot together exceed the limit.
        """
        h = self.harness(tokens_per_minute=120)
        first = h.post(chat_body(model="fake-silent", max_tokens=20), headers=BEARER)
        second = h.post(chat_body(model="fake-silent", max_tokens=20), headers=BEARER)
        response, body = answer(self, h, chat_body(max_tokens=20))
        self.assertEqual(response.code, 429)
        self.assertIn("tokens per minute", body["error"]["message"])
        self.assertNoResult(first)
        self.assertNoResult(second)

    def test_request_larger_than_the_limit_is_not_retried(self) -> None:
        """
        A request that could never fit the per-minute allowance is refused
        with x-should-retry: false rather than retried forever.
        """
        h = self.harness(tokens_per_minute=100)
        response, body = answer(self, h, chat_body(max_tokens=1000))
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])
        self.assertIn("Request too large", body["error"]["message"])

    def test_cancelled_stream_charges_partial_output(self) -> None:
        """
        A stream the client abandons is charged its prompt estimate plus
        what was streamed so far, not the full reservation and not nothing.
        """
        h = self.harness(tokens_per_minute=1000)
        before = self.remaining(h)
        response = self.successResultOf(h.post(chat_body(stream=True, max_tokens=500), headers=BEARER))
        self.assertLess(self.remaining(h), before - 500)  # the reservation is held

        def leave(data: bytes) -> None:
            raise RuntimeError("client leaves")

        done = treq.collect(response, leave)
        h.pump()
        self.failureResultOf(done, RuntimeError)
        charged = before - self.remaining(h)
        self.assertGreater(charged, 20)  # at least the prompt estimate
        self.assertLess(charged, 100)  # far less than the 500 reserved for output

    def test_plain_answer_cut_short_charges_its_reservation(self) -> None:
        """
        A non-streamed answer is generated whole before upstream sends its
        head, so one whose body never arrives whole (upstream broke, or
        the client hung up after the head) is charged its reservation, not
        only its prompt: else hanging up at the head would make any
        request cost the client's budget almost nothing.
        """
        h = self.harness(tokens_per_minute=1000)
        before = self.remaining(h)
        response = self.successResultOf(h.post(chat_body(model="fake-crash", max_tokens=500), headers=BEARER))
        self.assertEqual(response.code, 200)
        self.failureResultOf(treq.content(response))
        self.assertGreater(before - self.remaining(h), 500)


class SettlementTests(SynchronousTestCase):
    def harness(self) -> Harness:
        # A short read timeout, so the bucket barely refills while it runs.
        return Harness(clients=registry(CLIENT_KEY, limits=Limits(tokens_per_minute=1000)), read_timeout=0.01)

    def remaining(self, h: Harness) -> int:
        client = h.credentials.clients.identify(CLIENT_KEY)
        assert client is not None
        return int(dict(h.limiter.headers(client))[b"x-ratelimit-remaining-tokens"])

    def test_upstream_refusal_costs_nothing(self) -> None:
        """
        An upstream 429 (or 5xx) generated nothing: the client's allowance
        is refunded whole, so retrying through an upstream rate limit does
        not exhaust the client's own.
        """
        h = self.harness()
        self.assertEqual(
            self.successResultOf(h.post(chat_body(model="fake-429", max_tokens=10), headers=BEARER)).code, 429
        )
        self.assertEqual(
            self.successResultOf(h.post(chat_body(model="fake-500", max_tokens=10), headers=BEARER)).code, 500
        )
        self.assertEqual(self.remaining(h), 1000)

    def test_timeout_after_sending_charges_the_prompt(self) -> None:
        """
        A request that reached upstream and then timed out may have been
        billed for its prompt, so the prompt estimate is charged.
        """
        h = self.harness()
        body = chat_body(model="fake-silent", max_tokens=10)
        d = h.post(body, headers=BEARER)
        h.clock.advance(0.01)
        h.pump()
        self.assertEqual(self.successResultOf(d).code, 504)
        charged = 1000 - self.remaining(h)
        self.assertEqual(charged, -(-len(body) // 3))
