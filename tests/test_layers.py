"""The import graph of the package, lazy imports included: no cycle, and nothing that predicts or
serves reaches back into the training loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "digitlab"
DOWNSTREAM = ("inference", "evaluate", "predict", "report", "export", "serve")


def _unit(module: str) -> str:
    """digitlab.data.idx -> data, digitlab.serve.app -> serve, digitlab.train -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _unit(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
        targets = graph.setdefault(source, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("digitlab"):
                if node.module == "digitlab":  # from digitlab import checkpoint, __version__
                    targets.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
                else:
                    targets.add(_unit(node.module))
            elif isinstance(node, ast.Import):
                targets.update(_unit(a.name) for a in node.names if a.name.startswith("digitlab."))
        targets.discard(source)
        targets.discard("")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_the_package_imports_have_no_cycle() -> None:
    assert _cycles(import_graph()) == []


def test_nothing_that_predicts_or_serves_imports_the_training_loop() -> None:
    graph = import_graph()

    def reach(unit: str) -> set[str]:
        seen, todo = set(), [unit]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert {unit: sorted(reach(unit) & {"train", "ensemble", "distributed"}) for unit in DOWNSTREAM} == {
        unit: [] for unit in DOWNSTREAM}


def test_the_graph_is_read_at_all() -> None:
    """Guards the two tests above against passing on an empty graph."""
    graph = import_graph()
    assert "train" in graph["ensemble"] and "runtime" in graph["inference"] and "rundir" in graph["train"]


def test_the_server_starts_without_the_csv_reader_or_torch() -> None:
    """`digitlab serve` imports its module first; pyarrow (CSV) and torch load only when needed."""
    import subprocess
    import sys

    code = "import sys, digitlab.serve.app; print(sorted({'pyarrow', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
