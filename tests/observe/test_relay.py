"""
A worker's log events, written as records (L{relay.observer}'s format) and
decoded by the supervisor (L{relay.relayed_event}).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.observe import relay


def written(emit: Any) -> bytes:
    """
    What a relaying worker writes for the events C{emit} logs.
    """
    stream = io.StringIO()
    real, relay.sys.stdout = relay.sys.stdout, stream
    try:
        observer = relay.observer()
    finally:
        relay.sys.stdout = real
    emit(Logger(namespace="oaiproxy.example", observer=observer))
    return stream.getvalue().encode("utf-8")


class RelayedEventTests(SynchronousTestCase):
    def test_text_kept(self) -> None:
        """
        The event comes back with the worker's text, level and namespace,
        formatted as the worker would show it: an object's repr, a format
        spec kept (Twisted's own flattening drops it).
        """

        class Thing:
            def __repr__(self) -> str:
                return "<a thing>"

        line = written(
            lambda log: log.warn("saw {thing!r} {count} in {elapsed:.3f}s", thing=Thing(), count=3, elapsed=0.12345)
        )
        event = relay.relayed_event(line.rstrip(b"\n"), 2)
        assert event is not None
        self.assertEqual(formatEvent(event), "saw <a thing> 3 in 0.123s")
        self.assertEqual((event["log_level"], event["log_namespace"]), (LogLevel.warn, "oaiproxy.example"))
        self.assertEqual(event["oaiproxy_worker"], 2)

    def test_failure_kept(self) -> None:
        """
        A logged failure's traceback crosses too, the exception's message
        in it.
        """

        def fail(log: Logger) -> None:
            try:
                raise ZeroDivisionError("counting")
            except ZeroDivisionError:
                log.failure("while counting")

        event = relay.relayed_event(written(fail).rstrip(b"\n"), 0)
        assert event is not None
        text = formatEvent(event)
        self.assertTrue(text.startswith("while counting\nTraceback"), text)
        self.assertIn("ZeroDivisionError: counting", text)

    def test_not_a_record(self) -> None:
        """
        A plain line (a JSON access entry), a broken record or a record of
        something other than an event is not an event: the caller passes
        it on as text.
        """
        for line in (b'{"request_id": "req_1"}', b"\x1e{not json", b"\x1e[1, 2]", b'\x1e{"log_namespace": 3}', b""):
            self.assertIsNone(relay.relayed_event(line, 0), line)

    def test_observer_writes_records(self) -> None:
        """
        The observer twistd installs in a relaying worker writes each event
        as one record on a line of standard output.
        """
        stream = io.StringIO()
        self.patch(relay.sys, "stdout", stream)
        Logger(namespace="n", observer=relay.observer()).info("one {x}", x=1)
        [line] = stream.getvalue().encode().splitlines()
        event = relay.relayed_event(line, 0)
        assert event is not None
        self.assertEqual(formatEvent(event), "one 1")
