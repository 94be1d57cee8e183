"""The package's layers: no import cycle, and dependencies point one way.

core (geometry, fields, losses, optim, metrics, quality, result, ...) <- io <- api/report <- cli;
the evaluation package ``neuralreg_eval`` sits outside and nothing in ``neuralreg`` imports it.
Every import counts, the ones inside functions too.
"""

import ast
from pathlib import Path

import neuralreg

ROOT = Path(neuralreg.__file__).resolve().parent
UPPER = ("neuralreg.io", "neuralreg.api", "neuralreg.report", "neuralreg.cli", "neuralreg.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules or t.startswith("neuralreg_eval"):
                    deps.add(t)
        deps.discard(name)
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    """0 core, 1 io, 2 api and report, 3 cli, 4 the package's front (``neuralreg``)."""
    if module == "neuralreg":
        return 4
    for prefix, layer in (("neuralreg.cli", 3), ("neuralreg.__main__", 3), ("neuralreg.report", 2),
                          ("neuralreg.api", 2), ("neuralreg.io", 1)):  # fmt: skip
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return 0


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep in graph and not state.get(dep):
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def test_dependencies_point_one_way():
    graph = _graph()
    assert len(graph) > 30 and "neuralreg.geometry.transforms" in graph
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if d.startswith("neuralreg_eval") or (d != "neuralreg" and _layer(d) > _layer(m))
    ]
    assert not wrong, wrong


def test_the_core_reaches_no_upper_layer():
    """Everything the optimizer, the result and the self-check import, transitively, is core."""
    graph = _graph()
    seen, todo = set(), ["neuralreg.optim.registration", "neuralreg.result", "neuralreg.quality"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert len(seen) > 10
    assert not [m for m in seen if _layer(m) > 0], sorted(m for m in seen if _layer(m) > 0)
