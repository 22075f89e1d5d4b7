"""The layout's rules, read from the source with ``ast`` (every import, module-level or inside a function):

- imports point one way, ``server -> experts -> engine -> adapters``: a package may import those to its
  right, never one to its left (bench/ and tests/ may import anything);
- inside each of those folders too, their subpackages point one way (``SUBPACKAGES``, lowest first); a
  module directly in the folder may sit between them (``engine/factory.py`` picks an engine,
  ``experts/commands.py`` joins two subpackages' command lines), cycles are caught by the next rule;
- no import cycle between modules;
- every package and module says what it is for (a docstring).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
LAYERS = ("adapters", "engine", "experts", "server")  # lowest first
# the subpackages of each folder, lowest first (subpackages at one level may not import each other)
SUBPACKAGES = {
    "engine": (("native", "vllm"),),
    "experts": (("store",), ("pass1",), ("tasks",), ("train",), ("sapt",), ("eval",)),
    "server": (("api",),),
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    mods = {}
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in mods:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] in LAYERS:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = module_files(root)
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {top: i for i, top in enumerate(LAYERS)}
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if rank[d.split(".")[0]] > rank[m.split(".")[0]])


def subpackage_violations(graph: dict[str, set[str]], order: dict = SUBPACKAGES) -> list[str]:
    """Imports from a subpackage to one of the same folder ranked above it (or beside it)."""
    def rank(module: str):
        parts = module.split(".")
        if len(parts) < 3:  # the folder itself or a module directly in it: no rank
            return None
        for i, level in enumerate(order.get(parts[0], ())):
            if parts[1] in level:
                return parts[0], i, parts[1]
        return None

    bad = []
    for m, deps in graph.items():
        mine = rank(m)
        for d in deps:
            theirs = rank(d)
            if mine and theirs and mine[0] == theirs[0] and mine[2] != theirs[2] and theirs[1] >= mine[1]:
                bad.append(f"{m} imports {d}")
    return sorted(bad)


def test_every_subpackage_is_ranked():
    """A new subpackage must be given its place in SUBPACKAGES (else its imports go unchecked)."""
    ranked = {(top, name) for top, levels in SUBPACKAGES.items() for level in levels for name in level}
    found = {(p.parent.parent.name, p.parent.name) for top in LAYERS for p in (ROOT / top).glob("*/__init__.py")}
    assert found - ranked == set()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imports_point_one_way():
    assert direction_violations(import_graph()) == []


def test_subpackages_point_one_way():
    assert subpackage_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in module_files().items()
               if not ast.get_docstring(ast.parse(path.read_text())) and path.stat().st_size > 0]
    assert missing == []


@pytest.fixture
def fake_tree(tmp_path):
    def write(files: dict[str, str]) -> Path:
        for rel, text in files.items():
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        for top in LAYERS:
            (tmp_path / top).mkdir(exist_ok=True)
            (tmp_path / top / "__init__.py").touch()
        return tmp_path

    return write


def test_the_checks_catch_an_upward_import_and_a_cycle(fake_tree):
    """The rules above fail on what they forbid (a function-level import counts; so does a relative one)."""
    root = fake_tree({
        "engine/a.py": "def f():\n    from server.app import x\n",
        "experts/b.py": "from . import c\n",
        "experts/c.py": "import experts.b\n",
        "adapters/ok.py": "import torch\n",
        "server/app.py": "x = 1\n",
        "experts/store/s.py": "from experts.train import t\n",
        "experts/train/t.py": "from experts.store import u\n",
        "experts/store/u.py": "x = 1\n",
        "engine/native/n.py": "from engine.vllm import v\n",
        "engine/vllm/v.py": "x = 1\n",
    })
    for sub in ("experts/store", "experts/train", "engine/native", "engine/vllm"):
        (root / sub / "__init__.py").touch()
    graph = import_graph(root)
    assert direction_violations(graph) == ["engine.a imports server.app"]
    assert cycles(graph) == [["experts.b", "experts.c"]]
    assert subpackage_violations(graph) == ["engine.native.n imports engine.vllm.v",
                                            "experts.store.s imports experts.train.t"]


OUTSIDE_PATHS = ("../shared", "shared/data")  # a checkout's neighbours: the product finds data through T2_DATA_DIR


def outside_path_mentions(root: Path = ROOT, folders: tuple[str, ...] = (*LAYERS, "bench")) -> list[str]:
    """``file:line`` of every mention of a path beside the checkout, in the product's code and benchmarks."""
    found = []
    for top in folders:
        for path in sorted((root / top).rglob("*")):
            if path.suffix not in (".py", ".sh", ".md", ".json", ".yaml", ".toml") or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if any(p in line for p in OUTSIDE_PATHS):
                    found.append(f"{path.relative_to(root)}:{n}")
    return found


def test_nothing_in_the_product_names_a_path_beside_the_checkout():
    assert outside_path_mentions() == []


def test_the_path_check_finds_a_mention(fake_tree):
    root = fake_tree({"bench/b.py": 'PLACES = ("data", "../shared/data")\n', "experts/e.py": '"""data root."""\n'})
    assert outside_path_mentions(root) == ["bench/b.py:1"]
