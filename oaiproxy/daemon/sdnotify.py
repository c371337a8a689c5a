# -*- test-case-name: tests.test_lifecycle -*-
"""
The systemd notification protocol (sd_notify(3)), without a dependency.

A service with C{Type=notify} tells systemd how it is doing by sending
newline-separated C{KEY=VALUE} assignments in one datagram to the UNIX
socket named by C{$NOTIFY_SOCKET}.  The name may be a file system path or,
when it starts with C{@}, an abstract socket (the C{@} stands for a NUL
byte).  When the variable is unset the service is not under systemd and
every notification is silently skipped.
"""

from __future__ import annotations

import socket
import time
from typing import Mapping, Optional, Union

from twisted.logger import Logger

__all__ = ["Notifier", "notify_address", "encode"]

log = Logger()


def notify_address(value: Optional[str]) -> Union[str, bytes, None]:
    """
    The socket address for a C{$NOTIFY_SOCKET} value, or C{None} when
    there is nowhere to notify.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    return None


def encode(fields: Mapping[str, str]) -> bytes:
    """
    One notification datagram.  Values must be single lines: a newline
    would start a new, unintended assignment.
    """
    lines = []
    for key, value in fields.items():
        if "\n" in value:
            raise ValueError(f"sd_notify value for {key} must be one line")
        lines.append(f"{key}={value}")
    return "\n".join(lines).encode("utf-8")


class Notifier:
    """
    Sends notifications to systemd, if the process runs under it.

    @param address: from L{notify_address}; C{None} makes every call a
        no-op.
    """

    def __init__(self, address: Union[str, bytes, None]) -> None:
        self._address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Notifier":
        return cls(notify_address(environ.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str) -> None:
        """
        Send one datagram of C{KEY=VALUE} fields.  A failure to send is
        logged and otherwise ignored: losing a status line must never take
        the proxy down.
        """
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(encode(fields), self._address)
        except OSError as e:
            log.warn("could not notify systemd: {error}", error=e.strerror or str(e))

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def reloading(self) -> None:
        # systemd 253+ wants the monotonic time of the reload request too.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading configuration")

    def stopping(self, status: str) -> None:
        self.notify(STOPPING="1", STATUS=status)
