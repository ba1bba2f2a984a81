"""common/pool imports flow one way: every module imports on its own, and none hides a cycle in a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POOL = ROOT / "common" / "pool"
MODULES = sorted(p.stem for p in POOL.glob("*.py") if p.stem != "__init__")


def test_each_pool_module_imports_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = ["common.pool"] + [f"common.pool.{m}" for m in MODULES]
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
             for m in names}
    failed = {m: p.communicate(timeout=120)[1].strip().splitlines()[-1:] for m, p in procs.items()}
    failed = {m: err for m, err in failed.items() if procs[m].returncode}
    assert not failed, f"modules that do not import on their own: {failed}"


def test_no_function_level_import_of_the_pool_except_the_backend_factory():
    """A function-level import of another pool module is how a cycle hides; only common.pool's factory
    imports backends when asked for one (so nobody pays for ray or redis unless they use it)."""
    found = []
    for path in POOL.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common.pool"):
                    if not (path.name == "__init__.py" and fn.name == "_backend"):
                        found.append(f"{path.name}:{node.lineno} {fn.name} imports {node.module}")
    assert not found, found
