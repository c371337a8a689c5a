# -*- test-case-name: tests.upstream.test_bodies -*-
"""
Request bodies that go upstream while they are still arriving.

An audio upload can be as large as the body limit; holding it whole before
forwarding would cost its size in memory per upload and delay the upstream
call by the upload time.  L{BodyPipe} is the upload as an
L{IBodyProducer} for the upstream request: what the client sends is
written upstream as it comes, the client is paused while upstream is slow
(backpressure both ways), and only what arrives before upstream is ready
is held, in memory up to a bound and in a temporary file beyond it.

L{FormFields} reads the small text fields of a C{multipart/form-data}
body (C{model}, C{stream}) as it flows past, wherever they are relative to
the file, keeping at most a bounded prefix of each part.
"""

from __future__ import annotations

import re
import tempfile
from collections import deque
from typing import IO, Any, Callable, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import Attribute, implementer

from oaiproxy.errors import ApiError

__all__ = ["BodyPipe", "BodyRefused", "IStreamedBody", "FormFields", "form_boundary", "HOLD_BYTES"]

#: What is held in memory while upstream is not ready; beyond it, held
#: data goes to a temporary file.
HOLD_BYTES = 256 * 1024

#: The size of a read from the temporary file.
_READ = 64 * 1024


class BodyRefused(Exception):
    """
    The proxy refuses a body it was already forwarding: it grew past the
    limit (possible only without a C{Content-Length}, which is checked
    before the body is read), or it turned out malformed (a repeated
    C{model} field).  The upstream request fails, and the client gets
    C{error}.
    """

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.code)
        self.error = error


class IStreamedBody(IBodyProducer):
    """
    A request body still arriving as it is sent upstream.
    """

    def watch_progress(callback: Callable[[], None]) -> None:
        """
        Call C{callback} whenever upstream takes part of the body.
        """

    refusal = Attribute("The proxy's own error if it refused the body, else None.")

    sent = Attribute("Whether upstream began taking the body: then it cannot be sent again (no failover for it).")


@implementer(IStreamedBody)
class BodyPipe:
    """
    A request body on its way through: fed by the server side as chunks
    arrive, produced to the upstream connection.

    @param length: the body's declared length, or C{None} (chunked).
    @param pause_client: stop reading from the client (upstream is behind).
    @param resume_client: read from the client again.
    @param spool: makes the temporary file for held data (injected by
        tests).
    """

    def __init__(
        self,
        length: Optional[int],
        pause_client: Callable[[], None],
        resume_client: Callable[[], None],
        spool: Callable[[], IO[bytes]] = tempfile.TemporaryFile,
    ) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._spool = spool
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._file: Optional[IO[bytes]] = None
        self._file_read = 0
        self._file_size = 0
        self._consumer: Any = None
        self._done: Optional[Deferred[None]] = None
        self._paused = False
        self._client_paused = False
        self._complete = False
        self._stopped = False
        self._failure: Optional[Failure] = None
        self._observers: list[Callable[[bytes], None]] = []
        self._watchers: list[Callable[[Optional[Failure]], None]] = []
        self._progress: list[Callable[[], None]] = []

    def observe(self, observer: Callable[[bytes], None]) -> None:
        """
        Show C{observer} every chunk as it arrives (how the form fields are
        read without holding the body).
        """
        self._observers.append(observer)

    @property
    def sent(self) -> bool:
        """
        Whether an upstream connection began taking the body (its producer
        started): the body cannot go to another upstream after that.
        """
        return self._consumer is not None

    @property
    def refusal(self) -> Optional[ApiError]:
        """
        The proxy's own answer, if it refused the body (see L{fail}).
        """
        if self._failure is not None and self._failure.check(BodyRefused):
            error: ApiError = self._failure.value.error
            return error
        return None

    def notify(self, watcher: Callable[[Optional[Failure]], None]) -> None:
        """
        Tell C{watcher} when the body is complete (with C{None}) or has
        failed (with the failure), whether or not upstream is reading it.
        """
        self._watchers.append(watcher)

    def watch_progress(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} whenever upstream takes part of the body: the
        upstream is alive, though it has not answered yet (how the read
        timeout tells a slow upload from a silent upstream).
        """
        self._progress.append(callback)

    def _write_upstream(self, data: bytes) -> None:
        self._consumer.write(data)
        for callback in self._progress:
            callback()

    # The server side.

    def write(self, data: bytes) -> None:
        """
        A chunk of the body arrived from the client.
        """
        for observer in self._observers:
            observer(data)
        if self._stopped:
            return
        if self._consumer is not None and not self._paused and not self._held_bytes:
            self._write_upstream(data)
            return
        self._hold(data)

    def finish(self) -> None:
        """
        The whole body has arrived.
        """
        self._complete = True
        self._drain()
        for watcher in self._watchers:
            watcher(None)

    def fail(self, reason: Exception) -> None:
        """
        The body cannot be completed (see L{BodyRefused}): the upstream
        request fails with C{reason}.
        """
        if self._stopped:
            return
        self._failure = failure = Failure(reason)
        # Nothing more goes upstream, not even the rest of the chunk being
        # written when an observer refused the body.
        self._stopped = True
        self._discard()
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(failure)
        for watcher in self._watchers:
            watcher(failure)

    def close(self) -> None:
        """
        The client request is over: release what is held and never leave
        the client paused.
        """
        self._stopped = True
        self._discard()

    def _hold(self, data: bytes) -> None:
        self._held_bytes += len(data)
        if self._file is not None:
            self._file.seek(0, 2)
            self._file.write(data)
            self._file_size += len(data)
        else:
            self._held.append(data)
        if self._held_bytes <= HOLD_BYTES:
            return
        if self._consumer is None:
            if self._file is not None:
                return
            # Nobody can take the data yet (upstream is connecting, or the
            # model has not been seen): keep reading, on disk.
            self._file = self._spool()
            while self._held:
                chunk = self._held.popleft()
                self._file.write(chunk)
                self._file_size += len(chunk)
        elif not self._client_paused:
            # Upstream is slower than the client: slow the client down.
            self._client_paused = True
            self._pause_client()

    def _discard(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    # The upstream side (IBodyProducer).

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        if self._failure is not None:
            self._done = None
            done.errback(self._failure)
            return done
        self._drain()
        return done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        # The upstream request was cancelled or its connection lost; the
        # Deferred from startProducing must then never fire.
        self._done = None
        self.close()

    def _drain(self) -> None:
        """
        Write what is held, oldest first, while upstream takes it; finish
        when the body is complete and nothing is left.
        """
        consumer = self._consumer
        if consumer is None or self._stopped:
            return
        while not self._paused and self._held_bytes:
            if self._file is not None:
                self._file.seek(self._file_read)
                chunk = self._file.read(_READ)
                self._file_read += len(chunk)
                if self._file_read >= self._file_size:
                    self._file.close()
                    self._file = None
            else:
                chunk = self._held.popleft()
            self._held_bytes -= len(chunk)
            self._write_upstream(chunk)
        if self._held_bytes:
            return
        if self._client_paused:
            self._client_paused = False
            self._resume_client()
        if self._complete and self._done is not None:
            done, self._done = self._done, None
            done.callback(None)


_BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^";,\s]+))', re.IGNORECASE)
_DISPOSITION = re.compile(rb"^content-disposition:(.*)$", re.IGNORECASE | re.MULTILINE)
# RFC 6266: a disposition type, then "; name=value" parameters whose value
# is a token or a quoted string.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_PARAMETER = re.compile(rb";[ \t]*(" + _TOKEN + rb")[ \t]*=[ \t]*(" + _TOKEN + rb"|" + _QUOTED + rb")[ \t]*")
_DISPOSITION_VALUE = re.compile(
    rb"[ \t]*"
    + _TOKEN
    + rb"[ \t]*(?:;[ \t]*"
    + _TOKEN
    + rb"[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb")[ \t]*)*"
    rb"(?:;[ \t]*)?\r?"
)
_FOLDED = re.compile(rb"(?:^|\n)[ \t]")


def disposition_parameters(value: bytes) -> Optional[dict[bytes, bytes]]:
    """
    The parameters of a part's C{Content-Disposition} value, by lower-cased
    name (quoted values unquoted), or C{None} when parsers could read it
    differently: a value that is not C{type; name=value; ...}, a parameter
    given twice (C{name="model"; name="x"}: the first for some parsers, the
    last for others), a C{name*} (RFC 5987, decoded by some parsers and
    ignored by others) that does not say what C{name} says, or a name with
    a backslash (unescaped by some parsers only).
    """
    if _DISPOSITION_VALUE.fullmatch(value) is None:
        return None
    parameters: dict[bytes, bytes] = {}
    for raw_name, raw_value in _PARAMETER.findall(value):
        name = raw_name.lower()
        if name in parameters or (name == b"name" and b"\\" in raw_value):
            return None
        if raw_value.startswith(b'"'):
            raw_value = re.sub(rb"\\(.)", rb"\1", raw_value[1:-1])
        parameters[name] = raw_value
    if b"name*" in parameters:
        if parameters.get(b"name") != _ext_value(parameters[b"name*"]):
            return None
    return parameters


def _ext_value(value: bytes) -> Optional[bytes]:
    """
    An RFC 5987 C{charset'language'percent-encoded} value, as UTF-8; C{None}
    for one that cannot be read.
    """
    charset, sep, rest = value.partition(b"'")
    _, sep2, encoded = rest.partition(b"'")
    if not (sep and sep2):
        return None
    try:
        return unquote_to_bytes(encoded).decode(charset.decode("ascii")).encode("utf-8")
    except (LookupError, UnicodeError):
        return None


def form_boundary(content_type: bytes) -> Optional[bytes]:
    """
    The boundary of a C{multipart/form-data} content type, or C{None} for
    any other type.
    """
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    found = _BOUNDARY.findall(content_type)
    # Two boundaries: parsers disagree on which one counts, so the fields
    # the proxy reads might not be the ones upstream reads.
    if len(found) != 1:
        return None
    quoted, token = found[0]
    return quoted or token


class FormFields:
    """
    Reads the text fields of a multipart body as it streams past.

    Each part's first C{part_limit} bytes are kept until the next boundary;
    a part with a C{filename} (the upload itself) is skipped, and a longer
    text part is noted by name only, so memory stays bounded whatever the
    body's size.

    @ivar fields: the complete text fields seen so far, by name (the
        first value of a repeated one).
    @ivar suspect: names of fields whose value the proxy cannot vouch for:
        repeated (the proxy reads the first value, upstream may take the
        last), or too long to keep; C{*} for a part the proxy could not
        read at all.
    @ivar complete: the closing boundary has been seen.
    @ivar on_field: called with each text field's name as it completes.
    @ivar on_part: called as each part ends, whatever it was (a file, a
        part it could not read); the moment to look at L{suspect}, before
        the bytes that follow go anywhere.
    """

    def __init__(self, boundary: bytes, part_limit: int = 16 * 1024) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._limit = part_limit
        # The first boundary has no CRLF before it; pretend it does.
        self._buffer = b"\r\n"
        self._part: Optional[list[bytes]] = None
        self._kept = 0
        self._overflow = False
        self.fields: dict[str, str] = {}
        self.suspect: set[str] = set()
        self.complete = False
        self.on_field: Callable[[str], None] = lambda name: None
        self.on_part: Callable[[], None] = lambda: None

    def feed(self, data: bytes) -> None:
        if self.complete:
            return
        buffer = self._buffer + data
        size = len(self._delimiter)
        while True:
            at = buffer.find(self._delimiter)
            if at < 0:
                # Keep back only what could be the start of a delimiter.
                cut = max(len(buffer) - (size - 1), 0)
                break
            if len(buffer) < at + size + 2:
                # A delimiter, but not yet whether it is the closing one.
                cut = at
                break
            self._keep(buffer[:at])
            self._end_part()
            buffer = buffer[at + size :]
            if buffer.startswith(b"--"):
                self.complete = True
                return
            self._part, self._kept, self._overflow = [], 0, False
        self._keep(buffer[:cut])
        self._buffer = buffer[cut:]

    def _keep(self, data: bytes) -> None:
        if self._part is None or self._overflow or not data:
            return
        room = self._limit - self._kept
        if len(data) > room:
            # Keep the start (the part's headers), note the rest is lost.
            data, self._overflow = data[:room], True
        self._part.append(data)
        self._kept += len(data)

    def _end_part(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        self._read_part(part)
        self.on_part()

    def _read_part(self, part: list[bytes]) -> None:
        head, sep, value = b"".join(part).partition(b"\r\n\r\n")
        dispositions = _DISPOSITION.findall(head) if sep else []
        if len(dispositions) != 1:
            # No readable headers, or two dispositions upstream might read
            # differently.
            self.suspect.add("*")
            return
        parameters = disposition_parameters(dispositions[0])
        if parameters is None or _FOLDED.search(head) is not None:
            # A disposition parsers read differently (or folded over two
            # lines, which only some parsers join): whatever this part is to
            # the proxy, it may be the model to upstream.
            self.suspect.add("model")
            return
        if b"name" not in parameters:
            self.suspect.add("*")
            return
        name = parameters[b"name"].decode("utf-8", "replace")
        if b"filename" in parameters or b"filename*" in parameters:
            if name == "model":
                # Skipped as a file here, read as the model by a parser
                # that goes by the name.
                self.suspect.add("model")
            return
        if self._overflow or name in self.fields:
            self.suspect.add(name)
        else:
            self.fields[name] = value.decode("utf-8", "replace")
        self.on_field(name)
