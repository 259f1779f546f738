"""The package's layering, held as tests (docs/ARCHITECTURE.md describes it).

- No import circle in ``fastkd/``, lazy imports inside functions included.
- Each loss family has its four pieces under the same names (reference, ops, triton_kernel,
  module) and the layers import downwards only: a module never reaches a kernel, the reference
  imports nothing of its family.
- ``fastkd/distributed.py`` only re-exports.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture_report",
                                               ROOT / "scripts" / "architecture_report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules["architecture_report"] = report
_spec.loader.exec_module(report)

FAMILIES = ("logit", "feature", "relation")


@pytest.fixture(scope="module")
def graph():
    return report.import_graph()


def test_no_import_circle(graph):
    assert report.cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle(graph):
    planted = {k: list(v) for k, v in graph.items()}
    planted["fastkd.logit.config"] = planted["fastkd.logit.config"] + ["fastkd.logit.ops"]
    assert any({"fastkd.logit.config", "fastkd.logit.ops"} <= set(c)
               for c in report.cycles(planted))


def test_lazy_imports_count(tmp_path):
    # An import inside a function is an edge of the graph like any other.
    mods = {"fastkd.a": tmp_path / "a.py", "fastkd.b": tmp_path / "b.py"}
    mods["fastkd.a"].write_text("import fastkd.b\n")
    mods["fastkd.b"].write_text("def f():\n    from fastkd import a\n")
    edges = {m: report.imports_of(m, p, mods) for m, p in mods.items()}
    assert edges == {"fastkd.a": {"fastkd.b"}, "fastkd.b": {"fastkd.a"}}
    assert report.cycles(edges) == [["fastkd.a", "fastkd.b"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_has_its_four_pieces(family):
    names = {p.name for p in (ROOT / "fastkd" / family).glob("*.py")}
    assert {"reference.py", "ops.py", "triton_kernel.py", "module.py"} <= names
    for backend_file in (f"csrc/cpu/{family}_kd.cpp", f"csrc/cuda/{family}_kd.cu",
                         f"csrc/glue/{family}.h", f"csrc/include/fastkd/{family}_kd.h"):
        assert (ROOT / backend_file).is_file(), backend_file


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_import_downwards(graph, family):
    pkg = f"fastkd.{family}"
    reference = graph[f"{pkg}.reference"]
    assert not [m for m in reference if m.startswith(pkg + ".")], reference
    module = graph[f"{pkg}.module"]
    assert f"{pkg}.triton_kernel" not in module and "fastkd._ext" not in module, module
    kernel = graph[f"{pkg}.triton_kernel"]
    assert f"{pkg}.ops" not in kernel and f"{pkg}.module" not in kernel, kernel


def test_distributed_only_reexports():
    tree = ast.parse((ROOT / "fastkd" / "distributed.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds
