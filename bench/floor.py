"""
The floor under any proxy built on Twisted's reactor: a byte relay that
does nothing a proxy could leave out.

    python bench/floor.py PORT UPSTREAM_HOST UPSTREAM_PORT [--buffered] [--reuseport]

Each client connection is held until its request's head and body (by
Content-Length) are in, then one upstream connection is opened, the
request's bytes are sent on it as they came, and every read from upstream
is written to the client as it came.  No HTTP is parsed beyond finding the
head's end and its length, no header is changed, nothing is checked,
metered, counted or logged: what remains is the reactor's dispatch of
each read (epoll, C{callWithLogger}, C{doRead}), the protocol calls, and
the kernel's loopback TCP.  By default a read from upstream goes to the
client's socket at once (C{writeSomeData} when nothing is waiting, as the
proxy sends stream chunks); C{--buffered} leaves it to C{transport.write},
which sends at the reactor's next turn.  C{--reuseport} listens with
C{SO_REUSEPORT}, so that several relays share one port and the kernel
spreads the connections among them, as among the proxy's workers.

bench/run.py runs it as the "floor" target of (c) and (d) (C{--floor}),
pinned like the proxy and fed the same streams, so its CPU per chunk and
memory per idle stream are what the proxy's could at best come down to
in this process model.  It is a measuring tool: it takes any request and
holds no key.

Its send at once is the proxy's own (C{send_now} of
C{oaiproxy.server.twisted_internals}, below C{write_now}'s chunk framing):
where that does not apply (something is waiting) it writes the usual way.
"""

from __future__ import annotations

import re
import socket
import sys
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from oaiproxy.server.twisted_internals import send_now

_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")
_HEAD_LIMIT = 65536


class Upstream(Protocol):
    """
    The upstream side: the request's bytes out as they came, each read back
    to the client.
    """

    def __init__(self, client: "Client") -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.upstream = self
        self.transport.write(self.client.pending)
        self.client.pending = b""

    def dataReceived(self, data: bytes) -> None:
        self.client.send(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


class UpstreamFactory(ClientFactory):
    """
    One upstream connection for C{client}; a failure to connect closes it.
    """

    def __init__(self, client: "Client") -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Upstream:
        return Upstream(self.client)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.client.transport.loseConnection()


class Client(Protocol):
    """
    The client side: held until its request is in, then relayed both ways.
    """

    upstream: Optional[Upstream] = None
    connecting = False

    def __init__(self, reactor: IReactorTCP, target: tuple[str, int], buffered: bool) -> None:
        self.reactor = reactor
        self.target = target
        self.buffered = buffered
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)
            return
        self.pending += data
        if self.connecting:
            return
        end = self.pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self.pending) > _HEAD_LIMIT:
                self.transport.loseConnection()
            return
        length = _LENGTH.search(self.pending, 0, end)
        if len(self.pending) < end + 4 + (int(length.group(1)) if length else 0):
            return
        self.connecting = True
        self.reactor.connectTCP(self.target[0], self.target[1], UpstreamFactory(self))

    def send(self, data: bytes) -> None:
        if self.buffered or not send_now(self.transport, data):
            self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class Relay(Factory):
    """
    A L{Client} for each connection, relaying to C{target} on C{reactor}.
    """

    def __init__(self, reactor: IReactorTCP, target: tuple[str, int], buffered: bool) -> None:
        self.reactor = reactor
        self.target = target
        self.buffered = buffered

    def buildProtocol(self, addr: Any) -> Client:
        return Client(self.reactor, self.target, self.buffered)


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    buffered = "--buffered" in argv
    port, host, upstream_port = (a for a in argv if not a.startswith("--"))
    relay = Relay(reactor, (host, int(upstream_port)), buffered)  # type: ignore[arg-type]
    if "--reuseport" in argv:
        shared = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        shared.bind(("127.0.0.1", int(port)))
        shared.listen(4096)
        shared.setblocking(False)
        listening = reactor.adoptStreamPort(shared.fileno(), socket.AF_INET, relay)  # type: ignore[attr-defined]
        shared.close()
    else:
        listening = reactor.listenTCP(int(port), relay, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"floor relay listening on http://127.0.0.1:{listening.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
