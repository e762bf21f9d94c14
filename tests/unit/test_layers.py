"""The layering contract (pyproject's [tool.importlinter], run with import-linter) holds, fails on planted
violations, and no two subpackages import each other in a cycle (function-level imports included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.argv[0] = 'lint-imports'; lint_imports_command()"]
#: Modules of the pure core that live inside a subpackage: graph nodes of their own.
def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def test_the_layering_contracts_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


@pytest.fixture
def planted(tmp_path):
    """A copy of the package and its contracts, to plant violations in."""
    shutil.copytree(ROOT / "coordexp", tmp_path / "coordexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("coordjson/codec.py", "from coordexp.trainer import learner  # noqa", "Layers depend downward only"),
    ("config/schema.py", "import coordexp.launch.run  # noqa", "Layers depend downward only"),
    ("rollout/batch.py", "def late():\n    from coordexp.evaluation import pipeline  # noqa",
     "Layers depend downward only"),
    ("matching/boxes.py", "import torch  # noqa", "The pure core imports neither torch"),
    ("protocol.py", "def late():\n    import transformers  # noqa", "The pure core imports neither"),
    ("rollout/vllm_processor.py", "from transformers import AutoTokenizer  # noqa",
     "The vLLM processor never imports transformers"),
])
def test_a_planted_violation_fails(planted, module, line, broken):
    path = planted / "coordexp" / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    out = lint(planted)
    assert out.returncode != 0
    assert f"{broken}" in out.stdout and "BROKEN" in out.stdout, out.stdout


def test_every_subpackage_and_top_level_module_has_a_layer():
    """A new subpackage or top-level module must be placed in the contract, not slip past it."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    package = ROOT / "coordexp"
    modules = ({f"coordexp.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
               | {f"coordexp.{p.parent.name}" for p in package.glob("*/__init__.py")})
    assert "coordexp.rollout" in modules and "coordexp.repeat_rules" in modules  # the listing is real
    assert modules - named == set()


def node(module: str) -> str:
    """The layer-graph node of a module: its subpackage, or itself for a top-level module."""
    return ".".join(module.split(".")[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle reachable by DFS (enough to show one exists and which nodes it joins)."""
    found, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = "open"
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                found.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m, [*path, m])
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    return found


def package_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("coordexp", cache_dir=None)
    edges: dict[str, set[str]] = defaultdict(set)
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = node(module), node(imported)
            if a != b:
                edges[a].add(b)
    return edges


def test_no_import_cycle_between_subpackages():
    edges = package_graph()
    assert "coordexp.trainer" in edges and "coordexp.launch" in edges  # the graph is real
    assert cycles(edges) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
