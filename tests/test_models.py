"""
GET /v1/models and /v1/models/{id}: forwarded, and filtered for clients
with a model allow-list.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.trial.unittest import SynchronousTestCase

from tests.support import CLIENT_KEY, UPSTREAM_KEY, Harness, registry

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


class ModelsHarness(Harness):
    """
    The harness (whose default routes include the models), with a GET
    helper.
    """

    def get(self, case: SynchronousTestCase, path: str, headers: Any = BEARER) -> tuple[int, Any]:
        d = self.proxy.request("GET", "http://proxy.test" + path, headers=headers)
        self.pump()
        response = case.successResultOf(d)
        return response.code, json.loads(case.successResultOf(treq.content(response)))


class ModelsTests(SynchronousTestCase):
    def test_list_forwarded(self) -> None:
        """
        Without an allow-list the client sees upstream's list, at /v1/models
        and /models alike, fetched with the proxy's key.
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY])
        for path in ("/v1/models", "/models"):
            status, body = h.get(self, path)
            self.assertEqual(status, 200)
            self.assertEqual([m["id"] for m in body["data"]], ["gpt-4o", "gpt-4o-mini", "o3"])
        self.assertEqual(h.fake.requests[0].headers["authorization"], ["Bearer " + UPSTREAM_KEY.decode()])
        self.assertEqual((h.fake.requests[0].method, h.fake.requests[0].path), ("GET", "/v1/models"))

    def test_one_model(self) -> None:
        """
        /v1/models/{id} is forwarded, upstream's 404 included.
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY])
        self.assertEqual(h.get(self, "/v1/models/o3")[1]["id"], "o3")
        status, body = h.get(self, "/v1/models/nope")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))

    def test_allow_list_filters(self) -> None:
        """
        A client with an allow-list sees only its models, and any other is a
        404 for it without asking upstream.
        """
        h = ModelsHarness(clients=registry(CLIENT_KEY, models=["gpt-4o-mini", "not-upstream"]))
        status, body = h.get(self, "/v1/models")
        self.assertEqual((status, [m["id"] for m in body["data"]]), (200, ["gpt-4o-mini"]))
        requests_before = len(h.fake.requests)
        status, body = h.get(self, "/v1/models/o3")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))
        self.assertEqual(len(h.fake.requests), requests_before)
        self.assertEqual(h.get(self, "/v1/models/gpt-4o-mini")[1]["id"], "gpt-4o-mini")

    def test_same_access_rules_as_chat(self) -> None:
        """
        No key, a wrong key or an OpenAI key are refused as for chat, and a
        wrong method is a 405.
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY])
        self.assertEqual(h.get(self, "/v1/models", headers={})[0], 401)
        status, body = h.get(
            self,
            "/v1/models",
            headers={b"authorization": [b"Bearer sk-proj-" + b"x" * 58 + b"T3Blbk" + b"FJ" + b"y" * 58]},
        )
        self.assertEqual((status, body["error"]["code"]), (401, "openai_key_not_accepted"))
        d = h.proxy.request("POST", "http://proxy.test/v1/models", headers=BEARER, data=b"{}")
        h.pump()
        self.assertEqual(self.successResultOf(d).code, 405)
        self.assertEqual(h.fake.requests, [])

    def test_records_route(self) -> None:
        """
        Model list requests are logged and counted under route "models".
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY])
        h.get(self, "/v1/models")
        self.assertEqual([(r.route, r.client, r.status) for r in h.records], [("models", "client-1", 200)])
