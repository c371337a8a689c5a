"""
Packaging for oaiproxy.

The twistd plugin lives in C{twisted/plugins/}, which must stay a namespace
directory without C{__init__.py} (Twisted's own C{twisted.plugins} package
extends its C{__path__} to find it), so C{find_packages()} cannot see it and
it is listed by hand.  setuptools warns that C{twisted.plugins} has no
C{__init__.py}; that warning is expected.
"""

from setuptools import find_packages, setup

setup(
    name="oaiproxy",
    version="0.1.0",
    description="A self-hosted OpenAI API proxy on Twisted that keeps the API key on the proxy host",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    # Twisted 26.4 (the floor below) requires 3.9.12.
    python_requires=">=3.9.12",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/oaiproxy_plugin.py"],
        "oaiproxy.sharedstate": ["scripts/*.lua"],
        # The usage ledger's versioned schema deltas (oaiproxy/ledger/schema.py).
        "oaiproxy.ledger": ["schema/*/*.sql*"],
        # The dashboard's page, script, styles and vendored uPlot (with its
        # licence): static files, served as they are (oaiproxy/server/dashboard.py, oaiproxy/routes/live.py).
        "oaiproxy.server": ["static/*"],
    },
    # Each floor is the oldest version the suite passes on: .ci/run runs it
    # against exactly these (.ci/oldest.py pins them), and README's
    # Development section says why each is where it is.
    install_requires=[
        # Twisted's "tls" extra brings pyOpenSSL, service_identity and idna,
        # without which treq cannot verify an https upstream's certificate.
        # 25.5 added Site(parsePOSTFormSubmission=); 26.4 is the first whose
        # TLS server works with the pyOpenSSL its extra installs today
        # (25.5 mutates a used SSL context, which pyOpenSSL now refuses).
        "Twisted[tls]>=26.4.0",
        # 24.9 is the first that imports on Python 3.13 (older ones import
        # the cgi module, removed there).
        "treq>=24.9.0",
        # llhttp (Node's HTTP parser) frames upstream responses in
        # oaiproxy/upstream/http11.py; 0.6.0 is the oldest the agent's tests
        # were run on (and the first with Python 3.12 wheels).
        "httptools>=0.6",
        # The metric types and the exposition format; /metrics itself is a
        # small twisted.web resource of ours.
        "prometheus_client>=0.17.0",
        # A faster JSON parser for request bodies and usage (see
        # oaiproxy/fastjson.py, which falls back to the standard library).
        # Before 3.9.15 deeply nested input crashes the process
        # (CVE-2024-27454).
        "orjson>=3.9.15",
        # The client keys file is TOML; Python 3.11 reads it natively.
        'tomli>=1.1.0; python_version < "3.11"',
    ],
    extras_require={
        # openai 1.68: client.responses and streamed transcriptions, which
        # the end-to-end tests drive (before 1.55.3 it cannot use httpx 0.28).
        "test": [
            "pytest>=8.0.0",
            "pytest-twisted>=1.14.0",
            "openai>=1.68.0",
            "hypothesis>=6.0.0",
            "txredisapi>=1.6.0",
            # The PostgreSQL ledger tests run against a real server, so CI
            # never skips them (tests/ledger/test_schema.py, tests/e2e/test_ledger.py).
            "psycopg2-binary>=2.9.13",
            # The dashboard's browser tests drive Debian's chromium through its
            # chromedriver (tests/e2e/test_dashboard.py); 4.11 takes the
            # driver's path (Service) without Selenium Manager.
            "selenium>=4.11.0",
        ],
        # State shared through Redis (oaiproxy/sharedstate/).
        # txredisapi is the maintained Twisted-native Redis client: no
        # thread per call, no second event loop.  1.6.0 connects through
        # endpoints (ClientService), which we replace with our own on the
        # injected reactor; we use its protocol (replies, EVALSHA/NOSCRIPT).
        "redis": ["txredisapi>=1.6.0"],
        # A usage ledger in PostgreSQL (--usage-db postgresql://...); SQLite
        # needs nothing.  The binary wheel: no compiler or libpq headers.
        # 2.9.13 is the version the suite was written against; nothing
        # older has been tried (the oldest-versions run pins this one).
        "postgres": ["psycopg2-binary>=2.9.13"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
