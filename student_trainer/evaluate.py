"""Sampling checkpoints and scoring samples: FID family on images, exact measures on the analytic mixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import AnalyticConfig, SampleConfig
from common.data import load_dataset
from common.eval.exact import exact_nll, mode_coverage, sliced_wasserstein
from common.eval.features import get_feature_net
from common.eval.fid import evaluate
from common.images import save_grid, save_npz
from common.teachers.analytic import GaussianMixture
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer.sampling import sample_teacher


def sample_checkpoint(folder: str, num: int, out: str, steps: str = "50", sampler: str = "ancestral",
                      eta: float = 0.0, seed: int = 0, use_ema: bool = True, device: str = "cpu") -> dict:
    """A checkpoint folder's samples -> ``out`` (.npz) and a PNG grid beside it."""
    if not out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    model = DKDMTeacher.from_folder(folder, device=device, use_ema=use_ema)
    cfg = SampleConfig(sampler=sampler, steps=steps, eta=eta, num_samples=num)
    x, y = sample_teacher(model, cfg, seed=seed, progress=True)
    save_npz(x, out, labels=y)
    grid = save_grid(x[:256], Path(out).with_suffix(".png"))
    return {"samples": out, "grid": str(grid), "count": int(len(x))}


def load_samples(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path) as f:
        return f["arr_0"]


def evaluate_samples(samples: str, reference: str, features: str = "digits") -> dict:
    """FID, sFID, IS, precision/recall of an .npz of samples against a reference data set."""
    ref, _ = load_dataset(reference)
    return evaluate(load_samples(samples), ref, get_feature_net(features))


def exact_metrics(x: torch.Tensor, mixture: GaussianMixture, seed: int = 0, num_reference: int = 4096) -> dict:
    """Exact measures of samples [N, C, H, W] against the analytic mixture: SW2 to exact samples, coverage, NLL."""
    gen = torch.Generator().manual_seed(seed)
    ref, _ = mixture.sample(num_reference, generator=gen)
    cov = mode_coverage(x, mixture)
    return {"sliced_wasserstein": float(sliced_wasserstein(x.double(), ref.double(), generator=gen)),
            "mode_coverage": float(cov["coverage"]), "exact_nll": float(exact_nll(x, mixture))}


def mixture_of(cfg: AnalyticConfig) -> GaussianMixture:
    return GaussianMixture.from_config(cfg)
