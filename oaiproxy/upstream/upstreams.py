# -*- test-case-name: tests.upstream.test_failover,tests.server.test_build -*-
"""
The upstreams a proxy forwards to: the L{Pool} (choosing, breakers,
in-flight counts) and one L{UpstreamClient} per member (its own URL, key,
style, headers and timeouts).  The exchange asks it for the next
candidate of a request and for that candidate's client; a reload
(L{Upstreams.replace}) swaps the members, keeping the breakers of the
names that stay.

Today's single-upstream options are a pool of one, named C{default}
(L{Upstreams.of}): the same client as before, behind a pool that, with
one member and no other candidate, never fails over, and whose breaker
records failures but never opens (L{PassThroughBreaker}): with nothing to
fail over to, a 503 of the proxy's own would only replace upstream's
answer (its 429 and C{retry-after}), which is what these users get today.
An upstreams file with a single entry gets a real breaker.

For what it watches: the pool's members (C{upstreams.pool.members}, each
with its C{breaker} and C{in_flight}); breaker transitions through the
C{observer} of the breakers the pool's C{breaker} factory makes
(L{Upstreams.observe} adds one); and every attempt's end through
L{Upstreams.listen} (name, outcome, decision).

With a group (C{--shared-state}: L{oaiproxy.upstream.shared}) the
breakers of a pool from an upstreams file are shared with the other
processes; the shorthand's never opens, so it has nothing to share.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oaiproxy.config import Secret
from oaiproxy.observe.records import SINGLE_UPSTREAM
from oaiproxy.routetable import Route
from oaiproxy.upstream.breaker import Breaker, Permit, Transition
from oaiproxy.upstream.client import KeyHolder, TreqLike, UpstreamClient
from oaiproxy.upstream.pool import DEFAULT_MAX_ATTEMPTS, Decision, Outcome, Pool, PoolGroup, Upstream, decide
from oaiproxy.upstream.styles import AzureStyle, OpenAIStyle, UpstreamStyle

__all__ = ["Upstreams", "SINGLE", "PoolStyle", "StaticKey", "style_for", "AttemptListener"]

_log = Logger()

#: The name of the pool of one that today's single-upstream options make.
SINGLE = SINGLE_UPSTREAM

#: Told of every attempt's end: the upstream's name, the outcome, and what
#: it decided (fail over or not, the breaker's verdict).
AttemptListener = Callable[[str, Outcome, Decision], None]


class PassThroughBreaker(Breaker):
    """
    The breaker of the single-upstream options' pool of one: it notes the
    last failure (for C{/health/upstreams}) and never opens.
    """

    def failed(self, permit: Permit, reason: str, retry_after: Optional[float] = None) -> None:
        if self._settle(permit):
            self.last_failure, self.last_failure_at = reason, self._clock.seconds()

    def key_refused(self, permit: Permit, reason: str) -> None:
        if self._settle(permit):
            self.last_failure, self.last_failure_at = reason, self._clock.seconds()
            self.log.critical(
                "the upstream API rejected the proxy's API key ({reason}): check --api-key-file / OPENAI_API_KEY",
                upstream=self.name,
                reason=reason,
            )


class StaticKey:
    """
    A key read once from the upstreams file's source (a reload reads it
    again and makes a new one).
    """

    def __init__(self, key: Secret) -> None:
        self._key = key

    @property
    def api_key(self) -> Secret:
        return self._key


def style_for(upstream: Upstream, azure_api_version: Optional[str] = None) -> UpstreamStyle:
    """
    The addressing of one member: Azure deployments are its C{model_map};
    an OpenAI-style upstream's C{model_map} renames the body's model.
    """
    if upstream.style == "azure":
        return AzureStyle(azure_api_version, dict(upstream.model_map))
    return OpenAIStyle(dict(upstream.model_map))


class PoolStyle:
    """
    What the routes check before a request goes to some member of a pool
    of several: a model is needed when any member needs one, a path must
    be addressable on every member.  The member's own style addresses each
    attempt (the exchange checks it again there).
    """

    name = "pool"

    def __init__(self, styles: Sequence[UpstreamStyle]) -> None:
        self._styles = tuple(styles)

    def needs_model(self, route: Route) -> bool:
        return any(style.needs_model(route) for style in self._styles)

    def addressable(self, path: str, model: Optional[str]) -> bool:
        return all(style.addressable(path, model) for style in self._styles)

    def body_model(self, route: Route, model: Optional[str]) -> Optional[str]:
        # Renamed per member, by the exchange.
        return None


class Upstreams:
    """
    The pool and its members' clients.

    @param pool: the members, their breakers and in-flight counts.
    @param clients: one client per member's name.
    @param max_attempts: upstreams one request may try (C{--max-attempts}).
    @param first_byte_timeout: seconds a stream's first body byte may take
        before the next candidate is tried (C{--first-byte-timeout});
        C{None} for off.  A member's own C{first_byte_timeout} wins.
    @param read_timeout: the overall bound of one request's attempts.
    """

    def __init__(
        self,
        pool: Pool,
        clients: Mapping[str, UpstreamClient],
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        first_byte_timeout: Optional[float] = None,
        read_timeout: float = 600.0,
        make_clients: Optional[Callable[[Sequence[Upstream]], dict[str, UpstreamClient]]] = None,
    ) -> None:
        self.pool = pool
        self._make_clients = make_clients
        self.max_attempts = max_attempts
        self.first_byte_timeout = first_byte_timeout
        self.read_timeout = read_timeout
        self._clients = dict(clients)
        self._listeners: list[AttemptListener] = []
        self._observers: list[Callable[[Transition], None]] = []
        self._check()

    @classmethod
    def of(cls, client: UpstreamClient, clock: IReactorTime, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> "Upstreams":
        """
        A pool of one around C{client} (today's single-upstream options,
        and the tests that build a client themselves).
        """
        upstream = Upstream(SINGLE, client.base_url, Secret(b""), style=client.style.name)
        observers: list[Callable[[Transition], None]] = []
        pool = Pool([upstream], clock, breaker=_observed(clock, observers, PassThroughBreaker))
        made = cls(pool, {SINGLE: client}, max_attempts, None, client.read_timeout)
        made._observers = observers
        return made

    @classmethod
    def build(
        cls,
        upstreams: Sequence[Upstream],
        clock: IReactorTime,
        http_for: Callable[[Upstream], TreqLike],
        read_timeout: float,
        keys: Optional[Mapping[str, KeyHolder]] = None,
        azure_api_version: Optional[str] = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        first_byte_timeout: Optional[float] = None,
        breaker: Optional[Callable[[str], Breaker]] = None,
        shorthand: bool = False,
        group: Optional[PoolGroup] = None,
    ) -> "Upstreams":
        """
        The pool of C{upstreams} with a client each.

        @param http_for: the treq-like client a member's requests go
            through (one per connect timeout, in the daemon).
        @param keys: where a member's key is read for every request, when
            not its entry's own (the pool of one reads the reloadable
            credentials).
        @param shorthand: the pool of one of the single-upstream options
            (its breaker never opens: see L{PassThroughBreaker}).
        @param group: the processes the breakers are shared with
            (L{oaiproxy.upstream.shared.SharedBreakers}), if any; not for
            the shorthand's breaker, which never opens.
        """
        observers: list[Callable[[Transition], None]] = []
        kind = PassThroughBreaker if shorthand else Breaker
        pool = Pool(
            upstreams,
            clock,
            breaker=breaker or _observed(clock, observers, kind),
            group=None if shorthand else group,
        )
        own_keys = dict(keys or {})

        def make_clients(entries: Sequence[Upstream]) -> dict[str, UpstreamClient]:
            return {
                u.name: UpstreamClient(
                    http_for(u),
                    u.url,
                    own_keys.get(u.name) or StaticKey(u.key),
                    clock,
                    u.read_timeout or read_timeout,
                    u.headers,
                    style_for(u, azure_api_version),
                )
                for u in entries
            }

        made = cls(pool, make_clients(upstreams), max_attempts, first_byte_timeout, read_timeout, make_clients)
        made._observers = observers
        return made

    def replace(self, upstreams: Sequence[Upstream]) -> None:
        """
        A reload: new members and clients, all at once; a name that stays
        keeps its breaker and in-flight count (L{Pool.replace}).  Requests
        in flight finish on the client they started with.
        """
        assert self._make_clients is not None, "a pool built by Upstreams.build"
        clients = self._make_clients(upstreams)
        self.pool.replace(upstreams)
        self._clients = clients

    def _check(self) -> None:
        names = {m.name for m in self.pool.members}
        assert set(self._clients) == names, "one client per member"

    def client(self, name: str) -> UpstreamClient:
        """
        The client of the member C{name}.
        """
        return self._clients[name]

    @property
    def clients(self) -> dict[str, UpstreamClient]:
        """
        Every member's client, by name (a copy).
        """
        return dict(self._clients)

    @property
    def style(self) -> "Union[UpstreamStyle, PoolStyle]":
        """
        What the routes check a request against: the one member's style,
        or a L{PoolStyle} over all of them.
        """
        if len(self._clients) == 1:
            return next(iter(self._clients.values())).style
        return PoolStyle([c.style for c in self._clients.values()])

    def listen(self, listener: AttemptListener) -> None:
        """
        Tell C{listener} of every attempt's end (metrics, say).
        """
        self._listeners.append(listener)

    def attempted(self, name: str, outcome: Outcome) -> None:
        """
        An attempt on C{name} ended (the exchange calls this).
        """
        if self._listeners:
            decision = decide(outcome)
            for listener in self._listeners:
                try:
                    listener(name, outcome, decision)
                except Exception:
                    # A watcher's bug must not fail the request it watches.
                    _log.failure("bug in a listener of upstream attempts")

    def observe(self, observer: Callable[[Transition], None]) -> None:
        """
        Tell C{observer} of every breaker transition, of members there now
        and of those a reload adds (metrics, say).
        """
        self._observers.append(observer)


def _observed(
    clock: IReactorTime, observers: list[Callable[[Transition], None]], kind: type[Breaker] = Breaker
) -> Callable[[str], Breaker]:
    """
    The pool's breaker factory: the README's policy, each transition told
    to C{observers} (which may grow after the breakers are made).
    """

    def observe(transition: Transition) -> None:
        for observer in observers:
            try:
                observer(transition)
            except Exception:
                _log.failure("bug in an observer of breaker transitions")

    return lambda name: kind(name, clock, observer=observe)
