"""
The C{oaiproxy} twistd plugin.

twistd imports every module in C{twisted/plugins/} to list plugins, so this
one only names the module that does the work; L{ServiceMaker} imports
C{oaiproxy.daemon.tap} (and with it the reactor and treq) when the plugin is run.
There is deliberately no C{__init__.py} beside it: Twisted's own
C{twisted.plugins} package finds this directory on C{sys.path}.
"""

from twisted.application.service import ServiceMaker

oaiproxy = ServiceMaker(
    # Display name in `twistd --help`.
    "oaiproxy",
    # Module with Options and makeService, imported only when used.
    "oaiproxy.daemon.tap",
    # One-line description for `twistd --help`.
    "OpenAI API proxy that keeps the API key on this host",
    # The subcommand: `twistd oaiproxy ...`.
    "oaiproxy",
)
