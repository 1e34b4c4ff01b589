"""Architecture checks that read the source of rfbench/ (issue 11, item 2).

- no import circle among rfbench modules (module-level and function-level imports alike);
- ``rfbench/ops/**`` imports nothing from rfbench outside ``rfbench.ops`` and ``rfbench.errors``;
- no module in rfbench/ longer than ``MAX_LINES`` lines;
- reading a suite file imports neither the trainer, the runner, the report layer nor matplotlib;
- ``import rfbench.ops`` does not import triton.

The import graph is built from the AST, so it sees imports that a run would only reach on some
paths. Edges: ``import rfbench.x.y`` -> rfbench.x.y; ``from rfbench.x import name`` ->
rfbench.x.name when that is a module or package of rfbench, else rfbench.x; relative imports
are resolved against the importing module's package. No implicit edge is added from a
submodule to its parent package (importing rfbench.a.b runs rfbench/a/__init__.py, but that is
Python's doing, not a dependency the code chose).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rfbench"
MAX_LINES = 600
#: The only rfbench modules (besides rfbench.ops itself) that rfbench.ops may import.
OPS_ALLOWED = ("rfbench.ops", "rfbench.errors")


# --------------------------------------------------------------------------- reading the source
def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every .py file under ``package`` (``__init__`` -> the package)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module named by ``from <level dots><target> import ...`` inside ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, modules: Iterable[str], root: str = "rfbench") -> dict[str, int]:
    """``{imported rfbench module: first line}`` of every import in ``path`` (any nesting depth)."""
    known = set(modules)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name != root and not name.startswith(root + "."):
            return
        # `import rfbench.x.y` of a name that is not a module (never in practice): its longest module prefix
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name != module:
            found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve_relative(module, _is_package(path), node.level, node.module)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target, node.lineno)
    return found


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """The rfbench import graph ``{module: {imported module: line}}`` and the module files."""
    files = module_files(package)
    root = package.name
    return {m: imports_of(m, p, files, root) for m, p in files.items()}, files


# --------------------------------------------------------------------------- cycles
def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of ``graph`` (Tarjan, iterative), each sorted, every node once."""
    nodes = sorted(set(graph) | {w for vs in graph.values() for w in vs})
    succ = {v: sorted(set(graph.get(v, ()))) for v in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def _shortest_cycle_through(start: str, succ: Mapping[str, Iterable[str]], allowed: set[str]) -> list[str]:
    """Shortest path start -> ... -> start inside ``allowed`` (breadth first), as a node list."""
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in allowed and w not in seen:
                    seen.add(w)
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return []


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Readable import circles: for each strongly connected component with a cycle, the shortest
    cycle through each of its nodes, de-duplicated (a cycle is listed once, from its smallest node).
    Each cycle is a list ``[a, b, ..., a]``; an acyclic graph gives []."""
    succ = {v: set(ws) for v, ws in graph.items()}
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for comp in strongly_connected(graph):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in succ.get(comp[0], ()):
            continue
        for node in comp:
            cyc = _shortest_cycle_through(node, succ, members)
            if not cyc:
                continue
            ring = cyc[:-1]
            k = ring.index(min(ring))
            canon = tuple(ring[k:] + ring[:k])
            if canon not in seen:
                seen.add(canon)
                cycles.append([*canon, canon[0]])
    return cycles


def format_cycle(cycle: list[str], graph: Mapping[str, Mapping[str, int]], files: Mapping[str, Path]) -> str:
    """``a -> b -> a`` followed by where each edge is (file:line)."""
    hops = []
    for a, b in zip(cycle, cycle[1:]):
        line = graph.get(a, {}).get(b, "?")
        where = files[a].relative_to(ROOT) if a in files else a
        hops.append(f"      {where}:{line} imports {b}")
    return "  " + " -> ".join(cycle) + "\n" + "\n".join(hops)


# --------------------------------------------------------------------------- the cycle finder itself
def test_cycle_finder_finds_a_cycle_and_passes_an_acyclic_graph():
    cyclic = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]}
    assert sorted(map(tuple, find_cycles(cyclic))) == [("a", "b", "c", "a"), ("e", "e")]
    assert sorted(strongly_connected(cyclic)) == [["a", "b", "c"], ["d"], ["e"]]
    acyclic = {"a": ["b", "c"], "b": ["c"], "c": ["d"], "d": []}
    assert find_cycles(acyclic) == []
    assert sorted(strongly_connected(acyclic)) == [["a"], ["b"], ["c"], ["d"]]
    # two circles sharing a node: both are listed
    two = {"x": ["y", "z"], "y": ["x"], "z": ["x"]}
    assert sorted(map(tuple, find_cycles(two))) == [("x", "y", "x"), ("x", "z", "x")]
    # deep chain: iterative, no recursion limit
    n = 5000
    chain = {f"n{i}": [f"n{i + 1}"] for i in range(n)}
    assert find_cycles(chain) == []
    chain[f"n{n}"] = ["n0"]
    (only,) = find_cycles(chain)
    assert len(only) == n + 2


def test_import_edges_are_resolved_like_python(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import leaf\n")
    (pkg / "base.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\nfrom .. import base\n")
    (pkg / "sub" / "leaf.py").write_text(
        "import pkg.base\nfrom pkg.base import thing\n\n"
        "def f():\n    from .. import sub\n    from .other import x\n"
    )
    graph, _ = import_graph(pkg)
    assert graph["pkg"] == {"pkg.sub.leaf": 1}  # `from pkg.sub import leaf`: leaf is a module
    assert set(graph["pkg.sub"]) == {"pkg.sub.leaf", "pkg.base"}
    # function-level imports count; `from .other` of a missing module falls back to its package
    assert set(graph["pkg.sub.leaf"]) == {"pkg.base", "pkg.sub"}
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.sub"]]


# --------------------------------------------------------------------------- rfbench
def test_no_import_circles():
    graph, files = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, (
        f"{len(cycles)} import circle(s) among rfbench modules (function-level imports included):\n"
        + "\n".join(format_cycle(c, graph, files) for c in cycles)
        + "\nFix: make the dependency run one way (data -> estimator -> metrics -> suite -> results -> "
        "report; ops is a leaf): move the shared piece into the lower module, pass tensors/forms "
        "instead of objects, or use duck typing (string annotations) instead of an import; a submodule "
        "that needs the package's __version__ reads it from a leaf module (e.g. rfbench/_version.py)."
    )


def test_ops_is_a_leaf():
    graph, files = import_graph()
    bad = []
    for module, deps in sorted(graph.items()):
        if module != "rfbench.ops" and not module.startswith("rfbench.ops."):
            continue
        for dep, line in sorted(deps.items()):
            if not any(dep == a or dep.startswith(a + ".") for a in OPS_ALLOWED):
                bad.append(f"  {files[module].relative_to(ROOT)}:{line} ({module}) imports {dep}")
    assert not bad, (
        "rfbench.ops must import only from rfbench.ops and rfbench.errors:\n"
        + "\n".join(bad)
        + "\nFix: ops functions take tensors and ExpForm only; move what they need into rfbench.ops "
        "(e.g. linear_attention into ops/rf_attention/naive.py) and let the estimator call ops, "
        "never the other way round."
    )


def test_no_module_over_max_lines():
    over = []
    for module, path in module_files().items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            over.append((n, module, path))
    over.sort(reverse=True)
    assert not over, (
        f"{len(over)} module(s) in rfbench/ over {MAX_LINES} lines:\n"
        + "\n".join(f"  {n:5d}  {p.relative_to(ROOT)}" for n, _, p in over)
        + "\nFix: split the module by job (issue 11 item 6), e.g. a package with one file per job."
    )


def _modules_after(code: str) -> tuple[list[str], str]:
    """``sorted(sys.modules)`` after running ``code`` in a fresh interpreter at the repo root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    probe = (
        f"{code}\n"
        "import sys\n"
        "mods = sorted(sys.modules)\n"
        "learning = sys.modules.get('rfbench.learning')\n"
        "print('LEARNING_IS_PACKAGE', learning is not None and hasattr(learning, '__path__'))\n"
        "print('\\n'.join(mods))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"the probe failed:\n{res.stderr[-3000:]}"
    lines = res.stdout.splitlines()
    flag = next(line for line in lines if line.startswith("LEARNING_IS_PACKAGE"))
    return [line for line in lines if not line.startswith("LEARNING_IS_PACKAGE")], flag


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_reading_a_suite_imports_no_trainer_runner_or_report():
    forbidden = ("rfbench.learning.training", "rfbench.suite.runner", "rfbench.report", "matplotlib")
    mods, flag = _modules_after('from rfbench.suite.spec import load_suite\nload_suite("suites/quick.toml")')
    hits = sorted(m for m in mods if _matches(m, forbidden))
    # Before the split, rfbench.learning is one module: the config *and* the trainer.
    if "rfbench.learning" in mods and flag.endswith("False"):
        hits.insert(0, "rfbench.learning (a single module: config and trainer together)")
    shown = sorted({h.split(".")[0] if h.startswith("matplotlib") else h for h in hits})
    assert not shown, (
        "load_suite('suites/quick.toml') imported: " + ", ".join(shown) + "\n"
        "Fix: spec.py may import only the fit *config* (rfbench.learning.config: FitSpec, "
        "parse_fit_section); rfbench.learning re-exports the trainer lazily (module __getattr__); "
        "plotting is imported only inside rfbench.report; spec never imports the runner."
    )


def test_the_import_probe_sees_what_was_imported():
    mods, flag = _modules_after("import colorsys")
    assert "colorsys" in mods and flag == "LEARNING_IS_PACKAGE False"
    assert _matches("matplotlib.pyplot", ("matplotlib",)) and not _matches("matplotlibx", ("matplotlib",))


def test_importing_ops_does_not_import_triton():
    mods, _ = _modules_after("import rfbench.ops")
    hits = sorted(m for m in mods if _matches(m, ("triton",)))
    assert not hits, (
        f"`import rfbench.ops` imported triton ({len(hits)} triton modules, e.g. {', '.join(hits[:3])}).\n"
        "Fix: import triton only inside the fused.py modules, and import those lazily from the "
        "dispatching function when a kernel is about to run."
    )


if __name__ == "__main__":  # print the graph's circles without pytest
    g, f = import_graph()
    for c in find_cycles(g):
        print(format_cycle(c, g, f))
    sys.exit(pytest.main([__file__, "-q"]))
