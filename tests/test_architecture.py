"""The import rules of docs/architecture.md, checked on the real import graph.

- no import cycle between modules;
- packages come in layers, and nothing imports a later layer (``LAYERS``);
- operations import each other only through the named seams (``SEAMS``);
- root modules other than the public face (``__init__``, ``persist``) and ``__main__`` import no subpackage;
- nothing outside the CLI imports the CLI, typer or rich;
- bntool's own modules are imported at the top of a module (lazily only in the CLI, so ``--help`` stays fast);
- only the CLI spells a command-line flag in a string (the library names Python parameters);
- the module map lists every module, and no module grows past ~300 lines unless its docstring says why.

Each rule is a function returning its violations, so the tests below can show a rule failing on a
deliberately bad import as well as passing on the tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bntool"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, bool]]:
    """Every module ``name`` imports (bntool's and third-party tops), and whether the import sits in a function."""
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
    return [(target, inner) for target, inner in found if target != name]


RAW = {name: _imports(name) for name in MODULES}
GRAPH = {name: [(t, inner) for t, inner in imports if t in MODULES] for name, imports in RAW.items()}

#: the public face: the only root modules that import subpackages
FACE = {"bntool", "bntool.persist"}
#: packages in layers, ground floor first; a module imports from its own layer and earlier ones
LAYERS = [
    {"root"},
    {"runtime"},
    {"verify"},
    {"io"},
    {"onnxio"},
    {"graph"},
    {"data"},
    {"folding", "recalibration", "freezing", "converting", "inspection", "export"},  # the operations
    {"face"},
    {"cli"},
    {"entry"},  # __main__: `python -m bntool`
]
OPERATIONS = LAYERS[7]
#: the only imports from one operation package into another
SEAMS = {("export", "folding"), ("inspection", "folding")}


def package_of(name: str) -> str:
    if name == "bntool.__main__":
        return "entry"
    if name in FACE:
        return "face"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and name not in _ROOT_FILES) else "root"


_ROOT_FILES = {_module_name(p) for p in PACKAGE.glob("*.py")}


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def cycle(graph: dict[str, list[tuple[str, bool]]]) -> list[str] | None:
    edges = {n: {t for t, _ in imports} for n, imports in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt) and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(edges) if not state.get(n) and (c := visit(n))), None)


def layer_violations(graph: dict[str, list[tuple[str, bool]]]) -> list[tuple[str, str]]:
    """Imports that reach a later layer, or another operation package other than through a seam."""
    bad = []
    for name, imports in graph.items():
        source = package_of(name)
        for target, _ in imports:
            destination = package_of(target)
            if _layer(destination) > _layer(source):
                bad.append((name, target))
            elif source != destination and source in OPERATIONS and destination in OPERATIONS \
                    and (source, destination) not in SEAMS:
                bad.append((name, target))
    return bad


def root_violations(graph: dict[str, list[tuple[str, bool]]]) -> list[tuple[str, str]]:
    """Root modules (the vocabulary) that import a subpackage."""
    return [(name, target) for name, imports in graph.items() for target, _ in imports
            if package_of(name) == "root" and package_of(target) != "root"]


def cli_violations(raw: dict[str, list[tuple[str, bool]]]) -> list[tuple[str, str]]:
    """Modules outside the CLI that import the CLI, typer or rich."""
    return [(name, target) for name, imports in raw.items() for target, _ in imports
            if package_of(name) not in ("cli", "entry")
            if target.startswith(("bntool.cli", "typer", "rich"))]


#: the one lazy import outside the CLI: the deprecated `bntool.inspection.plot` looks its function up on use
LAZY_ALLOWED = {("bntool.inspection", "bntool.inspection.picture")}


def lazy_violations(graph: dict[str, list[tuple[str, bool]]]) -> list[tuple[str, str]]:
    return [(name, target) for name, imports in graph.items() for target, inner in imports
            if inner and package_of(name) != "cli" and (name, target) not in LAZY_ALLOWED]


def test_the_import_graph_has_no_cycle():
    assert cycle(GRAPH) is None


def test_no_import_reaches_a_later_layer_or_another_operation_but_through_a_seam():
    assert layer_violations(GRAPH) == []


def test_root_modules_import_no_subpackage():
    assert root_violations(GRAPH) == []


def test_nothing_outside_the_cli_imports_the_cli_typer_or_rich():
    assert cli_violations(RAW) == []


def test_bntool_modules_are_imported_at_the_top_except_in_the_cli():
    # the CLI imports the torch side inside each command (and rich only to print an error): `bntool --help` stays fast
    assert lazy_violations(GRAPH) == []


def test_each_rule_fails_on_a_deliberately_bad_import():
    def plus(graph, name, target, inner=False):
        changed = {n: list(imports) for n, imports in graph.items()}
        changed[name].append((target, inner))
        return changed

    assert layer_violations(plus(GRAPH, "bntool.runtime.running", "bntool.folding.fold")) \
        == [("bntool.runtime.running", "bntool.folding.fold")]  # up a layer
    assert layer_violations(plus(GRAPH, "bntool.folding.fold", "bntool.freezing.freeze")) \
        == [("bntool.folding.fold", "bntool.freezing.freeze")]  # operation to operation, no seam
    assert layer_violations(plus(GRAPH, "bntool.folding.rules", "bntool.export.write")) \
        == [("bntool.folding.rules", "bntool.export.write")]  # a seam runs one way only
    assert root_violations(plus(GRAPH, "bntool.norms", "bntool.runtime.running")) \
        == [("bntool.norms", "bntool.runtime.running")]
    assert cli_violations(plus(RAW, "bntool.folding.fold", "rich.console")) == [("bntool.folding.fold", "rich.console")]
    assert lazy_violations(plus(GRAPH, "bntool.io.writing", "bntool.verify.bits", inner=True)) \
        == [("bntool.io.writing", "bntool.verify.bits")]
    assert cycle(plus(GRAPH, "bntool.errors", "bntool.persist")) is not None


#: a command-line flag as a message would spell it
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flag_spellings(sources: dict[str, str]) -> list[tuple[str, int, str]]:
    """String literals outside the CLI that spell a command-line flag (docstrings and comments may mention the
    command line; a message may not: the library names Python parameters, and only the CLI knows flags)."""
    found = []
    for name, text in sources.items():
        if package_of(name) in ("cli", "entry"):
            continue
        tree = ast.parse(text)
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [(name, node.lineno, flag) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for flag in _FLAG.findall(node.value)]
    return sorted(found)


SOURCES = {name: path.read_text() for name, path in MODULES.items()}


def test_only_the_cli_spells_flags():
    assert flag_spellings(SOURCES) == []


def test_a_flag_planted_in_a_library_message_is_found():
    planted = SOURCES["bntool.io.outputs"] + (
        '\n\ndef _planted(out):\n    """Docstrings may say --out."""\n    # and comments --force\n'
        '    raise ValueError(f"`{out}` exists; pass --force or choose another --out")\n')
    lines = len(SOURCES["bntool.io.outputs"].splitlines())
    assert flag_spellings({**SOURCES, "bntool.io.outputs": planted}) \
        == [("bntool.io.outputs", lines + 6, "--force"), ("bntool.io.outputs", lines + 6, "--out")]
    # the CLI may: the same line in a command module is no finding
    assert flag_spellings({"bntool.cli.fold": planted}) == []


def _map_modules() -> set[str]:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    text = text[text.index("## Module map"):text.index("## One command")]
    listed = set()
    for row in (line for line in text.splitlines() if line.startswith("| `")):
        for file in re.findall(r"`([\w/]+)\.py`", row.split(" | ")[0]):
            listed.add(("bntool." + file.replace("/", ".")).removesuffix(".__init__"))
    return listed


def test_the_module_map_lists_every_module():
    listed = _map_modules()
    assert sorted(set(MODULES) - listed) == [] and sorted(listed - set(MODULES)) == []


#: a module longer than this says why in its docstring (the words "over 300 lines")
ROOM = 300


#: rooms still to be cut on their seams
TO_CUT: set[str] = set()


def test_rooms_stay_small_or_say_why():
    long = [name for name, path in MODULES.items() if package_of(name) != "cli"
            and len(path.read_text().splitlines()) > ROOM
            and "over 300 lines" not in (ast.get_docstring(ast.parse(path.read_text())) or "") and name not in TO_CUT]
    assert long == []


def test_subpackage_inits_hold_a_docstring_only():
    # a re-export would pull torch into `bntool --help` and shadow module names; inspection keeps one deprecated name
    heavy = []
    for name, path in MODULES.items():
        if path.name != "__init__.py" or name in ("bntool", "bntool.cli"):
            continue
        body = [n for n in ast.parse(path.read_text()).body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        if body and name != "bntool.inspection":
            heavy.append(name)
    assert heavy == []
