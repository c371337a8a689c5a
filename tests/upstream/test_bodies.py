"""
L{BodyPipe} (an upload on its way upstream) and L{FormFields} (its text
fields, read in passing).
"""

from __future__ import annotations

import io
from typing import IO

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH

from oaiproxy.errors import body_too_large
from oaiproxy.upstream.bodies import HOLD_BYTES, BodyPipe, BodyRefused, FormFields, form_boundary
from tests.support import form


class _Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class _Client:
    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


class BodyPipeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = _Client()
        self.spooled: list[IO[bytes]] = []

        def spool() -> IO[bytes]:
            f = io.BytesIO()
            self.spooled.append(f)
            return f

        self.pipe = BodyPipe(None, self.client.pause, self.client.resume, spool)

    def test_length(self) -> None:
        """
        The declared length is the producer's; no length means chunked.
        """
        self.assertIs(self.pipe.length, UNKNOWN_LENGTH)
        self.assertEqual(BodyPipe(10, self.client.pause, self.client.resume).length, 10)

    def test_held_until_upstream_is_ready_then_spooled(self) -> None:
        """
        Before upstream reads, the body is held: in memory up to a bound,
        then in a temporary file, and the client is never paused (nothing
        could resume it).  Everything comes out in order.
        """
        chunks = [bytes([i]) * 100_000 for i in range(8)]
        for chunk in chunks:
            self.pipe.write(chunk)
        self.assertFalse(self.client.paused)
        self.assertEqual(len(self.spooled), 1)
        self.assertGreater(len(self.spooled[0].getvalue()), HOLD_BYTES)
        consumer = _Consumer()
        done = self.pipe.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), b"".join(chunks))
        self.assertNoResult(done)
        self.pipe.write(b"tail")
        self.pipe.finish()
        self.assertEqual(b"".join(consumer.data), b"".join(chunks) + b"tail")
        self.successResultOf(done)
        self.assertTrue(self.spooled[0].closed)

    def test_paused_upstream_pauses_the_client(self) -> None:
        consumer = _Consumer()
        self.pipe.startProducing(consumer)
        self.pipe.pauseProducing()
        self.pipe.write(b"a" * HOLD_BYTES)
        self.assertFalse(self.client.paused)
        self.pipe.write(b"b")
        self.assertTrue(self.client.paused)
        self.assertEqual(self.spooled, [])
        self.pipe.resumeProducing()
        self.assertFalse(self.client.paused)
        self.assertEqual(b"".join(consumer.data), b"a" * HOLD_BYTES + b"b")

    def test_spooled_then_paused_upstream_pauses_the_client(self) -> None:
        """
        Once data went to the temporary file (upstream was connecting), a
        slow upstream still slows the client down: the file does not grow
        at the client's pace.
        """
        self.pipe.write(b"s" * (HOLD_BYTES + 1))
        consumer = _Consumer()

        class PausesOnce:
            """
            Upstream's buffer fills on the first write.
            """

            def write(inner, data: bytes) -> None:
                first = not consumer.data
                consumer.write(data)
                if first:
                    self.pipe.pauseProducing()

        self.pipe.startProducing(PausesOnce())
        self.assertEqual(len(consumer.data), 1)
        self.assertFalse(self.client.paused)
        self.pipe.write(b"t" * (HOLD_BYTES + 1))
        self.assertTrue(self.client.paused)
        self.pipe.resumeProducing()
        self.assertEqual(b"".join(consumer.data), b"s" * (HOLD_BYTES + 1) + b"t" * (HOLD_BYTES + 1))
        self.assertFalse(self.client.paused)

    def test_failure(self) -> None:
        """
        A body that fails (too large) fails the upstream request, whether
        upstream was reading yet or not, and tells its watchers.
        """
        seen = []
        self.pipe.notify(seen.append)
        done = self.pipe.startProducing(_Consumer())
        self.pipe.fail(BodyRefused(body_too_large(5)))
        self.failureResultOf(done, BodyRefused)
        self.assertEqual(seen[0].value.error.status, 413)
        late = BodyPipe(None, self.client.pause, self.client.resume)
        late.fail(BodyRefused(body_too_large(5)))
        self.failureResultOf(late.startProducing(_Consumer()), BodyRefused)

    def test_stop(self) -> None:
        """
        Upstream giving up never fires the producer's Deferred, drops what
        is held and lets the client be read again (to discard the rest).
        """
        done = self.pipe.startProducing(_Consumer())
        self.pipe.pauseProducing()
        self.pipe.write(b"x" * (HOLD_BYTES + 1))
        self.assertTrue(self.client.paused)
        self.pipe.stopProducing()
        self.assertFalse(self.client.paused)
        self.pipe.write(b"more")
        self.pipe.finish()
        self.assertNoResult(done)


class FormFieldsTests(SynchronousTestCase):
    def test_fields_around_a_file(self) -> None:
        """
        Text fields before and after a file are read, in any chunking; the
        file is skipped.
        """
        body, content_type = form([("model", "whisper-1"), ("file", b"\r\n--" + b"z" * 50_000), ("language", "en")])
        boundary = form_boundary(content_type)
        assert boundary is not None
        for size in (1, 13, 4096, len(body)):
            fields = FormFields(boundary)
            seen: list[str] = []
            fields.on_field = seen.append
            for i in range(0, len(body), size):
                fields.feed(body[i : i + size])
            self.assertEqual(fields.fields, {"model": "whisper-1", "language": "en"}, size)
            self.assertEqual(seen, ["model", "language"])
            self.assertTrue(fields.complete)

    def test_long_field_skipped(self) -> None:
        """
        A text part longer than the bound is not kept, but its name is
        noted: its value is one the proxy cannot vouch for.
        """
        body, content_type = form([("prompt", "p" * 200), ("model", "m")])
        fields = FormFields(form_boundary(content_type) or b"", part_limit=100)
        fields.feed(body)
        self.assertEqual(fields.fields, {"model": "m"})
        self.assertEqual(fields.suspect, {"prompt"})

    def test_suspect_parts(self) -> None:
        """
        A repeated field keeps its first value and is suspect; a part with
        two Content-Disposition headers (parsers disagree on which counts)
        or none makes the form suspect as a whole.
        """
        body, content_type = form([("model", "a"), ("model", "b")])
        fields = FormFields(form_boundary(content_type) or b"")
        fields.feed(body)
        self.assertEqual((fields.fields, fields.suspect), ({"model": "a"}, {"model"}))
        twice = (
            b'--b\r\nContent-Disposition: form-data; name="language"\r\n'
            b'Content-Disposition: form-data; name="model"\r\n\r\nx\r\n--b--\r\n'
        )
        fields = FormFields(b"b")
        fields.feed(twice)
        self.assertEqual((fields.fields, fields.suspect), ({}, {"*"}))

    def test_boundary(self) -> None:
        # RFC 2046 allows spaces in a quoted boundary.
        self.assertEqual(form_boundary(b'multipart/form-data; boundary="ab c"'), b"ab c")
        self.assertEqual(form_boundary(b"Multipart/Form-Data; charset=x; boundary=xyz"), b"xyz")
        self.assertIsNone(form_boundary(b"application/json"))
        self.assertIsNone(form_boundary(b"multipart/form-data"))
