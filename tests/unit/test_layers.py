"""The import layering of `pipeline/`, written down once and checked by walking the import graph with `ast`.

A module imports only modules of its own layer or lower ones, and no chain of imports leads back to where it
started. Every import counts: top-level, inside a function, under `if TYPE_CHECKING:`. Lowest first:

  0 leaves     pipeline (the version), errors, version
  1 schemas    pipeline.config and every <area>/config.py, model variants/format/ref: pydantic models and constants
  2 model, data
  3 eval, tracking
  4 train
  5 launch, devstack, capacity, reference: Ray, the development cluster, sizing, the paper's reference runs
  6 jobs       pretrain, transfer, lineage: what one job does, start to end
  7 commands   commands, cli: the command line

A module's layer is the most specific rule that names it (a module path, or a package and everything under it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS: list[tuple[str, list[str]]] = [
    ("leaves", ["pipeline", "pipeline.errors", "pipeline.version"]),
    ("schemas", ["pipeline.config", "pipeline.*.config", "pipeline.model.variants", "pipeline.model.format",
                 "pipeline.model.ref"]),
    ("model, data", ["pipeline.model.*", "pipeline.data.*"]),
    ("eval, tracking", ["pipeline.eval.*", "pipeline.tracking.*"]),
    ("train", ["pipeline.train.*"]),
    ("launch", ["pipeline.launch.*", "pipeline.devstack.*", "pipeline.capacity", "pipeline.reference"]),
    ("jobs", ["pipeline.pretrain", "pipeline.transfer.*", "pipeline.lineage"]),
    ("commands", ["pipeline.commands.*", "pipeline.commands.config", "pipeline.cli", "pipeline.demo"]),
]

# What may be imported inside a function outside pipeline/commands (where `vitpipe --help` needs every command's
# implementation lazy): heavy libraries only, never a project module (pyproject.toml lists the files and why).
LAZY_OK = {"torch", "torchvision", "ray", "mlflow", "deepspeed", "webdataset", "matplotlib", "imagehash", "gcsfs",
           "s3fs", "aiobotocore", "pyarrow"}  # the last three: object stores and tables only (gpu_check's machine has none)

# third-party packages a layer must not import at all (the data floor receives a `map` callable; it never drives Ray)
FORBIDDEN = {"model, data": {"ray"}}


def _match(module: str, pattern: str) -> int:
    """How specifically `pattern` names `module` (0 = not at all)."""
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return len(base.split(".")) if module == base or module.startswith(base + ".") else 0
    if "*" in pattern:
        p, m = pattern.split("."), module.split(".")
        return 10 * len(p) if len(p) == len(m) and all(a in ("*", b) for a, b in zip(p, m)) else 0
    return 100 if module == pattern else 0


def layer_of(module: str) -> int:
    best = max(((_match(module, pat), i) for i, (_, pats) in enumerate(LAYERS) for pat in pats), default=(0, -1))
    if best[0] == 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """module -> {imported project module: line}, and module -> top-level names of third-party imports."""
    files = {_module_name(p): p for p in (ROOT / "pipeline").rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        ext: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pipeline.train import commit` imports the module pipeline.train.commit
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            for target in targets:
                if target.split(".")[0] == "pipeline":
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != module:
                        edges.setdefault(target, node.lineno)
                else:
                    ext.add(target.split(".")[0])
        graph[module], external[module] = edges, ext
    return graph, external


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    graph, _ = import_graph()
    assert len(graph) > 50
    for module in graph:
        layer_of(module)


def test_no_import_climbs_a_layer():
    graph, _ = import_graph()
    uphill = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]}) at line {line}"
        for module, edges in sorted(graph.items()) for target, line in sorted(edges.items())
        if layer_of(target) > layer_of(module)
    ]
    assert not uphill, "imports that climb a layer:\n" + "\n".join(uphill)


def test_no_import_circles():
    graph, _ = import_graph()
    assert not _cycles(graph), "import circles: " + "; ".join(" <-> ".join(c) for c in _cycles(graph))


def test_forbidden_third_party_imports():
    _, external = import_graph()
    bad = [f"{m} imports {lib}" for m, libs in sorted(external.items()) for lib in sorted(libs)
           if lib in FORBIDDEN.get(LAYERS[layer_of(m)][0], set())]
    assert not bad, bad


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, [["a", "b", "c"]]),
    ({"a": {"b": 1}, "b": {}}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert _cycles(graph) == expected


def test_the_layer_rules_pick_the_most_specific():
    assert LAYERS[layer_of("pipeline.train.config")][0] == "schemas"
    assert LAYERS[layer_of("pipeline.train.loop")][0] == "train"
    assert LAYERS[layer_of("pipeline.model.ref")][0] == "schemas"
    assert LAYERS[layer_of("pipeline.model.vit")][0] == "model, data"
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("pipeline.nowhere")


def _lazy_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, inside a try block) of every import inside a function body."""
    tree = ast.parse(path.read_text(), str(path))
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        chain, up = [], parent.get(node)
        while up is not None:
            chain.append(up)
            up = parent.get(up)
        if not any(isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)) for a in chain):
            continue
        in_try = any(isinstance(a, ast.Try) for a in chain)
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        out += [(node.lineno, name, in_try) for name in names]
    return out


def test_lazy_imports_are_heavy_libraries_only():
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if "commands" in path.relative_to(ROOT).parts or path.name == "cli.py":
            continue
        for line, module, in_try in _lazy_imports(path):
            top = module.split(".")[0]
            if top == "pipeline" or (top not in LAZY_OK and not in_try):  # in a try: an optional extra
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} inside a function")
    assert not bad, "move these to the top of the file:\n" + "\n".join(bad)


def test_ruff_passes():
    """Import order and imports-at-the-top (PLC0415, with pyproject.toml's listed exceptions)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "pipeline", "jobs", "tests",
                           "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_module_holds_two_ideas_by_size():
    """Past ~450 lines a module usually does two jobs (shared/STYLE.md): split it."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pipeline").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
