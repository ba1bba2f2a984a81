"""The replication's --quick mode end to end (issue 7): every experiment runs, the report has its tables,
plots and sample grids, and every number in it is finite. Also: the paper configs validate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.models.registry import network_flags

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = ["cifar10_32", "imagenet_32", "celeba_64", "celebahq_256_ldm"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_dry_run(name):
    """`dkdm distill --dry-run` accepts each full-scale config (exit 0, the resolved config on stdout)."""
    r = subprocess.run([sys.executable, "-m", "student_trainer.cli", "distill", "--config",
                        f"configs/paper/{name}.yaml", "--set", "teacher.path=/some/dir", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["teacher"]["path"] == "/some/dir"
    assert cfg["distill"]["ema_rate"] == 0.9999 and cfg["teacher"]["diffusion"]["respacing"] == ""


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_flags_build(name):
    """Teacher flags pass guided-diffusion's checks and the student flags resolve (no weights needed)."""
    from common.models.adm import check_model_flags
    from common.teachers.guided import split_guided_flags

    cfg = load_config(str(ROOT / "configs" / "paper" / f"{name}.yaml"), ["teacher.path=/x"])
    if cfg.teacher.kind == "guided_diffusion":
        check_model_flags(split_guided_flags(cfg.teacher.flags, cfg.teacher.diffusion))
        assert cfg.pool.rho == 0.4 and cfg.distill.lr == 1e-4
    else:
        assert cfg.teacher.kind == "diffusers" and cfg.pool.rho == 4.0 and cfg.distill.lambda_vlb == 0.0
        assert cfg.distill.batch_size == 48 and cfg.sample.sampler == "ddim"
    # the student is smaller than the teacher (the LDM teacher: 224 channels, 2 res blocks, in the notes)
    s = network_flags(cfg.student.arch, cfg.student.size, **cfg.student.flags)
    t = {"num_channels": 224, "num_res_blocks": 2, **cfg.teacher.flags}
    assert s["num_channels"] <= t["num_channels"] and s["num_res_blocks"] <= t["num_res_blocks"]
    assert (s["num_channels"], s["num_res_blocks"]) != (t["num_channels"], t["num_res_blocks"])


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_replicate_quick_writes_a_complete_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/replicate.py", "--quick", "--out", str(tmp_path / "docs"),
                        "--work", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=880)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = (tmp_path / "docs" / "replication.md").read_text()
    assets = tmp_path / "docs" / "replication"
    results = json.loads((assets / "results.json").read_text())
    # every experiment ran, with the seeds it was asked for
    assert set(results["experiments"]) == {"table2_mixture", "table2_digits", "table5_cross", "fig4a_variants",
                                           "fig4b_rho", "beyond_spi", "beyond_chain"}
    # the report's sections, tables and plots
    for heading in ("Table 2 analogue", "Table 5 analogue", "Fig. 4a analogue", "Fig. 4b analogue",
                    "samples per insert", "respaced distillation chain", "Agreement with the paper", "Full scale"):
        assert heading in report, heading
    for row in ("Data-Limited Training (20%)", "Data-Free Training (0%)", "Dynamic Iterative Distillation"):
        assert row in report
    for png in ("fig4a_variants.png", "fig4b_rho.png", "beyond_spi.png", "beyond_chain.png",
                "table2_mixture__dkdm.png", "table2_digits__data_free.png", "table5_cross__ViTS_CNNT_dkdm.png"):
        assert (assets / png).stat().st_size > 1000, png
        assert f"replication/{png}" in report
    # every metric of every run is a finite number
    for exp in results["experiments"].values():
        for runs in exp["methods"].values():
            for run in runs:
                nums = list(_finite_numbers(run["metrics"]))
                assert nums and all(math.isfinite(v) for v in nums if not math.isnan(v)), run["metrics"]
                for key in ("fid", "sliced_wasserstein"):
                    if key in run["metrics"]:
                        assert math.isfinite(run["metrics"][key])
    # DKDM's warm-up cost grows with the chain length at a fixed pool size (|B+| * K / 2 forwards)
    chain = results["experiments"]["beyond_chain"]["methods"]
    assert chain["chain=10"][0]["warmup_forwards"] < chain["chain=25"][0]["warmup_forwards"]
    # the report re-renders from the saved results alone
    r = subprocess.run([sys.executable, "benchmarks/replicate.py", "--report-only", "--out", str(tmp_path / "docs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "docs" / "replication.md").read_text() == report
