# -*- test-case-name: tests.routes.test_usagepolicy -*-
"""
C{GET /usage}'s policy, as pure functions: what the query string may say,
which UTC days an answer covers, and whose usage the caller may see.  The
resource (L{oaiproxy.routes.usage}) only applies them; every rule is a
test without a request, a clock or a database.

    GET /usage?client=NAME[,NAME...]&since=YYYY-MM-DD|Nd&until=YYYY-MM-DD

The query string is refused whole (a 400 naming the parameter) rather
than read leniently: a parameter the endpoint does not know (a typo such
as C{clients=}), one given twice (C{since}, C{until}), one not in UTF-8,
a date that is not one, C{since} after C{until}, or a window longer than
L{MAX_DAYS} days.  A typo silently ignored would answer with every
client's data, or another window, than was asked for.

The admin key sees every client, over the last L{ADMIN_DAYS} UTC days by
default.  A client key sees only its own usage, over its current and
previous budget periods (months, or days for a client whose budgets are
all per day); its C{since} and C{until} can only narrow that window.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Optional, Union
from urllib.parse import unquote_to_bytes

from oaiproxy.access.admin import ADMIN, Caller
from oaiproxy.access.budgets import period_of
from oaiproxy.access.clients import Client
from oaiproxy.config import ConfigError
from oaiproxy.errors import ApiError, bad_request, usage_forbidden
from oaiproxy.ledger.report import parse_since

__all__ = [
    "ADMIN_DAYS",
    "MAX_DAYS",
    "MAX_QUERY_BYTES",
    "MAX_CLIENTS",
    "MAX_NAME_CHARS",
    "Query",
    "Window",
    "parse_query",
    "utc_day",
    "admin_window",
    "client_window",
    "period_kind",
    "window_for",
    "visible_clients",
]

#: The admin's default window: the last 30 UTC days, today included.
ADMIN_DAYS = 30
#: The longest window an answer covers: a year and a month of margin,
#: enough for "this month against the same month last year".
MAX_DAYS = 400
#: The longest query string read (a long client list fits; more is abuse).
MAX_QUERY_BYTES = 4096
#: The most client names one query may ask for.
MAX_CLIENTS = 100
#: The longest client name a query may carry.
MAX_NAME_CHARS = 256

_PARAMS = ("client", "since", "until")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DAYS = re.compile(r"[1-9][0-9]{0,2}d")


@dataclass(frozen=True)
class Query:
    """
    What a query string asks for; empty or C{None} where it is silent.

    @ivar clients: the client names asked for, in order, each once.
    """

    clients: tuple[str, ...] = ()
    since: Optional[datetime.date] = None
    until: Optional[datetime.date] = None


@dataclass(frozen=True)
class Window:
    """
    The UTC days an answer covers, both included.
    """

    since: datetime.date
    until: datetime.date

    @property
    def days(self) -> tuple[str, str]:
        """
        The first and last day, C{YYYY-MM-DD}, as the ledger keys its rows.
        """
        return self.since.isoformat(), self.until.isoformat()


def utc_day(now: float) -> datetime.date:
    """
    The UTC day of the Unix time C{now}.
    """
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date()


def parse_query(raw: bytes, today: datetime.date) -> Union[Query, ApiError]:
    """
    The query string C{raw} (without its C{?}, as on the wire), or the 400
    that refuses it.  C{Nd} in C{since} counts back from C{today}.
    """
    if len(raw) > MAX_QUERY_BYTES:
        return bad_request(f"The query string is longer than {MAX_QUERY_BYTES} bytes.", None, "query_too_long")
    fields = [field for field in raw.split(b"&") if field]
    if len(fields) > MAX_CLIENTS + len(_PARAMS):
        return bad_request(f"The query string has more than {MAX_CLIENTS + len(_PARAMS)} parameters.", None)
    clients: list[str] = []
    dates: dict[str, datetime.date] = {}
    for field in fields:
        raw_name, _, raw_value = field.partition(b"=")
        try:
            name, value = _decoded(raw_name), _decoded(raw_value)
        except UnicodeDecodeError:
            return bad_request("The query string must be UTF-8, percent-encoded.", None)
        if name not in _PARAMS:
            shown = name if len(name) <= 64 else name[:64] + "..."
            return bad_request(
                f"Unknown query parameter {shown!r}: /usage takes client, since and until.", shown or None
            )
        if name == "client":
            refused = _add_clients(clients, value)
            if refused is not None:
                return refused
            continue
        if name in dates:
            return bad_request(f"'{name}' is given more than once.", name)
        day = _date(name, value, today)
        if isinstance(day, ApiError):
            return day
        dates[name] = day
    return Query(tuple(clients), dates.get("since"), dates.get("until"))


def _decoded(raw: bytes) -> str:
    """
    One name or value of a query string: ASCII on the wire, C{+} for a
    space, percent-encoded UTF-8.

    @raise UnicodeDecodeError: for anything else.
    """
    raw.decode("ascii")
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")


def _add_clients(clients: list[str], value: str) -> Optional[ApiError]:
    for name in value.split(","):
        name = name.strip()
        if not name:
            return bad_request("'client' must name a client (several: client=a,b or client=a&client=b).", "client")
        if len(name) > MAX_NAME_CHARS:
            return bad_request(f"A client name is at most {MAX_NAME_CHARS} characters.", "client")
        if name not in clients:
            clients.append(name)
        if len(clients) > MAX_CLIENTS:
            return bad_request(f"At most {MAX_CLIENTS} clients at once.", "client")
    return None


def _date(name: str, value: str, today: datetime.date) -> Union[datetime.date, ApiError]:
    text = value.strip()
    if _DATE.fullmatch(text) or (name == "since" and _DAYS.fullmatch(text)):
        try:
            return parse_since(text, today)
        except (ConfigError, ValueError, OverflowError):
            pass
    if name == "since":
        wanted = f"a UTC date, YYYY-MM-DD, or a number of days back, 1d to {MAX_DAYS}d"
    else:
        wanted = "a UTC date, YYYY-MM-DD"
    return bad_request(f"'{name}' must be {wanted}.", name)


def _checked(since: datetime.date, until: datetime.date) -> Union[Window, ApiError]:
    if since > until:
        return bad_request(f"'since' ({since}) is after 'until' ({until}).", "since")
    if (until - since).days + 1 > MAX_DAYS:
        return bad_request(f"The window is longer than {MAX_DAYS} days: narrow 'since' or 'until'.", "since")
    return Window(since, until)


def admin_window(query: Query, today: datetime.date) -> Union[Window, ApiError]:
    """
    The admin's window: C{since} to C{until} as asked; C{until} is today by
    default, C{since} the L{ADMIN_DAYS} days up to C{until}.
    """
    until = query.until or today
    since = query.since or until - datetime.timedelta(days=ADMIN_DAYS - 1)
    return _checked(since, until)


def period_kind(client: Client) -> str:
    """
    The period a client's usage is shown by: its months, unless all its
    budgets are per day.
    """
    budgets = client.budgets
    daily = budgets.tokens_per_day is not None or budgets.usd_per_day is not None
    monthly = budgets.tokens_per_month is not None or budgets.usd_per_month is not None
    return "day" if daily and not monthly else "month"


def client_window(query: Query, client: Client, now: float) -> Union[Window, ApiError]:
    """
    A client's window: from the first UTC day of its previous period (in its
    budget zone) to today; C{since} and C{until} may only narrow it, and a
    window narrowed to nothing is a 400.
    """
    zone = client.budgets.zone
    previous = period_of(now, zone, period_kind(client)).previous(zone)
    first, last = previous.utc_days()[0], utc_day(now)
    since = max(query.since or first, first)
    until = min(query.until or last, last)
    if since > until:
        return bad_request(
            f"A client key sees its usage from {first} to {last} (its current and previous period); "
            "'since' and 'until' may only narrow that.",
            "since" if query.since is not None and query.since > last else "until",
        )
    return _checked(since, until)


def window_for(who: Caller, query: Query, now: float) -> Union[Window, ApiError]:
    """
    The window of C{who}'s answer (L{admin_window} or L{client_window}).
    """
    if isinstance(who, Client):
        return client_window(query, who, now)
    return admin_window(query, utc_day(now))


def visible_clients(who: Caller, query: Query) -> Union[Optional[tuple[str, ...]], ApiError]:
    """
    The clients C{who} sees: C{None} for every client (the admin, not
    naming any); the names asked for (the admin); a client's own name (a
    client, naming nobody else).  A client naming anyone else gets the
    same 403 whoever it named.
    """
    if who is ADMIN:
        return query.clients or None
    if not isinstance(who, Client):
        raise TypeError("an unknown caller sees nothing: answer it a 401 first")
    if any(name != who.name for name in query.clients):
        return usage_forbidden()
    return (who.name,)
