"""
The budget scripts against a real redis-server: an admission the proxy
gave up waiting for leaves the totals in Redis as they were, and a
settled one leaves exactly what it cost.
"""

from __future__ import annotations

import shutil

from twisted.internet import defer, reactor, task

from oaiproxy.access.budgetstore import BudgetHold
from oaiproxy.access.clients import Budgets, Client
from oaiproxy.access.sharedbudgets import SharedBudgetHold, SharedBudgetStore
from oaiproxy.ledger.prices import Price, PriceBook, Prices
from oaiproxy.sharedstate.link import KeySpace
from tests.e2e.test_shared_redis import RedisCase, started_link, until_up

SERVER = shutil.which("redis-server")
PRICES = Prices(PriceBook({"gpt-4o": Price(input=1.0, cached_input=0.5, output=4.0)}, None))


class SharedBudgetsRedisTests(RedisCase):
    @defer.inlineCallbacks
    def store(self, deadline: float = 0.05):
        link = started_link(self.redis.port, deadline)
        self.addCleanup(link.stopService)
        yield until_up(link)
        return SharedBudgetStore(reactor, PRICES, link, KeySpace("t:"), instances=1)

    @defer.inlineCallbacks
    def totals(self, store: SharedBudgetStore, client: Client):
        keys = store._keys(client, store.periods(client))
        reply = yield store.link.call("budget_read", keys, [])
        return [int(v) for v in reply]

    @defer.inlineCallbacks
    def test_late_admission_leaves_the_totals_as_they_were(self):
        store = yield self.store()
        c = Client("alice", b"", budgets=Budgets(tokens_per_day=1000))
        held = yield store.reserve(c, "gpt-4o", 20, 100)
        assert isinstance(held, SharedBudgetHold)
        held.settle(30)
        yield held.settled
        before = yield self.totals(store, c)
        assert before[:2] == [1, 30]
        # Redis paused for less than the link's silence: the admission
        # misses its deadline (decided locally), then runs when Redis
        # resumes, and the release sent after it gives its tokens back.
        self.redis.pause()
        try:
            late = yield store.reserve(c, "gpt-4o", 20, 100)
            assert isinstance(late, BudgetHold) and not isinstance(late, SharedBudgetHold)
            assert store.link.up
        finally:
            self.redis.pause(False)
        yield task.deferLater(reactor, 0.3, lambda: None)
        after = yield self.totals(store, c)
        assert after == before, (before, after)
        # No marker is left behind.
        keys = yield store.link._protocol.keys("t:budget:*:r:*")
        assert list(keys) == []
