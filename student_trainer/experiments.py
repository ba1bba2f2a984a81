"""Method comparisons at an equal step budget (issue 3's figures; the replication builds on them).

On the analytic mixture every method is scored exactly: sliced Wasserstein-2 to exact samples,
mode coverage and exact NLL of the student's samples.
"""

from __future__ import annotations

import time

import torch

from common.config import Config
from common.teachers import make_teacher
from student_trainer.baselines import train_on_data
from student_trainer.distill import distill, resolve_device
from student_trainer.evaluate import exact_metrics, mixture_of
from student_trainer.sampling import sample_teacher
from student_trainer.student import build_student_for, student_var_type
from common.models.checkpoint import from_pretrained
from student_trainer.sampling import sample_images


def _score_checkpoint(cfg: Config, folder: str, chain, var_type: str, teacher) -> dict:
    model, _ = from_pretrained(folder, use_ema=True)
    x, _ = sample_images(model, chain, var_type, cfg.sample, teacher.image_shape, None, seed=cfg.run.seed + 7,
                         device=resolve_device(cfg.run.device), clip_denoised=teacher.clip_denoised)
    return exact_metrics(x, mixture_of(cfg.teacher.analytic), seed=cfg.run.seed)


def compare_on_mixture(cfg: Config, methods=("dkdm", "data_free", "data_based", "untrained", "teacher"),
                       num_data: int = 2048) -> dict[str, dict]:
    """Each method trains the same student for ``cfg.distill.steps`` steps; returns exact metrics per method."""
    assert cfg.teacher.kind == "analytic", "compare_on_mixture needs the analytic teacher"
    device = resolve_device(cfg.run.device)
    teacher = make_teacher(cfg.teacher, device)
    mixture = mixture_of(cfg.teacher.analytic)
    results: dict[str, dict] = {}
    base = cfg.run.name
    for method in methods:
        t0 = time.perf_counter()
        run = cfg.model_copy(deep=True)
        run.run.name = f"{base}-{method}"
        run.run.progress = False
        if method == "dkdm":
            out = distill(run)
            res = _score_checkpoint(run, out["checkpoint"], teacher.diffusion, student_var_type(teacher), teacher)
        elif method in ("data_free", "data_based"):
            gen = torch.Generator().manual_seed(cfg.run.seed + 1)
            if method == "data_based":
                x = mixture.sample(num_data, generator=gen)[0].float()
            else:   # the teacher's synthetic set, same size, 100-step sampling as the paper's larger sets
                scfg = cfg.sample.model_copy(update={"steps": "100", "num_samples": num_data})
                x = sample_teacher(teacher, scfg, seed=cfg.run.seed + 1)[0]
            run.teacher.diffusion.respacing = ""      # standard training samples t from the full schedule
            out = train_on_data(run, data=(x.clamp(-1, 1), None))
            from common.diffusion import make_diffusion
            dc = cfg.teacher.diffusion
            res = _score_checkpoint(run, out["checkpoint"], make_diffusion(dc.schedule, dc.num_timesteps),
                                    dc.var_type, teacher)
        elif method == "untrained":
            model, _ = build_student_for(cfg.student, teacher)
            x, _ = sample_images(model, teacher.diffusion, student_var_type(teacher), cfg.sample, teacher.image_shape,
                                 None, seed=cfg.run.seed + 7, device=device, clip_denoised=teacher.clip_denoised)
            res = exact_metrics(x, mixture, seed=cfg.run.seed)
        elif method == "teacher":
            x, _ = sample_teacher(teacher, cfg.sample, seed=cfg.run.seed + 7)
            res = exact_metrics(x, mixture, seed=cfg.run.seed)
        else:
            raise ValueError(f"unknown method {method!r}")
        res["wall_s"] = time.perf_counter() - t0
        results[method] = res
    return results
