"""
oaiproxy: a self-hosted OpenAI API proxy that keeps the API key on the
proxy host.  Start it with C{twistd -n oaiproxy}; see L{oaiproxy.daemon.tap}.

Importing this package is cheap and never imports the reactor, because
twistd imports it while it scans for plugins.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
