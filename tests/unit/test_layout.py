"""The package layout (recipe/__init__.py, recipe/stages/__init__.py): dependencies point one
way, tools -> stages -> algorithms, with recipe.config and recipe.io for all.

- every module under recipe/ is parsed with ``ast`` (imports inside functions included) and
  checked against the layer rules; the module-level import graph has no circle;
- the entry modules import in a fresh interpreter, and importing a lower layer does not
  load a higher one;
- the registered stages are the ones :data:`recipe.stages.base.ORDER` documents.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "recipe"

#: ``python -m recipe.<tool>`` modules and the Slurm glue ``main`` uses.
TOOLS = {"recipe.main", "recipe.data", "recipe.models", "recipe.eval", "recipe.report", "recipe.dots", "recipe.slurm"}
TRAINER = "recipe.stages.trainer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, name: str) -> str:
    """Absolute module of ``from <module> import name`` (relative imports resolved)."""
    base = node.module or ""
    if node.level:
        pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    candidate = f"{base}.{name}"
    return candidate if candidate in MODULES else base  # `from recipe import data` names a module


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The ``recipe.*`` modules ``module`` imports (with ``top_level_only``: at import time,
    i.e. not inside a function)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, node, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m == "recipe" or m.startswith("recipe.")}


def _layer_of(module: str) -> str:
    if module in TOOLS:
        return "tool"
    if module == TRAINER:
        return "trainer"
    for layer in ("stages", "algos", "reward"):
        if module == f"recipe.{layer}" or module.startswith(f"recipe.{layer}."):
            return layer
    return {"recipe.config": "config", "recipe.io": "io", "recipe": "package"}.get(module, "unknown")


def test_every_module_has_a_layer():
    assert {"recipe.config", "recipe.io", TRAINER, *TOOLS} <= set(MODULES)
    assert [m for m in MODULES if _layer_of(m) == "unknown"] == []
    # the tree the rules below speak about
    assert {"recipe.stages.base", "recipe.stages.rows", "recipe.stages.group_filter", "recipe.stages.rollout_replay",
            "recipe.stages.dots", "recipe.stages.preference", "recipe.stages.reward_metrics",
            "recipe.stages.workers"} <= set(MODULES)
    assert {"recipe.algos.metrics", "recipe.algos.lorr", "recipe.algos.dots", "recipe.algos.rollout_replay"} <= set(MODULES)


def _allowed_for_stage(target: str) -> bool:
    return (target == "recipe.algos" or target.startswith("recipe.algos.")
            or target in ("recipe.config", "recipe.io", "recipe.stages.base", "recipe.stages.rows"))


STAGE_MODULES = [m for m in MODULES if _layer_of(m) == "stages"]
ALGO_MODULES = [m for m in MODULES if _layer_of(m) == "algos"]


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_modules_import_neither_the_trainer_nor_a_tool(module):
    got = imports(module)
    assert not got & ({TRAINER} | TOOLS), sorted(got & ({TRAINER} | TOOLS))
    # recipe/stages/__init__.py: algorithms, config, io and the stage protocol / row helpers only
    assert [m for m in sorted(got) if not _allowed_for_stage(m)] == []


@pytest.mark.parametrize("module", ALGO_MODULES)
def test_algorithm_modules_import_no_stage_and_no_tool(module):
    got = imports(module)
    bad = [m for m in sorted(got) if m == "recipe.stages" or m.startswith("recipe.stages.") or m in TOOLS]
    assert bad == []
    assert [m for m in sorted(got) if _layer_of(m) not in ("algos", "config", "io")] == []


def test_config_io_and_reward_sit_below_stages_and_tools():
    assert imports("recipe.io") == set()
    assert {_layer_of(m) for m in imports("recipe.config")} <= {"algos"}  # lazy registry / helper lookups
    for module in (m for m in MODULES if _layer_of(m) == "reward"):
        assert {_layer_of(m) for m in imports(module)} <= {"reward", "config", "io"}, module


def test_only_tools_import_the_trainer():
    importers = sorted(m for m in MODULES if TRAINER in imports(m))
    assert importers and all(m in TOOLS for m in importers), importers


def test_no_import_circle_at_import_time():
    graph = {m: imports(m, top_level_only=True) & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_the_layer_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """Control: the checker is not vacuous (a lazy import of a tool inside a function, a
    relative import and ``from recipe import <module>`` are all found)."""
    fake = {**MODULES, "recipe.stages.fake": tmp_path / "fake.py"}
    (tmp_path / "fake.py").write_text(
        "from . import rows\nfrom recipe import data\n\ndef f():\n    import recipe.stages.trainer\n")
    monkeypatch.setitem(globals(), "MODULES", fake)
    assert imports("recipe.stages.fake") == {"recipe.stages.rows", "recipe.data", TRAINER}
    assert imports("recipe.stages.fake", top_level_only=True) == {"recipe.stages.rows", "recipe.data"}


# ----------------------------------------------------------------------------- fresh interpreters
def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["recipe.main", "recipe.eval", TRAINER])
def test_entry_module_imports_in_a_fresh_interpreter(module):
    proc = _python(f"import {module}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lower_layers_do_not_load_higher_ones_at_run_time():
    code = """
import json, sys
import recipe.algos, recipe.algos.metrics, recipe.algos.lorr, recipe.algos.dots, recipe.config, recipe.io
after_algos = sorted(m for m in sys.modules if m.startswith("recipe."))
import recipe.stages.rollout_replay, recipe.stages.dots, recipe.stages.preference, recipe.stages.reward_metrics
import recipe.stages.group_filter
after_stages = sorted(m for m in sys.modules if m.startswith("recipe."))
print(json.dumps([after_algos, after_stages]))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_algos, after_stages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m for m in after_algos if _layer_of(m) not in ("algos", "config", "io")] == []
    assert [m for m in after_stages if _layer_of(m) in ("tool", "trainer")] == []


# ----------------------------------------------------------------------------- the stage registry
def test_registered_stages_are_the_documented_order():
    code = """
import json
from recipe.stages.base import BUILTIN, ORDER, STAGES, load_stages
classes = load_stages()
print(json.dumps({"order": ORDER, "loaded": [[c.name, c.order, c.__module__] for c in classes],
                  "registered": sorted(STAGES), "builtin": list(BUILTIN)}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    order = out["order"]
    assert sorted(out["registered"]) == sorted(order)  # every registered stage is documented, and vice versa
    assert {name: o for name, o, _ in out["loaded"]} == order  # each class's order is the documented one
    assert [name for name, _, _ in out["loaded"]] == sorted(order, key=lambda n: (order[n], n))  # run order
    assert {module for _, _, module in out["loaded"]} == set(out["builtin"])  # one stage per built-in module
