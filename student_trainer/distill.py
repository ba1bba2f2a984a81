"""Dynamic iterative distillation in one process (paper Algorithm 1).

The parts are the ones the distributed service runs on separate machines: a
``TeacherWorker`` refilling pool slots, a ``Pool`` (here the in-process
backend unless configured otherwise) and a ``StudentTrainer`` drawing batches
and returning the drawn slots for refill. The paper's three variants share
this one code path:

    dynamic    B+ of round(rho * T) * b slots, shuffle-denoise warm-up, draw b at random
    shuffled   b slots, shuffle-denoise warm-up, the whole batch each step
    iterative  b slots all starting at t = T-1, the whole batch walked down to 0
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import Config
from common.images import save_grid
from common.pool import make_pool, pool_size
from common.pool.base import Pool, PoolTimeout
from common.seeds import eval_seed, student_init_seed, teacher_seed
from common.teachers import Teacher, make_teacher
from common.teachers.latent import latent_decoder, teacher_autoencoder_record
from student_trainer.checkpoints import load_checkpoint, model_config, save_checkpoint
from student_trainer.run_dir import RunDir
from student_trainer.sampling import sample_images
from student_trainer.student import build_student_for, student_var_type
from student_trainer.trainer import StudentTrainer, record_step_metrics
from teacher_workers.worker import TeacherWorker

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def num_slots_for(cfg: Config, num_timesteps: int) -> int:
    """|B+| = round(rho * T) * b for dynamic; b for the shuffled and plain iterative variants."""
    if cfg.distill.variant == "dynamic":
        return pool_size(cfg.pool, num_timesteps, cfg.distill.batch_size)
    return cfg.distill.batch_size


@dataclass
class Session:
    """Everything one distillation run holds."""

    cfg: Config
    run: RunDir
    teacher: Teacher
    pool: Pool
    worker: TeacherWorker
    trainer: StudentTrainer
    student_config: dict
    device: torch.device


def build_session(cfg: Config) -> Session:
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    teacher = make_teacher(cfg.teacher, device)
    n = num_slots_for(cfg, teacher.diffusion.num_timesteps)
    if n < cfg.distill.batch_size:
        raise ValueError(f"pool of {n} slots is smaller than distill.batch_size={cfg.distill.batch_size}")
    pool = make_pool(cfg.pool, num_slots=n, record_shape=teacher.image_shape,
                     has_logvar=teacher.learned_variance, has_label=teacher.num_classes is not None,
                     num_timesteps=teacher.diffusion.num_timesteps, seed=cfg.run.seed)
    if cfg.pool.group is not None:      # issue 8: draw as a consumer group (student_trainer/sweep.py)
        pool.attach_group(cfg.pool.group, cfg.pool.group_policy, cfg.pool.group_max_lag)
    worker = TeacherWorker(teacher, pool, microbatch=cfg.distill.teacher_microbatch, seed=teacher_seed(cfg.run.seed),
                           warmup="noise" if cfg.distill.variant == "iterative" else "shuffle",
                           claim_timeout_s=cfg.pool.claim_timeout_s)
    return student_session(cfg, teacher, pool, worker, device)


def student_session(cfg: Config, teacher: Teacher, pool: Pool, worker: TeacherWorker, device: torch.device) -> Session:
    """A Session for one student on a given teacher, pool and worker (the sweep shares them between students)."""
    torch.manual_seed(student_init_seed(cfg.run.seed))    # the student's initialisation depends on its seed only
    model, student_config = build_student_for(cfg.student, teacher)
    trainer = StudentTrainer.from_config(model, teacher.diffusion, cfg.distill, student_var_type(teacher), device)
    return Session(cfg, RunDir(cfg), teacher, pool, worker, trainer, student_config, device)


def _checkpoint(s: Session) -> Path:
    t = s.teacher
    config = model_config(s.student_config, t.diffusion, s.cfg.teacher.diffusion.schedule, s.trainer.var_type,
                          t.clip_denoised, t.image_shape, t.num_classes, v_bound=s.trainer.v_bound,
                          teacher_identity=t.identity(), autoencoder=teacher_autoencoder_record(t))
    rng = {"worker": s.worker.gen.get_state(), "torch": torch.get_rng_state()}
    return save_checkpoint(s.run, s.trainer, config, rng, pool=s.pool)


def _resume(s: Session) -> None:
    rng = load_checkpoint(s.run, s.trainer, pool=s.pool)
    s.worker.gen.set_state(rng["worker"])
    torch.set_rng_state(rng["torch"])


def write_samples(s: Session, tag: str) -> Path:
    x, _ = sample_images(s.trainer.ema_model(), s.teacher.diffusion, s.trainer.var_type, s.cfg.sample,
                         s.teacher.image_shape, s.teacher.num_classes, seed=eval_seed(s.cfg.run.seed), device=s.device,
                         clip_denoised=s.teacher.clip_denoised, v_bound=s.trainer.v_bound,
                         decode=latent_decoder(s.teacher))
    path = s.run.samples / f"{tag}.png"
    save_grid(x, path)
    return path


def pool_summary(pool: Pool) -> dict:
    """Pool stats for the log (calling stats() also publishes the pool's gauges, e.g. READY t histogram)."""
    st = pool.stats()
    return {"pool_ready": st.counts.get("READY", 0), "pool_refill": st.counts.get("REFILL", 0),
            "record_age_mean": st.record_age_mean, "pool_t_histogram": st.t_histogram}


def refill(worker: TeacherWorker, n: int) -> int:
    """Refill what the release sent to REFILL (with samples_per_insert > 1 some slots stay READY)."""
    done = 0
    while done < n:
        try:
            done += worker.refill_once(n - done, timeout_s=0.0)
        except PoolTimeout:
            break
    return done


def train_step(s: Session) -> dict:
    """Algorithm 1, lines 4-8: draw b, loss, gradient step, release; the teacher refills the drawn slots."""
    b = s.cfg.distill.batch_size
    t0 = time.perf_counter()
    draw = s.pool.draw(b, timeout_s=s.cfg.pool.block_timeout_s, group=s.cfg.pool.group)
    t_draw = time.perf_counter()
    out = s.trainer.distill_step(draw.batch, teacher_clip=s.teacher.clip_denoised)
    s.pool.release(draw.lease_id)
    t_train = time.perf_counter()
    refill(s.worker, b)
    t_end = time.perf_counter()
    out.update(step=s.trainer.step, pool_wait_s=t_draw - t0, train_s=t_train - t_draw, teacher_s=t_end - t_train,
               step_s=t_end - t0, mean_t=float(draw.batch.t.float().mean()))
    record_step_metrics(out, 0, b)
    return out


def distill(cfg: Config) -> dict:
    """Run (or resume) a distillation; returns where the results are."""
    s = build_session(cfg)
    try:
        return run_session(s)
    finally:
        s.pool.close()


def run_session(s: Session) -> dict:
    cfg = s.cfg
    # 1. The enlarged batch set B+: restored from the checkpoint, or built by shuffle-denoise warm-up.
    if s.run.has_checkpoint():
        _resume(s)
        logger.info("resumed %s at step %d (pool restored, no warm-up)", s.run.root, s.trainer.step)
    else:
        s.worker.fill_all(s.pool.num_slots, progress=cfg.run.progress)
    # 2. Training: Algorithm 1's loop.
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.distill.steps, initial=s.trainer.step, desc="distill", unit="step", dynamic_ncols=True)
    while s.trainer.step < cfg.distill.steps:
        out = train_step(s)
        step = s.trainer.step
        if step % cfg.run.log_every == 0 or step == cfg.distill.steps:
            s.run.log({**out, **pool_summary(s.pool)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", vlb=f"{out['l_vlb']:.4f}")
        if cfg.run.sample_every and step % cfg.run.sample_every == 0:
            write_samples(s, f"step_{step:07d}")
        if cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0:
            _checkpoint(s)
    if bar is not None:
        bar.close()
    # 3. Final checkpoint and sample grid.
    ckpt = _checkpoint(s)
    grid = write_samples(s, "final")
    return {"run_dir": str(s.run.root), "checkpoint": str(ckpt), "samples": str(grid),
            "metrics": str(s.run.metrics_path), "steps": s.trainer.step}
