"""Several students from one pool in one process (issue 8): the teacher's cost paid once for a sweep.

One teacher, one ``TeacherWorker`` and one pool (the config's backend, local by default) are built
for the whole sweep, with one consumer group per student (common/pool/groups.py). The pool is warmed
up once; then the students step round-robin, each drawing ``b`` records new to its group
(``train_step`` with ``pool.group``). A slot goes to REFILL only once every attached group has
trained on its record, so each teacher forward serves every student: for S students at equal steps
the sweep costs one warm-up plus ``steps * b`` refill forwards instead of S of each.

    from student_trainer.sweep import sweep
    cfg = load_config("configs/mixture.yaml")
    sweep(cfg, [{"run.name": "w64", "student.flags": {"width": 64}},
                {"run.name": "w256", "student.flags": {"width": 256}, "run.seed": 1}])

Each student is the sweep's config with its overrides (dotted keys as ``--set``); it may change
``student.*``, ``run.*`` (its own ``run.name`` is required and names its group and folder),
``distill.*`` except ``variant`` and ``teacher_microbatch``, and ``pool.group``/``pool.group_policy``/
``pool.group_max_lag``; the teacher, the chain and the pool are the sweep's. A student that has done
its steps is checkpointed (config + weights, as ``distill`` writes them, without a pool snapshot:
the pool is the sweep's) and its group detached, so the others go on alone. Resuming a sweep is not
supported (each student can be resumed as a plain ``distill`` run only without its pool state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.config import Config, ConfigError, _set_dotted, config_from_dict
from common.pool import make_pool
from common.pool.base import PoolError
from common.seeds import teacher_seed
from common.teachers import make_teacher
from common.teachers.latent import teacher_autoencoder_record
from student_trainer.checkpoints import model_config, save_checkpoint
from student_trainer.distill import Session, num_slots_for, student_session, pool_summary, refill, resolve_device, train_step, write_samples
from teacher_workers.worker import TeacherWorker

SHARED_DISTILL = ("distill.variant", "distill.teacher_microbatch")   # the pool's and the worker's, not a student's
STUDENT_POOL_KEYS = ("pool.group", "pool.group_policy", "pool.group_max_lag")


def student_config(cfg: Config, overrides: dict[str, Any]) -> Config:
    """The sweep's config with one student's dotted overrides; its group defaults to its run.name."""
    if "run.name" not in overrides:
        raise ConfigError(f"sweep student {overrides}: needs its own run.name (it names its folder and group)")
    for key in overrides:
        section = key.split(".")[0]
        if section == "teacher" or key in SHARED_DISTILL or (section == "pool" and key not in STUDENT_POOL_KEYS):
            raise ConfigError(f"sweep student {overrides['run.name']!r}: {key} is the sweep's, not a student's")
    tree = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    tree["pool"]["group"] = overrides.get("pool.group", overrides["run.name"])
    return config_from_dict(tree)


def save_student(s: Session) -> Path:
    """Config + weights + trainer state, as distill's checkpoint minus the pool snapshot (the pool is shared)."""
    t = s.teacher
    config = model_config(s.student_config, t.diffusion, s.cfg.teacher.diffusion.schedule, s.trainer.var_type,
                          t.clip_denoised, t.image_shape, t.num_classes, v_bound=s.trainer.v_bound,
                          teacher_identity=t.identity(), autoencoder=teacher_autoencoder_record(t))
    return save_checkpoint(s.run, s.trainer, config, {"torch": torch.get_rng_state()}, pool=None)


def finish_student(s: Session) -> dict:
    """Detach the student's group (its pending records stop holding slots), checkpoint, final samples."""
    s.pool.detach_group(s.cfg.pool.group)
    ckpt = save_student(s)
    grid = write_samples(s, "final")
    return {"name": s.cfg.run.name, "group": s.cfg.pool.group, "run_dir": str(s.run.root), "checkpoint": str(ckpt),
            "samples": str(grid), "metrics": str(s.run.metrics_path), "steps": s.trainer.step}


def can_step(s: Session, groups: dict[str, dict]) -> bool:
    """The group has b records it has not trained on (a blocking draw here would wait for itself)."""
    return groups.get(s.cfg.pool.group, {}).get("pending", 0) >= s.cfg.distill.batch_size


def sweep(cfg: Config, students: list[dict[str, Any]]) -> dict:
    """Train every student from one warm pool; returns {"students": [per-student results], teacher counts}."""
    if not students:
        raise ConfigError("sweep needs at least one student")
    scfgs = [student_config(cfg, o) for o in students]
    names = [c.pool.group for c in scfgs]
    if len(set(names)) != len(names) or len({c.run.name for c in scfgs}) != len(scfgs):
        raise ConfigError(f"sweep students need distinct run.name and pool.group, got {names}")
    # 1. One teacher, one pool, one worker for the whole sweep; one consumer group per student.
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    teacher = make_teacher(cfg.teacher, device)
    n = num_slots_for(cfg, teacher.diffusion.num_timesteps)
    if n < max(c.distill.batch_size for c in scfgs):
        raise ConfigError(f"pool of {n} slots is smaller than a student's distill.batch_size")
    pool = make_pool(cfg.pool.model_copy(update={"group": None}), num_slots=n, record_shape=teacher.image_shape,
                     has_logvar=teacher.learned_variance, has_label=teacher.num_classes is not None,
                     num_timesteps=teacher.diffusion.num_timesteps, seed=cfg.run.seed)
    try:
        worker = TeacherWorker(teacher, pool, microbatch=cfg.distill.teacher_microbatch, seed=teacher_seed(cfg.run.seed),
                               warmup="noise" if cfg.distill.variant == "iterative" else "shuffle",
                               claim_timeout_s=cfg.pool.claim_timeout_s)
        sessions = [student_session(c, teacher, pool, worker, device) for c in scfgs]
        for c in scfgs:
            pool.attach_group(c.pool.group, c.pool.group_policy, c.pool.group_max_lag)
        # 2. The shuffle-denoise warm-up, once for every student.
        worker.fill_all(n, progress=cfg.run.progress)
        warmup_forwards = worker.forwards
        # 3. Round-robin training; each train_step refills what every group is done with.
        results = run_round_robin(sessions, worker, n)
        return {"students": results, "teacher_forwards": worker.forwards, "warmup_forwards": warmup_forwards,
                "num_slots": n}
    finally:
        pool.close()


def run_round_robin(sessions: list[Session], worker: TeacherWorker, num_slots: int) -> list[dict]:
    """Step every unfinished student once per round; finished students are checkpointed and detached."""
    pool = sessions[0].pool
    results: dict[str, dict] = {}
    active = list(sessions)
    while active:
        stepped = False
        for s in list(active):
            if s.trainer.step >= s.cfg.distill.steps:
                results[s.cfg.run.name] = finish_student(s)
                active.remove(s)
                stepped = True
                continue
            if not can_step(s, pool.groups()):
                continue
            out = train_step(s)
            stepped = True
            step = s.trainer.step
            if step % s.cfg.run.log_every == 0 or step == s.cfg.distill.steps:
                s.run.log({**out, **pool_summary(pool), "group": s.cfg.pool.group})
        if not stepped and refill(worker, num_slots) == 0:
            lag = {k: (g["pending"], g["lag"]) for k, g in pool.groups().items()}
            raise PoolError(f"sweep stalled: no student has a batch of new records and nothing to refill "
                            f"(group: (pending, lag) = {lag})")
    return [results[s.cfg.run.name] for s in sessions]
