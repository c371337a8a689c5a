"""
End to end with a pool (issue 13): three fake upstreams, each a real
process (C{python -m oaiproxy.fake.upstream}) with its own key, behind the
real daemon (C{twistd -n oaiproxy --upstreams-file ...}), driven by the
official C{openai} SDK with its own retries off (C{max_retries=0}) unless a
test says otherwise, so that what the SDK sees is what the proxy did.

One upstream at a time is made to fail: killed, rate-limited with
C{retry-after}, hanging, or all of them at once.  Each test starts its own
daemon (0.4 s): every one of them leaves breakers open or an upstream
dead, which the next must not inherit.  Nothing sleeps: the tests wait on
events (a count reached, a state seen) in bounded loops with deadlines;
the only waits in real time are the upstream's own C{retry-after} and a
breaker's backoff, which the tests poll out.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake.processes import Process, start_fake_upstream, start_proxy
from oaiproxy.upstream.pool import worst_case_upstream_requests
from tests.support import temp_dir

CLIENT_KEY = "oaiproxy-client-E2EPOOLCLIENT"
NAMES = ("a", "b", "c")
KEYS = {name: f"sk-proj-E2EPOOLKEY{name.upper()}0123456789" for name in NAMES}
MESSAGES = [{"role": "user", "content": "hello pool"}]
REPLY = "This is a mock reply to: hello pool"
#: Bound on any one wait in these tests.
DEADLINE = 20.0


def http(
    method: str, url: str, body: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def until(condition: Callable[[], bool], what: str, step: Callable[[], None] = lambda: None) -> None:
    """
    Run C{step} until C{condition} holds, at most L{DEADLINE} seconds:
    each step is a request, so this waits on the proxy's answers, not on
    a timer.
    """
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        step()


class Fake:
    """
    One fake upstream process and its control routes.
    """

    def __init__(self, case: SynchronousTestCase, cwd: str, name: str, port: Optional[int] = None) -> None:
        args = ["--port", str(port)] if port is not None else []
        self.name = name
        self.process, self.url = start_fake_upstream(cwd, KEYS[name], *args)
        case.addCleanup(self.process.stop)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        self._control = self.url.rsplit("/v1", 1)[0] + "/_fake/"

    def mode(self, **mode: Any) -> None:
        status, body = http("POST", self._control + "mode", json.dumps(mode).encode())
        assert status == 200, body

    def chats(self) -> list[dict[str, Any]]:
        """
        The chat completions it received, in order, each with its C{at}.
        """
        status, body = http("GET", self._control + "requests")
        assert status == 200
        return [r for r in json.loads(body) if r["path"].endswith("/chat/completions")]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


class PoolTestCase(SynchronousTestCase):
    """
    Three fake upstreams, C{a}, C{b} and C{c}, equal, behind a daemon.
    """

    proxy_args: Sequence[str] = ("--read-timeout", "5")

    def setUp(self) -> None:
        self.cwd = temp_dir(self)
        self.fakes = {name: Fake(self, self.cwd, name) for name in NAMES}
        self.proxy, self.base = self.start_proxy(self.proxy_args)

    def start_proxy(self, args: Sequence[str]) -> tuple[Process, str]:
        path = f"{self.cwd}/upstreams.toml"
        with open(path, "w") as f:
            for name, fake in self.fakes.items():
                f.write(f'[[upstreams]]\nname = "{name}"\nurl = "{fake.url}"\nkey_env = "POOL_KEY_{name.upper()}"\n\n')
        env = {f"POOL_KEY_{name.upper()}": key for name, key in KEYS.items()}
        env["OAIPROXY_CLIENT_KEYS"] = CLIENT_KEY
        proxy, base = start_proxy(self.cwd, ["--upstreams-file", path, *args], env)
        self.addCleanup(proxy.stop)
        return proxy, base

    def client(self, **kwargs: Any) -> openai.OpenAI:
        options: dict[str, Any] = {"api_key": CLIENT_KEY, "max_retries": 0, "timeout": DEADLINE}
        options.update(kwargs)
        return openai.OpenAI(base_url=self.base + "/v1", **options)

    def chat(self, client: Optional[openai.OpenAI] = None, stream: bool = False) -> str:
        """
        One call through the SDK; the reply's text.
        """
        client = client or self.client()
        if not stream:
            completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            return completion.choices[0].message.content or ""
        chunks = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def health(self) -> dict[str, dict[str, Any]]:
        status, body = http("GET", self.base + "/health/upstreams", headers={"Authorization": "Bearer " + CLIENT_KEY})
        assert status == 200, body
        return {u["name"]: u for u in json.loads(body)["upstreams"]}

    def received(self) -> dict[str, int]:
        return {name: len(fake.chats()) for name, fake in self.fakes.items()}

    def burst(self, calls: int, workers: int, midway: Callable[[], None], at: int) -> list[BaseException]:
        """
        C{calls} SDK calls, alternately plain and streamed, from C{workers}
        threads; C{midway} runs once C{at} of them have completed, while
        the others are on their way.  Returns what the SDK raised.
        """
        errors: list[BaseException] = []
        replies: list[str] = []
        lock = threading.Lock()
        reached = threading.Event()
        todo = list(range(calls))

        def work() -> None:
            client = self.client()
            while True:
                with lock:
                    if not todo:
                        return
                    index = todo.pop()
                try:
                    reply = self.chat(client, stream=index % 2 == 1)
                except Exception as e:
                    with lock:
                        errors.append(e)
                    continue
                with lock:
                    replies.append(reply)
                    if len(replies) + len(errors) >= at:
                        reached.set()

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        try:
            self.assertTrue(reached.wait(DEADLINE), "the burst never got going")
            midway()
        finally:
            for thread in threads:
                thread.join(DEADLINE)
        self.assertEqual([r for r in replies if r != REPLY], [])
        return errors


class KillTests(PoolTestCase):
    def test_kill_one_during_a_burst(self) -> None:
        """
        One upstream killed (SIGKILL) while plain and streamed calls are on
        their way: every call succeeds, the survivors take them all.
        """
        before: dict[str, int] = {}

        def kill() -> None:
            before.update(self.received())
            self.fakes["b"].kill()

        errors = self.burst(calls=90, workers=6, midway=kill, at=30)
        self.assertEqual(errors, [])
        self.assertGreater(before["b"], 0)
        after = {name: len(self.fakes[name].chats()) for name in ("a", "c")}
        self.assertGreater(after["a"] + after["c"] - before["a"] - before["c"], 30)


class ModelsTests(PoolTestCase):
    def test_models_from_a_healthy_upstream(self) -> None:
        """
        client.models.list() with one upstream dead: the list comes from
        another (the entries have no models lists, so an upstream is asked),
        every time.
        """
        self.fakes["a"].kill()
        self.fakes["b"].mode(mode="status", status=503)
        for _ in range(5):
            self.assertEqual([m.id for m in self.client().models.list()], ["gpt-4o", "gpt-4o-mini", "o3"])


class RateLimitTests(PoolTestCase):
    def test_retry_after_is_honoured_then_one_probe(self) -> None:
        """
        An upstream answering 429 with C{retry-after: 2} receives nothing
        for 2 seconds, then exactly one probe, while three clients keep
        calling and never see an error; its second 429 keeps it out again.
        """
        limited = self.fakes["b"]
        limited.mode(mode="status", status=429, retry_after="2")
        errors: list[BaseException] = []
        stop = threading.Event()

        def call() -> None:
            client = self.client()
            while not stop.is_set():
                try:
                    self.chat(client)
                except Exception as e:
                    errors.append(e)

        # One client alone until the limited upstream has answered its 429:
        # calls already in flight to it when that 429 comes are not what is
        # tested (with several clients, two can reach it before it answers).
        client = self.client()
        until(lambda: len(limited.chats()) >= 1, "a call to the limited upstream", lambda: self.chat(client))
        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            # Each step of the waits is one more call from this thread too.
            until(lambda: len(limited.chats()) >= 2, "the probe after retry-after", lambda: self.chat(client))
            probe_at = limited.chats()[1]["at"]
            # Another second of traffic: no second probe (the first one's
            # 429 opened the breaker for 2 s again).
            until(
                lambda: time.time() >= probe_at + 1.0, "a second of traffic after the probe", lambda: self.chat(client)
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(DEADLINE)
        self.assertEqual(errors, [])
        seen = [r["at"] for r in limited.chats()]
        self.assertEqual(len(seen), 2, seen)
        self.assertGreaterEqual(seen[1] - seen[0], 2.0 - 0.05)
        self.assertGreater(sum(self.received().values()), 20)


class HangTests(PoolTestCase):
    proxy_args = ("--read-timeout", "10", "--first-byte-timeout", "0.5")
    margin = 1.0

    def streams_around(self, hanging: Fake) -> None:
        client = self.client(timeout=5.0)
        slowest = 0.0
        streams = 0

        def one() -> None:
            nonlocal slowest, streams
            started = time.monotonic()
            chunks = iter(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
            first = next(chunks)
            slowest = max(slowest, time.monotonic() - started)
            self.assertEqual(first.choices[0].delta.role, "assistant")
            self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), REPLY)
            streams += 1

        until(lambda: len(hanging.chats()) >= 2 or streams >= 30, "streams to reach the hanging upstream", one)
        self.assertGreaterEqual(len(hanging.chats()), 2)
        self.assertLess(slowest, 0.5 + self.margin)

    def test_hanging_upstream(self) -> None:
        """
        An upstream that accepts a stream and never answers: with
        C{--first-byte-timeout 0.5}, every stream's first chunk comes from
        another upstream within 0.5 s plus a margin, not at the read
        timeout (10 s).
        """
        self.fakes["b"].mode(mode="hang")
        self.streams_around(self.fakes["b"])

    def test_head_then_silence(self) -> None:
        """
        The same when the hanging upstream sends its response head at once
        and then no byte of the body: the head never reached the client,
        so the stream still fails over.
        """
        self.fakes["b"].mode(mode="hang-after-head")
        self.streams_around(self.fakes["b"])


class AllDownTests(PoolTestCase):
    def test_all_killed(self) -> None:
        """
        Every upstream dead: the SDK gets an OpenAI-shaped 502 at once,
        not after a timeout.
        """
        for fake in self.fakes.values():
            fake.kill()
        started = time.monotonic()
        with self.assertRaises(openai.APIStatusError) as caught:
            self.chat()
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(caught.exception.status_code, 502)
        body = caught.exception.body
        assert isinstance(body, dict)
        self.assertEqual(set(body), {"message", "type", "param", "code"})

    def test_all_failing_stays_within_the_bound(self) -> None:
        """
        Every upstream answering 503: the SDK, with its own default retries
        (3 tries), gets an OpenAI-shaped 503 within its deadline, and the
        upstreams together received no more requests than the documented
        worst case, 3 tries x 3 attempts.
        """
        for fake in self.fakes.values():
            fake.mode(mode="status", status=503)
        started = time.monotonic()
        with self.assertRaises(openai.InternalServerError) as caught:
            self.chat(self.client(max_retries=2, timeout=10.0))
        self.assertLess(time.monotonic() - started, 10.0)
        self.assertEqual(caught.exception.status_code, 503)
        body = caught.exception.body
        assert isinstance(body, dict)
        self.assertEqual(set(body), {"message", "type", "param", "code"})
        total = sum(self.received().values())
        self.assertGreater(total, 0)
        self.assertLessEqual(total, worst_case_upstream_requests(3, 3, 3))


class ComeBackTests(PoolTestCase):
    def test_one_comes_back(self) -> None:
        """
        An upstream killed until its breaker opens, then started again on
        its port: once the backoff is over a single probe reaches it and
        closes its breaker, and traffic returns to it.
        """
        gone = self.fakes["b"]
        gone.kill()
        client = self.client()
        until(lambda: self.health()["b"]["state"] == "open", "b's breaker to open", lambda: self.chat(client))
        back = Fake(self, self.cwd, "b", port=gone.port)
        self.fakes["b"] = back
        # The backoff (5 s less jitter) runs out in real time; each step is
        # a call, so the probe is whichever call comes first after it.
        until(lambda: len(back.chats()) >= 1, "the probe", lambda: self.chat(client))
        self.assertEqual(len(back.chats()), 1)
        self.assertEqual(self.health()["b"]["state"], "closed")
        for _ in range(30):
            self.assertEqual(self.chat(client), REPLY)
        self.assertGreaterEqual(len(back.chats()), 4)
