# -*- test-case-name: tests.test_tap -*-
"""
The daemon's own log as JSON lines, for C{--log-format json}.

With C{--log-format json} the access log is one JSON object per line on
standard output, for log shippers; the daemon's other lines (its startup
report, warnings, Twisted's own "starting up" and "Main loop terminated",
anything written to C{sys.stdout} or C{sys.stderr}) would be text lines in
the same stream.  L{observer} is a twistd log observer factory
(C{twistd --logger oaiproxy.observe.jsonlog.observer}) that writes each of them as
one JSON object per line instead, so every line on standard output parses
as JSON.  L{oaiproxy.daemon.tap.Options} selects it for C{--log-format json}
whenever twistd would log to standard output (C{--nodaemon}, no
C{--logfile}).

A record holds C{time} (Unix seconds), C{level}, C{namespace}, C{message}
(the text a text log would show), and C{traceback} for a logged failure;
an access entry is told apart by its C{request_id}.  The event's other
fields are left out: the message is what the daemon chose to show.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, TextIO

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

__all__ = ["JsonLogObserver", "observer", "OBSERVER_NAME"]

#: The name twistd's C{--logger} takes for L{observer}.
OBSERVER_NAME = "oaiproxy.observe.jsonlog.observer"


@implementer(ILogObserver)
class JsonLogObserver:
    """
    Write each log event as one JSON object on a line.

    @param stream: where lines go.
    @param now: the clock for an event without a time.
    """

    def __init__(self, stream: TextIO, now: Callable[[], float] = time.time) -> None:
        self._stream = stream
        self._now = now

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": round(event.get("log_time") or self._now(), 3),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()


def observer() -> JsonLogObserver:
    """
    The log observer factory twistd calls (C{--logger}) as logging begins,
    while C{sys.stdout} is still the real standard output.
    """
    return JsonLogObserver(sys.stdout)
