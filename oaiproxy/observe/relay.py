# -*- test-case-name: tests.observe.test_relay -*-
"""
A worker's log, carried into its supervisor's.

Under C{--workers} each worker is a C{twistd --nodaemon} child whose
standard output and standard error the supervisor reads.  Where the
supervisor's own log is that same standard output (C{-n} without
C{--logfile}: the systemd unit, a terminal), the workers' lines pass
through as they are, the cheapest way.  Anywhere else (daemonised, where
twistd points standard output at C{/dev/null}; C{--logfile};
C{--syslog}; an operator's C{--logger}) they would land where nobody
reads them, so each worker logs through L{observer} instead: every event
as one record of Twisted's JSON text sequence (C{jsonFileLogObserver}),
and the supervisor decodes
each record with L{relayed_event} and publishes it to its own log.  The
event keeps the worker's time, namespace, level and text (formatted in the
worker: L{shown_event}), so the log file reads as a single process's
would; an observer of the operator's own (C{--logger}) gets those, not the
event's other structured fields.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, cast

from twisted.logger import ILogObserver, eventFromJSON, formatEvent, jsonFileLogObserver
from zope.interface import implementer

__all__ = ["OBSERVER_NAME", "RECORD_SEPARATOR", "observer", "relayed_event", "shown_event"]

#: The name twistd's C{--logger} takes for L{observer}.
OBSERVER_NAME = "oaiproxy.observe.relay.observer"

#: What starts each record (RFC 7464), and so tells one from any other
#: line a worker writes (a JSON access entry, output before logging began).
RECORD_SEPARATOR = b"\x1e"


def shown_event(event: dict[str, Any]) -> dict[str, Any]:
    """
    What of an event crosses to the supervisor: its time, level, namespace
    and system, and its text as this process shows it, a failure's
    traceback (with the exception's message) appended.  The text is
    formatted here because Twisted's flattening keeps a field's value but
    not its format spec (C{{elapsed:.3f}}), and a failure's exception does
    not survive JSON; the other fields stay behind, so what the supervisor
    gets is what a log line shows and no more.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback()
        except Exception:
            text += "\n(unable to obtain traceback)"
    shown = {key: event[key] for key in _KEPT if key in event}
    shown["log_format"] = "{oaiproxy_text}"
    shown["oaiproxy_text"] = text
    return shown


_KEPT = ("log_time", "log_level", "log_namespace", "log_system")


def observer() -> ILogObserver:
    """
    The log observer factory a relaying worker's twistd calls
    (C{--logger}) as logging begins, while C{sys.stdout} is still the
    real standard output: each event's L{shown_event}, as a record of
    Twisted's JSON text sequence.
    """
    records = jsonFileLogObserver(sys.stdout)

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        records(shown_event(event))

    return cast(ILogObserver, observe)


def relayed_event(line: bytes, worker: int) -> Optional[dict[str, Any]]:
    """
    The log event a worker's output line carries, marked with the worker's
    index (C{oaiproxy_worker}); L{None} for a line that is not a record,
    or not a readable one, which the caller passes on as text.
    """
    if not line.startswith(RECORD_SEPARATOR):
        return None
    try:
        event = eventFromJSON(line[1:].decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("log_namespace", ""), str):
        return None
    event["oaiproxy_worker"] = worker
    return event
