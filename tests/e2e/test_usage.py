"""
C{GET /usage} end to end: the real daemon (C{twistd -n oaiproxy
--mock-upstream --workers 2}) on 127.0.0.1 over one SQLite ledger,
traffic driven by the official C{openai} SDK, then C{/usage} read from
each worker in turn with the admin key and with client keys.

Nothing sleeps for a fixed time: each wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional

import openai
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.access.clients import file_entry
from oaiproxy.fake.processes import SOURCE_ROOT, start_proxy
from tests.e2e.test_workers import only_running, workers_of
from tests.support import temp_dir

ADMIN_KEY = "oaiproxy-admin-e2e-0123456789abcdefghij"
ALICE_KEY = "oai-client-e2e-alice-0123456789abcdef"
BOB_KEY = "oai-client-e2e-bob-0123456789abcdefgh"
HOSTILE = 'team "x" </script><b>'
MESSAGES = [{"role": "user", "content": "hello proxy"}]
PRICES = os.path.join(SOURCE_ROOT, "docs", "prices.example.toml")


def get(base: str, path: str, key: Optional[str]) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    request = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(read: Callable[[], Any], wanted: Any, timeout: float = 40.0) -> None:
    """
    Poll C{read()} until it returns C{wanted}.
    """
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = read()
        if seen == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"{seen!r} is not {wanted!r}")


class UsageE2ETests(SynchronousTestCase):
    def test_workers_answer_from_the_shared_ledger(self) -> None:
        """
        Requests served by two workers are in every worker's answer once
        written: the admin sees every client (a hostile name as the same
        JSON string), a client only itself, with its budgets; another
        client's usage is a 403, an unknown key a 401, a bad window a 400.
        """
        cwd = temp_dir(self)
        keys = os.path.join(cwd, "clients.toml")
        with open(keys, "w") as f:
            f.write(file_entry("alice", ALICE_KEY) + "usd_per_month = 50.0\ntokens_per_day = 1000000\n")
            f.write(file_entry("bob", BOB_KEY))
            f.write(file_entry(HOSTILE, "oai-client-e2e-hostile-0123456789abc"))
        admin = os.path.join(cwd, "admin_key")
        with open(admin, "w") as f:
            f.write(ADMIN_KEY + "\n")
        proxy, base = start_proxy(
            cwd,
            [
                "--mock-upstream",
                "--workers",
                "2",
                "--client-keys-file",
                keys,
                "--admin-key-file",
                admin,
                "--usage-db",
                os.path.join(cwd, "usage.sqlite3"),
                "--prices-file",
                PRICES,
                "--log-format",
                "json",
            ],
            {},
        )
        self.addCleanup(proxy.stop)
        proxy.wait_until(lambda out: out.count("oaiproxy listening on") == 2)

        failures: list[BaseException] = []

        def chat(key: str) -> None:
            try:
                client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=20)
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=chat, args=(k,)) for k in [ALICE_KEY] * 6 + [BOB_KEY] * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.assertEqual(failures, [])

        def requests_by_client() -> dict[str, int]:
            status, body = get(base, "/usage", ADMIN_KEY)
            assert status == 200, body
            return {c["client"]: c["totals"]["requests"] for c in json.loads(body)["clients"]}

        def written() -> Optional[float]:
            status, body = get(base, "/metrics", ADMIN_KEY)
            match = re.search(rb"^oaiproxy_ledger_written_records_total (\S+)$", body, re.M)
            return float(match.group(1)) if match else None

        # Once every worker has written its requests (each flushes every
        # second), each worker, alone, answers with all of them.
        wait_for(written, 9.0)
        wanted = {"alice": 6, "bob": 3, HOSTILE: 0}
        for worker in workers_of(proxy.pid):
            with only_running(worker, workers_of(proxy.pid)):
                wait_for(requests_by_client, wanted)
        status, body = get(base, "/usage", ADMIN_KEY)
        document = json.loads(body)
        self.assertEqual(document["object"], "usage")
        self.assertTrue(document["ledger"])
        alice = next(c for c in document["clients"] if c["client"] == "alice")
        self.assertEqual([(d["model"], d["upstream"]) for d in alice["days"]], [("gpt-4o-mini", "default")])
        self.assertGreater(alice["totals"]["cost_usd"], 0)
        self.assertEqual({b["budget"] for b in alice["budgets"]}, {"usd_per_month", "tokens_per_day"})
        self.assertNotIn(b"</script>", body)

        status, body = get(base, "/usage", ALICE_KEY)
        self.assertEqual(status, 200)
        mine = json.loads(body)
        self.assertEqual([c["client"] for c in mine["clients"]], ["alice"])
        self.assertEqual(mine["clients"][0]["totals"]["requests"], 6)
        self.assertNotIn(b"bob", body)

        forbidden = {get(base, f"/usage?client={name}", ALICE_KEY) for name in ("bob", "nobody")}
        self.assertEqual(len(forbidden), 1)
        self.assertEqual(next(iter(forbidden))[0], 403)
        self.assertEqual(get(base, "/usage", "oai-client-not-a-key")[0], 401)
        self.assertEqual(get(base, "/usage", None)[0], 401)
        self.assertEqual(get(base, "/usage?since=3650d", ADMIN_KEY)[0], 400)
        self.assertEqual(get(base, "/usage?since=2026-01-01&since=7d", ADMIN_KEY)[0], 400)

        # In the access log, not in the client's request count.
        wait_for(lambda: '"path":"/usage"' in proxy.output, True)
        entries = [json.loads(line) for line in proxy.output.splitlines() if line.startswith("{")]
        reads = [e for e in entries if e.get("path") == "/usage"]
        self.assertEqual({e["route"] for e in reads}, {"usage"})
        self.assertIn("alice", {e["client"] for e in reads})
        self.assertNotIn(ADMIN_KEY, proxy.output)
        self.assertNotIn(ALICE_KEY, proxy.output)
