# -*- test-case-name: tests.access.test_admission,tests.routes.test_chat,tests.routes.test_pending_admission -*-
"""
Admission: what a request passes before it may cost an upstream call.

In order: the proxy is not draining, the request carries a valid client key
(and no real OpenAI key anywhere), then the client's model allow-list and
its limits.  Each refusal is an OpenAI-shaped error set on the request.
The limits live in a L{oaiproxy.access.limits.LimitStore}, which may be a
round trip away (Redis), so L{Admission.answer} may answer with a
Deferred (with the in-process stores it answers at once); everything
before it is checked at once.
The routes call it (L{oaiproxy.routes.forwarding}) and, once a request is
admitted, hand it to the exchange (L{oaiproxy.upstream.exchange}): admission
never reaches the upstream itself.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from oaiproxy.access.budgets import Exhausted
from oaiproxy.access.budgetstore import BudgetedLimits, BudgetHold, BudgetStore, Unpriced
from oaiproxy.access.clients import Client, ClientRegistry, Credentials
from oaiproxy.access.limits import UNLIMITED, Held, Limiter, LimitStore, LocalLimitStore, Refusal
from oaiproxy.drain import Lifecycle
from oaiproxy.errors import (
    ApiError,
    draining,
    insufficient_quota,
    invalid_api_key,
    model_not_allowed,
    model_unpriced,
    openai_key_sent,
    rate_limited,
)
from oaiproxy.observe.records import record_of
from oaiproxy.upstream.headers import (
    bearer_token,
    bearer_tokens,
    openai_key_carrier,
    scope_openai_headers,
    url_carries_openai_key,
)
from oaiproxy.web import error_response

__all__ = ["Admission", "admission_gate", "authenticate"]

_log = Logger()


def authenticate(request: Request, credentials: Credentials) -> "Optional[Client] | ApiError":
    """
    Who is asking: the client whose key the request carries (C{None} when
    the proxy has no client keys), or the error to answer with.  A request
    carrying a real OpenAI key anywhere (a header, the URL) is refused
    either way; a configured client key is accepted whatever it looks like.
    The client's name goes on the request's record, for logs and metrics,
    and its entry decides the C{OpenAI-Organization} / C{OpenAI-Project}
    that go upstream.

    A request is asked about twice, by the site's gate when its headers
    are in and by its route: the second time the headers' answer is reused
    (about 5 µs), unless a reload replaced the clients meanwhile, and only
    the URL is looked at again (the gate may not know it yet).  Only an
    admission is remembered; a refusal is worked out (and logged) again.
    """
    clients = credentials.clients
    known: "Optional[tuple[ClientRegistry, Optional[Client]]]" = getattr(request, _AUTHENTICATED, None)
    if known is not None and known[0] is clients:
        # Its headers passed; the URL may have been unknown then.
        client = known[1]
        leaked = "the URL" if url_carries_openai_key(request.uri) else None
    else:
        known = None
        headers = request.requestHeaders
        token = bearer_token(headers)
        client = clients.identify(token) if (token is not None and len(clients)) else None
        if token is not None and client is not None:
            accepted: tuple[bytes, ...] = (token,)
        elif len(clients) and len(headers.getRawHeaders(b"authorization", ())) > 1:
            # Several Authorization headers: refused below, but a client's
            # key among them is not a leaked OpenAI key, whatever it looks like.
            accepted = tuple(key for key in bearer_tokens(headers) if clients.identify(key) is not None)
        else:
            accepted = ()
        leaked = openai_key_carrier(headers, request.uri, accepted)
    if leaked is not None:
        # Where, never what: the operator can tell the user to rotate it.
        _log.warn("refused a request carrying a real OpenAI API key in {where}; it should be rotated", where=leaked)
        return openai_key_sent(leaked)
    if len(clients) and client is None:
        return invalid_api_key()
    if known is None:
        if client is not None:
            # Who, never with what key.
            record_of(request).client = client.name
            scope_openai_headers(
                request.requestHeaders, client.organization, client.project, client.pass_openai_headers
            )
        setattr(request, _AUTHENTICATED, (clients, client))
    return client


#: The attribute of a request that holds its admission by L{authenticate}:
#: the clients it was decided against, and the client.
_AUTHENTICATED = "_oaiproxy_authenticated"


def admission_gate(credentials: Credentials) -> Callable[[Request], bool]:
    """
    The check a request passes as soon as its headers are in, before any
    of its body is read (see L{oaiproxy.server.site.ProxySite.admit}): the same
    key check as L{authenticate}, so a client without a valid key cannot
    make the proxy hold a body (its route then refuses it, by the same
    check, before the body).  The model allow-list cannot apply yet: every
    route names its model in the body.
    """

    def gate(request: Request) -> bool:
        return not isinstance(authenticate(request, credentials), ApiError)

    return gate


class Admission:
    """
    The admission every forwarded request passes, shared by every route.

    @param credentials: the clients allowed in (none: no client auth); read
        per request, so a reload applies at once.
    @param clock: the clock of the limits.
    @param lifecycle: tells whether the proxy is draining.
    @param store: where the clients' limits live, shared by every route
        (by default a fresh in-process L{Limiter} on C{clock}); a
        L{BudgetedLimits} brings the clients' budgets too, reserved once the
        limits admit a request.
    """

    log = Logger()

    def __init__(
        self,
        credentials: Credentials,
        clock: IReactorTime,
        lifecycle: Optional[Lifecycle] = None,
        store: Optional[LimitStore] = None,
    ) -> None:
        self._credentials = credentials
        self._lifecycle = lifecycle or Lifecycle()
        self._budgets: Optional[BudgetStore] = None
        if isinstance(store, BudgetedLimits):
            self._budgets = store.budgets
            store = store.limits
        self._store: LimitStore = store if store is not None else LocalLimitStore(Limiter(clock))

    def admit(self, request: Request, route: str) -> "Optional[Client] | bytes":
        """
        The client making the request (C{None} without client auth), or the
        body of the error already set on the request.  An admitted request's
        record is labelled with C{route}, the route serving it.
        """
        if self._lifecycle.draining:
            return error_response(request, draining())
        client = authenticate(request, self._credentials)
        if isinstance(client, ApiError):
            return error_response(request, client)
        record_of(request).route = route
        return client

    def answer(
        self,
        request: Request,
        client: Optional[Client],
        model: Optional[str],
        estimate: int,
        names_model: bool = True,
        prompt_estimate: Optional[int] = None,
    ) -> "Held | bytes | Deferred[Held | bytes]":
        """
        Check the client's allow-list for C{model} and take C{estimate}
        tokens (and a request, and a concurrency slot) from its limits.

        The allow-list is checked here and now; the limits are the store's
        answer, which may be a round trip away (Redis): then the answer is
        a Deferred, which never fails.  With the in-process stores it is
        the answer itself, with no Deferred made or called back (a chain
        of three cost about 4 µs a request).

        @param names_model: the request is about a model (false for reading
            a stored response: no allow-list applies, the limits do).
        @param prompt_estimate: the part of C{estimate} that is prompt (for
            its price in a dollar budget); by default all of it is priced
            as output, the dearer part.
        @return: the hold to settle when the response is over, or the body
            of the error already set on the request.
        """
        if client is None:
            return UNLIMITED
        if names_model and not client.allows(model):
            return error_response(request, model_not_allowed(client.name, model))
        budgets = self._budgets
        if budgets is not None and client.budgets.any and names_model:
            price = budgets.price(client, model)
            if isinstance(price, Unpriced):
                self.log.info("client {client} refused an unpriced model under a dollar budget", client=client.name)
                return error_response(request, model_unpriced(client.name, model, price.prices_file))
        prompt = 0 if prompt_estimate is None else prompt_estimate
        admitted = self._store.admit(client, estimate)
        if isinstance(admitted, Deferred):
            return admitted.addCallback(
                self._answered, request, client, model if names_model else None, prompt, estimate
            )
        return self._answered(admitted, request, client, model if names_model else None, prompt, estimate)

    def _answered(
        self,
        admitted: "Held | Refusal",
        request: Request,
        client: Client,
        model: Optional[str],
        prompt: int,
        estimate: int,
    ) -> "Held | bytes | Deferred[Held | bytes]":
        if isinstance(admitted, Refusal):
            self.log.info("client {client} over its {limit} limit", client=client.name, limit=admitted.limit)
            return error_response(
                request, rate_limited(admitted.message, admitted.retry_after, tuple(admitted.headers))
            )
        budgets = self._budgets
        if budgets is None or not client.budgets.any:
            # (No budget to reserve: every store answers None for it.)
            return admitted
        # Reserved only now, after the check of the limits: their answer
        # may have been a round trip away, and a budget reserved before it
        # would be held by requests the limits then refuse.  Locally the
        # check and the reservation are one step; in Redis, one script.
        held = budgets.reserve(client, model, prompt, estimate, record_of(request))
        if isinstance(held, Deferred):
            return held.addCallback(self._budgeted, admitted, request, client)
        return self._budgeted(held, admitted, request, client)

    def _budgeted(
        self, held: "Optional[BudgetHold] | Exhausted | Unpriced", admitted: Held, request: Request, client: Client
    ) -> "Held | bytes":
        if isinstance(held, (Exhausted, Unpriced)):
            # Its limits' hold goes back: the request never runs.
            admitted.settle(0)
            if isinstance(held, Unpriced):
                return error_response(request, model_unpriced(client.name, held.model, held.prices_file))
            self.log.info("client {client} over its {budget} budget", client=client.name, budget=held.budget)
            return error_response(request, insufficient_quota(held.message))
        return BudgetedLimits.both(admitted, held)
