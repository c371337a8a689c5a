# -*- test-case-name: tests.test_layers -*-
"""
The package's layers, and the rule that keeps a request's path one way:
a module imports only from its own layer or the layers below it.

A module that reached up (an exchange importing a route, a route importing
the site) would make the next module added to a layer depend on all of
them; this test names the import that does, so the shape cannot rot.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

from twisted.trial.unittest import SynchronousTestCase

import oaiproxy

#: Top to bottom.  Each entry is a layer: the modules (or packages) in it.
#: The README's development map lists the same order.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("daemon", ("oaiproxy.daemon", "oaiproxy.fake", "oaiproxy.__main__")),
    ("server", ("oaiproxy.server",)),
    ("routes", ("oaiproxy.routes",)),
    ("access", ("oaiproxy.access",)),
    ("upstream", ("oaiproxy.upstream",)),
    ("sharedstate", ("oaiproxy.sharedstate",)),
    ("ledger", ("oaiproxy.ledger",)),
    ("observe", ("oaiproxy.observe",)),
    (
        "shared",
        (
            "oaiproxy.web",
            "oaiproxy.drain",
            "oaiproxy.routetable",
            "oaiproxy.errors",
            "oaiproxy.config",
            "oaiproxy.fastjson",
            "oaiproxy.keyshape",
            "oaiproxy",
        ),
    ),
]

PACKAGE = Path(oaiproxy.__file__).parent


def layer_of(module: str) -> int:
    """
    The index in L{LAYERS} of C{module} (0 is the top), by its longest
    matching entry.
    """
    best, index = "", -1
    for position, (_, members) in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > len(best):
                best, index = member, position
    if index < 0:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {__name__} and to the README's map")
    return index


def modules() -> Iterator[tuple[str, Path]]:
    """
    Every module of the package, by dotted name.
    """
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports_of(module: str, path: Path, source: Optional[str] = None) -> Iterator[tuple[int, str]]:
    """
    The modules that C{module} (at C{path}, or as C{source}) imports, with
    the line of each import, wherever the statement is (a function's body
    too); relative imports are resolved.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "oaiproxy":
                # "from oaiproxy import fastjson" imports a module.
                for alias in node.names:
                    yield node.lineno, f"oaiproxy.{alias.name}" if (PACKAGE / f"{alias.name}.py").exists() else base
            else:
                yield node.lineno, base


def upward_imports() -> list[str]:
    """
    Every import of a module from a layer above the importer's, as
    C{"importer:line imports imported (layer above layer)"}.
    """
    found = []
    for module, path in modules():
        own = layer_of(module)
        for line, imported in imports_of(module, path):
            if imported != "oaiproxy" and not imported.startswith("oaiproxy."):
                continue
            theirs = layer_of(imported)
            if theirs < own:
                found.append(f"{module}:{line} imports {imported} ({LAYERS[theirs][0]} is above {LAYERS[own][0]})")
    return found


def import_cycles() -> list[str]:
    """
    Every cycle of imports among the package's modules (within a layer:
    across layers the rule above already forbids one), as
    C{"a -> b -> a"}.
    """
    graph = {module: {imported for _, imported in imports_of(module, path)} for module, path in modules()}
    found: list[str] = []
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        stack.append(module)
        for imported in sorted(graph.get(module, set())):
            if imported in stack:
                found.append(" -> ".join(stack[stack.index(imported) :] + [imported]))
            elif imported in graph and imported not in done:
                visit(imported, stack)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [])
    return found


class LayerTests(SynchronousTestCase):
    """
    The layers of L{LAYERS}, as the package's imports have them.
    """

    def test_every_module_has_a_layer(self) -> None:
        """
        A new module must be placed: one in no layer fails here, by name.
        """
        for module, _ in modules():
            layer_of(module)

    def test_no_module_imports_from_a_layer_above(self) -> None:
        """
        No module imports from a layer above its own.
        """
        self.assertEqual(upward_imports(), [])

    def test_no_import_cycles(self) -> None:
        """
        Within a layer too, modules import one way: no cycles.
        """
        self.assertEqual(import_cycles(), [])

    def test_an_upward_import_is_found(self) -> None:
        """
        The scan sees an upward import, written either way, even inside a
        function: an exchange that imported a route would be named.
        """
        source = "def f():\n    from oaiproxy.routes import jsonapi\nimport oaiproxy.server.site\n"
        path = PACKAGE / "upstream" / "client.py"
        found = []
        for line, imported in imports_of("oaiproxy.upstream.client", path, source):
            if layer_of(imported) < layer_of("oaiproxy.upstream.client"):
                found.append((line, imported))
        self.assertEqual(sorted(found), [(2, "oaiproxy.routes"), (3, "oaiproxy.server.site")])

    def test_layers_are_ordered(self) -> None:
        """
        The daemon is the top and the shared modules the bottom; a request
        goes server, routes, access, upstream; the shared state is below both
        users of it (access, upstream); the ledger reads observe's records and
        is read by access's budgets.
        """
        names = [name for name, _ in LAYERS]
        self.assertEqual(
            names, ["daemon", "server", "routes", "access", "upstream", "sharedstate", "ledger", "observe", "shared"]
        )
