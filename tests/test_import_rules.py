"""The import rules of src/fmtransfer, read from the source with `ast` (nothing is imported): no import
cycle, no import from a lower layer to a higher one, the serving runtime free of training code, and no
method file importing another. The layers are written down here and in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SRC = REPO / "src"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "utils", "locks", "integrity", "registry", "evaluate", "plots", "failures", "preprocess",
              "ranges", "config_checks", "config", "runfiles")),
    ("task record", ("data.base",)),
    ("backbones", ("backbones",)),
    ("cache", ("cache",)),
    ("data", ("data",)),
    ("train", ("train",)),
    ("models", ("models",)),
    ("serving", ("serving",)),
    ("methods", ("methods",)),
    ("teachers", ("teachers",)),
    ("runner", ("stream_run", "runner")),
    ("export", ("export_manifest", "export_fm", "export")),
    ("tools", ("api", "validate", "catalog", "benchmarking")),
    ("entry", ("cli", "__main__", "")),
]
"""Lowest first. A module may import its own layer and the layers below it; `""` is the package face
(fmtransfer/__init__.py). Names are module paths below `fmtransfer.`; the longest matching prefix wins."""

NEVER: dict[str, tuple[str, ...]] = {
    "models": ("teachers",),
    "cache": ("models",),
    "serving": ("train", "methods", "teachers", "runner", "stream_run", "export", "export_fm", "export_manifest"),
    "methods": ("serving",),
    "teachers": ("serving",),
}
"""Rules stated on their own, whatever the order above. The serving runtime loads an export with no
training code (tests/test_serving_rows.py checks the same in a subprocess), and the training side does
not reach into it either: only the runner, export and the tools above them import both."""

PENDING: set[tuple[str, str]] = set()
"""Edges that other branches of issue 17 are removing: every rule here skips them until then. The lead
empties this after merging those branches; an edge listed here that the code no longer has fails
`test_pending_edges_still_exist`, so the list only shrinks."""


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (never run, so never part of an import cycle)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def _imported(node: ast.AST, here: str, is_pkg: bool) -> list[str]:
    """Dotted names a node imports: `import a.b`, `from a import b` (b may be a module) and
    `importlib.import_module("a.b")` with a literal name. Function-level imports count too."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = here.split(".") if is_pkg else here.split(".")[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def import_graph(src: Path, package: str = "fmtransfer") -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name resolves to the deepest module it names)."""
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        out: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, mod, path.name == "__init__.py"):
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name.startswith(package) and name != mod:
                    out.add(name)
        graph[mod] = out
    return graph


def short(mod: str, package: str = "fmtransfer") -> str:
    return mod.removeprefix(package).removeprefix(".")


def layer_of(mod: str) -> int | None:
    name = short(mod)
    matches = [(len(p), rank) for rank, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if name == p or (p and name.startswith(p + "."))]
    return max(matches)[1] if matches else None


def live_edges(graph: dict[str, set[str]], pending: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if (short(a), short(b)) not in pending} for a, bs in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer to a higher one. Importing the package face itself is never upward:
    Python runs fmtransfer/__init__.py before any submodule anyway."""
    return [f"{short(a)} ({LAYERS[layer_of(a)][0]}) -> {short(b)} ({LAYERS[layer_of(b)][0]})"
            for a in sorted(graph) for b in sorted(graph[a])
            if short(b) and layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a in sorted(graph):
        layer = LAYERS[layer_of(a)][0] if layer_of(a) is not None else None
        for b in sorted(graph[a]):
            for banned in NEVER.get(layer or "", ()):
                if short(b) == banned or short(b).startswith(banned + "."):
                    out.append(f"{short(a)} -> {short(b)} ({layer} never imports {banned})")
    return out


def method_files(src: Path, package: str = "fmtransfer") -> set[str]:
    """Modules under methods/ that register a method (`METHODS.register(...)`): one method each."""
    out = set()
    for path in (src / package / "methods").glob("*.py"):
        if "METHODS.register(" in path.read_text():
            out.add(module_name(path, src))
    return out


def method_to_method(graph: dict[str, set[str]], methods: set[str]) -> list[str]:
    return [f"{short(a)} -> {short(b)}" for a in sorted(methods) for b in sorted(graph[a]) if b in methods]


def violations(graph: dict[str, set[str]], methods: set[str], pending: set[tuple[str, str]]) -> list[str]:
    """Every broken rule, one line each (empty when the graph keeps them all)."""
    graph = live_edges(graph, pending)
    out = [f"{short(m)}: no layer (add it to LAYERS here and in docs/architecture.md)"
           for m in sorted(graph) if layer_of(m) is None]
    out += ["import cycle: " + " , ".join(short(m) for m in c) for c in cycles(graph)]
    out += ["upward import: " + e for e in upward(graph)]
    out += ["forbidden import: " + e for e in forbidden(graph)]
    out += ["method imports method: " + e for e in method_to_method(graph, methods)]
    return out


GRAPH = import_graph(SRC)
METHOD_FILES = method_files(SRC)


def test_the_package_keeps_its_import_rules() -> None:
    found = violations(GRAPH, METHOD_FILES, PENDING)
    assert not found, "\n".join(found)


def test_pending_edges_still_exist() -> None:
    gone = sorted(f"{a} -> {b}" for a, b in PENDING if f"fmtransfer.{b}" not in GRAPH.get(f"fmtransfer.{a}", ()))
    assert not gone, "no longer imported, remove from PENDING: " + ", ".join(gone)


@pytest.mark.parametrize(("importer", "imported", "says"), [
    ("models.base", "teachers.base", "forbidden import: models.base -> teachers.base (models never imports teachers)"),
    ("cache.store", "models.base", "upward import: cache.store (cache) -> models.base (models)"),
    ("serving.manifest", "train.loop", "serving never imports train"),
    ("teachers.base", "serving.loader", "teachers never imports serving"),
    ("config", "runner", "upward import: config (core) -> runner (runner)"),
    ("utils", "newpkg.thing", "newpkg.thing: no layer"),
    ("methods.kd", "methods.fitnet", "method imports method: methods.kd -> methods.fitnet"),
])
def test_a_new_violation_fails(importer: str, imported: str, says: str) -> None:
    graph = {m: set(bs) for m, bs in GRAPH.items()}
    graph[f"fmtransfer.{importer}"].add(f"fmtransfer.{imported}")
    graph.setdefault(f"fmtransfer.{imported}", set())
    assert any(says in v for v in violations(graph, METHOD_FILES, PENDING)), says


def test_a_cycle_inside_one_layer_and_a_lazy_import_are_found(tmp_path: Path) -> None:
    """Parsed from files: an import inside a function counts, one under `if TYPE_CHECKING:` does not."""
    pkg = tmp_path / "fmtransfer"
    (pkg / "cache").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cache" / "__init__.py").write_text("")
    (pkg / "cache" / "store.py").write_text("from fmtransfer.cache import rows\n")
    (pkg / "cache" / "rows.py").write_text("def f() -> None:\n    from fmtransfer.cache.store import x\n")
    (pkg / "errors.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                   "    import fmtransfer.cache.rows\n")
    graph = import_graph(tmp_path)
    assert graph["fmtransfer.errors"] == set() and graph["fmtransfer.cache.rows"] == {"fmtransfer.cache.store"}
    assert cycles(graph) == [["fmtransfer.cache.rows", "fmtransfer.cache.store"]]
