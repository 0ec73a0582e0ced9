"""Import layering of the graphsched package, read from the source with ``ast`` (nothing imported).

Units are the top-level modules and packages of graphsched (``graphsched.api``,
``graphsched.schedule`` ...) and the package root ``graphsched`` itself. Imports inside one unit
are not edges.

* Module-level imports (those that run when a module is imported, class bodies and module-level
  ``if``/``try`` included, ``if TYPE_CHECKING:`` blocks excluded) must not form a cycle between units.
* Function-level imports may close a cycle (that is how a lazy import breaks one); they are listed
  in ``FUNCTION_LEVEL_CYCLE_BREAKERS`` below so a new one is noticed.
* ``graphsched.testing.emulated`` (the emulated process group, a package) is test machinery:
  inside the package only ``graphsched.testing`` may import it or its modules (benchmarks/ and
  tests/, outside the package, use it too).
* Compile-time code (``COMPILE_TIME``: capture's planning and rewriting steps, the fingerprints and
  the rank agreement they use) imports nothing from ``graphsched.runtime``.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "graphsched"
EMULATED = "graphsched.testing.emulated"
RUNTIME = "graphsched.runtime"
#: Units that run while graphs are compiled and must not depend on the code that runs them.
COMPILE_TIME = (
    "graphsched.agreement",
    "graphsched.analysis",
    "graphsched.fingerprint",
    "graphsched.partition",
    "graphsched.schedule",
)

#: Module-level cycles that are accepted, as frozensets of units, each with its reason. None now.
ALLOWED_MODULE_LEVEL_CYCLES: dict[frozenset[str], str] = {}

#: Function-level imports that point against the module-level layering, i.e. that would close a
#: cycle between units if they ran at import time: (importing module, imported module) -> reason.
#: The test fails when this list no longer matches the source, so it stays a true record.
#: None today. The function-level imports that cross units all point along the module-level
#: layering or between units with no module-level path back: api -> schedule / partition /
#: integrations / fingerprint / reasons, capture -> partition / runtime / agreement,
#: partition -> agreement / analysis, integrations -> api, timelines -> api / reasons,
#: cli -> timelines, demo -> models / timelines, codegen / partition / testing -> compat (the lazy
#: torch imports). They defer import cost; none of them is needed to break a cycle.
FUNCTION_LEVEL_CYCLE_BREAKERS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    imported: str  # dotted module name imported
    module_level: bool
    line: int


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _all_modules() -> set[str]:
    return {_module_name(p) for p in ROOT.rglob("*.py")}


def _imports_of(path: pathlib.Path, modules: set[str]) -> list[Import]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        out = []
        for a in node.names:
            sub = f"{mod}.{a.name}"
            out.append(sub if sub in modules else mod)
        return out

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child):
                    if t == "graphsched" or t.startswith("graphsched."):
                        found.append(Import(name, t, module_level, child.lineno))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit(stmt, module_level)
            else:
                visit(child, module_level)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _all_imports() -> list[Import]:
    modules = _all_modules()
    return [i for p in sorted(ROOT.rglob("*.py")) for i in _imports_of(p, modules)]


def _unit_graph(imports: list[Import], module_level_only: bool) -> nx.DiGraph:
    g = nx.DiGraph()
    for i in imports:
        if module_level_only and not i.module_level:
            continue
        a, b = _unit(i.importer), _unit(i.imported)
        if a != b:
            g.add_edge(a, b)
    return g


def test_the_parser_sees_known_imports() -> None:
    imports = _all_imports()
    assert Import("graphsched.capture", "graphsched.config", True, 0) in {
        Import(i.importer, i.imported, i.module_level, 0) for i in imports
    }
    assert any(not i.module_level for i in imports)


def test_no_module_level_import_cycle_between_top_level_units() -> None:
    g = _unit_graph(_all_imports(), module_level_only=True)
    cycles = [frozenset(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_MODULE_LEVEL_CYCLES]
    assert not unexpected, f"module-level import cycles between graphsched units: {unexpected}"
    stale = [sorted(c) for c in ALLOWED_MODULE_LEVEL_CYCLES if c not in cycles]
    assert not stale, f"allowed cycles that no longer exist (drop them): {stale}"


def test_function_level_cycle_breakers_are_recorded() -> None:
    imports = _all_imports()
    layering = _unit_graph(imports, module_level_only=True)
    breakers = set()
    for i in imports:
        if i.module_level:
            continue
        a, b = _unit(i.importer), _unit(i.imported)
        if a != b and b in layering and a in layering and nx.has_path(layering, b, a):
            breakers.add((i.importer, i.imported))
    assert breakers == set(FUNCTION_LEVEL_CYCLE_BREAKERS), (
        "function-level imports that close a cycle between units changed; record them in "
        f"FUNCTION_LEVEL_CYCLE_BREAKERS with a reason: {sorted(breakers)}"
    )


def test_only_testing_imports_the_emulated_process_group() -> None:
    assert EMULATED in _all_modules(), f"{EMULATED} moved: update EMULATED"
    offenders = [
        f"{i.importer}:{i.line}"
        for i in _all_imports()
        if (i.imported == EMULATED or i.imported.startswith(EMULATED + "."))
        and not (i.importer == "graphsched.testing" or i.importer.startswith("graphsched.testing."))
    ]
    assert not offenders, f"{EMULATED} is test machinery, imported outside graphsched.testing: {offenders}"


def test_compile_time_code_does_not_import_the_runtime() -> None:
    modules = _all_modules()
    assert all(u in modules for u in COMPILE_TIME), "a COMPILE_TIME unit moved: update the list"
    offenders = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in _all_imports()
        if _unit(i.importer) in COMPILE_TIME and _unit(i.imported) == RUNTIME
    ]
    assert not offenders, f"compile-time code imports {RUNTIME}: {offenders}"


@pytest.mark.parametrize("name", sorted(__import__("graphsched.compat").compat.LAZY))
def test_compat_names_resolve(name: str) -> None:
    import graphsched.compat as compat

    assert getattr(compat, name) is not None
