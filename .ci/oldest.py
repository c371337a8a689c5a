"""
Print pip constraints pinning every requirement of setup.py, the test extra
included, to the oldest version setup.py allows (its ">=" floor), for
.ci/run's oldest-versions run.  A requirement without a floor is an error:
every floor is to be proven.

Reads setup.py's literals without running it (setup() would build).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(;.*)?$")


def requirements(setup_py: str) -> list[str]:
    """
    Every string in setup()'s install_requires and extras_require.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(setup_py)):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            found.extend(n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and "=" in str(n.value))
    return found


def constraint(requirement: str) -> str:
    """
    C{"Twisted[tls]>=26.4.0"} -> C{"Twisted==26.4.0"} (pip constraints take
    no extras); an environment marker is kept.
    """
    match = _FLOOR.match(requirement)
    if match is None:
        raise SystemExit(f"setup.py: {requirement!r} has no plain '>=' floor to pin")
    name, _, version, marker = match.groups()
    return f"{name}=={version}{marker or ''}"


if __name__ == "__main__":
    setup_py = Path(sys.argv[1] if len(sys.argv) > 1 else "setup.py").read_text(encoding="utf-8")
    for line in requirements(setup_py):
        print(constraint(line))
