"""
GET /v1/models and /v1/models/{id}: forwarded, and filtered for clients
with a model allow-list; an id that is not one path segment never goes
upstream; the filtered list is read through the one exchange path, bounded
in size and time, with upstream's refusal of the proxy's key kept from the
client.
"""

from __future__ import annotations

import gzip
import json
from typing import Any, Optional

import treq
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.config import Secret
from oaiproxy.errors import ApiError
from oaiproxy.fake.harness import CLIENT_KEY, UPSTREAM_KEY, Harness, pool_harness, registry
from oaiproxy.routes.models import filter_listing
from oaiproxy.upstream.exchange import COLLECT_LIMIT
from oaiproxy.upstream.pool import Upstream
from oaiproxy.upstream.styles import AzureStyle
from tests.tricks import ID_TRICKS

BEARER = {b"authorization": [b"Bearer " + CLIENT_KEY]}


class ModelsHarness(Harness):
    """
    The harness (whose default routes include the models), with a GET
    helper.
    """

    def get(self, case: SynchronousTestCase, path: str, headers: Any = BEARER) -> tuple[int, Any]:
        response, body = self.fetch(case, path, headers)
        return response.code, json.loads(body)

    def fetch(self, case: SynchronousTestCase, path: str, headers: Any = BEARER) -> tuple[IResponse, bytes]:
        d = self.proxy.request("GET", "http://proxy.test" + path, headers=headers)
        self.pump()
        response = case.successResultOf(d)
        content = treq.content(response)
        self.pump()
        return response, case.successResultOf(content)


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


class ModelIdTests(SynchronousTestCase):
    """
    An id below C{/models} is one path segment: every trick that would
    make it another upstream path (C{../files} reads the account's files
    with the shared key) is a 404 without asking upstream.
    """

    def test_tricks_never_go_upstream(self) -> None:
        """
        Each trick, below /v1/models and /models, with and without an
        allow-list (even one naming the trick), to OpenAI and to Azure, is
        an OpenAI-shaped 404 (code model_not_found, not to be retried),
        and upstream receives nothing.
        """
        tricks = ID_TRICKS + [("", "an empty id")]
        for models in (None, ["gpt-4o", "../files", ".."]):
            for style in (None, AzureStyle()):
                h = ModelsHarness(clients=registry(CLIENT_KEY, models=models), style=style)
                for trick, why in tricks:
                    for prefix in ("/v1/models/", "/models/"):
                        response, body = h.fetch(self, prefix + trick)
                        where = f"{prefix + trick} ({why}; allow-list {models}, {style})"
                        self.assertEqual(response.code, 404, where)
                        error = json.loads(body)["error"]
                        self.assertEqual(set(error), {"message", "type", "param", "code"}, where)
                        self.assertEqual(error["code"], "model_not_found", where)
                        self.assertIn("is not a model id", error["message"], where)
                        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"], where)
                self.assertEqual(h.fake.requests, [])

    def test_real_ids_are_forwarded(self) -> None:
        """
        Real ids (fine-tunes with colons, dated snapshots, Ollama tags, an
        odd character) go upstream as one segment.
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY])
        ids = [
            "o3",
            "ft:gpt-4o-mini:org:custom:abc123",
            "gpt-4o-2024-08-06",
            "llama3.1:8b",
            "my model",
            "v1.2.",
            ".hidden",
        ]
        for name in ids:
            h.fetch(self, "/v1/models/" + name.replace(" ", "%20"))
        self.assertEqual(
            [r.path for r in h.fake.requests],
            [
                "/v1/models/o3",
                "/v1/models/ft:gpt-4o-mini:org:custom:abc123",
                "/v1/models/gpt-4o-2024-08-06",
                "/v1/models/llama3.1:8b",
                "/v1/models/my%20model",
                "/v1/models/v1.2.",
                "/v1/models/.hidden",
            ],
        )


class ScriptedList(Resource):
    """
    An upstream whose model list the test writes by hand, chunk by chunk,
    to see what the proxy does while and after it arrives.

    @ivar request: the one request received, once it has arrived.
    @ivar lost: the request's connection was closed before it finished.
    """

    isLeaf = True

    def __init__(self, status: int = 200, gzipped: bool = False, length: Optional[int] = None) -> None:
        super().__init__()
        self._status = status
        self._gzipped = gzipped
        self._length = length
        self.request: Optional[Request] = None
        self.lost = False

    def render_GET(self, request: Request) -> int:
        self.request = request
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-request-id", b"req_scripted")
        if self._gzipped:
            request.setHeader(b"content-encoding", b"gzip")
        if self._length is not None:
            request.setHeader(b"content-length", b"%d" % (self._length,))
        request.notifyFinish().addErrback(lambda _: setattr(self, "lost", True))
        request.write(b"")
        return NOT_DONE_YET


class FilteredListTests(SynchronousTestCase):
    """
    A client with an allow-list gets upstream's list filtered: read whole,
    through the same exchange as every other request.
    """

    def harness(self, upstream: Optional[Resource] = None) -> ModelsHarness:
        return ModelsHarness(clients=registry(CLIENT_KEY, models=["gpt-4o-mini"]), upstream_resource=upstream)

    def test_refused_proxy_key(self) -> None:
        """
        Upstream's 401 (which quotes the end of the proxy's key) is the
        operator's problem: the client gets the 502 the chat path gives,
        not to be retried, without upstream's body; the operator gets a
        critical log line.
        """
        h = self.harness()
        h.credentials.replace(Secret(b"sk-proj-REVOKEDKEY0123456789tail"), h.credentials.clients)
        with capturedLogs() as logged:
            response, body = h.fetch(self, "/v1/models")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_auth_failed")
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])
        self.assertNotIn(b"tail", body)
        self.assertNotIn(b"Incorrect API key", body)
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logged))
        self.assertEqual(len(h.fake.requests), 1)
        self.assertEqual(h.records[-1].upstream_status, 401)

    def test_filtered_body_and_head(self) -> None:
        """
        The filtered list carries upstream's headers and its own length.
        """
        h = self.harness()
        response, body = h.fetch(self, "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["gpt-4o-mini"])
        self.assertEqual(response.length, len(body))
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"req_fake_1"])

    def test_upstream_errors_pass_through(self) -> None:
        """
        Any answer but a 200 is upstream's to give, as on every route.
        """
        upstream = ScriptedList(status=429)
        h = self.harness(upstream)
        d = h.proxy.request("GET", "http://proxy.test/v1/models", headers=BEARER)
        h.pump()
        assert upstream.request is not None
        upstream.request.write(b'{"error": {"message": "slow down", "type": "requests", "param": null, "code": null}}')
        upstream.request.finish()
        h.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 429)
        self.assertIn(b"slow down", self.successResultOf(treq.content(response)))

    def test_a_list_that_cannot_be_filtered(self) -> None:
        """
        A 200 that is not a list of models is never passed on unfiltered:
        it would show the client every model.
        """
        deep = b"[" * 100_000 + b"]" * 100_000
        for text in (b'{"data": 5}', b"not json", b'{"object": "list"}', deep):
            upstream = ScriptedList()
            h = self.harness(upstream)
            d = h.proxy.request("GET", "http://proxy.test/v1/models", headers=BEARER)
            h.pump()
            assert upstream.request is not None
            upstream.request.write(text)
            upstream.request.finish()
            h.pump()
            response = self.successResultOf(d)
            body = self.successResultOf(treq.content(response))
            self.assertEqual((response.code, json.loads(body)["error"]["code"]), (502, "upstream_bad_response"))

    def test_filter_never_raises(self) -> None:
        """
        Whatever the list holds, filtering gives the allowed models or the
        502 for an unreadable list, never an exception: entries that are
        not models with a string id are dropped; a body that is not a list
        of models (nesting deep enough to exhaust the recursion limit
        included) is the error.
        """
        allowed = frozenset(["a"])
        deep = b"[" * 100_000 + b"]" * 100_000
        mixed = filter_listing(200, b'{"data": [1, "a", {"id": "a"}, {"id": ["a"]}, {"id": 7}]}', allowed)
        assert isinstance(mixed, bytes), mixed
        self.assertEqual(json.loads(mixed)["data"], [{"id": "a"}])
        for text in (deep, b'{"data": null}', b'{"object": "list"}', b"\xff"):
            answer = filter_listing(200, text, allowed)
            self.assertIsInstance(answer, ApiError, text[:40])
            assert isinstance(answer, ApiError)
            self.assertEqual(answer.code, "upstream_bad_response")
        self.assertEqual(filter_listing(500, b"oops", allowed), b"oops")

    def test_size_cap_on_the_decoded_body(self) -> None:
        """
        A gzip bomb (a few KB that decode to more than the cap) is cut off
        at the cap: the proxy stops reading (upstream's connection closes
        before the body is over) and answers a 502 not to be retried.
        """
        upstream = ScriptedList(gzipped=True)
        h = self.harness(upstream)
        d = h.proxy.request("GET", "http://proxy.test/v1/models", headers=BEARER)
        h.pump()
        assert upstream.request is not None
        compressor = gzip.compress(b'{"object": "list", "data": [' + b" " * (COLLECT_LIMIT + 1))
        self.assertLess(len(compressor), COLLECT_LIMIT // 100)
        upstream.request.write(compressor)
        h.pump()
        self.assertTrue(upstream.lost, "the proxy went on reading past its cap")
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (502, "upstream_response_too_large"))
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])

    def test_idle_timeout_on_the_body(self) -> None:
        """
        An upstream that sends the head and part of the list, then nothing,
        is given up on after the read timeout: a 504, and the upstream
        connection closed.
        """
        upstream = ScriptedList()
        h = self.harness(upstream)
        d = h.proxy.request("GET", "http://proxy.test/v1/models", headers=BEARER)
        h.pump()
        assert upstream.request is not None
        upstream.request.write(b'{"object": "list", "data": [')
        h.pump()
        h.clock.advance(29)
        h.pump()
        self.assertNoResult(d)
        h.clock.advance(2)
        h.pump()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (504, "upstream_timeout"))
        self.assertTrue(upstream.lost)

    def test_client_leaving_closes_upstream(self) -> None:
        """
        A client that goes away while the list is read stops the read.
        """
        upstream = ScriptedList()
        h = self.harness(upstream)
        d = h.proxy.request("GET", "http://proxy.test/v1/models", headers=BEARER)
        h.pump()
        assert upstream.request is not None
        upstream.request.write(b'{"object": "list", "data": [')
        h.pump()
        d.cancel()
        h.pump()
        self.failureResultOf(d)
        self.assertTrue(upstream.lost)


def _entry(name: str, **fields: Any) -> Upstream:
    return Upstream(name, f"http://{name}.test/v1", Secret(f"sk-proj-KEY{name.upper()}".encode()), **fields)


class PoolModelsTests(SynchronousTestCase):
    """
    C{/v1/models} with several upstreams: the union of what the pool
    serves, filtered by the client's allow-list.
    """

    def get(self, h: Harness, path: str) -> tuple[int, Any]:
        d = h.proxy.request("GET", "http://proxy.test" + path, headers=BEARER)
        h.pump()
        response = self.successResultOf(d)
        content = treq.content(response)
        h.pump()
        return response.code, json.loads(self.successResultOf(content))

    def test_configured_lists_answered_by_the_proxy(self) -> None:
        """
        When every entry says what it serves (a C{models} list, or an
        Azure deployment map), the list is theirs, answered without asking
        any upstream: names, not globs.
        """
        h, fakes = pool_harness(
            _entry("openai", models=("gpt-4o", "gpt-4o-*")),
            _entry("vllm", models=("llama-3.1-8b",), model_map={"llama-3.1-8b": "meta-llama/Llama-3.1-8B"}),
            Upstream(
                "azure",
                "http://azure.test",
                Secret(b"azure-key"),
                style="azure",
                models=("gpt-4o-mini",),
                model_map={"gpt-4o-mini": "prod-4o-mini"},
            ),
        )
        status, body = self.get(h, "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["data"]], ["gpt-4o", "gpt-4o-mini", "llama-3.1-8b"])
        self.assertEqual(body["data"][1], {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "azure"})
        self.assertEqual(self.get(h, "/v1/models/llama-3.1-8b")[1]["id"], "llama-3.1-8b")
        status, body = self.get(h, "/v1/models/mistral")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))
        self.assertEqual([r for f in fakes.values() for r in f.requests], [])
        # A model only a glob covers is asked of the upstream whose glob it is.
        status, body = self.get(h, "/v1/models/gpt-4o-2099")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))
        self.assertEqual([r.path for r in fakes["openai"].requests], ["/v1/models/gpt-4o-2099"])

    def test_allow_list_filters_the_union(self) -> None:
        """
        A client with an allow-list sees the union less its other models.
        """
        h, _ = pool_harness(
            _entry("openai", models=("gpt-4o", "o3")),
            _entry("vllm", models=("llama-3.1-8b",)),
            clients=registry(CLIENT_KEY, models=["o3", "llama-3.1-8b"]),
        )
        self.assertEqual([m["id"] for m in self.get(h, "/v1/models")[1]["data"]], ["llama-3.1-8b", "o3"])
        self.assertEqual(self.get(h, "/v1/models/gpt-4o")[0], 404)

    def test_upstream_without_a_list_is_asked_and_merged(self) -> None:
        """
        An entry without a C{models} list serves what its upstream says:
        its list is asked (of a healthy one: the first answers 503 and the
        request fails over) and merged with the configured names, then
        filtered by the allow-list.
        """
        h, fakes = pool_harness(
            _entry("broken"),
            _entry("openai", priority=1),
            _entry("vllm", models=("llama-3.1-8b", "o3")),
            clients=registry(CLIENT_KEY, models=["gpt-4o", "o3", "llama-3.1-8b"]),
        )
        fakes["broken"].set_mode({"mode": "status", "status": 503})
        status, body = self.get(h, "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["data"]], ["gpt-4o", "o3", "llama-3.1-8b"])
        self.assertEqual(body["data"][1]["owned_by"], "openai")
        self.assertEqual([len(f.requests) for f in fakes.values()], [1, 1, 0])
        # Asked of every entry that could serve it: the no-list ones.
        self.assertEqual(self.get(h, "/v1/models/gpt-4o")[1]["id"], "gpt-4o")

    def test_azure_deployments_listed(self) -> None:
        """
        A single Azure upstream with a deployment map lists the map's
        models (Azure's own list names base models, not deployments),
        without asking it.
        """
        h = ModelsHarness(client_keys=[CLIENT_KEY], style=AzureStyle(None, {"gpt-4o": "prod-4o", "o3": "prod-o3"}))
        self.assertEqual([m["id"] for m in h.get(self, "/v1/models")[1]["data"]], ["gpt-4o", "o3"])
        self.assertEqual(h.get(self, "/v1/models/o3")[1]["owned_by"], "azure")
        self.assertEqual(h.get(self, "/v1/models/gpt-4o-mini")[0], 404)
        self.assertEqual(h.fake.requests, [])
