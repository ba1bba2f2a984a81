"""What the bound on the student's Eq. 12 v does, measured on the exact mixture teacher (issue 22, item 2).

    python benchmarks/v_bound.py                 # 3 seeds, 400 steps of batch 32 (the replication's mixture budget)
    python benchmarks/v_bound.py --seeds 1 --steps 100

Each choice names the bound under the loss and the bound when sampling:
    none        the reference: v raw in L*_vlb and when sampling
    clamp/raw   clamped in L*_vlb, raw when sampling (the project before issue 22)
    clamp       clamped in both
    tanh        tanh(v) in both
and, for the data-based baseline (IDDPM's hybrid objective on exact mixture samples), none and clamp.
Printed per choice (mean ± std over seeds): the exact score error, SW2 of the samples to exact
samples, their exact NLL, and on the 50-step sampling chain the largest raw |v| and the sampled
sigma's largest ratio to sqrt(beta_t) and smallest to sqrt(beta_tilde_t), Eq. 12's two ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from common.config import load_config
from common.diffusion import bound_v, make_diffusion, model_log_variance, respace
from common.models.checkpoint import from_pretrained
from student_trainer.baselines import train_on_data
from student_trainer.distill import build_session, train_step
from student_trainer.evaluate import exact_metrics, mixture_of, score_error
from student_trainer.sampling import network_denoiser, run_sampler

DKDM_CHOICES = {"none": ("none", "none"), "clamp/raw": ("clamp", "none"), "clamp": ("clamp", "clamp"),
                "tanh": ("tanh", "tanh")}
DATA_CHOICES = {"data_based none": "none", "data_based clamp": "clamp"}


def sample_and_watch(model, chain, cfg, teacher, seed: int, sample_bound: str) -> tuple[torch.Tensor, dict]:
    """Samples on cfg.sample's respacing, and over the chain the max raw |v|, the max sigma / sqrt(beta_t)
    and the min sigma / sqrt(beta_tilde_t) (Eq. 12's ends)."""
    d = respace(chain, cfg.sample.steps)
    raw = network_denoiser(model.eval(), d, teacher.image_shape[0], "none")
    seen = {"v": 0.0, "ratio": 0.0, "low": np.inf}

    def denoise(x_t, t, y=None):
        eps, v = raw(x_t, t)
        vb = bound_v(v, sample_bound)
        logvar = model_log_variance(d, t, "learned_range", vb, shape=x_t.shape)
        max_log = model_log_variance(d, t, "learned_range", torch.ones_like(v), shape=x_t.shape)
        min_log = model_log_variance(d, t, "learned_range", -torch.ones_like(v), shape=x_t.shape)
        seen["v"] = max(seen["v"], float(v.abs().max()))
        seen["ratio"] = max(seen["ratio"], float(torch.exp(0.5 * (logvar - max_log)).max()))
        seen["low"] = min(seen["low"], float(torch.exp(0.5 * (logvar - min_log)).min()))
        return eps, vb

    x, _ = run_sampler(d, denoise, "learned_range", cfg.sample, teacher.image_shape, None, seed, torch.device("cpu"),
                       clip_denoised=teacher.clip_denoised)
    return x, seen


def measure(model, chain, cfg, teacher, mixture, seed: int, sample_bound: str) -> dict:
    x, seen = sample_and_watch(model, chain, cfg, teacher, seed + 7, sample_bound)
    m = exact_metrics(x, mixture, seed=seed)
    return {"score_error": score_error(model, teacher, mixture, num=512, seed=seed, t_stride=5),
            "sw2": m["sliced_wasserstein"], "nll": m["exact_nll"], "max_raw_v": seen["v"],
            "max_sigma_ratio": seen["ratio"], "min_sigma_ratio": seen["low"]}


def dkdm_run(cfg, train_bound: str, sample_bound: str) -> dict:
    s = build_session(cfg)
    try:
        s.trainer.v_bound = train_bound
        s.worker.fill_all(s.pool.num_slots)
        while s.trainer.step < cfg.distill.steps:
            train_step(s)
        return measure(s.trainer.ema_model(), s.teacher.diffusion, cfg, s.teacher, mixture_of(cfg.teacher.analytic),
                       cfg.run.seed, sample_bound)
    finally:
        s.pool.close()


def data_run(cfg, bound: str, teacher) -> dict:
    """The data-based baseline on 1797 exact mixture samples, hybrid objective with v bounded by ``bound``."""
    from student_trainer import baselines
    mixture = mixture_of(cfg.teacher.analytic)
    x = mixture.sample(1797, generator=torch.Generator().manual_seed(cfg.run.seed + 1))[0].float().clamp(-1, 1)
    run = cfg.model_copy(deep=True)
    run.teacher.diffusion.respacing = ""
    run.sample.num_samples = 16
    saved, baselines.HYBRID_V_BOUND = baselines.HYBRID_V_BOUND, bound
    try:
        out = train_on_data(run, data=(x, None))
    finally:
        baselines.HYBRID_V_BOUND = saved
    model, _ = from_pretrained(out["checkpoint"], use_ema=True)
    dc = cfg.teacher.diffusion
    return measure(model, make_diffusion(dc.schedule, dc.num_timesteps), cfg, teacher, mixture, cfg.run.seed, bound)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--only", default="", help="comma-separated choices (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from common.teachers import make_teacher
    out_dir = tempfile.mkdtemp(prefix="vbound-")
    rows: dict[str, list[dict]] = {}
    choices = [*DKDM_CHOICES, *DATA_CHOICES]
    if args.only:
        choices = [c for c in choices if c in args.only.split(",")]
    for seed in range(args.seeds):
        for name in choices:
            cfg = load_config("configs/mixture.yaml", [
                f"run.out_dir={out_dir}", f"run.name={name.replace(' ', '_').replace('/', '_')}-{seed}",
                f"run.seed={seed}", "run.progress=false", "run.ckpt_every=0", "metrics.enabled=false",
                f"distill.steps={args.steps}", "distill.batch_size=32", "distill.ema_rate=0.99",
                "sample.num_samples=512"])
            if name in DKDM_CHOICES:
                res = dkdm_run(cfg, *DKDM_CHOICES[name])
            else:
                res = data_run(cfg, DATA_CHOICES[name], make_teacher(cfg.teacher, "cpu"))
            rows.setdefault(name, []).append(res)
            print(json.dumps({"choice": name, "seed": seed, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    print("\n| choice (loss / sampling) | score error | SW2 | exact NLL | max raw abs(v) | max sigma / sqrt(beta_t) "
          "| min sigma / sqrt(beta_tilde_t) |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        cells = []
        for k in ("score_error", "sw2", "nll", "max_raw_v", "max_sigma_ratio", "min_sigma_ratio"):
            v = np.array([r[k] for r in rs])
            cells.append(f"{v.mean():.4g} ± {v.std(ddof=1) if len(v) > 1 else 0:.2g}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
