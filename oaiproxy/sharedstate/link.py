# -*- test-case-name: tests.sharedstate.test_link,tests.access.test_shared,tests.e2e.test_shared_redis -*-
"""
The connection to the Redis that holds the state a group of processes
shares (client limits, upstream breakers, budgets).

  - L{redis_connector}: one connected, authenticated txredisapi protocol,
    through an endpoint on the I{injected} reactor (txredisapi's own
    connection functions use the global reactor and, with C{reconnect},
    wait forever on a dead server: its issue #112).  It names why a
    connection failed (L{SharedStateError}); L{check_shared_state} is the
    startup check built on it.
  - L{RedisLink}: the connection as a state.  Every call carries our own
    deadline (default 50 ms, on the injected clock): a missed deadline
    decides that call locally (L{Unavailable}) and is counted
    (C{missed}), but does not by itself drop the connection.  The link
    goes down (one critical log line per episode) when the connection is
    lost, or when Redis has sent no reply at all for the C{silence}
    interval while a call waits (default C{max(1 s, 10 x deadline)});
    while down no call is even tried, and a background reconnect with
    backoff brings it back up by itself.  Its users decide locally while
    it is down: see L{oaiproxy.access.shared}.
  - L{KeySpace}: every key under one prefix, so several groups can share
    one Redis; a name's keys share one hash tag (C{{name}}), so a Redis
    Cluster keeps each script's keys on one node.

Every change of state is a Lua script (C{scripts/}) run on Redis's clock
(C{TIME}), never a host's: hosts' clocks differ, Redis's is one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Optional, Sequence
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_PREFIX",
    "Connector",
    "KeySpace",
    "RedisLink",
    "RedisTarget",
    "SharedState",
    "SharedStateError",
    "Unavailable",
    "check_shared_state",
    "failed",
    "redis_connector",
    "script",
]

#: Seconds a call to Redis may take before the proxy decides without it:
#: a LAN round trip is well under a millisecond.
DEFAULT_DEADLINE = 0.05
#: The shortest silence (seconds without any reply while a call waits)
#: that takes the link down: a saturated proxy reads replies tens of
#: milliseconds late, a stopped Redis sends none at all.
MIN_SILENCE = 1.0
DEFAULT_PREFIX = "oaiproxy:"

_log = Logger()
#: The Lua scripts, in C{oaiproxy/sharedstate/scripts/}: every one is
#: loaded on connecting, so calls send EVALSHA.
SCRIPTS = (
    "admit",
    "settle",
    "renew",
    "breaker_read",
    "breaker_open",
    "breaker_close",
    "breaker_probe",
    "budget_admit",
    "budget_settle",
    "budget_read",
    "budget_release",
)


@functools.lru_cache(maxsize=None)
def script(name: str) -> bytes:
    """
    The Lua script C{name} (package data: C{oaiproxy/sharedstate/scripts/}),
    read once.
    """
    return resources.files("oaiproxy.sharedstate").joinpath("scripts", name + ".lua").read_bytes()


class SharedStateError(Exception):
    """
    The shared state cannot be used, and why, for an operator.

    @ivar reason: C{"refused"}, C{"timeout"}, C{"unresolved"}, C{"tls"},
        C{"auth"}, C{"database"} or C{"protocol"}.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"shared state: {reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Unavailable(Exception):
    """
    A call was not answered in time, or the link is down.
    """


@dataclass(frozen=True)
class RedisTarget:
    """
    Where the shared state lives: from C{redis://host:port/db} or
    C{rediss://} (TLS, verified against C{ca_file} or the platform's
    roots).  The password never comes from the URL's text in a log: it is
    kept out of the repr.
    """

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    ca_file: Optional[str] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, password: Optional[str] = None, ca_file: Optional[str] = None) -> "RedisTarget":
        """
        @param password: from a file or a systemd credential; wins over one
            in the URL.
        @raise ValueError: for anything but a redis:// or rediss:// URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"the shared state URL must start with redis:// or rediss://, not {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("the shared state URL names no host")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the shared state URL's database must be a number, not {path!r}")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path or 0),
            tls=parts.scheme == "rediss",
            ca_file=ca_file,
            username=unquote(parts.username) if parts.username else None,
            password=password if password is not None else (unquote(parts.password) if parts.password else None),
        )


class _Protocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol on our clock (its class attribute C{callLater}
    is the global reactor's), remembering why its connection was lost.
    """

    factory: Any = None
    lost: Optional[Failure] = None
    #: Set by L{RedisLink}: told of every reply Redis sends, late ones
    #: too (txredisapi hands a late reply to the already timed-out
    #: Deferred, which ignores it), and of the connection's loss.
    on_reply: Optional[Callable[[], None]] = None
    on_lost: Optional[Callable[[Failure], None]] = None

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__(replyTimeout=None, convertNumbers=True)
        self.callLater = clock.callLater

    def replyReceived(self, reply: Any) -> None:
        # While connected only: connectionLost hands each waiting call a
        # ConnectionError through here, which is no reply from Redis.
        if self.connected and self.on_reply is not None:
            self.on_reply()
        super().replyReceived(reply)

    def connectionLost(self, why: Failure) -> None:
        self.lost = why
        super().connectionLost(why)
        if self.on_lost is not None:
            self.on_lost(why)


class _NoFactory:
    """
    What txredisapi's protocol calls on its factory; we do AUTH and
    SELECT ourselves, so it only matters if a server QUITs us.
    """

    isLazy = True

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        pass


def _classify(failure: Failure, target: RedisTarget, protocol: Optional[_Protocol]) -> SharedStateError:
    where = f"{target.host}:{target.port}"
    if protocol is not None and protocol.lost is not None:
        lost = protocol.lost
        if _is_tls(lost):
            return SharedStateError("tls", f"TLS with {where} failed: {lost.getErrorMessage()}")
    if _is_tls(failure):
        return SharedStateError("tls", f"TLS with {where} failed: {failure.getErrorMessage()}")
    if failure.check(netError.ConnectionRefusedError):
        return SharedStateError("refused", f"{where} refused the connection (is redis-server running there?)")
    if failure.check(netError.DNSLookupError):
        return SharedStateError("unresolved", f"cannot resolve {target.host!r}")
    if failure.check(netError.TimeoutError, DeferredTimeout, CancelledError):
        hint = " (a plain-text server behind rediss:// can look like this)" if target.tls else ""
        return SharedStateError("timeout", f"{where} did not answer in time{hint}")
    if failure.check(txredisapi.ResponseError):
        text = failure.getErrorMessage()
        if any(word in text.upper() for word in ("NOAUTH", "WRONGPASS", "PASSWORD", "AUTH")):
            return SharedStateError("auth", f"{where} refused the credentials: {text}")
        return SharedStateError("protocol", f"{where} answered an error: {text}")
    if protocol is not None and protocol.lost is not None:
        return SharedStateError("protocol", f"{where} closed the connection: {protocol.lost.getErrorMessage()}")
    return SharedStateError("protocol", f"{where}: {failure.getErrorMessage()}")


def _is_tls(failure: Failure) -> bool:
    try:
        from OpenSSL.SSL import Error as TLSError
    except ImportError:  # pragma: no cover (Twisted[tls] brings it)
        return False
    return failure.check(TLSError) is not None


Connector = Callable[[], "Deferred[Any]"]


def redis_connector(reactor: Any, target: RedisTarget, connect_timeout: float = 2.0) -> Connector:
    """
    A function that opens one connection to C{target} through the injected
    C{reactor}: TCP (or TLS, verified), then AUTH and SELECT, then a PING;
    its Deferred fires with the txredisapi protocol, or fails with a
    L{SharedStateError} naming why.  Cancelling it aborts the connection.
    """
    endpoint: Any = HostnameEndpoint(reactor, target.host, target.port, timeout=max(1, int(connect_timeout)))
    if target.tls:
        if target.ca_file:
            with open(target.ca_file, "rb") as ca:
                trust: Any = Certificate.loadPEM(ca.read())
        else:
            trust = platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(target.host, trustRoot=trust), endpoint)

    @inlineCallbacks
    def connect() -> Any:
        protocol: Optional[_Protocol] = None
        try:
            protocol = _Protocol(reactor)
            protocol.factory = _NoFactory()
            yield connectProtocol(endpoint, protocol)
            _no_delay(protocol.transport)
            if target.password is not None:
                if target.username:
                    yield protocol.auth(target.password, target.username)
                else:
                    yield protocol.auth(target.password)
            if target.db:
                try:
                    yield protocol.select(target.db)
                except txredisapi.ResponseError as e:
                    raise SharedStateError("database", f"cannot select database {target.db}: {e}") from None
            yield protocol.ping()
            # Loaded now, so the first calls send EVALSHA, not each a whole
            # script (a burst of EVALs at startup can miss the deadline).
            for name in SCRIPTS:
                sha = yield protocol.script_load(script(name))
                protocol.script_hashes.add(sha)
        except SharedStateError:
            _abort(protocol)
            raise
        except BaseException:
            failure = Failure()
            _abort(protocol)
            raise _classify(failure, target, protocol) from None
        return protocol

    return connect


def _no_delay(transport: Any) -> None:
    """
    Turn Nagle off: pipelined calls written while a reply is outstanding
    would otherwise wait for the server's delayed ACK (40 ms on Linux),
    almost the whole deadline.  Under TLS the TCP transport is one down.
    """
    for layer in (transport, getattr(transport, "transport", None)):
        if layer is not None and hasattr(layer, "setTcpNoDelay"):
            layer.setTcpNoDelay(True)
            return


def _abort(protocol: Optional[Any]) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abortConnection()


def check_shared_state(connect: Connector, clock: IReactorTime, deadline: float = 5.0) -> "Deferred[None]":
    """
    The startup check: connect, authenticate, select, PING, within
    C{deadline} seconds, then close.  Fails with a L{SharedStateError}
    whose message says why (refused, timeout, TLS, auth...): a configured
    shared state that is not there at startup is a configuration error.
    """

    @inlineCallbacks
    def check() -> Any:
        attempt = connect()
        attempt.addTimeout(deadline, clock)
        try:
            protocol = yield attempt
        except SharedStateError:
            raise
        except (DeferredTimeout, CancelledError):
            raise SharedStateError("timeout", f"no answer within {deadline} s") from None
        _abort(protocol)

    return check()


class KeySpace:
    """
    Every key the proxy writes, under one prefix.  Kinds: C{limits} (the
    client limits, L{oaiproxy.access.shared}), C{budget} (the budget totals,
    L{oaiproxy.access.sharedbudgets}) and C{breaker} (the upstream
    breakers).  A name is put inside a hash tag with its C{%}, C{{} and
    C{}} escaped, so no two names share a key and one name's keys share a
    cluster slot.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def key(self, kind: str, name: str, part: str) -> str:
        tag = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.prefix}{kind}:{{{tag}}}:{part}"

    def limits(self, client: str) -> tuple[str, str]:
        """
        A client's buckets (hash) and concurrency leases (sorted set).
        """
        return self.key("limits", client, "buckets"), self.key("limits", client, "leases")

    def budget(self, client: str, kind: str, period: str) -> str:
        """
        A client's total in one period (hash): C{day:2026-12-03},
        C{month:2026-12}, in the client's zone.
        """
        return self.key("budget", client, f"{kind}:{period}")

    def budget_marker(self, client: str, request: str) -> str:
        """
        What one admission reserved in Redis (hash), until it is settled
        or released (L{oaiproxy.access.sharedbudgets}).
        """
        return self.key("budget", client, f"r:{request}")


class RedisLink(Service):
    """
    One connection to Redis, as a state the proxy can read (L{up}).

    Calls are pipelined on one connection (Redis runs one command at a
    time anyway).  Each has a deadline on the injected clock: a call not
    answered in time fails with L{Unavailable} (its caller decides
    locally), so no request waits longer than the deadline.  A missed
    deadline alone leaves the connection up: on a saturated proxy (its
    own event loop queued tens of milliseconds) replies Redis sent in
    time are read late, and dropping the connection on each would make
    the link flap (measured: 61 episodes in 50 s of full load at 50 ms,
    C{bench/README.md}).  txredisapi matches replies to calls in order,
    so a late reply is consumed by its timed-out call and discarded.

    The link goes down when the connection is lost, or when C{silence}
    seconds (default C{max(1 s, 10 x deadline)}) pass with a call
    unanswered and no reply at all from Redis: a stopped or wedged Redis.
    A count of consecutive misses is not used: it grows with the request
    rate, not with how long Redis has been quiet.  While down, calls fail
    at once with L{Unavailable}, and reconnection is tried in the
    background after C{retry[0]} seconds, doubling up to C{retry[1]}.
    While up, a PING every C{keepalive} seconds finds a dead connection
    even when idle.

    @ivar up: the link is usable; the metrics read it.
    @ivar episodes: how many times it went down.
    @ivar missed: how many calls missed their deadline (decided locally).
    """

    log = Logger()

    def __init__(
        self,
        connect: Connector,
        clock: IReactorTime,
        deadline: float = DEFAULT_DEADLINE,
        retry: tuple[float, float] = (0.25, 5.0),
        keepalive: float = 5.0,
        name: str = "redis",
        silence: Optional[float] = None,
    ) -> None:
        self._connect = connect
        self._clock = clock
        self.deadline = deadline
        self.silence = max(MIN_SILENCE, 10 * deadline) if silence is None else silence
        self._retry = retry
        self._delay = retry[0]
        self._keepalive = keepalive
        self._where = name
        self._protocol: Any = None
        self._pending: Optional[IDelayedCall] = None
        self._attempt: Optional[Deferred[Any]] = None
        self._pinger: Optional[LoopingCall] = None
        self.up = False
        self.episodes = 0
        self.missed = 0
        self._down_since: Optional[float] = None
        self._first = True
        #: When Redis last replied (or the connection was made).
        self._heard = 0.0
        #: When the oldest call that missed its deadline since then was sent.
        self._waiting_since: Optional[float] = None
        self._silence_check: Optional[IDelayedCall] = None
        #: Called with C{True} when the link comes up, C{False} when it goes down.
        self.watchers: list[Callable[[bool], None]] = []
        #: Called once for each call that missed its deadline.
        self.late_watchers: list[Callable[[], None]] = []

    def startService(self) -> None:
        super().startService()
        self._try_connect()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._stop_pinger()
        self._stop_silence_check()
        self.up = False
        protocol, self._protocol = self._protocol, None
        _abort(protocol)
        return succeed(None)

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> "Deferred[Any]":
        """
        Run the Lua script C{name} (EVALSHA, or EVAL after a NOSCRIPT)
        within the deadline, or fail with L{Unavailable}.
        """
        if not self.up or self._protocol is None:
            return failed(Unavailable("the shared state is down"))
        protocol = self._protocol
        try:
            d: Deferred[Any] = protocol.eval(script(name), list(keys), list(args))
        except txredisapi.ConnectionError as e:
            self._lost(protocol, str(e))
            return failed(Unavailable(str(e)))
        return self._bounded(d, protocol)

    def ping(self) -> "Deferred[Any]":
        if not self.up or self._protocol is None:
            return failed(Unavailable("the shared state is down"))
        protocol = self._protocol
        try:
            d = protocol.ping()
        except txredisapi.ConnectionError as e:
            self._lost(protocol, str(e))
            return failed(Unavailable(str(e)))
        return self._bounded(d, protocol)

    def _bounded(self, d: "Deferred[Any]", protocol: Any) -> "Deferred[Any]":
        sent = self._clock.seconds()
        # Cancelling txredisapi's Deferred (what addTimeout does) leaves
        # its place in the reply queue: the late reply still goes to this
        # call, whose Deferred has fired already and ignores it.
        d.addTimeout(self.deadline, self._clock)

        def answered(result: Any) -> Any:
            self._replied(protocol)
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(txredisapi.ResponseError) and not failure.check(txredisapi.ConnectionError):
                # Redis answered, with an error: the link is fine; the caller
                # decides (a script error is a bug, logged there).
                self._replied(protocol)
                return failure
            if failure.check(DeferredTimeout):
                why = f"no answer within {self.deadline * 1000:g} ms"
                self._late(protocol, sent)
            else:
                why = failure.getErrorMessage()
                self._lost(protocol, why)
            return Failure(Unavailable(why))

        return d.addCallbacks(answered, failed)

    def _replied(self, protocol: Any) -> None:
        """
        Redis sent a reply (in time or late): it is alive, however late
        this process reads it.
        """
        if protocol is self._protocol:
            self._heard = self._clock.seconds()
            self._waiting_since = None

    def _late(self, protocol: Any, sent: float) -> None:
        """
        A call missed its deadline: counted, and Redis's silence watched
        from when it was sent (or its last reply, if later).
        """
        self.missed += 1
        for watcher in list(self.late_watchers):
            watcher()
        if protocol is not self._protocol or self._waiting_since is not None:
            return
        self._waiting_since = max(sent, self._heard)
        self._check_silence_at(self._waiting_since + self.silence)

    def _check_silence_at(self, when: float) -> None:
        if self._silence_check is not None and self._silence_check.active():
            return
        self._silence_check = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._check_silence)

    def _check_silence(self) -> None:
        self._silence_check = None
        since = self._waiting_since
        if since is None or self._protocol is None:
            return
        if self._clock.seconds() - since >= self.silence:
            self._lost(self._protocol, f"no reply for {self.silence:g} s")
        else:
            self._check_silence_at(since + self.silence)

    def _stop_silence_check(self) -> None:
        if self._silence_check is not None and self._silence_check.active():
            self._silence_check.cancel()
        self._silence_check = None
        self._waiting_since = None

    def _lost(self, protocol: Any, why: str) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        _abort(protocol)
        self._stop_pinger()
        self._stop_silence_check()
        if self.up:
            self.up = False
            self._episode_begins(why)
        self._schedule()

    def _episode_begins(self, why: str) -> None:
        """
        The shared state is gone (or was never there): one critical line
        and one watcher call per episode, however many calls fail in it.
        """
        self.episodes += 1
        self._down_since = self._clock.seconds()
        self.log.critical(
            "shared state at {where} unreachable ({why}): "
            "limits are local at a conservative share and breakers local until it is back",
            where=self._where,
            why=why,
        )
        for watcher in list(self.watchers):
            watcher(False)

    def _schedule(self) -> None:
        if not self.running or (self._pending is not None and self._pending.active()):
            return
        delay = self._delay
        self._delay = min(self._retry[1], self._delay * 2)
        self._pending = self._clock.callLater(delay, self._try_connect)

    def _try_connect(self) -> None:
        self._pending = None
        if not self.running or self._attempt is not None:
            return
        attempt = self._connect()
        attempt.addTimeout(max(self.deadline, 1.0), self._clock)
        self._attempt = attempt

        def connected(protocol: Any) -> None:
            self._attempt = None
            if not self.running:
                _abort(protocol)
                return
            self._protocol = protocol
            self._heard = self._clock.seconds()
            protocol.on_reply = lambda: self._replied(protocol)
            protocol.on_lost = lambda why: self._lost(protocol, why.getErrorMessage())
            self._delay = self._retry[0]
            self.up = True
            if self._first:
                self._first = False
                self.log.info("shared state at {where} connected", where=self._where)
            else:
                since = self._down_since
                self.log.warn(
                    "shared state at {where} is back after {seconds:.1f} s: limits and breakers are shared again",
                    where=self._where,
                    seconds=0.0 if since is None else self._clock.seconds() - since,
                )
            self._start_pinger()
            for watcher in list(self.watchers):
                watcher(True)

        def failed(failure: Failure) -> None:
            self._attempt = None
            if not self.running:
                # Cancelled by stopService: not an outage.
                return
            if self._first and self._down_since is None:
                # Never up yet: the first failure opens the episode.
                self._first = False
                self._episode_begins(failure.getErrorMessage())
            self._schedule()

        attempt.addCallbacks(connected, failed)

    def _start_pinger(self) -> None:
        if self._keepalive <= 0:
            return
        self._pinger = LoopingCall(lambda: self.ping().addErrback(lambda _: None))
        self._pinger.clock = self._clock
        self._pinger.start(self._keepalive, now=False)

    def _stop_pinger(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None


def failed(error: Exception) -> "Deferred[Any]":
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


@dataclass(frozen=True)
class SharedState:
    """
    What a process needs to share state with its group: the link (a
    service the daemon starts and stops), the key space, and how many
    processes are expected to share it (each takes C{1 / instances} of a
    limit while the link is down).
    """

    link: RedisLink
    keys: KeySpace
    instances: int = 1
