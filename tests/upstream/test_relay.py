"""
The body relay's flow control: a slow client pauses the upstream socket
(so the proxy's memory does not grow with a stream nobody reads), and a
pause the client causes is never mistaken for a silent upstream.
"""

from __future__ import annotations

import gc
from typing import Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from oaiproxy.upstream.relay import KEEPALIVE, BodyRelay, UpstreamIdle, _deadlines_of


class Consumer:
    """
    The part of a twisted.web request the relay writes to, recording what
    it is given.
    """

    def __init__(self) -> None:
        self.producer: Optional[IPushProducer] = None
        self.streaming: Optional[bool] = None
        self.written: list[bytes] = []

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def write(self, data: bytes) -> None:
        self.written.append(data)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = Consumer()
        self.upstream = StringTransport()
        self.outcomes: list[Optional[Failure]] = []
        self.relay = BodyRelay(self.consumer, self.clock, 10.0, self.outcomes.append)  # type: ignore[arg-type]
        self.relay.makeConnection(self.upstream)

    def test_chunks_written_immediately(self) -> None:
        """
        Every chunk is written to the client as it arrives.
        """
        self.relay.dataReceived(b"data: 1\n\n")
        self.assertEqual(self.consumer.written, [b"data: 1\n\n"])
        self.relay.dataReceived(b"data: 2\n\n")
        self.assertEqual(self.consumer.written, [b"data: 1\n\n", b"data: 2\n\n"])

    def test_client_backpressure_pauses_upstream(self) -> None:
        """
        The upstream transport is the client's streaming producer: when the
        client's buffers fill, reading from upstream stops, and resumes
        when the client catches up.
        """
        producer = self.consumer.producer
        assert producer is not None
        self.assertTrue(self.consumer.streaming)
        producer.pauseProducing()
        self.assertEqual(self.upstream.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.upstream.producerState, "producing")

    def test_pause_does_not_count_as_upstream_silence(self) -> None:
        """
        A client that keeps the stream paused longer than the read timeout
        does not get the stream killed for upstream silence.
        """
        producer = self.consumer.producer
        assert producer is not None
        producer.pauseProducing()
        self.clock.advance(60)
        self.assertEqual(self.upstream.producerState, "paused")
        self.assertEqual(self.outcomes, [])
        producer.resumeProducing()
        self.clock.advance(9.9)
        self.assertEqual(self.upstream.producerState, "producing")

    def test_silence_stops_upstream(self) -> None:
        """
        No data for the read timeout closes the upstream connection and
        reports L{UpstreamIdle}; each chunk restarts the count.
        """
        self.clock.advance(9)
        self.relay.dataReceived(b"x")
        self.clock.advance(9)
        self.assertEqual(self.upstream.producerState, "producing")
        self.clock.advance(1)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.relay.connectionLost(Failure(ResponseFailed([])))
        [outcome] = self.outcomes
        assert outcome is not None
        self.assertIsInstance(outcome.value, UpstreamIdle)

    def test_silence_counts_from_the_last_of_many_chunks(self) -> None:
        """
        However many chunks came, the timeout ends the read timeout after
        the last of them, not later; one timer is pending all along (a
        chunk only notes its time).
        """
        for _ in range(500):
            self.clock.advance(0.37)
            self.relay.dataReceived(b"x")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(9.99)
        self.assertEqual(self.upstream.producerState, "producing")
        self.clock.advance(0.01)
        self.assertEqual(self.upstream.producerState, "stopped")

    def test_silence_on_close_delimited_body(self) -> None:
        """
        A body without length or chunking ends at connection close, so the
        close the timeout causes looks like a normal end; it is still
        reported as a timeout, not passed off as a complete answer.
        """
        self.clock.advance(10)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.relay.connectionLost(Failure(PotentialDataLoss()))
        [outcome] = self.outcomes
        assert outcome is not None
        self.assertIsInstance(outcome.value, UpstreamIdle)

    def test_complete_body(self) -> None:
        """
        A body that ends normally, or by connection close without a length
        (HTTP/1.0 style), is complete; the idle timer is gone.
        """
        for reason in (ResponseDone(), PotentialDataLoss()):
            self.outcomes.clear()
            self.relay.connectionLost(Failure(reason))
            self.assertEqual(self.outcomes, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_broken_body(self) -> None:
        """
        A body cut off by upstream is reported as the failure it was.
        """
        failure = Failure(ResponseFailed([Failure(Exception("reset"))]))
        self.relay.connectionLost(failure)
        self.assertEqual(self.outcomes, [failure])

    def test_abort_stops_upstream(self) -> None:
        """
        When the client leaves, the relay closes the upstream connection
        and cancels its timer.
        """
        self.relay.abort()
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SharedTimerTests(SynchronousTestCase):
    """
    The relays of one clock share one delayed call (a C{DelayedCall} per
    open stream was about 0.4 KB of its memory), and each still times out
    on its own.
    """

    def relay(self, clock: Clock, seconds: float, keepalive: float = 0.0) -> tuple[BodyRelay, StringTransport]:
        upstream = StringTransport()
        relay = BodyRelay(Consumer(), clock, seconds, lambda outcome: None, keepalive=keepalive)  # type: ignore[arg-type]
        relay.makeConnection(upstream)
        return relay, upstream

    def test_each_stream_times_out_on_its_own(self) -> None:
        """
        Streams with different timeouts and chunk times each time out the
        read timeout after their own last chunk, with one delayed call
        pending for all of them.
        """
        clock = Clock()
        a, a_up = self.relay(clock, 10.0)
        clock.advance(3)
        b, b_up = self.relay(clock, 4.0)
        c, c_up = self.relay(clock, 30.0, keepalive=5.0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2)
        a.dataReceived(b"x")  # a: due at 15
        clock.advance(2.5)  # 7.5: b due at 7
        self.assertEqual((a_up.producerState, b_up.producerState), ("producing", "stopped"))
        clock.advance(7.4)  # 14.9
        self.assertEqual(a_up.producerState, "producing")
        clock.advance(0.1)
        self.assertEqual(a_up.producerState, "stopped")
        self.assertEqual(c_up.producerState, "producing")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(18)  # 33: c due at 33
        self.assertEqual(c_up.producerState, "stopped")
        c.connectionLost(Failure(ResponseFailed([])))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_finished_stream_kept_by_nothing(self) -> None:
        """
        A stream that ended is not kept alive by its timer's place among
        the deadlines while other streams' timers run.
        """
        clock = Clock()
        kept, _ = self.relay(clock, 60.0)
        ended, _ = self.relay(clock, 60.0)
        ended.connectionLost(Failure(ResponseDone()))
        del ended
        gc.collect()
        self.assertEqual(len([r for r in gc.get_objects() if type(r) is BodyRelay and r._timer._clock is clock]), 1)
        kept.connectionLost(Failure(ResponseDone()))

    def test_ended_streams_leave_no_entries(self) -> None:
        """
        Thousands of short requests beside one long stream leave the
        deadlines' heap bounded, not one entry per request ended.
        """
        clock = Clock()
        long_stream, _ = self.relay(clock, 600.0)
        for _ in range(5000):
            short, _ = self.relay(clock, 600.0)
            short.connectionLost(Failure(ResponseDone()))
            clock.advance(0.001)
        self.assertLessEqual(len(_deadlines_of(clock)._heap), 130)
        long_stream.connectionLost(Failure(ResponseDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class KeepaliveRelayTests(SynchronousTestCase):
    def test_comment_only_between_events(self) -> None:
        """
        A keepalive comment written inside an unfinished event would corrupt
        it: while upstream is silent in the middle of an event, nothing is
        sent; once the event is complete, the comment goes out.
        """
        clock, consumer = Clock(), Consumer()
        relay = BodyRelay(consumer, clock, 60.0, lambda outcome: None, keepalive=5.0)  # type: ignore[arg-type]
        relay.makeConnection(StringTransport())
        relay.dataReceived(b'data: {"a"')
        clock.advance(5)
        self.assertNotIn(KEEPALIVE, consumer.written)
        relay.dataReceived(b": 1}\n\n")
        clock.advance(5)
        self.assertEqual(consumer.written[-1], KEEPALIVE)
        clock.advance(5)
        self.assertEqual(consumer.written.count(KEEPALIVE), 2)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class TransformRelayTests(SynchronousTestCase):
    def test_partial_event_dropped_on_failure(self) -> None:
        """
        When upstream fails in the middle of an event, the half event the
        filter holds is dropped, so what the client has ends between
        events, where an error event can follow.
        """
        from oaiproxy.observe.usage import UsageEventFilter

        clock, consumer = Clock(), Consumer()
        relay = BodyRelay(consumer, clock, 60.0, lambda outcome: None, transform=UsageEventFilter())  # type: ignore[arg-type]
        relay.makeConnection(StringTransport())
        relay.dataReceived(b'data: {"a": 1}\n\ndata: {"b"')
        relay.connectionLost(Failure(ResponseFailed([])))
        self.assertEqual(b"".join(consumer.written), b'data: {"a": 1}\n\n')
        self.assertTrue(relay.at_boundary)

    def test_complete_body_flushes_the_rest(self) -> None:
        """
        A body that ends normally gets whatever the filter still holds.
        """
        from oaiproxy.observe.usage import UsageEventFilter

        clock, consumer = Clock(), Consumer()
        relay = BodyRelay(consumer, clock, 60.0, lambda outcome: None, transform=UsageEventFilter())  # type: ignore[arg-type]
        relay.makeConnection(StringTransport())
        relay.dataReceived(b'data: {"a": 1}\n\ndata: [DONE]')
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(b"".join(consumer.written), b'data: {"a": 1}\n\ndata: [DONE]')
