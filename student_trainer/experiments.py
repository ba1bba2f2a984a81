"""Method comparisons at an equal step budget (issue 3's figures; the replication builds on them).

On the analytic mixture every method is scored exactly: sliced Wasserstein-2 to exact samples,
mode coverage and exact NLL of the student's samples.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from common.config import AnalyticConfig, Config
from common.teachers import make_teacher
from common.teachers.dkdm_teacher import checkpoint_v_bound
from student_trainer.baselines import train_on_data
from student_trainer.distill import distill, resolve_device
from student_trainer.evaluate import exact_metrics, mixture_of
from student_trainer.losses import DKDM_V_BOUND
from student_trainer.sampling import sample_teacher
from student_trainer.student import build_student_for, student_var_type
from common.models.checkpoint import from_pretrained
from student_trainer.sampling import sample_images


def _score_checkpoint(cfg: Config, folder: str, chain, var_type: str, teacher) -> dict:
    model, config = from_pretrained(folder, use_ema=True)
    x, _ = sample_images(model, chain, var_type, cfg.sample, teacher.image_shape, None, seed=cfg.run.seed + 7,
                         device=resolve_device(cfg.run.device), clip_denoised=teacher.clip_denoised,
                         v_bound=checkpoint_v_bound(config))
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
                scfg = cfg.sample.model_copy(update={"steps": "100", "timesteps": None, "num_samples": num_data})
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
                                 None, seed=cfg.run.seed + 7, device=device, clip_denoised=teacher.clip_denoised,
                                 v_bound=DKDM_V_BOUND)
            res = exact_metrics(x, mixture, seed=cfg.run.seed)
        elif method == "teacher":
            x, _ = sample_teacher(teacher, cfg.sample, seed=cfg.run.seed + 7)
            res = exact_metrics(x, mixture, seed=cfg.run.seed)
        else:
            raise ValueError(f"unknown method {method!r}")
        res["wall_s"] = time.perf_counter() - t0
        results[method] = res
    return results


# --- digits: digits-feature FID of 50-step samples against sklearn's digits ------------------------

def digits_reference(feature_net=None) -> dict:
    """Digits-net features of the 1797 real digits (cache it when scoring several models)."""
    from common.data import load_dataset
    from common.eval.features import get_feature_net
    from common.eval.fid import compute_features

    return compute_features(load_dataset("digits")[0], feature_net or get_feature_net("digits"))


def score_digits_checkpoint(folder: str, sample_cfg, seed: int = 7, num_samples: int = 1797,
                            device: str | torch.device = "cpu", reference: dict | None = None,
                            feature_net=None) -> dict:
    """FID family (digits features) of a checkpoint's EMA samples on the ``sample_cfg.steps`` respacing of its chain."""
    from common.eval.features import get_feature_net
    from common.eval.fid import evaluate
    from common.teachers.dkdm_teacher import DKDMTeacher

    net = feature_net or get_feature_net("digits")
    model = DKDMTeacher.from_folder(folder, device=device, use_ema=True)
    x, _ = sample_teacher(model, sample_cfg, seed=seed, num_samples=num_samples)
    return evaluate(x, reference if reference is not None else digits_reference(net), net)


def compare_on_digits(cfg: Config, methods=("dkdm", "data_free", "data_based", "teacher"),
                      num_eval: int = 1797) -> dict[str, dict]:
    """Each method trains the same student for ``cfg.distill.steps`` steps (batch ``cfg.distill.batch_size``)
    from the ``dkdm`` digits teacher; returns digits-feature FID/sFID/IS/precision/recall of ``num_eval``
    EMA samples (``cfg.sample.steps`` ancestral steps) per method, and the wall time.

    dkdm: Algorithm 1 on the teacher's ``teacher.diffusion.respacing`` chain; data_free: the teacher's
    ``data.num_synthetic`` samples (``data.synth_steps`` steps), then standard training; data_based: the
    1797 real digits, standard training; teacher: the teacher's own samples (a floor for the students).
    """
    from common.data import load_dataset
    from common.eval.features import get_feature_net

    assert cfg.teacher.kind == "dkdm", "compare_on_digits needs a dkdm (checkpoint) teacher"
    device = resolve_device(cfg.run.device)
    teacher = make_teacher(cfg.teacher, device)
    net = get_feature_net("digits")
    reference = digits_reference(net)
    score = lambda folder: score_digits_checkpoint(folder, cfg.sample, cfg.run.seed + 7, num_eval,   # noqa: E731
                                                   device, reference, net)
    results: dict[str, dict] = {}
    for method in methods:
        t0 = time.perf_counter()
        run = cfg.model_copy(deep=True)
        run.run.name = f"{cfg.run.name}-{method}"
        run.run.progress = False
        if method == "dkdm":
            res = score(distill(run)["checkpoint"])
        elif method in ("data_free", "data_based"):
            if method == "data_based":
                x = load_dataset("digits")[0]
            else:
                scfg = cfg.sample.model_copy(update={"steps": cfg.data.synth_steps, "timesteps": None,
                                                      "sampler": cfg.data.synth_sampler})
                x = sample_teacher(teacher, scfg, seed=cfg.run.seed + 1, num_samples=cfg.data.num_synthetic)[0]
            res = score(train_on_data(run, data=(x.clamp(-1, 1), None))["checkpoint"])
        elif method == "teacher":
            from common.teachers import check_local_path
            res = score(str(check_local_path(cfg.teacher.path, "dkdm")))
        else:
            raise ValueError(f"unknown method {method!r}")
        res["wall_s"] = time.perf_counter() - t0
        results[method] = res
    return results


# --- building blocks of the replication (benchmarks/replicate.py) ---------------------------------
#
# A ``Scorer`` maps samples [N, C, H, W] in [-1, 1] to a dict of metrics. Every method below trains
# the student named by ``cfg.student`` for ``cfg.distill.steps`` steps and scores its EMA weights'
# samples (``cfg.sample``) with the same scorer, so the numbers of one table are comparable.

Scorer = Callable[[torch.Tensor], dict]


def mixture_scorer(cfg: AnalyticConfig, seed: int = 0, num_reference: int = 4096) -> Scorer:
    """Exact measures against the analytic mixture: sliced W2 to exact samples, mode coverage, exact NLL."""
    mixture = mixture_of(cfg)
    return lambda x: exact_metrics(x, mixture, seed=seed, num_reference=num_reference)


def digits_scorer(feature_net=None, reference: str = "digits") -> Scorer:
    """FID (and sFID, IS, precision, recall) in the digits feature space against all 1797 real digits."""
    from common.data import load_dataset
    from common.eval.features import get_feature_net
    from common.eval.fid import compute_features, evaluate

    net = feature_net or get_feature_net("digits")
    ref = compute_features(load_dataset(reference)[0], net)
    return lambda x: evaluate(x, ref, net)


def _student_samples(model: torch.nn.Module, chain, var_type: str, cfg: Config, image_shape, num_classes,
                     clip_denoised: bool, v_bound: str) -> torch.Tensor:
    x, _ = sample_images(model, chain, var_type, cfg.sample, image_shape, num_classes, seed=cfg.run.seed + 7,
                         device=resolve_device(cfg.run.device), clip_denoised=clip_denoised, v_bound=v_bound)
    return x


def distill_with_curve(cfg: Config, score: Scorer, eval_at: Iterable[int] = ()) -> dict:
    """DKDM (``cfg.distill.variant``) with the EMA student scored at the steps ``eval_at`` and at the end.

    Returns ``{"metrics", "curve": [{"step", **metrics}], "samples" [N, C, H, W], "warmup_forwards",
    "warmup_s", "train_forwards", "train_s"}``: the warm-up cost is the shuffle-denoise (or noise)
    fill of all slots, counted in teacher forwards (one per record).
    """
    from student_trainer.distill import build_session, train_step

    eval_at = sorted(set(int(s) for s in eval_at if 0 < int(s) < cfg.distill.steps))
    s = build_session(cfg)
    try:
        t0 = time.perf_counter()
        s.worker.fill_all(s.pool.num_slots, progress=cfg.run.progress)
        warm_forwards, t1 = s.worker.forwards, time.perf_counter()

        def samples() -> torch.Tensor:
            return _student_samples(s.trainer.ema_model(), s.teacher.diffusion, s.trainer.var_type, cfg,
                                    s.teacher.image_shape, s.teacher.num_classes, s.teacher.clip_denoised,
                                    s.trainer.v_bound)

        curve, eval_s = [], 0.0
        while s.trainer.step < cfg.distill.steps:
            train_step(s)
            if s.trainer.step in eval_at:
                te = time.perf_counter()
                curve.append({"step": s.trainer.step, **score(samples())})
                eval_s += time.perf_counter() - te
        train_s = time.perf_counter() - t1 - eval_s
        x = samples()
        final = score(x)
        curve.append({"step": s.trainer.step, **final})
        return {"metrics": final, "curve": curve, "samples": x, "warmup_forwards": warm_forwards,
                "warmup_s": t1 - t0, "train_forwards": s.worker.forwards - warm_forwards, "train_s": train_s,
                "pool_slots": s.pool.num_slots}
    finally:
        s.pool.close()


def train_on_set(cfg: Config, x: torch.Tensor, score: Scorer, y: torch.Tensor | None = None) -> dict:
    """Standard training of the student on images ``x`` [N, C, H, W] (data-based / data-free / data-limited).

    The student learns the full chain ``cfg.teacher.diffusion`` (no respacing) with the hybrid
    objective and is sampled on ``cfg.sample``'s respacing of it.
    """
    from common.diffusion import make_diffusion

    run = cfg.model_copy(deep=True)
    run.teacher.diffusion.respacing = ""
    run.sample.num_samples = min(16, cfg.sample.num_samples)   # train_on_data's own grid only
    t0 = time.perf_counter()
    out = train_on_data(run, data=(x.clamp(-1, 1), y))
    train_s = time.perf_counter() - t0
    model, mcfg = from_pretrained(out["checkpoint"], use_ema=True)
    dc = cfg.teacher.diffusion
    num_classes = mcfg.get("num_classes")
    samples = _student_samples(model, make_diffusion(dc.schedule, dc.num_timesteps), dc.var_type, cfg,
                               tuple(x.shape[1:]), num_classes, dc.clip_denoised, checkpoint_v_bound(mcfg))
    return {"metrics": score(samples), "samples": samples, "train_s": train_s, "checkpoint": out["checkpoint"]}


def teacher_samples(teacher, cfg: Config, num: int | None = None, steps: str | None = None,
                    seed: int | None = None) -> torch.Tensor:
    """``num`` teacher samples on ``steps`` (default ``cfg.sample``): the synthetic set of the data-free baseline."""
    scfg = cfg.sample.model_copy(update={k: v for k, v in (("steps", steps), ("num_samples", num)) if v is not None})
    if steps is not None:
        scfg.timesteps = None       # ``steps`` of the teacher's own chain, not the scoring timesteps
    x, _ = sample_teacher(teacher, scfg, seed=cfg.run.seed + 7 if seed is None else seed)
    return x.clamp(-1, 1)


def untrained_samples(cfg: Config, teacher) -> torch.Tensor:
    model, _ = build_student_for(cfg.student, teacher)
    return _student_samples(model, teacher.diffusion, student_var_type(teacher), cfg, teacher.image_shape,
                            teacher.num_classes, teacher.clip_denoised, DKDM_V_BOUND)
