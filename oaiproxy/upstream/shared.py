# -*- test-case-name: tests.upstream.test_shared,tests.upstream.test_shared_redis,tests.e2e.test_shared_breaker -*-
"""
The breakers of a pool shared by a group of processes (workers, hosts)
through Redis (L{oaiproxy.sharedstate.link}): an upstream opened by one
process is open for all, and only one half-open probe runs across the
whole group.

Each process's own L{Breaker} still makes every decision, at once, with no
Redis round trip per request: a closed breaker asks nobody.  What the group
adds travels beside the requests:

  - A transition to open is published at once (C{breaker_open.lua}): the
    open-until on Redis's clock, whether upstream set the cooldown
    (C{retry-after}, a refused key) and why, in a record that outlives
    it.  An open is only ever extended, never shortened, by the group as
    by one breaker.
  - Every process reads each upstream's record every C{interval} seconds
    (1 s; C{breaker_read.lua}, one call per upstream, each upstream's
    keys under its own hash tag), and at once after a failure its own
    breaker counted without opening.  A process that did not see the
    upstream fail opens its breaker for what is left of the group's
    cooldown (L{Breaker.adopt}).  So another process stops sending to an
    opened upstream within C{interval}, or after its own first failure
    there, whichever is sooner, instead of after its own five.
  - When the cooldown is over, only the process holding the probe lease
    (C{breaker_probe.lua}: C{SET NX PX} of the process's id, C{lease}
    10 s, renewed at each read while its probe runs) sends the probe.  A
    request that finds the upstream half-open starts taking the lease and
    goes elsewhere (or gets the C{503} with C{retry-after: 1} of an
    upstream waiting on its probe); the next one may be the probe.  The
    others hold the upstream as open until the outcome is published: a
    success closes it for all (C{breaker_close.lua}: the record stays a
    minute marked closed, so every reader sees it), a failure re-opens it
    for all with the prober's next backoff.  The prober dying frees the
    lease within C{lease}.

While the link is down (L{RedisLink.up} false) the breakers are purely
local, as without Redis: nothing is asked, each process probes for
itself.  When it comes back, the first read merges: an upstream a process
holds open that the group does not (opened during the episode, or lost
with a Redis restart) is published; one the group holds open is adopted;
one the group closed after the opening this process knew is closed.  No
call to Redis ever delays a request: every one is made beside it, and
bounded by the link's deadline.

Keys: L{KeySpace.key}C{("breaker", name, "state")} (a hash) and
C{("breaker", name, "probe")} (the lease).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaiproxy.sharedstate.link import KeySpace, RedisLink, Unavailable
from oaiproxy.upstream.breaker import Breaker, State, Transition

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_LEASE", "SharedBreakers"]

#: Seconds between two reads of the group's breakers.
DEFAULT_INTERVAL = 1.0
#: Seconds the probe lease lasts without renewal: how long a dead prober
#: holds up the others' probe.
DEFAULT_LEASE = 10.0
#: Seconds an opening's record outlives its cooldown (for a probe nobody
#: sent: no traffic), and a closed record is kept.
_KEEP_OPEN = 600.0
_KEEP_CLOSED = 60.0

_NONE, _OPEN, _CLOSED = 0, 1, 2


@dataclass
class _Member:
    """
    What this process knows of one upstream's breaker in the group.

    @ivar known: the gen of the group's opening the local open stands for
        (published or adopted); C{None} when closed or opened while the
        link was down.
    @ivar granted_until: the probe lease is ours to start a probe with
        until then (local clock, with a margin); 0 once lost or used up.
    @ivar elsewhere_until: another process holds the lease until then.
    @ivar version: counts local transitions: a read sent before one says
        nothing about the state after it.
    """

    breaker: Breaker
    keys: tuple[str, str]
    known: Optional[int] = None
    granted_until: float = 0.0
    elsewhere_until: float = 0.0
    not_before: float = 0.0
    taking: bool = False
    reading: bool = False
    version: int = 0


class SharedBreakers:
    """
    The group's breakers, in Redis (see the module's docstring): a
    L{oaiproxy.upstream.pool.PoolGroup} for L{Pool}.

    @param interval: seconds between reads of every upstream's record.
    @param lease: seconds the probe lease lasts without renewal (at least
        three intervals).
    @ivar adopted: transitions learnt from the group, for tests and
        figures.
    """

    log = Logger()

    def __init__(
        self,
        link: RedisLink,
        clock: IReactorTime,
        keys: Optional[KeySpace] = None,
        interval: float = DEFAULT_INTERVAL,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        if lease < 3 * interval:
            raise ValueError("the probe lease must last at least three read intervals")
        self.link = link
        self.clock = clock
        self.keys = keys or KeySpace()
        self.interval = interval
        self.lease = lease
        self.adopted = 0
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._members: dict[str, _Member] = {}
        self._loop: Optional[LoopingCall] = None
        link.watchers.append(self._link_changed)
        if link.up:
            self._start()

    def stop(self) -> None:
        """
        Stop reading (shutdown, tests); the breakers go on locally.
        """
        if self._link_changed in self.link.watchers:
            self.link.watchers.remove(self._link_changed)
        self._stop()

    # The pool's side (PoolGroup).

    def join(self, breaker: Breaker) -> None:
        member = _Member(
            breaker, (self.keys.key("breaker", breaker.name, "state"), self.keys.key("breaker", breaker.name, "probe"))
        )
        self._members[breaker.name] = member
        breaker.group = self
        self._read(member)

    def leave(self, name: str) -> None:
        member = self._members.pop(name, None)
        if member is not None:
            member.breaker.group = None

    # The breaker's side (BreakerGroup).

    def may_probe(self, breaker: Breaker, early: bool) -> bool:
        member = self._members.get(breaker.name)
        if member is None or not self.link.up:
            return True
        now = self.clock.seconds()
        if member.granted_until > now:
            return True
        if member.elsewhere_until > now or member.taking or now < member.not_before:
            return False
        self._take(member, early)
        return member.granted_until > self.clock.seconds()

    def probing_elsewhere(self, breaker: Breaker) -> bool:
        member = self._members.get(breaker.name)
        return member is not None and self.link.up and member.elsewhere_until > self.clock.seconds()

    def moved(self, breaker: Breaker, transition: Transition) -> None:
        member = self._members.get(breaker.name)
        if member is None:
            return
        member.version += 1
        if transition.new is not State.HALF_OPEN:
            member.granted_until = 0.0
        if transition.shared:
            return
        if transition.new is State.OPEN:
            self._publish_open(member, transition.cooldown or 0.0, breaker.told, transition.critical, transition.reason)
        elif transition.new is State.CLOSED:
            self._publish_close(member)

    def failure(self, breaker: Breaker) -> None:
        member = self._members.get(breaker.name)
        if member is not None:
            self._read(member)

    # Talking to Redis.

    def _call(self, script: str, member: _Member, args: Sequence[Any]) -> Any:
        d = self.link.call(script, member.keys, args)

        def unanswered(failure: Failure) -> None:
            if not failure.check(Unavailable):
                self.log.failure("the {script} script failed; the breaker stays local", failure, script=script)
            return None

        return d.addErrback(unanswered)

    def _take(self, member: _Member, early: bool) -> None:
        member.taking = True
        sent = self.clock.seconds()

        def answered(reply: Any) -> None:
            member.taking = False
            if reply is None or self._members.get(member.breaker.name) is not member:
                return
            status, ms, gen = int(reply[0]), int(reply[1]), int(reply[2])
            now = self.clock.seconds()
            if status == 1:
                member.granted_until = sent + self.lease - 2 * self.interval
                member.known = gen or member.known
            elif status == -1:
                member.elsewhere_until = now + ms / 1000
            else:
                # Still open for the group (its cooldown is longer than
                # this breaker's): hold it as long, ask again after that.
                member.not_before = now + min(self.interval, ms / 1000)
                self._read(member)

        self._call("breaker_probe", member, [self._me, int(self.lease * 1000), int(early)]).addCallback(answered)

    def _publish_open(self, member: _Member, cooldown: float, told: bool, refused: bool, reason: str) -> None:
        if not self.link.up:
            member.known = None
            return
        version = member.version
        args = [int(cooldown * 1000), int(told), int(refused), reason, self._me, int(_KEEP_OPEN * 1000)]

        def answered(reply: Any) -> None:
            if reply is None or member.version != version:
                return
            left, gen, told_, refused_ = (int(v) for v in reply[:4])
            member.known = gen
            if left / 1000 > member.breaker.cooldown_left() + 0.5:
                # The group's open is longer: this process holds it as long.
                member.breaker.adopt(left / 1000, bool(told_), bool(refused_), reason)

        self._call("breaker_open", member, args).addCallback(answered)

    def _publish_close(self, member: _Member) -> None:
        gen, member.known = member.known, None
        if not self.link.up:
            return
        version = member.version

        def answered(reply: Any) -> None:
            if reply is None or int(reply[0]) == 1 or member.version != version:
                return
            # A newer opening replaced the one this probe answered.
            left, newer, told, refused = (int(v) for v in reply[1:5])
            member.known = newer
            member.breaker.adopt(max(0, left) / 1000, bool(told), bool(refused), str(reply[5] or ""))
            self.adopted += 1

        self._call("breaker_close", member, [gen or 0, self._me, int(_KEEP_CLOSED * 1000)]).addCallback(answered)

    def _read(self, member: _Member) -> None:
        if member.reading or not self.link.up:
            return
        member.reading = True
        version, sent = member.version, self.clock.seconds()
        breaker = member.breaker
        # Granted (and not lost since: then it is 0) and in use: renewed,
        # however long the probe takes.
        renew = member.granted_until > 0 and breaker.probing_here

        def answered(reply: Any) -> None:
            member.reading = False
            if reply is None or member.version != version or self._members.get(breaker.name) is not member:
                return
            self._merge(member, reply, sent, renew)

        self._call("breaker_read", member, [self._me, int(self.lease * 1000) if renew else 0]).addCallback(answered)

    def _merge(self, member: _Member, reply: Sequence[Any], sent: float, renewed: bool) -> None:
        """
        Bring the local breaker and the group's record together (see the
        module's docstring).
        """
        kind, left, gen, told, refused, probe, mine = (int(v) for v in reply[:7])
        reason = str(reply[7] or "")
        breaker = member.breaker
        now = self.clock.seconds()
        if mine and probe > 0:
            if renewed:
                member.granted_until = sent + self.lease - 2 * self.interval
        else:
            member.granted_until = 0.0
        member.elsewhere_until = now + probe / 1000 if probe > 0 and not mine else 0.0
        state = breaker.state
        if kind == _OPEN:
            member.known = gen
            if state is State.OPEN and breaker.cooldown_left() > max(0, left) / 1000 + 0.5:
                # Extended here (a later retry-after): the group too.
                self._publish_open(
                    member, breaker.cooldown_left(), breaker.told, breaker.key_refused_open, "extended elsewhere"
                )
            elif left > 0 or state is State.CLOSED:
                before = breaker.state
                breaker.adopt(max(0, left) / 1000, bool(told), bool(refused), reason)
                self.adopted += breaker.state is not before
        elif state is not State.CLOSED:
            if kind == _CLOSED and member.known == gen:
                breaker.close_by_group()
                self.adopted += 1
            else:
                # Opened here while the group could not hear of it, or
                # the record was lost with a Redis restart: publish it.
                self._publish_open(
                    member,
                    breaker.cooldown_left(),
                    breaker.told,
                    breaker.key_refused_open,
                    breaker.last_failure or "opened while the shared state was down",
                )
        else:
            member.known = None

    # The reads' loop follows the link.

    def _link_changed(self, up: bool) -> None:
        for member in self._members.values():
            member.granted_until = member.elsewhere_until = member.not_before = 0.0
        if up:
            self._start()
        else:
            self._stop()

    def _start(self) -> None:
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        if not self.link.up:
            self._stop()
            return
        for member in list(self._members.values()):
            self._read(member)
