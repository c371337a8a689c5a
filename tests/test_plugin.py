"""
The twistd plugin: discoverable by twistd, and cheap to discover.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from oaiproxy.daemon import tap
from oaiproxy.fake.processes import child_env


class PluginTests(SynchronousTestCase):
    def plugin(self) -> IServiceMaker:
        found = [p for p in getPlugins(IServiceMaker) if p.tapname == "oaiproxy"]
        self.assertTrue(found, "twistd would not list oaiproxy")
        return found[0]

    def test_discovered(self) -> None:
        """
        twistd finds a plugin named oaiproxy that builds the service from
        oaiproxy.daemon.tap.
        """
        plugin = self.plugin()
        self.assertTrue(verifyObject(IPlugin, plugin))
        self.assertTrue(verifyObject(IServiceMaker, plugin))
        self.assertIs(plugin.options, tap.Options)
        self.assertIs(plugin.makeService, tap.makeService)

    def test_plugin_scan_does_not_import_the_reactor(self) -> None:
        """
        Listing plugins imports the plugin module but not the proxy or the
        reactor: twistd scans before it installs the reactor the user chose.
        """
        code = (
            "import sys\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
            "assert 'oaiproxy' in names, names\n"
            "print('reactor' if 'twisted.internet.reactor' in sys.modules else 'no-reactor')\n"
            "print('tap' if 'oaiproxy.daemon.tap' in sys.modules else 'no-tap')\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=child_env({}),
        ).stdout.split()
        self.assertEqual(output, ["no-reactor", "no-tap"])
