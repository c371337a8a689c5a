# -*- test-case-name: tests.routes.test_uploads,tests.routes.test_pending_admission -*-
"""
C{POST /v1/audio/transcriptions} and C{/v1/audio/translations}: audio
uploads, streamed upstream as they arrive.

The body is C{multipart/form-data}: a file and a few text fields
(C{model}, C{language}, C{stream}...).  The file is never held whole (see
L{oaiproxy.upstream.bodies}); the fields are read as they pass.  The model is needed
before anything goes upstream only when something depends on it (the
client has a model allow-list, or the upstream is Azure, where it picks the
deployment); then the request waits for the C{model} field, holding what
arrives meanwhile in a temporary file.  The official Python SDK sends the
model before the file, so the wait is a few hundred bytes; an SDK that
sends it after the file (the Node SDK with C{{file, model}}) waits for the
upload, still without holding it in memory.

Then the client's limits answer (L{oaiproxy.access.admission.Admission.
answer}), at once in-process, after a round trip with a shared store;
until they do, nothing goes upstream and what arrives is held the same
way (L{oaiproxy.upstream.bodies.BodyPipe}: in memory up to a bound, then in
a temporary file).  A refusal meanwhile (a second C{model} field, a body
over the limit, the client gone) ends the upload, and its hold is given
back as soon as admission answers.
"""

from __future__ import annotations

from typing import Optional

from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from twisted.web.server import NOT_DONE_YET, Request

from oaiproxy.access.clients import Client
from oaiproxy.access.limits import Held
from oaiproxy.errors import ApiError, bad_request
from oaiproxy.routes.forwarding import ForwardingResource
from oaiproxy.upstream.bodies import BodyPipe, BodyRefused, FormFields, form_boundary
from oaiproxy.web import error_response, query_of, read_body, send_error

__all__ = ["UploadResource"]


class UploadResource(ForwardingResource):
    """
    An upload route (L{ForwardingResource.route}).  The client's limits
    count the request (and the tokens its response reports); the model
    allow-list applies to the C{model} field.
    """

    def render_POST(self, request: Request) -> bytes | int:
        route = self.route
        client = self.admission.admit(request, route.label)
        if isinstance(client, bytes):
            return client
        boundary = form_boundary(request.getHeader(b"content-type") or b"")
        if boundary is None:
            return error_response(
                request,
                bad_request(
                    "This endpoint takes a multipart/form-data body (a file and its fields) with one boundary.",
                    None,
                    "invalid_content_type",
                ),
            )
        fields = FormFields(boundary)
        # The site's requests stream an upload's body (see
        # oaiproxy.server.site.ProxyRequest); a plain twisted.web one has none.
        pipe: Optional[BodyPipe] = getattr(request, "body_pipe", None)
        body: "bytes | IBodyProducer"
        if pipe is not None:
            pipe.observe(fields.feed)
            body = pipe
        else:
            # Not a streaming site (a plain twisted.web one): the body is
            # already complete.
            body = read_body(request)
            fields.feed(body)
        needs_model = (client is not None and client.models is not None) or self._upstream.style.needs_model(route)
        return _Upload(self, request, client, fields, body, pipe, needs_model).begin()


def _untrusted_model() -> ApiError:
    return bad_request(
        "The 'model' field must appear once, as a short text field, in a well-formed multipart body.",
        "model",
        "invalid_value",
    )


class _Upload:
    """
    One upload: waiting for its model if it must, then forwarded.

    Its fields keep being read while it is forwarded: a second C{model}
    field (which upstream might take instead of the checked first one)
    stops the upload with a 400.

    @ivar state: C{new}, C{waiting} (for the model), C{admitting} (for
        the client's limits), C{forwarded}, or C{answered} (by the proxy
        itself).
    """

    def __init__(
        self,
        resource: UploadResource,
        request: Request,
        client: Optional[Client],
        fields: FormFields,
        body: "bytes | IBodyProducer",
        pipe: Optional[BodyPipe],
        needs_model: bool,
    ) -> None:
        self._resource = resource
        self._request = request
        self._client = client
        self._fields = fields
        self._body = body
        self._pipe = pipe
        self._needs_model = needs_model
        self.state = "new"
        self._watching = False
        fields.on_field = self._field
        fields.on_part = self._check
        for name in list(fields.fields):
            # Fields read before now (a body that was already complete).
            self._field(name)

    def begin(self) -> bytes | int:
        problem = self._problem()
        if problem is not None:
            self.state = "answered"
            return error_response(self._request, problem)
        model = self._fields.fields.get("model")
        if not self._needs_model or model is not None:
            return self._forward(model)
        if self._pipe is None or self._fields.complete:
            return self._no_model()
        self.state = "waiting"
        self._watch()
        return NOT_DONE_YET

    def _watch(self) -> None:
        """
        Answer, and release the held body, if the body fails or the client
        goes while the upload waits (for its model, or its admission).
        """
        if self._watching:
            return
        self._watching = True
        if self._pipe is not None:
            self._pipe.notify(self._body_over)
        self._request.notifyFinish().addErrback(self._gone)

    def _problem(self) -> Optional[ApiError]:
        """
        Why the form cannot be trusted to name the model upstream will use.
        """
        suspect = self._fields.suspect
        if "model" in suspect or (self._needs_model and "*" in suspect):
            return _untrusted_model()
        return None

    def _field(self, name: str) -> None:
        value = self._fields.fields.get(name)
        if name == "model" and value is not None:
            self._resource.note(self._request, model=value)
        elif name == "stream" and value is not None:
            self._resource.note(self._request, stream=value.strip().lower() == "true")
        if name == "model" and self.state == "waiting" and self._problem() is None:
            self._answer(self._forward(value))

    def _check(self) -> None:
        """
        A part ended: refuse the upload if the form can no longer be
        trusted, before the bytes after it go upstream.
        """
        problem = self._problem()
        if problem is not None:
            self._refuse(problem)

    def _refuse(self, error: ApiError) -> None:
        if self.state in ("waiting", "admitting"):
            self.state = "answered"
            send_error(self._request, error)
        elif self.state == "forwarded" and self._pipe is not None:
            # The upstream request fails, and the exchange answers the
            # client with this error (see classify_upstream_failure).
            self._pipe.fail(BodyRefused(error))

    def _forward(self, model: Optional[str]) -> bytes | int:
        request = self._request
        resource = self._resource
        self.state = "admitting"
        admitted = resource.admission.answer(request, self._client, model, 0)

        def forward(held: Held) -> None:
            self.state = "forwarded"
            exchange = resource.exchange(request, resource.route, held)
            exchange.start(self._body, "POST", resource.route.path, model, query_of(request))

        def refused() -> None:
            self.state = "answered"

        result = resource.when_admitted(request, admitted, forward, refused)
        if self.state == "admitting":
            # Still pending: the body keeps being held meanwhile.
            self._watch()
        return result

    def _no_model(self) -> bytes:
        self.state = "answered"
        return error_response(
            self._request,
            bad_request("you must provide a model parameter.", "model", "missing_required_parameter"),
        )

    def _answer(self, result: bytes | int) -> None:
        """
        Send what a step decided, the resource having returned
        C{NOT_DONE_YET} already.
        """
        if isinstance(result, bytes):
            self._request.write(result)
            self._request.finish()

    def _body_over(self, failure: Optional[Failure]) -> None:
        """
        The whole body arrived, or was refused, while the request was
        still waiting for its model or its admission (a complete body then
        waits for the admission).
        """
        if self.state not in ("waiting", "admitting"):
            return
        if failure is None:
            if self.state == "waiting":
                self._answer(self._no_model())
        elif failure.check(BodyRefused):
            self.state = "answered"
            send_error(self._request, failure.value.error)

    def _gone(self, failure: Failure) -> None:
        if self.state in ("waiting", "admitting"):
            self.state = "answered"
        if self._pipe is not None:
            self._pipe.close()
