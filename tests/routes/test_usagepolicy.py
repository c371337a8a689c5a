"""
C{GET /usage}'s policy (L{oaiproxy.routes.usagepolicy}): the query string
read strictly, the windows of the admin and of a client, and who sees
whom, without a request or a database.
"""

from __future__ import annotations

import datetime
import hashlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.admin import ADMIN
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.errors import ApiError
from oaiproxy.routes.usagepolicy import (
    MAX_CLIENTS,
    MAX_DAYS,
    MAX_QUERY_BYTES,
    Query,
    Window,
    admin_window,
    client_window,
    parse_query,
    visible_clients,
    window_for,
)

TODAY = datetime.date(2026, 12, 3)
#: 2026-12-03T12:00:00Z.
NOON = datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.timezone.utc).timestamp()


def client(name: str = "alice", **budgets: object) -> Client:
    return Client(name, hashlib.sha256(name.encode()).digest(), budgets=Budgets(**budgets))  # type: ignore[arg-type]


def refused(result: object, status: int = 400) -> ApiError:
    assert isinstance(result, ApiError), result
    assert result.status == status, result
    return result


class ParseQueryTests(SynchronousTestCase):
    def test_nothing(self) -> None:
        self.assertEqual(parse_query(b"", TODAY), Query())

    def test_every_parameter(self) -> None:
        """
        Clients repeated or comma-separated (each once, in order), a date
        since and until; C{Nd} counts back from today, today included.
        """
        query = parse_query(b"client=a,b&client=c&client=a&since=2026-11-01&until=2026-11-30", TODAY)
        self.assertEqual(query, Query(("a", "b", "c"), datetime.date(2026, 11, 1), datetime.date(2026, 11, 30)))
        self.assertEqual(parse_query(b"since=7d", TODAY), Query(since=datetime.date(2026, 11, 27)))
        self.assertEqual(parse_query(b"since=1d", TODAY), Query(since=TODAY))

    def test_percent_encoded_names(self) -> None:
        """
        A name is percent-decoded UTF-8; a C{+} is a space.
        """
        query = parse_query(b"client=%C3%A9quipe+%22x%22%3Cb%3E", TODAY)
        self.assertEqual(query, Query(('\u00e9quipe "x"<b>',)))

    def test_unknown_parameter(self) -> None:
        """
        A parameter it does not know (a typo) is refused, named, not
        ignored: ignoring C{clients=bob} would answer with everyone.
        """
        error = refused(parse_query(b"clients=bob", TODAY))
        self.assertEqual(error.param, "clients")
        self.assertIn("clients", error.message)

    def test_repeated_dates(self) -> None:
        for raw in (b"since=7d&since=30d", b"until=2026-12-01&until=2026-12-02"):
            error = refused(parse_query(raw, TODAY))
            self.assertIn("more than once", error.message)

    def test_bad_dates(self) -> None:
        """
        Only C{YYYY-MM-DD} (a real date) or C{Nd} for since, only a date
        for until; the error names the parameter.
        """
        for name, value in [
            ("since", b"2026-02-30"),
            ("since", b"0d"),
            ("since", b"-3d"),
            ("since", b"1000d"),
            ("since", b"99999999999999999999d"),
            ("since", b"yesterday"),
            ("since", b"20261203"),
            ("since", b"%D9%A2%D9%A0%D9%A2%D9%A6-12-03"),  # Arabic-Indic digits
            ("until", b"7d"),
            ("until", b""),
            ("until", b"2026-12-03T00:00:00"),
        ]:
            raw = name.encode() + b"=" + value
            self.assertEqual(refused(parse_query(raw, TODAY)).param, name, raw)

    def test_not_utf8(self) -> None:
        for raw in (b"client=%ff%fe", b"%ff=1", b"client=\xff"):
            self.assertIn("UTF-8", refused(parse_query(raw, TODAY)).message)

    def test_huge(self) -> None:
        """
        A query string past L{MAX_QUERY_BYTES}, more than L{MAX_CLIENTS}
        names, a name of 257 characters: 400s, not work.
        """
        refused(parse_query(b"client=" + b"a" * MAX_QUERY_BYTES, TODAY))
        many = ",".join(f"c{i}" for i in range(MAX_CLIENTS + 1)).encode()
        self.assertEqual(refused(parse_query(b"client=" + many, TODAY)).param, "client")
        refused(parse_query(b"&".join([b"client=x"] * (MAX_CLIENTS + 10)), TODAY))
        self.assertEqual(refused(parse_query(b"client=" + b"n" * 257, TODAY)).param, "client")
        self.assertEqual(parse_query(b"client=" + b"n" * 256, TODAY), Query(("n" * 256,)))

    def test_empty_name(self) -> None:
        for raw in (b"client=", b"client=a,,b", b"client=%20"):
            self.assertEqual(refused(parse_query(raw, TODAY)).param, "client")

    @given(st.binary(max_size=300))
    def test_any_bytes(self, raw: bytes) -> None:
        """
        Whatever the bytes, a query or a 400, never an exception.
        """
        result = parse_query(raw, TODAY)
        if isinstance(result, ApiError):
            self.assertEqual(result.status, 400)
        else:
            self.assertIsInstance(result, Query)


class AdminWindowTests(SynchronousTestCase):
    def test_default(self) -> None:
        """
        The last 30 UTC days, today included.
        """
        self.assertEqual(admin_window(Query(), TODAY), Window(datetime.date(2026, 11, 4), TODAY))
        self.assertEqual(window_for(ADMIN, Query(), NOON), Window(datetime.date(2026, 11, 4), TODAY))

    def test_until_alone(self) -> None:
        """
        The 30 days up to it.
        """
        until = datetime.date(2026, 6, 30)
        self.assertEqual(admin_window(Query(until=until), TODAY), Window(datetime.date(2026, 6, 1), until))

    def test_since_after_until(self) -> None:
        error = refused(admin_window(Query(since=TODAY, until=datetime.date(2026, 12, 2)), TODAY))
        self.assertEqual(error.param, "since")

    def test_longest(self) -> None:
        """
        L{MAX_DAYS} days are served; one more, or ten years, is a 400.
        """
        since = TODAY - datetime.timedelta(days=MAX_DAYS - 1)
        self.assertEqual(admin_window(Query(since=since), TODAY), Window(since, TODAY))
        refused(admin_window(Query(since=since - datetime.timedelta(days=1)), TODAY))
        refused(admin_window(Query(since=datetime.date(2016, 12, 3)), TODAY))


class ClientWindowTests(SynchronousTestCase):
    def test_months(self) -> None:
        """
        Without budgets, or with a monthly one: the previous month's first
        day to today.
        """
        for someone in (client(), client(usd_per_month=5.0), client(tokens_per_day=10, usd_per_month=5.0)):
            self.assertEqual(client_window(Query(), someone, NOON), Window(datetime.date(2026, 11, 1), TODAY))

    def test_days(self) -> None:
        """
        Only daily budgets: yesterday and today.
        """
        daily = client(tokens_per_day=1000, usd_per_day=1.0)
        self.assertEqual(client_window(Query(), daily, NOON), Window(datetime.date(2026, 12, 2), TODAY))

    def test_zone(self) -> None:
        """
        Periods are the client's zone's, as UTC days: a month in Tokyo
        (UTC+9) begins on the last UTC day of the month before.
        """
        tokyo = client(usd_per_month=5.0, budget_timezone="Asia/Tokyo")
        self.assertEqual(client_window(Query(), tokyo, NOON).since, datetime.date(2026, 10, 31))

    def test_only_narrows(self) -> None:
        """
        A client's since and until narrow its window, never widen it.
        """
        alice = client()
        wide = Query(since=datetime.date(2020, 1, 1), until=datetime.date(2030, 1, 1))
        self.assertEqual(client_window(wide, alice, NOON), Window(datetime.date(2026, 11, 1), TODAY))
        narrow = Query(since=datetime.date(2026, 11, 10), until=datetime.date(2026, 11, 20))
        self.assertEqual(
            client_window(narrow, alice, NOON), Window(datetime.date(2026, 11, 10), datetime.date(2026, 11, 20))
        )
        self.assertEqual(window_for(alice, narrow, NOON).since, datetime.date(2026, 11, 10))

    def test_outside(self) -> None:
        """
        A window entirely outside its periods is a 400 saying which days it
        may see.
        """
        error = refused(client_window(Query(until=datetime.date(2026, 1, 31)), client(), NOON))
        self.assertEqual(error.param, "until")
        self.assertIn("2026-11-01", error.message)
        refused(
            client_window(Query(since=datetime.date(2026, 11, 20), until=datetime.date(2026, 11, 10)), client(), NOON)
        )


class VisibleTests(SynchronousTestCase):
    def test_admin(self) -> None:
        self.assertIsNone(visible_clients(ADMIN, Query()))
        self.assertEqual(visible_clients(ADMIN, Query(("bob", "carol"))), ("bob", "carol"))

    def test_client(self) -> None:
        """
        A client sees itself, also when it names itself.
        """
        self.assertEqual(visible_clients(client(), Query()), ("alice",))
        self.assertEqual(visible_clients(client(), Query(("alice",))), ("alice",))

    def test_someone_else(self) -> None:
        """
        Naming anyone else (alone or beside itself) is a 403, the same one
        whoever is named.
        """
        errors = [
            refused(visible_clients(client(), Query(names)), 403)
            for names in (("bob",), ("alice", "bob"), ("no-such-client-with-a-long-name",))
        ]
        self.assertEqual(
            {(e.code, e.message, e.body()) for e in errors}, {(errors[0].code, errors[0].message, errors[0].body())}
        )
        self.assertEqual(errors[0].code, "permission_denied")
        self.assertNotIn("bob", errors[0].message)

    def test_nobody(self) -> None:
        with self.assertRaises(TypeError):
            visible_clients(None, Query())
