"""What a run shows at its end: the loss curves, the teacher beside the student, a quality figure for both.

- ``plot_losses``: ``metrics.jsonl`` -> ``loss_curve.png`` (L_simple*, L*_vlb and their sum per
  logged step, log scale: L*_vlb spans orders of magnitude early on). Every run writes it.
- ``compare_with_teacher``: teacher and student sampled from the same noise (same seed, same chain,
  the sampler draws x_T and every step's noise in the same order) side by side in one PNG, and
  scored: the exact measures against the analytic mixture (common/eval/exact.py), else the
  project's digits FID (common/eval/features.py) for 1x8x8 images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from common.config import Config
from common.teachers import make_teacher
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer.sampling import sample_teacher

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "l_simple", "l_vlb")


def plot_losses(metrics_path: str | Path, out: str | Path) -> Path | None:
    """One log-scale panel per loss term against the step; None when no step was logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()] \
        if Path(metrics_path).is_file() else []
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(LOSS_TERMS), figsize=(4 * len(LOSS_TERMS), 3.2), constrained_layout=True)
    for ax, term in zip(axes, LOSS_TERMS):
        points = sorted((r["step"], r[term]) for r in rows if r.get(term) is not None and r[term] > 0)
        if points:
            ax.plot(*zip(*points), lw=1)
            ax.set_yscale("log")
        ax.set_title({"loss": "loss (L_simple* + L*_vlb)", "l_simple": "L_simple*", "l_vlb": "L*_vlb"}[term])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare_with_teacher(cfg: Config, checkpoint: str | Path, out: str | Path, device: str = "cpu") -> dict:
    """Teacher | student grid from the same noise at ``out``, and each one's quality figure."""
    teacher = make_teacher(cfg.teacher, device)
    student = DKDMTeacher.from_folder(str(checkpoint), device=device, use_ema=cfg.sample.use_ema)
    if student.diffusion.fingerprint() != teacher.diffusion.fingerprint():
        raise ValueError("the student's chain is not the teacher's: their samples share no noise")
    x_teacher, _ = sample_teacher(teacher, cfg.sample, seed=cfg.run.seed)
    x_student, _ = sample_teacher(student, cfg.sample, seed=cfg.run.seed)
    grid = side_by_side(x_teacher, x_student, out)
    scores = {"teacher": quality(cfg, teacher, x_teacher), "student": quality(cfg, teacher, x_student)}
    return {"comparison": str(grid), "quality": scores}


def quality(cfg: Config, teacher, x: torch.Tensor) -> dict:
    """Exact measures against the analytic mixture, else digits FID; {} when neither applies."""
    if cfg.teacher.kind == "analytic":
        from student_trainer.evaluate import exact_metrics
        return {k: round(v, 4) for k, v in exact_metrics(x, teacher.mixture, seed=cfg.run.seed).items()}
    if tuple(teacher.image_shape) == (1, 8, 8):
        from common.data import load_dataset
        from common.eval.features import get_feature_net
        from common.eval.fid import compute_features, fid

        ref, _ = load_dataset("digits")
        net = get_feature_net("digits")
        return {"digits_fid": round(fid(compute_features(ref, net)["pool"], compute_features(x, net)["pool"]), 3)}
    return {}


def side_by_side(left: torch.Tensor, right: torch.Tensor, out: str | Path, gap_px: int = 8) -> Path:
    """Two sample grids in one PNG, teacher left and student right."""
    import tempfile

    from PIL import Image

    from common.images import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        a, b = (Image.open(save_grid(x, Path(tmp) / f"{i}.png")).convert("L" if x.shape[1] == 1 else "RGB")
                for i, x in enumerate((left, right)))
        canvas = Image.new(a.mode, (a.width + gap_px + b.width, max(a.height, b.height)), 255 if a.mode == "L"
                           else (255, 255, 255))
        canvas.paste(a, (0, 0))
        canvas.paste(b, (a.width + gap_px, 0))
    out = Path(out)
    canvas.save(out)
    return out


def finish(cfg: Config, result: dict, run_root: str | Path, distilled: bool = True) -> dict:
    """The end of every run: the loss curve, and for a distilled student the teacher beside it."""
    root = Path(run_root)
    curve = plot_losses(root / "metrics.jsonl", root / "loss_curve.png")
    if curve is not None:
        result["loss_curve"] = str(curve)
        logger.info("loss curve: %s", curve)
    if distilled and "checkpoint" in result:
        result.update(compare_with_teacher(cfg, result["checkpoint"], root / "samples" / "teacher_vs_student.png"))
        logger.info("teacher | student from the same noise: %s; quality %s", result["comparison"], result["quality"])
    return result
