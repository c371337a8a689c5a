# -*- test-case-name: tests.access.test_shared,tests.e2e.test_shared_redis -*-
"""
Client limits shared through Redis by several processes and hosts.

Over the connection of L{oaiproxy.sharedstate.link}:

  - L{SharedLimitStore}: the L{oaiproxy.access.limits.LimitStore} over the
    link.  Admission is one round trip (C{admit.lua}), settlement one
    (C{settle.lua}); both use Redis's clock (C{TIME}), never a host's.
    Concurrency slots are leases that a running request renews
    (C{renew.lua}), so a dead process frees its slots within the lease.
    While the link is down it decides locally, with each limit divided by
    C{instances} (L{Limits.split}), and counts what it admits so.

Fallback bound, per client (the README's "Several processes and hosts"
says the same): the shared bucket never knows what was admitted locally,
and the local buckets never know what was admitted in Redis, so each side
keeps its own token-bucket bound and the two add up.  Over any window of
W seconds, of which F were spent in fallback, the group admits at most

    C{limit * (1 + W / 60)}                       (the shared bucket)
  + C{P * max(1, limit // instances) * (1 + F / 60)}   (P local buckets)

where P is the number of processes that fell back.  With P == instances
the second term is at most C{limit * (1 + F / 60)} (plus P - 1 when the
limit is below P): a client can get at most one extra limit's worth as a
burst, plus the limit's own rate while the episode lasts.  Never
unlimited, never refusing everything.  A concurrency limit is overshot
by at most the local share per process (shared leases held before the
episode are not seen locally).  Token reservations of requests admitted
in Redis whose settlement is lost stay charged (the safe side), and
their leases expire.

A client's keys are L{KeySpace.limits}: one hash tag per client.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Callable, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.access.clients import Client
from oaiproxy.access.limits import UNLIMITED, Held, Limiter, Refusal, Reservation, rate_headers, refusal_message
from oaiproxy.sharedstate.link import KeySpace, RedisLink, Unavailable

__all__ = ["DEFAULT_LEASE", "SharedLimitStore", "SharedReservation"]

#: Seconds a concurrency lease lasts without renewal: how long the slots of
#: a process that died stay taken.
DEFAULT_LEASE = 30.0

_STATUS = {1: "concurrent", 2: "requests", 3: "tokens", 4: "tokens"}
_OVER = {1: "concurrent", 2: "requests", 3: "too large", 4: "tokens"}


class SharedReservation:
    """
    A request admitted by L{SharedLimitStore}: in Redis (settled by one
    round trip, its lease renewed while it runs), or locally during a
    fallback (settled locally).

    @ivar settled: fires when the settlement is done (or given up); for
        tests and orderly shutdown, nobody needs to wait for it.
    """

    def __init__(
        self,
        store: "SharedLimitStore",
        estimate: int,
        keys: tuple[str, str] = ("", ""),
        tokens_per_minute: int = 0,
        lease: str = "",
        local: Optional[Reservation] = None,
    ) -> None:
        self.estimate = estimate
        self._store = store
        self._keys = keys
        self._tpm = tokens_per_minute
        self.lease = lease
        self.local = local
        self.settled: Deferred[None] = Deferred()
        self._done = False
        self._renewer: Optional[LoopingCall] = None
        if lease:
            self._renewer = LoopingCall(self._renew)
            self._renewer.clock = store.clock
            self._renewer.start(store.lease / 3, now=False)

    def _renew(self) -> None:
        self._store.link.call("renew", self._keys[1:], [self.lease, int(self._store.lease * 1000)]).addErrback(
            lambda _: None
        )

    def settle(self, used_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        if self.local is not None:
            self.local.settle(used_tokens)
            self.settled.callback(None)
            return
        refund = self.estimate - used_tokens if self._tpm else 0
        if not self.lease and not refund:
            self.settled.callback(None)
            return
        d = self._store.link.call("settle", self._keys, [self._tpm, refund, self.lease])

        def lost(failure: Failure) -> None:
            # The lease expires by itself; unreturned tokens stay charged.
            self._store.log.debug("settlement lost: {why}", why=failure.getErrorMessage())

        d.addCallbacks(lambda _: None, lost).addBoth(lambda _: self.settled.callback(None))


class SharedLimitStore:
    """
    The client limits of a group of processes, in Redis (see the module's
    docstring for the fallback and its bound).

    @param instances: how many processes share the limits: each takes
        C{1 / instances} of every limit while Redis is unreachable.
    @param lease: seconds a concurrency slot is held without renewal.
    @ivar fallback_admitted: requests admitted locally, in all episodes.
    """

    log = Logger()

    def __init__(
        self,
        link: RedisLink,
        clock: IReactorTime,
        keys: Optional[KeySpace] = None,
        instances: int = 1,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.link = link
        self.clock = clock
        self.keys = keys or KeySpace()
        self.instances = max(1, instances)
        self.lease = lease
        self.local = Limiter(clock, share=self.instances)
        self.fallback_admitted = 0
        #: Called for each request admitted in fallback (the metrics).
        self.on_fallback: Callable[[], None] = lambda: None
        self._ids = itertools.count(1)
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @property
    def up(self) -> bool:
        return self.link.up

    def admit(self, client: Client, estimate: int) -> "Deferred[Held | Refusal]":
        limits = client.limits
        if not limits.any:
            return succeed(UNLIMITED)
        if not self.link.up:
            return succeed(self._locally(client, estimate))
        keys = self.keys.limits(client.name)
        rpm = limits.requests_per_minute or 0
        tpm = limits.tokens_per_minute or 0
        concurrent = limits.concurrent_requests or 0
        lease = f"{self._me}-{next(self._ids)}" if concurrent else ""
        d = self.link.call("admit", keys, [rpm, tpm, concurrent, estimate, int(self.lease * 1000), lease])

        def answered(reply: Sequence[int]) -> "Held | Refusal":
            status, retry_ms, r_level, r_full, t_level, t_full = (int(v) for v in reply)
            if status == 0:
                return SharedReservation(self, estimate, keys, tpm, lease)
            headers: list[tuple[bytes, bytes]] = []
            if rpm:
                headers += rate_headers("requests", rpm, max(0, r_level), r_full / 1000)
            if tpm:
                headers += rate_headers("tokens", tpm, max(0, t_level), t_full / 1000)
            retry = None if retry_ms < 0 else retry_ms / 1000
            return Refusal(_STATUS[status], refusal_message(client, _OVER[status], estimate), retry, tuple(headers))

        def unanswered(failure: Failure) -> "Held | Refusal":
            if not failure.check(Unavailable):
                self.log.failure("the admit script failed; deciding locally", failure)
            return self._locally(client, estimate)

        return d.addCallbacks(answered, unanswered)

    def _locally(self, client: Client, estimate: int) -> "Held | Refusal":
        admitted = self.local.admit(client, estimate)
        if isinstance(admitted, Refusal):
            admitted.headers = tuple(self.local.headers(client))
            return admitted
        self.fallback_admitted += 1
        self.on_fallback()
        return SharedReservation(self, estimate, local=admitted)
