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


# One interpreter imports the third-party libraries once, then each module is imported in a forked child
# that has no project module loaded yet: a cycle among the project's modules shows as the child's ImportError.
_CHECK = """
import os, sys, numpy, torch, msgpack, ray, redis
bad = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException as err:
            print(name, type(err).__name__, err, flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        bad.append(name)
sys.exit(1 if bad else 0)
"""


def test_each_pool_module_imports_in_a_fresh_interpreter():
    names = ["common.pool"] + [f"common.pool.{m}" for m in MODULES]
    res = subprocess.run([sys.executable, "-c", _CHECK, *names], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"modules that do not import on their own:\n{res.stdout}{res.stderr[-2000:]}"


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
