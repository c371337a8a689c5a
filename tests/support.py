"""
Helpers for the tests only: temporary directories, a self-signed
certificate, multipart bodies, one whole request through the harness.

The in-memory harness itself is L{oaiproxy.fake.harness}, over the
daemon's own wiring; its names are re-exported here for the branches that
still import them from this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import treq
from twisted.web.iweb import IResponse

from oaiproxy.fake.harness import CLIENT_KEY as CLIENT_KEY  # re-exported for branches in flight
from oaiproxy.fake.harness import UPSTREAM_KEY as UPSTREAM_KEY
from oaiproxy.fake.harness import Harness
from oaiproxy.fake.harness import chat_body as chat_body
from oaiproxy.fake.harness import registry as registry

__all__ = ["exchange", "form", "self_signed_pem", "temp_dir"]


def temp_dir(case: Any) -> str:
    """
    A fresh directory removed after the test.  (trial's C{mktemp} is
    relative to the working directory, which under pytest is the checkout.)
    """
    path = tempfile.mkdtemp(prefix="oaiproxy-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


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
