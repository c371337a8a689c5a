# -*- test-case-name: tests.observe.test_record_owners -*-
"""
Each field of L{RequestRecord} has one owner, the one module that writes
it (listed in L{oaiproxy.observe.records.OWNERS}): a second writer would
make a log line's meaning depend on which of them ran last.
"""

from __future__ import annotations

import ast
import re

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.observe.records import OWNERS, RequestRecord
from tests.test_layers import modules

#: What a record is called where it is written: C{record}, C{self.record},
#: C{self._record}, C{record_of(request)}.
_RECORD = re.compile(r"(^|\.|_)record(_of\(.*\))?$")


def writes(source: str) -> list[tuple[int, str]]:
    """
    The record fields that C{source} assigns, with the line of each.
    """
    fields = set(RequestRecord.__slots__)
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and part.attr in fields and _RECORD.search(ast.unparse(part.value)):
                    found.append((part.lineno, part.attr))
    return found


def foreign_writes() -> list[str]:
    """
    Every assignment of a record field outside its owner, as
    C{"module:line writes field (owned by owner)"}.
    """
    found = []
    for module, path in modules():
        if module == "oaiproxy.observe.records":
            continue
        for line, field in writes(path.read_text(encoding="utf-8")):
            if module not in OWNERS[field]:
                found.append(f"{module}:{line} writes {field} (owned by {', '.join(sorted(OWNERS[field]))})")
    return found


class OwnerTests(SynchronousTestCase):
    """
    L{OWNERS} against the assignments in the package.
    """

    def test_every_field_has_an_owner(self) -> None:
        """
        Every field is listed, and all but C{route} (labelled by the site on
        arrival, relabelled by admission) have exactly one owner.
        """
        self.assertEqual(set(OWNERS), set(RequestRecord.__slots__))
        shared = {field: owners for field, owners in OWNERS.items() if len(owners) != 1}
        self.assertEqual(shared, {"route": ("oaiproxy.server.site", "oaiproxy.access.admission")})

    def test_only_the_owner_writes(self) -> None:
        """
        No module assigns a field it does not own.
        """
        self.assertEqual(foreign_writes(), [])

    def test_a_foreign_write_is_seen(self) -> None:
        """
        The scan sees each spelling of a record being written.
        """
        source = (
            "record.model = 1\n"
            "self._record.usage = 2\n"
            "record_of(request).client = 3\n"
            "self.record.bytes_out += 4\n"
            "response.status = 5\n"
        )
        self.assertEqual(writes(source), [(1, "model"), (2, "usage"), (3, "client"), (4, "bytes_out")])
