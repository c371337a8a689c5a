"""
L{oaiproxy.sharedstate.link.RedisLink} in memory: txredisapi's real
protocol (ours, L{_Protocol}) on a L{StringTransport} and a L{Clock}, so
the test feeds Redis's replies byte for byte, late or never, and sees
what txredisapi's reply queue does with a call that has timed out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.sharedstate.link import RedisLink, Unavailable, _Protocol

DEADLINE = 0.05


class Link(SynchronousTestCase):
    """
    A started link whose connector makes connected protocols on
    StringTransports; C{self.outcomes} gets each call's result (a value
    or an L{Unavailable}) in the order they fire.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocols: list[_Protocol] = []
        self.link = RedisLink(self.connect, self.clock, deadline=DEADLINE, retry=(0.25, 1.0), keepalive=0)
        self.changes: list[bool] = []
        self.link.watchers.append(self.changes.append)
        self.late: list[None] = []
        self.link.late_watchers.append(lambda: self.late.append(None))
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.link.startService()
        self.addCleanup(self.link.stopService)
        self.assertTrue(self.link.up)

    def connect(self) -> "Deferred[Any]":
        protocol = _Protocol(self.clock)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)

    def call(self, outcomes: list[Any]) -> "Deferred[Any]":
        """
        One script call; its outcome is appended to C{outcomes}, each
        outcome however often the Deferred fires.
        """
        d = self.link.call("admit", ["k"], [1])
        d.addCallbacks(outcomes.append, lambda f: outcomes.append(f.trap(Unavailable) and f.value))
        return d

    def reply(self, data: bytes) -> None:
        self.protocols[-1].dataReceived(data)

    def criticals(self) -> list[dict]:
        return [e for e in self.events if e.get("log_level") == LogLevel.critical]


class LateReplyTests(Link):
    def test_late_reply_is_discarded_and_the_next_call_gets_its_own(self) -> None:
        """
        A call that missed its deadline fails once with L{Unavailable};
        its reply, arriving late, fires nothing and raises nothing, the
        connection stays up, and the next call gets the next reply.
        """
        first: list[Any] = []
        self.call(first)
        self.clock.advance(DEADLINE)
        [missed] = first
        self.assertIsInstance(missed, Unavailable)
        self.assertEqual((self.link.missed, len(self.late)), (1, 1))
        second: list[Any] = []
        self.call(second)
        self.reply(b":1\r\n")  # the first call's reply, late
        self.assertEqual(len(first), 1)
        self.assertEqual(second, [])
        self.reply(b":2\r\n")
        self.assertEqual(second, [2])
        self.assertTrue(self.link.up)
        self.assertFalse(self.protocols[-1].transport.disconnecting)
        self.assertEqual((len(self.protocols), self.link.episodes, self.changes), (1, 0, [True]))

    def test_late_error_reply_raises_nothing(self) -> None:
        """
        A late error reply (Redis's C{-ERR}) goes to the timed-out call
        and is dropped there, not logged as an unhandled error.
        """
        first: list[Any] = []
        self.call(first)
        self.clock.advance(DEADLINE)
        self.reply(b"-ERR something\r\n")
        self.assertEqual(len(first), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(self.link.up)

    def test_misses_with_replies_arriving_open_no_episode(self) -> None:
        """
        A saturated proxy: for three times the silence interval every call
        misses its deadline, yet Redis's replies keep arriving (late):
        every call is decided within the deadline, each is counted, and
        the link never goes down.
        """
        outcomes: list[Any] = []
        rounds = int(3 * self.link.silence / 0.1)
        for _ in range(rounds):
            self.call(outcomes)
            self.clock.advance(DEADLINE)
            self.clock.advance(0.05)
            self.reply(b":1\r\n")
        self.assertEqual(len(outcomes), rounds)
        self.assertTrue(all(isinstance(o, Unavailable) for o in outcomes))
        self.assertEqual((self.link.missed, len(self.late)), (rounds, rounds))
        self.assertTrue(self.link.up)
        self.assertEqual((self.link.episodes, self.changes, self.criticals()), (0, [True], []))


class DownTests(Link):
    def test_silence_opens_one_episode_within_the_interval(self) -> None:
        """
        Redis sends nothing (SIGSTOP): calls still end at their deadline
        while the link is up; the silence interval after the first
        unanswered call was sent, the link is down, once (one critical
        line, one watcher call), the connection dropped; then calls are
        decided at once, and a reconnect brings the link back.
        """
        outcomes: list[Any] = []
        self.call(outcomes)
        for steps in range(1, 100):  # bounded: a link that never goes down fails
            self.assertEqual(len(outcomes), steps - 1)
            self.clock.advance(DEADLINE)
            self.assertEqual(len(outcomes), steps)  # never held past the deadline
            if not self.link.up:
                break
            self.call(outcomes)
        self.assertFalse(self.link.up)
        self.assertAlmostEqual(self.clock.seconds(), self.link.silence)
        self.assertEqual(self.link.silence, 1.0)  # max(1 s, 10 x 50 ms)
        self.assertEqual((self.link.episodes, self.changes, len(self.criticals())), (1, [True, False], 1))
        self.assertIn("no reply for 1 s", self.criticals()[0]["why"])
        self.assertTrue(self.protocols[0].transport.disconnecting)
        now: list[Any] = []
        self.call(now)
        [refused] = now
        self.assertIsInstance(refused, Unavailable)
        self.clock.advance(5)
        self.assertEqual((self.link.episodes, len(self.criticals())), (1, 1))
        self.assertEqual((len(self.protocols), self.changes), (2, [True, False, True]))

    def test_lost_connection_opens_an_episode_at_once(self) -> None:
        """
        The connection closes with no call waiting: the link is down at
        once, without waiting for a call or a silence, and reconnects
        after its first backoff.
        """
        self.protocols[0].connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.link.up)
        self.assertEqual((self.link.episodes, self.changes, len(self.criticals())), (1, [True, False], 1))
        self.clock.advance(0.25)
        self.assertTrue(self.link.up)
        self.assertEqual(len(self.protocols), 2)
