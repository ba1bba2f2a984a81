"""The end of a run: loss curve from metrics.jsonl, teacher beside student from the same noise, scores;
and the CLI around it: shipped configs by name, --device, --log-level."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from student_trainer.cli import config_path, main as cli_main, shipped_configs
from student_trainer.report import plot_losses, side_by_side

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "teacher.analytic.image_size=4", "teacher.analytic.num_components=4",
    "teacher.diffusion.respacing=20", "student.arch=mlp", "student.flags={width: 64, depth: 1, time_embed_dim: 32}",
    "distill.batch_size=8", "distill.teacher_microbatch=64", "pool.rho=0.5", "distill.steps=6", "run.log_every=2",
    "sample.num_samples=8", "sample.steps=5", "run.progress=false", "metrics.enabled=false",
]


def test_loss_curve_is_drawn_from_metrics_jsonl(tmp_path):
    lines = [{"step": s, "loss": 1.0 / s, "l_simple": 0.5 / s, "l_vlb": 0.5 / s} for s in range(1, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "x"}\n')
    out = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    assert out is not None and Image.open(out).size[0] > 600
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_losses(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_side_by_side_puts_two_grids_in_one_png(tmp_path):
    a, b = torch.zeros(4, 1, 8, 8) - 1, torch.ones(4, 1, 8, 8)
    img = np.asarray(Image.open(side_by_side(a, b, tmp_path / "c.png", gap_px=8)), dtype=float)
    half = (img.shape[1] - 8) // 2
    assert img.shape[1] == 2 * half + 8
    assert img[:, :half].mean() + 100 < img[:, -half:].mean()      # black samples left, white right


def test_distill_ends_with_loss_curve_comparison_and_exact_scores(tmp_path, capsys):
    args = ["distill", "--config", "mixture", "--log-level", "warning"]
    for item in TINY + [f"run.out_dir={tmp_path}"]:
        args += ["--set", item]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "mixture"
    assert (run / "loss_curve.png").is_file() and (run / "samples" / "teacher_vs_student.png").is_file()
    summary = json.loads(out.strip().splitlines()[-1])
    for who in ("teacher", "student"):
        assert set(summary["quality"][who]) == {"sliced_wasserstein", "mode_coverage", "exact_nll"}
    # The exact teacher is the better sampler of its own mixture than a 6-step student.
    assert summary["quality"]["teacher"]["exact_nll"] < summary["quality"]["student"]["exact_nll"]


def test_shipped_configs_are_found_by_name_and_are_the_repositorys():
    names = shipped_configs()
    assert {"digits", "digits_teacher", "mixture", "paper/cifar10_32"} <= set(names)
    for value in ("digits", "configs/digits.yaml", "paper/cifar10_32"):
        name = value.removeprefix("configs/").removesuffix(".yaml")
        assert Path(config_path(value)).read_text() == (ROOT / "configs" / f"{name}.yaml").read_text()


def test_unknown_config_and_device_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["distill", "--config", "digitz"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "digitz" in err and "mixture" in err
    assert cli_main(["eval", "--samples", "x.npz", "--reference", "digits", "--device", "tpu:7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--device" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    assert cli_main(["sample", "--checkpoint", str(tmp_path), "--out", "x.npz", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
