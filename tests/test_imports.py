"""One way up the chain: no import cycle between the packages of dualssl, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unit(module: str) -> str:
    """``dualssl.evaluation.run`` -> ``evaluation``; ``dualssl.export`` -> ``export``; ``dualssl`` -> ``dualssl``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(path: Path, module: str) -> set[str]:
    """Every ``dualssl.*`` module ``path`` imports anywhere: top level, in functions, under TYPE_CHECKING."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from dualssl import serving` imports the module dualssl.serving
            found.update(f"{target}.{a.name}" for a in node.names) if target == "dualssl" else found.add(target)
    return {name for name in found if name == "dualssl" or name.startswith("dualssl.")}


def package_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """``{unit: {imported unit: [importing modules]}}`` over the first-level packages/modules of dualssl."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted((root / "dualssl").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for target in imports_of(path, module):
            if _unit(target) != _unit(module) and target != "dualssl":
                graph.setdefault(_unit(module), {}).setdefault(_unit(target), []).append(module)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units (first unit repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_parser_sees_lazy_relative_and_from_package_imports(tmp_path):
    pkg = tmp_path / "dualssl"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("from .fit import x\n")
    (pkg / "engine" / "fit.py").write_text("def f():\n    from dualssl.evaluation import run\n")
    (pkg / "evaluation.py").write_text("def g():\n    from dualssl import export\n")
    (pkg / "export.py").write_text("import dualssl.engine.fit\n")
    graph = package_graph(tmp_path)
    assert set(graph) == {"engine", "evaluation", "export"}
    assert find_cycle(graph) == ["engine", "evaluation", "export", "engine"]
    (pkg / "export.py").write_text("import dualssl.config\n")
    assert find_cycle(package_graph(tmp_path)) is None


def test_no_package_cycle_in_dualssl():
    graph = package_graph()
    assert "export" in graph and "evaluation" in graph["export"]  # export may use evaluation
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} in {graph[a][b]}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, f"import cycle {' -> '.join(cycle)}: " + "; ".join(where)


def test_engine_and_evaluation_never_import_export_or_serving():
    graph = package_graph()
    for unit in ("engine", "evaluation", "data", "models", "losses"):
        assert not {"export", "serving", "cli"} & set(graph.get(unit, {})), (unit, graph.get(unit))
