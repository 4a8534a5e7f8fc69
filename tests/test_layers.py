"""The layers of DESIGN.md: imports point down the stack, never up, and no module imports
itself back through a cycle. Every import counts, including lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

ROOT = Path(difflab.__file__).parent

#: Top-level modules of difflab, lowest layer first; a module may import only from lower
#: ranks or from inside its own package.
LAYERS: list[tuple[str, ...]] = [
    ("io", "config"),
    ("process",),
    ("conditioning",),
    ("parameterization",),
    ("networks", "data", "text", "analytic"),
    ("objectives",),
    ("samplers",),
    ("guidance",),
    ("editing",),
    ("evaluation",),
    ("training",),
    ("pipeline",),
    ("recipes",),
    ("serve",),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ["difflab", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """Absolute names of the difflab modules ``name`` imports (``from p import sub`` counts
    as the submodule ``p.sub`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("difflab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("difflab"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs or {target}
            if subs != {f"{target}.{a.name}" for a in node.names}:
                out.add(target)
    # importing a.b.c runs the packages a.b and a first: an edge to each one the importer
    # is not itself inside (losses -> objectives.weighting also runs objectives/__init__)
    for m in list(out):
        parts = m.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if not (name + ".").startswith(parent + "."):
                out.add(parent)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_top_level_module_has_a_layer():
    missing = {layer(m) for m in MODULES} - set(RANK) - {None}
    assert not missing, f"add these modules to LAYERS: {sorted(missing)}"


def test_imports_point_down_the_layers():
    bad = []
    for src, targets in GRAPH.items():
        a = layer(src)
        for dst in targets:
            b = layer(dst)
            if a is None or b is None or a == b:
                continue
            if RANK[b] >= RANK[a]:
                bad.append(f"{src} imports {dst}")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(sorted(bad))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ re-exporting its submodules is not a cycle unless a submodule
    # imports the package (or another submodule that does) back
    cycles = strongly_connected(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert "difflab.training.trainer" in GRAPH["difflab.cli.train"] or any(
        m.startswith("difflab.training") or m.startswith("difflab.recipes")
        for m in GRAPH["difflab.cli.train"])
