"""
C{GET /usage} through the proxy's own site, in memory, over a real SQLite
ledger whose pool thread runs on the test's clock: who sees what, the
agreed JSON shape, the rows still in memory, budgets, hostile names and
query strings, and a database that fails or hangs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
from dataclasses import replace
from typing import Any, Optional

import treq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaiproxy.access.budgets import Cost
from oaiproxy.access.clients import Budgets, Client, ClientRegistry
from oaiproxy.config import Secret
from oaiproxy.fake.harness import Harness, chat_body, harness_config
from oaiproxy.ledger.prices import Price, PriceBook
from oaiproxy.routes.usage import READ_SECONDS
from tests.ledger.fakes import threadless_writer
from tests.support import temp_dir

ADMIN_KEY = b"oaiproxy-admin-0123456789abcdefghij"
ALICE_KEY = b"oai-client-key-of-alice-000000000"
BOB_KEY = b"oai-client-key-of-bob-00000000000"
HOSTILE = 'evil"</script><img src=x onerror=alert(1)>\u2028\x00'
#: 2026-12-03T12:00:00Z.
NOON = datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.timezone.utc).timestamp()
PRICE = Price(0.15, 0.075, 0.60)


def sha(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def clients() -> ClientRegistry:
    return ClientRegistry(
        [
            Client("alice", sha(ALICE_KEY), budgets=Budgets(tokens_per_day=100_000, usd_per_month=50.0)),
            Client("bob", sha(BOB_KEY)),
            Client("carol", sha(b"oai-client-key-of-carol-000000000")),
        ]
    )


def totals(requests: int = 1, prompt: int = 10, completion: int = 5, cost: float = 0.001, **more: int) -> list[Any]:
    """
    A row's totals, in the ledger's column order.
    """
    row = {"errors": 0, "estimated": 0, "cached": 0, "reasoning": 0, "unpriced": 0, **more}
    return [
        requests,
        row["errors"],
        row["estimated"],
        prompt,
        completion,
        row["cached"],
        row["reasoning"],
        cost,
        row["unpriced"],
    ]


class UsageCase(SynchronousTestCase):
    """
    A proxy with three clients and an admin key, over a threadless SQLite
    ledger, on one clock at 2026-12-03 noon UTC.
    """

    ledger = True

    def setUp(self) -> None:
        self.writer, self.clock, self.thread, _, self.engine = threadless_writer(temp_dir(self))
        self.clock.advance(NOON)
        config = replace(
            harness_config(clients=clients()),
            admin_key=Secret(ADMIN_KEY),
            prices=PriceBook({"gpt-4o-mini": PRICE}, "prices.toml"),
        )
        self.harness = Harness(config=config, clock=self.clock, ledger=self.writer if self.ledger else None)

    def settle(self) -> None:
        """
        Move bytes and run the pool's jobs until nothing moves.
        """
        for _ in range(5):
            self.harness.pump()
            self.clock.advance(0)

    def fetch(
        self, query: bytes = b"", key: Optional[bytes] = ADMIN_KEY, method: bytes = b"GET", path: bytes = b"/usage"
    ) -> tuple[int, Headers, bytes]:
        """
        Send a request as it is on the wire (the query's bytes unchanged).
        """
        headers = Headers({b"authorization": [b"Bearer " + key]} if key is not None else {})
        d = self.harness.proxy_agent.request(method, b"http://proxy.test" + path + query, headers)
        self.settle()
        response = self.last = self.successResultOf(d)
        content = treq.content(response)
        self.settle()
        return response.code, response.headers, self.successResultOf(content)

    def usage(self, query: bytes = b"", key: Optional[bytes] = ADMIN_KEY) -> dict[str, Any]:
        status, _, body = self.fetch(query, key)
        self.assertEqual(status, 200, body)
        document: dict[str, Any] = json.loads(body)
        return document

    def flushed(self, *rows: tuple[tuple[str, str, str, str], list[Any]]) -> None:
        """
        Write C{rows} to the database.
        """
        for key, values in rows:
            self.writer.add(key, values)
        d = self.writer.flush()
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(d))

    def by_name(self, document: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {entry["client"]: entry for entry in document["clients"]}


class AdminTests(UsageCase):
    def test_every_client(self) -> None:
        """
        The admin key sees every configured client (carol, with no usage,
        too) and every name in the ledger's window, sorted, in the agreed
        shape; the last 30 days by default.
        """
        self.flushed(
            (("2026-12-03", "alice", "gpt-4o-mini", "default"), totals(3, 30, 21, 0.0012)),
            (("2026-12-02", "bob", "gpt-4o", "default"), totals(1, 5, 5, 0.0, unpriced=1)),
            (("2026-11-03", "bob", "gpt-4o-mini", "default"), totals(9)),  # 31 days ago
            (("2026-12-01", "retired", "gpt-4o-mini", "default"), totals(2, estimated=1)),
        )
        document = self.usage()
        self.assertEqual(
            {k: document[k] for k in ("object", "ledger", "since", "until")},
            {"object": "usage", "ledger": True, "since": "2026-11-04", "until": "2026-12-03"},
        )
        self.assertAlmostEqual(document["generated_at"], NOON)
        self.assertEqual([c["client"] for c in document["clients"]], ["alice", "bob", "carol", "retired"])
        alice = self.by_name(document)["alice"]
        sums = {
            "requests": 3,
            "errors": 0,
            "prompt_tokens": 30,
            "completion_tokens": 21,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": 0.0012,
        }
        row = {"day": "2026-12-03", "model": "gpt-4o-mini", "upstream": "default", **sums, "estimated": False}
        self.assertEqual(alice["days"], [row])
        self.assertEqual(alice["totals"], sums)
        entries = self.by_name(document)
        # Unpriced: unknown, never 0.
        self.assertIsNone(entries["bob"]["days"][0]["cost_usd"])
        self.assertIsNone(entries["bob"]["totals"]["cost_usd"])
        self.assertEqual(entries["bob"]["totals"]["requests"], 1)
        self.assertEqual(entries["carol"]["days"], [])
        self.assertEqual(entries["carol"]["totals"]["requests"], 0)
        self.assertTrue(entries["retired"]["days"][0]["estimated"])

    def test_headers(self) -> None:
        """
        JSON, never cached, never sniffed as HTML.
        """
        status, headers, body = self.fetch()
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertEqual(self.last.length, len(body))

    def test_filter_and_window(self) -> None:
        """
        C{?client=} (a list) keeps those clients, configured or in the
        ledger, and no name that is neither; since and until pick the days.
        """
        self.flushed(
            (("2026-06-15", "bob", "gpt-4o-mini", "default"), totals(4)),
            (("2026-06-15", "alice", "gpt-4o-mini", "default"), totals(1)),
            (("2026-06-15", "retired", "gpt-4o-mini", "default"), totals(2)),
            (("2026-07-01", "bob", "gpt-4o-mini", "default"), totals(8)),
        )
        document = self.usage(b"?client=bob,retired&client=ghost&since=2026-06-01&until=2026-06-30")
        self.assertEqual((document["since"], document["until"]), ("2026-06-01", "2026-06-30"))
        self.assertEqual([c["client"] for c in document["clients"]], ["bob", "retired"])
        self.assertEqual(self.by_name(document)["bob"]["totals"]["requests"], 4)
        one = self.usage(b"?client=bob&since=2026-06-01&until=2026-07-31")
        self.assertEqual([c["client"] for c in one["clients"]], ["bob"])
        self.assertEqual(one["clients"][0]["totals"]["requests"], 12)

    def test_held_rows_added(self) -> None:
        """
        What the writer still holds in memory is added to what the database
        has, row by row: the answer is never a second behind.
        """
        key = ("2026-12-03", "bob", "gpt-4o-mini", "default")
        self.flushed((key, totals(2, 20, 10, 0.002)))
        self.writer.add(key, totals(1, 10, 5, 0.001))
        self.writer.add(("2026-12-03", "bob", "gpt-4o-mini", "other-upstream"), totals(1))
        self.writer.add(("2026-12-03", "newcomer", "gpt-4o-mini", "default"), totals(1))
        document = self.usage()
        bob = self.by_name(document)["bob"]
        self.assertEqual([(d["upstream"], d["requests"]) for d in bob["days"]], [("default", 3), ("other-upstream", 1)])
        self.assertEqual(bob["days"][0]["prompt_tokens"], 30)
        self.assertAlmostEqual(bob["days"][0]["cost_usd"], 0.003)
        self.assertEqual(bob["totals"]["requests"], 4)
        self.assertIn("newcomer", self.by_name(document))

    def test_flush_in_flight_counted_once(self) -> None:
        """
        A flush still in flight when the read is asked for is written
        before the read runs (one pool thread): its rows are counted once,
        from the database, not again from what the writer held.
        """
        key = ("2026-12-03", "bob", "gpt-4o-mini", "default")
        self.writer.add(key, totals(2, 20, 10, 0.002))
        flushing = self.writer.flush()
        bob = self.by_name(self.usage())["bob"]
        self.assertTrue(self.successResultOf(flushing))
        self.assertEqual(bob["totals"]["requests"], 2)
        self.assertEqual(bob["days"][0]["prompt_tokens"], 20)

    def test_hostile_names(self) -> None:
        """
        A client name is data: it comes back as a JSON string, the same
        string, with no raw C{<}, C{>}, C{&} or control byte in the body.
        """
        self.flushed(((("2026-12-03", HOSTILE, "gpt-4o-mini", "default")), totals(1)))
        _, _, body = self.fetch()
        self.assertIn(HOSTILE, self.by_name(json.loads(body)))
        for raw in (b"<", b">", b"&", b"\x00", "\u2028".encode()):
            self.assertNotIn(raw, body)
        body.decode("ascii")
        wanted = self.usage(b"?client=" + b"".join(b"%%%02X" % byte for byte in HOSTILE.encode()))
        self.assertEqual([c["client"] for c in wanted["clients"]], [HOSTILE])

    def test_no_admin_key_configured(self) -> None:
        """
        Without an admin key nothing opens the admin view: the key a
        deployment forgot to configure is just an unknown key.
        """
        self.harness.credentials.replace(Secret(b"sk-up"), clients(), None)
        status, _, body = self.fetch()
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))


class ClientTests(UsageCase):
    def setUp(self) -> None:
        super().setUp()
        self.flushed(
            (("2026-12-03", "alice", "gpt-4o-mini", "default"), totals(3)),
            (("2026-11-01", "alice", "gpt-4o-mini", "default"), totals(1)),
            (("2026-10-31", "alice", "gpt-4o-mini", "default"), totals(100)),  # before the previous month
            (("2026-12-03", "bob", "gpt-4o-mini", "default"), totals(7)),
        )
        self.writer.add(("2026-12-03", "bob", "gpt-4o-mini", "default"), totals(1))

    def test_own_usage(self) -> None:
        """
        A client key sees itself only, over its current and previous month,
        with its budgets; no other client's name or figures are in the body.
        """
        status, _, body = self.fetch(key=ALICE_KEY)
        self.assertEqual(status, 200)
        document = json.loads(body)
        self.assertEqual((document["since"], document["until"]), ("2026-11-01", "2026-12-03"))
        self.assertEqual([c["client"] for c in document["clients"]], ["alice"])
        self.assertEqual(document["clients"][0]["totals"]["requests"], 4)
        self.assertEqual([b["budget"] for b in document["clients"][0]["budgets"]], ["tokens_per_day", "usd_per_month"])
        for other in (b"bob", b"carol"):
            self.assertNotIn(other, body)
        self.assertEqual(self.usage(key=BOB_KEY)["clients"][0]["totals"]["requests"], 8)

    def test_naming_itself(self) -> None:
        document = self.usage(b"?client=alice&since=2026-12-01", key=ALICE_KEY)
        self.assertEqual(document["since"], "2026-12-01")
        self.assertEqual(document["clients"][0]["totals"]["requests"], 3)

    def test_since_only_narrows(self) -> None:
        """
        A client asking further back gets its own window, not the older rows.
        """
        document = self.usage(b"?since=2026-01-01", key=ALICE_KEY)
        self.assertEqual(document["since"], "2026-11-01")
        self.assertEqual(document["clients"][0]["totals"]["requests"], 4)

    def test_another_client(self) -> None:
        """
        A client naming anyone else gets a 403, byte for byte the same
        whether that client exists, has usage, or not: neither the body nor
        its size tells.
        """
        answers = {
            query: self.fetch(query, key=ALICE_KEY)
            for query in (b"?client=bob", b"?client=carol", b"?client=nobody-at-all", b"?client=alice,bob")
        }
        self.assertEqual({status for status, _, _ in answers.values()}, {403})
        self.assertEqual(len({body for _, _, body in answers.values()}), 1)
        error = json.loads(answers[b"?client=bob"][2])["error"]
        self.assertEqual((error["code"], error["param"]), ("permission_denied", "client"))
        self.assertNotIn(b"bob", answers[b"?client=bob"][2])

    def test_unknown_key(self) -> None:
        """
        No key, an unknown key, a key under another scheme: 401, whatever
        the query asks for.
        """
        for key in (None, b"oai-client-not-a-key", ADMIN_KEY[:-1]):
            for query in (b"", b"?client=alice", b"?since=zzz"):
                status, _, body = self.fetch(query, key=key)
                self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        headers = Headers({b"authorization": [b"Basic " + ALICE_KEY]})
        d = self.harness.proxy_agent.request(b"GET", b"http://proxy.test/usage", headers)
        self.settle()
        self.assertEqual(self.successResultOf(d).code, 401)

    def test_budgets(self) -> None:
        """
        Each configured budget with its limit, what is used (settled or
        reserved by a request in flight), what is left, its period and when
        it resets.
        """
        alice = next(c for c in clients() if c.name == "alice")
        budgets = self.harness.built.budgets
        assert budgets is not None
        hold = budgets.admit(alice, "gpt-4o-mini", 1000, 3000)
        self.assertIsNotNone(hold)
        entries = {b["budget"]: b for b in self.usage(key=ALICE_KEY)["clients"][0]["budgets"]}
        usd = (1000 * PRICE.input + 2000 * PRICE.output) / 1e6
        self.assertEqual(
            entries["tokens_per_day"],
            {
                "budget": "tokens_per_day",
                "unit": "tokens",
                "limit": 100_000,
                "used": 3000,
                "left": 97_000,
                "period_start": "2026-12-03T00:00:00+00:00",
                "resets_at": "2026-12-04T00:00:00+00:00",
                "timezone": "UTC",
            },
        )
        self.assertEqual(entries["usd_per_month"]["unit"], "usd")
        self.assertEqual(entries["usd_per_month"]["limit"], 50.0)
        self.assertAlmostEqual(entries["usd_per_month"]["used"], usd)
        self.assertAlmostEqual(entries["usd_per_month"]["left"], 50.0 - usd)
        self.assertEqual(entries["usd_per_month"]["period_start"], "2026-12-01T00:00:00+00:00")
        self.assertEqual(entries["usd_per_month"]["resets_at"], "2027-01-01T00:00:00+00:00")
        # The admin sees the same budgets; bob has none.
        by_admin = self.by_name(self.usage())
        self.assertEqual(by_admin["alice"]["budgets"][0]["used"], 3000)
        self.assertEqual(by_admin["bob"]["budgets"], [])

    def test_budgets_are_the_groups_figure(self) -> None:
        """
        What is used comes from the store's group-wide reading (Redis, with
        --shared-state), not only what this process saw.
        """
        budgets = self.harness.built.budgets
        assert budgets is not None
        group = {"day": Cost(40_000, 1.0), "month": Cost(40_000, 20.0)}
        self.patch(budgets, "current", lambda client: succeed(group))
        entries = {b["budget"]: b for b in self.usage(key=ALICE_KEY)["clients"][0]["budgets"]}
        self.assertEqual((entries["tokens_per_day"]["used"], entries["tokens_per_day"]["left"]), (40_000, 60_000))
        self.assertEqual(entries["usd_per_month"]["left"], 30.0)


class TrafficTests(UsageCase):
    def test_requests_show_up(self) -> None:
        """
        Chat requests through the proxy are in the next answer (from the
        writer's memory, before any flush), with their cost and the budget
        they used; reading /usage is in the access log under the client who
        asked, but not counted as that client's request in the metrics.
        """
        for _ in range(2):
            d = self.harness.post(chat_body(), headers={b"authorization": [b"Bearer " + ALICE_KEY]})
            self.settle()
            self.assertEqual(self.successResultOf(d).code, 200)
        alice = self.usage(key=ALICE_KEY)["clients"][0]
        self.assertEqual(alice["totals"]["requests"], 2)
        used = alice["totals"]["prompt_tokens"] + alice["totals"]["completion_tokens"]
        self.assertGreater(used, 0)
        self.assertGreater(alice["totals"]["cost_usd"], 0)
        self.assertEqual(alice["budgets"][0]["used"], used)
        record = self.harness.records[-1]
        self.assertEqual((record.route, record.client, record.path, record.status), ("usage", "alice", "/usage", 200))
        self.assertEqual(record.attempts, 0)
        sample = self.harness.metrics.registry.get_sample_value
        self.assertEqual(
            sample("oaiproxy_requests_total", {"client": "-", "model": "-", "route": "usage", "status_class": "2xx"}), 1
        )
        self.assertIsNone(
            sample(
                "oaiproxy_requests_total", {"client": "alice", "model": "-", "route": "usage", "status_class": "2xx"}
            )
        )
        self.assertEqual(self.usage(key=ALICE_KEY)["clients"][0]["totals"]["requests"], 2)


class QueryTrickTests(UsageCase):
    def test_refused_cleanly(self) -> None:
        """
        Query-string tricks are 400s in OpenAI's shape, naming the
        parameter where there is one, without a read of the database.
        """
        jobs = self.thread.jobs
        for query, param in [
            (b"?since=7d&since=30d", "since"),
            (b"?until=2026-12-01&until=2026-12-02", "until"),
            (b"?since=" + b"9" * 5000 + b"d", None),
            (b"?client=" + b"a" * 300, "client"),
            (b"?client=%ff%fe", None),
            (b"?since=2026-12-03&until=2026-12-01", "since"),
            (b"?since=2016-01-01&until=2026-01-01", "since"),
            (b"?since=3650d", "since"),
            (b"?since=2026-13-01", "since"),
            (b"?until=%00", "until"),
            (b"?clients=alice", "clients"),
            (b"?client=", "client"),
        ]:
            status, headers, body = self.fetch(query)
            self.assertEqual(status, 400, query)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            error = json.loads(body)["error"]
            self.assertEqual((error["type"], error["param"]), ("invalid_request_error", param), query)
        self.assertEqual(self.thread.jobs, jobs)
        # Raw bytes that are not even ASCII, which an HTTP client would not
        # send, straight to the site: the site refuses the request line.
        channel = self.harness.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"GET /usage?client=\xff\xfe&since=\xe9 HTTP/1.1\r\nHost: proxy.test\r\n"
            b"Authorization: Bearer " + ADMIN_KEY + b"\r\n\r\n"
        )
        self.clock.advance(0)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")
        channel.connectionLost(Failure(ConnectionDone()))
        # Fragments and empty fields are nothing.
        self.assertEqual(self.fetch(b"?&&")[0], 200)

    def test_methods_and_paths(self) -> None:
        """
        GET and HEAD only (a JSON 405 with Allow otherwise), nothing below
        it; HEAD has GET's headers and no body.
        """
        for method in (b"POST", b"PUT", b"DELETE"):
            status, headers, body = self.fetch(method=method)
            self.assertEqual(status, 405)
            self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
            self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")
        status, headers, body = self.fetch(method=b"HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(self.fetch(path=b"/usage/alice")[0], 404)
        self.assertEqual(self.fetch(path=b"/v1/usage")[0], 404)


class LedgerOffTests(UsageCase):
    ledger = False

    def test_ledger_off(self) -> None:
        """
        Without a ledger: 200, C{ledger} false, no days, the budgets still.
        """
        document = self.usage(key=ALICE_KEY)
        self.assertFalse(document["ledger"])
        self.assertEqual(document["clients"][0]["days"], [])
        self.assertEqual(len(document["clients"][0]["budgets"]), 2)
        self.assertEqual([c["client"] for c in self.usage()["clients"]], ["alice", "bob", "carol"])


class DatabaseTests(UsageCase):
    def test_failing(self) -> None:
        """
        A database that fails: a 503 saying the ledger is unavailable,
        logged once for the episode, while chat requests are still served;
        once it answers again, a 200 and one line saying so.
        """
        self.thread.error = sqlite3.OperationalError("database is locked")
        with capturedLogs() as events:
            for _ in range(3):
                status, headers, body = self.fetch()
                self.assertEqual(status, 503)
                error = json.loads(body)["error"]
                self.assertEqual((error["type"], error["code"]), ("api_error", "ledger_unavailable"))
                self.assertIn("ledger", error["message"])
            d = self.harness.post(chat_body(), headers={b"authorization": [b"Bearer " + ALICE_KEY]})
            self.settle()
            self.assertEqual(self.successResultOf(d).code, 200)
            self.thread.error = None
            self.assertEqual(self.fetch()[0], 200)
            self.assertEqual(self.fetch()[0], 200)
        mine = [e for e in events if e.get("log_namespace") == "oaiproxy.usage"]
        self.assertEqual([e["log_level"] for e in mine], [LogLevel.error, LogLevel.info])
        self.assertIn("database is locked", mine[0]["why"])
        self.assertNotIn(ADMIN_KEY.decode(), repr(mine))

    def test_slow(self) -> None:
        """
        A database slower than L{READ_SECONDS}: a 503 at the deadline; while
        that read still holds the pool's thread, the next request is a 503
        at once, queueing nothing; once the thread is free, a 200.
        """
        self.thread.held = True
        d = self.harness.proxy_agent.request(
            b"GET", b"http://proxy.test/usage", Headers({b"authorization": [b"Bearer " + ADMIN_KEY]})
        )
        self.settle()
        self.assertNoResult(d)
        self.clock.advance(READ_SECONDS)
        self.settle()
        self.assertEqual(self.successResultOf(d).code, 503)
        queued = len(self.thread.queued)
        self.assertEqual(self.fetch()[0], 503)
        self.assertEqual(len(self.thread.queued), queued)
        self.thread.release()
        self.assertEqual(self.fetch()[0], 200)

    def test_one_read_at_a_time_per_key(self) -> None:
        """
        While a key's read is queued, that key's next request is a 429 at
        once, queueing nothing; another key still reads; once the first
        read is back, the key reads again.
        """
        self.thread.held = True
        d = self.harness.proxy_agent.request(
            b"GET", b"http://proxy.test/usage", Headers({b"authorization": [b"Bearer " + ALICE_KEY]})
        )
        self.settle()
        queued = len(self.thread.queued)
        status, headers, body = self.fetch(key=ALICE_KEY)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (429, "rate_limit_exceeded"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(len(self.thread.queued), queued)
        other = self.harness.proxy_agent.request(
            b"GET", b"http://proxy.test/usage", Headers({b"authorization": [b"Bearer " + BOB_KEY]})
        )
        self.settle()
        self.assertEqual(len(self.thread.queued), queued + 1)
        self.thread.release()
        self.settle()
        self.assertEqual((self.successResultOf(d).code, self.successResultOf(other).code), (200, 200))
        self.assertEqual(self.fetch(key=ALICE_KEY)[0], 200)

    def test_client_gone(self) -> None:
        """
        A client that leaves before the ledger answers: nothing is written
        to it and nothing fails.
        """
        self.thread.held = True
        d = self.harness.proxy_agent.request(
            b"GET", b"http://proxy.test/usage", Headers({b"authorization": [b"Bearer " + ADMIN_KEY]})
        )
        self.settle()
        d.cancel()
        self.settle()
        self.failureResultOf(d)
        with capturedLogs() as events:
            self.thread.release()
            self.settle()
        self.assertEqual([e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)], [])
