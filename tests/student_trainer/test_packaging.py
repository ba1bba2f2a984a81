"""The wheel works outside a checkout: configs by name, every imported distribution declared.

The wheel is built from a copy of the repository and installed with ``--no-deps`` into a fresh
virtual environment in a temporary folder. Its third-party packages come from the test's own
environment through a path entry (a ``.pth`` line: the project itself is not importable from there,
its editable-install hook is not run), so the check that they are declared is explicit: every
distribution the installed code imports must be in the wheel's Requires-Dist, and ``pip check``
must find the declared ones satisfied.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "teacher_workers", "student_trainer")


def third_party_imports(site: Path) -> set[str]:
    """Top-level modules imported anywhere in the installed packages, minus the stdlib and themselves."""
    names: set[str] = set()
    for package in PACKAGES:
        for f in (site / package).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, its site-packages) with the freshly built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".ci-venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp / "dist").glob("dkdm-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the dependencies path (deps.pth) may hold an editable install of this project;
    # pip must neither take it for this wheel nor uninstall it.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed",
                    str(wheel)], check=True, timeout=300)
    return env_dir, site


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR", "/tmp/ray")
    return env


def test_every_imported_distribution_is_declared(installed):
    env_dir, site = installed
    dist = next(site.glob("dkdm-*.dist-info"))
    meta = Parser().parsestr((dist / "METADATA").read_text())
    declared = {canonical(r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip())
                for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    providers = metadata.packages_distributions()
    missing = {m: providers.get(m) for m in third_party_imports(site)
               if not any(canonical(d) in declared for d in providers.get(m, []))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "check"],
                           capture_output=True, text=True, env=clean_env())
    assert check.returncode == 0, check.stdout


def test_every_data_file_of_the_packages_is_installed(installed):
    """Assets, configs, scripts: whatever the code reads beside itself (documentation aside)."""
    _, site = installed
    wanted = [f.relative_to(ROOT) for package in PACKAGES for f in (ROOT / package).rglob("*")
              if f.is_file() and f.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in f.parts]
    wanted += [Path("student_trainer/configs") / f.relative_to(ROOT / "configs") for f in (ROOT / "configs").rglob("*.yaml")]
    missing = [str(f) for f in wanted if not (site / f).is_file()]
    assert not missing, f"not in the wheel: {missing}"


@pytest.mark.slow
def test_installed_dkdm_distills_the_shipped_mixture_config_from_any_folder(installed, tmp_path):
    env_dir, site = installed
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import student_trainer; print(student_trainer.__file__)"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    out = subprocess.run([str(env_dir / "bin" / "dkdm"), "distill", "--config", "mixture", "--set", "distill.steps=20",
                          "--set", "pool.rho=0.1", "--set", "sample.num_samples=64"],   # a smaller warm-up and evaluation
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "runs" / "mixture" / "checkpoint" / "model.safetensors").is_file()
    assert '"steps": 20' in out.stdout
