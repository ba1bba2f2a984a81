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


def evaluate_samples(samples: str, reference: str, features: str = "digits", device: str = "cpu") -> dict:
    """FID, sFID, IS, precision/recall of an .npz of samples against a reference data set."""
    ref, _ = load_dataset(reference)
    return evaluate(load_samples(samples), ref, get_feature_net(features, device=device))


def exact_metrics(x: torch.Tensor, mixture: GaussianMixture, seed: int = 0, num_reference: int = 4096) -> dict:
    """Exact measures of samples [N, C, H, W] against the analytic mixture: SW2 to exact samples, coverage, NLL."""
    gen = torch.Generator().manual_seed(seed)
    ref, _ = mixture.sample(num_reference, generator=gen)
    cov = mode_coverage(x, mixture)
    return {"sliced_wasserstein": float(sliced_wasserstein(x.double(), ref.double(), generator=gen)),
            "mode_coverage": float(cov["coverage"]), "exact_nll": float(exact_nll(x, mixture))}


def mixture_of(cfg: AnalyticConfig) -> GaussianMixture:
    return GaussianMixture.from_config(cfg)


@torch.no_grad()
def score_error(model: torch.nn.Module, teacher, mixture: GaussianMixture, num: int = 1024, seed: int = 0,
                t_stride: int = 1) -> float:
    """Exact score error of a network on its teacher's chain: mean over chain indices t of
    E_{x_t ~ q_t} ||eps_S(x_t, t) - eps*(x_t, t)||^2 / D, with eps* the analytic teacher's exact eps."""
    from common.diffusion import q_sample

    gen = torch.Generator().manual_seed(seed)
    d = teacher.diffusion
    x0 = mixture.sample(num, generator=gen)[0].float()
    errs = []
    for ti in range(0, d.num_timesteps, t_stride):
        t = torch.full((num,), ti, dtype=torch.long)
        x_t = q_sample(d, x0, t, torch.randn(x0.shape, generator=gen))
        eps_true, _ = teacher.predict(x_t, t)
        eps_s = model(x_t, d.map_timesteps(t))[:, : x0.shape[1]]
        errs.append(float(((eps_s.float() - eps_true) ** 2).mean()))
    return float(np.mean(errs))
