"""Imports point one way: networks (common/models) never import teachers (common/teachers), which build on them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_models_never_import_teachers():
    found = []
    for path in (ROOT / "common" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):          # function-level imports included
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("common.teachers")]
    assert not found, found
    code = ("import sys, pkgutil, importlib, common.models as m\n"
            "[importlib.import_module(f'common.models.{i.name}') for i in pkgutil.iter_modules(m.__path__)]\n"
            "print(sorted(k for k in sys.modules if k.startswith('common.teachers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
