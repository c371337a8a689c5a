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
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/oaiproxy_plugin.py"]},
    install_requires=[
        # Twisted's "tls" extra brings pyOpenSSL, service_identity and idna,
        # without which treq cannot verify an https upstream's certificate.
        "Twisted[tls]>=24.7.0",
        "treq>=23.11.0",
        # The metric types and the exposition format; /metrics itself is a
        # small twisted.web resource of ours.
        "prometheus_client>=0.17",
        # A faster JSON parser for request bodies and usage (see
        # oaiproxy/fastjson.py, which falls back to the standard library).
        "orjson>=3.9",
        # The client keys file is TOML; Python 3.11 reads it natively.
        'tomli>=1.1; python_version < "3.11"',
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "openai>=1.40", "hypothesis>=6"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
