"""The import graph of docs/architecture.md holds: no cycles, nothing imports upward into the CLI or its console,
and bntool's own modules are imported at the top of a module (lazily only where the CLI keeps ``--help`` fast)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bntool"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, bool]]:
    """Every bntool module ``name`` imports, and whether the import sits inside a function."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue  # annotations only
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[: len(package) - child.level + 1] + [child.module or ""]).strip(".") \
                    if child.level else child.module or ""
                found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, inner) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return [(target, inner) for target, inner in found if target in MODULES and target != name]


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt) and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(edges) if not state.get(n) and (c := visit(n))), None)


def test_the_import_graph_has_no_cycle():
    assert _cycle({n: {t for t, _ in imports} for n, imports in GRAPH.items()}) is None


def test_nothing_outside_the_cli_imports_the_cli_or_the_console():
    upward = [(n, t) for n, imports in GRAPH.items() for t, _ in imports
              if not n.startswith("bntool.cli") and (t.startswith("bntool.cli") or t == "bntool.console")
              and n != "bntool.__main__"]
    assert upward == []


def test_bntool_modules_are_imported_at_the_top_except_in_the_cli_commands():
    # the CLI imports the torch side inside each command (and rich only to print an error): `bntool --help` stays fast
    lazy = [(n, t) for n, imports in GRAPH.items() for t, inner in imports if inner and not n.startswith("bntool.cli")]
    assert lazy == []


def _map_groups() -> dict[str, int]:
    """Each module of docs/architecture.md's module map -> the index of its group (ground floor first)."""
    import re

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    text = text[text.index("## Module map"):text.index("## One command")]
    groups: dict[str, int] = {}
    for index, section in enumerate(text.split("\n**")[1:]):
        for row in (line for line in section.splitlines() if line.startswith("| `")):
            for file in re.findall(r"`([\w/]+)\.py`", row.split(" | ")[0]):
                name = "bntool." + file.replace("/", ".")
                groups[name.removesuffix(".__init__")] = index
    return groups


def test_the_module_map_lists_every_module_and_imports_never_reach_a_later_group():
    groups = _map_groups()
    assert sorted(set(MODULES) - set(groups)) == [] and sorted(set(groups) - set(MODULES)) == []
    upward = [(n, t) for n, imports in GRAPH.items() for t, _ in imports if groups[t] > groups[n]]
    assert upward == [("bntool.inspection", "bntool.plot")]  # the one exception the map names
