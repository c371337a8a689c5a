"""
In-memory wiring shared by the resource tests: the proxy's Resource tree
behind a C{StubTreq} (the client's view), forwarding through another
C{StubTreq} to a L{FakeUpstream}, with one L{Clock} for every timeout.

No sockets and no reactor: each request moves only when L{Harness.pump}
says so, which is what lets a test look at a stream between two chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Optional, Sequence

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.iweb import IResponse
from twisted.web.resource import IResource

from oaiproxy.access.admission import admission_gate
from oaiproxy.access.clients import Client, ClientRegistry, Credentials, Limits
from oaiproxy.access.limits import Limiter
from oaiproxy.config import Secret
from oaiproxy.daemon.lifecycle import Lifecycle
from oaiproxy.fake.upstream import FakeUpstream
from oaiproxy.observe.metrics import Metrics, MetricsResource
from oaiproxy.observe.records import RequestRecord
from oaiproxy.routes.jsonapi import api_resources, streamed_paths
from oaiproxy.routetable import BY_NAME, DEFAULT_ROUTES, in_order
from oaiproxy.server.site import ProxySite
from oaiproxy.server.tree import HealthResource, build_tree
from oaiproxy.upstream.client import TreqLike, UpstreamClient, http_client
from oaiproxy.upstream.styles import AzureStyle, UpstreamStyle


def temp_dir(case: Any) -> str:
    """
    A fresh directory removed after the test.  (trial's C{mktemp} is
    relative to the working directory, which under pytest is the checkout.)
    """
    path = tempfile.mkdtemp(prefix="oaiproxy-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


UPSTREAM_KEY = b"sk-proj-UPSTREAMSECRET0123456789"
CLIENT_KEY = b"oai-client-CLIENTSECRET42"
UPSTREAM_URL = "http://upstream.test/v1"
AZURE_URL = "http://example-resource.openai.azure.test"


def registry(*keys: bytes, limits: Optional[Limits] = None, models: Optional[Sequence[str]] = None) -> ClientRegistry:
    """
    Clients named C{client-1}, C{client-2}... for the given keys.
    """
    return ClientRegistry(
        [
            Client(
                name=f"client-{i}",
                key_sha256=hashlib.sha256(key).digest(),
                limits=limits or Limits(),
                models=frozenset(models) if models is not None else None,
            )
            for i, key in enumerate(keys, 1)
        ]
    )


def chat_body(model: str = "gpt-4o-mini", stream: bool = False, **more: Any) -> bytes:
    """
    A valid chat completions body.
    """
    document: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello proxy"}]}
    if stream:
        document["stream"] = True
    document.update(more)
    return json.dumps(document).encode()


class Harness:
    """
    A proxy wired to a fake upstream, entirely in memory.

    @ivar fake: the upstream resource (records requests, counts
        disconnects).
    @ivar clock: drives read timeouts and the fake's chunk pacing.
    """

    def __init__(
        self,
        *,
        client_keys: Sequence[bytes] = (),
        clients: Optional[ClientRegistry] = None,
        read_timeout: float = 30.0,
        chunk_interval: float = 0.0,
        http: Optional[TreqLike] = None,
        upstream_resource: Optional[IResource] = None,
        stream_usage: bool = True,
        sse_keepalive: float = 0.0,
        routes: Iterable[str] = DEFAULT_ROUTES,
        style: Optional[UpstreamStyle] = None,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.clock = Clock()
        azure = isinstance(style, AzureStyle)
        self.fake = FakeUpstream(self.clock, api_key=UPSTREAM_KEY, chunk_interval=chunk_interval, azure=azure)
        # The proxy's own client configuration (no cookies, one-write
        # bodies) over an in-memory agent instead of a connection pool.
        self.upstream_agent = RequestTraversalAgent(upstream_resource or self.fake)
        if clients is None:
            clients = registry(*client_keys)
        self.credentials = Credentials(Secret(UPSTREAM_KEY), clients)
        self.lifecycle = Lifecycle()
        self.upstream = UpstreamClient(
            http or http_client(self.upstream_agent),
            AZURE_URL if azure else UPSTREAM_URL,
            self.credentials,
            self.clock,
            read_timeout,
            style=style,
        )
        self.limiter = Limiter(self.clock)
        # The daemon's own wiring (oaiproxy.daemon.tap does the same).
        enabled = in_order(routes)
        self.api = api_resources(
            enabled,
            self.upstream,
            self.clock,
            self.credentials,
            self.lifecycle,
            10.0,
            self.limiter,
            stream_usage=stream_usage,
            sse_keepalive=sse_keepalive,
        )
        self.chat = self.api.get("chat/completions")
        self.metrics = Metrics()
        #: The record of every finished request, in order.
        self.records: list[RequestRecord] = []
        root = build_tree(
            self.api,
            HealthResource(self.lifecycle),
            MetricsResource(self.metrics),
            disabled=[name for name in BY_NAME if name not in self.api],
        )
        self.proxy = StubTreq(root)
        # StubTreq serves through a plain twisted.web Site; put the proxy's
        # own in its place, so requests are ProxyRequests on ProxyChannels
        # (records, metrics, request ids) on the harness's clock.
        self.site = self.proxy._agent._serverFactory = ProxySite(
            root,
            max_body_bytes=max_body_bytes,
            streamed_paths=streamed_paths(enabled),
            idle_timeout=600,
            header_timeout=600,
            gate=admission_gate(self.credentials),
            lifecycle=self.lifecycle,
            metrics=self.metrics,
            access_log=self.records.append,
            reactor=self.clock,
        )

    def pump(self) -> None:
        """
        Move every pending byte between client, proxy and upstream.  Ten
        rounds bound the loop; one request needs at most three.
        """
        for _ in range(10):
            self.proxy.flush()
            self.upstream_agent.flush()

    def post(
        self,
        body: bytes,
        path: str = "/v1/chat/completions",
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> "Deferred[IResponse]":
        """
        Send a POST to the proxy, unbuffered so a test sees a stream's
        chunks as they arrive; the request is pumped until it settles.
        """
        sent = {b"content-type": [b"application/json"]}
        sent.update(headers or {})
        d: Deferred[IResponse] = self.proxy.request(
            "POST",
            "http://proxy.test" + path,
            data=body,
            headers=sent,
            unbuffered=True,
            # Like the openai SDK (httpx), never follow a redirect.
            allow_redirects=False,
        )
        self.pump()
        return d


def self_signed_pem(directory: str) -> str:
    """
    Write a self-signed certificate for 127.0.0.1 with its key; return the
    file's path.  It is trusted nowhere unless a test says so.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        # Its own CA, so a test can make it trusted with SSL_CERT_FILE.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "upstream.pem")
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def exchange(
    case: Any,
    h: Harness,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[dict[bytes, list[bytes]]] = None,
) -> tuple[IResponse, bytes]:
    """
    One complete request through the harness: the response and its whole
    body.
    """
    d = h.proxy.request(method, "http://proxy.test" + path, data=body, headers=headers or {}, allow_redirects=False)
    h.pump()
    response = case.successResultOf(d)
    content = treq.content(response)
    h.pump()
    return response, case.successResultOf(content)


def form(fields: Sequence[tuple[str, Any]], boundary: bytes = b"oaiproxy-test-boundary") -> tuple[bytes, bytes]:
    """
    A multipart/form-data body and its content type; a C{bytes} value is a
    file.
    """
    parts = []
    for name, value in fields:
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="audio.wav"\r\nContent-Type: audio/wav'
            data = value
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', str(value).encode()
        parts.append(b"--" + boundary + b"\r\n" + head.encode() + b"\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary
