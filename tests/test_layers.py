"""The package's structure (#23): the import graph of `fastcxr/` has no cycle, and no module
imports from a layer above its own. Layers, lowest first, follow the data:

0 base      — vocabulary and plumbing every layer shares: errors, config, findings,
              formulations, manifest, leakage, the image readers (dicom, images/*), models,
              runtime/*, and the numerics
              (evaluate/stats, evaluate/metrics: a training run chooses its thresholds and
              scores its test set with them)
1 prepare   — prepare/*, preprocessing
2 data      — data/*
3 train     — train/*
4 evaluate  — evaluate/* (the rest), predict, export
5 experiments — study, bench
6 interface — cli/*, __main__, the package's lazy names

Every import counts — at module level or inside a function (lazy imports hide edges, they do
not remove them) — except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastcxr"

LAYERS = [
    ["fastcxr.errors", "fastcxr.version", "fastcxr.config", "fastcxr.findings",
     "fastcxr.formulations", "fastcxr.manifest", "fastcxr.leakage", "fastcxr.dicom",
     "fastcxr.images", "fastcxr.models", "fastcxr.backbones", "fastcxr.runtime",
     "fastcxr.evaluate.stats", "fastcxr.evaluate.metrics", "fastcxr.evaluate.intervals",
     "fastcxr.standalone", "fastcxr.results"],
    ["fastcxr.prepare", "fastcxr.preprocessing"],
    ["fastcxr.data"],
    ["fastcxr.train"],
    ["fastcxr.evaluate", "fastcxr.predict", "fastcxr.export"],
    ["fastcxr.study", "fastcxr.bench"],
    ["fastcxr.cli", "fastcxr.__main__", "fastcxr"],
]  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def graph() -> dict[str, set[str]]:
    """module → the fastcxr modules it imports (`from pkg import sub` is an edge to `sub`)."""
    mods = modules()

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    g: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names if a.name.startswith("fastcxr")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                if not base.startswith("fastcxr"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    edges.add(sub if sub in mods else known(base))
        g[mod] = edges - {mod}
    return g


def layer(mod: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or (p != "fastcxr" and mod.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best[0]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_from_a_higher_layer():
    g = graph()
    up = sorted(
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in g.items()
        for t in targets
        if layer(t) > layer(m)
    )
    assert up == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The checks above could fail: a made-up circle is found, and so is an upward edge."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = graph()
    assert "fastcxr.train.schedule" in g["fastcxr.train.network"]  # lazy imports count too
    assert "fastcxr.train.ddp" in g["fastcxr.train.learner"]  # (imported in a function)
    assert layer("fastcxr.train.lr_find") > layer("fastcxr.data.datablock")
    assert layer("fastcxr.evaluate.figures") > layer("fastcxr.train.lr_find")
    assert layer("fastcxr.evaluate.stats") < layer("fastcxr.train.network")


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 600


def test_no_function_over_60_lines_and_no_module_over_600():
    """A function's lines run from its `def` (decorators apart) to its last line."""
    long_functions, long_modules = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PKG.parent)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PKG.parent)}:{node.name} {lines}")
    assert long_functions == [] and long_modules == []
