"""The student side of the distributed service: Ray Train's per-worker loop (paper Algorithm 1, lines 4-8).

Every Ray Train worker draws its own batch of ``distill.batch_size`` records
from the shared pool (the global batch is ``batch_size * num_workers``), takes
one optimizer step (DDP averages the gradients when ``num_workers > 1``) and
releases its slots for the teachers to refill. The next draw is prefetched in a
background thread while the current step computes, so the pool's latency hides
behind the step; what remains visible is ``pool_wait_s``.

Checkpoints go through ``ray.train.report(metrics, checkpoint=...)``: rank 0
writes the same folder layout as the single-process loop
(student_trainer/checkpoints.py: config.json + safetensors + optimizer + RNG +
``pool.snapshot``) plus ``manifest.json`` (sizes and SHA-256, written last), so a
checkpoint is also a loadable ``dkdm`` model and a damaged one is recognised.
They are written every ``run.ckpt_every_s`` seconds of training (rank 0's clock
decides for every rank) and/or every ``run.ckpt_every`` steps, and at the end.
A restarted worker group (``FailureConfig``) or a second run with the same name
resumes the trainer from ``ray.train.get_checkpoint()`` when it is intact, else
from the newest intact one the driver found; ``metrics.jsonl`` is cut back to the
resumed step, so its steps stay increasing. The pool is live in the first case
and restored by the driver (student_trainer/run.py) in the second.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2.api.callback import UserCallback

from common import metrics
from common.config import Config, config_from_dict
from common.diffusion import Diffusion
from common.images import save_grid, save_npz
from common.models.checkpoint import checkpoint_problem, write_manifest
from common.pool.base import Pool
from common.seeds import eval_seed, student_init_seed
from common.teachers.base import Teacher
from common.teachers.latent import decode_latents, load_autoencoder, teacher_autoencoder_record
from student_trainer.checkpoints import load_checkpoint, model_config, save_checkpoint
from student_trainer.sampling import sample_images
from student_trainer.student import build_student, student_var_type
from student_trainer.trainer import StudentTrainer, record_step_metrics

logger = logging.getLogger(__name__)

# What a training checkpoint holds at least (manifest.json, when present, lists every file with its checksum).
CHECKPOINT_FILES = ("trainer_state.json", "config.json", "model.safetensors", "pool.snapshot")


@dataclass
class TeacherSpec:
    """What the student side needs of the teacher (no weights): its chain, shapes, variance and identity."""

    diffusion: Diffusion
    schedule: str
    image_shape: tuple[int, int, int]
    num_classes: int | None
    var_type: str
    learned_variance: bool
    clip_denoised: bool
    identity: dict
    autoencoder: dict | None = None     # a latent teacher's autoencoder_record: decodes the samples

    @classmethod
    def of(cls, teacher: Teacher, schedule: str) -> "TeacherSpec":
        return cls(teacher.diffusion, schedule, tuple(teacher.image_shape), teacher.num_classes, teacher.var_type,
                   teacher.learned_variance, teacher.clip_denoised, teacher.identity(),
                   teacher_autoencoder_record(teacher))


class _CheckpointFolder:
    """The RunDir face that save_checkpoint/load_checkpoint use, pointing at one folder (no atomic swap:
    Ray Train copies the finished folder into storage itself)."""

    def __init__(self, folder: str | Path):
        self.checkpoint = Path(folder)

    def begin_checkpoint(self) -> Path:
        return self.checkpoint

    def commit_checkpoint(self, tmp: Path) -> None:
        pass


class DDPStudentTrainer(StudentTrainer):
    """StudentTrainer whose forward goes through a DDP wrapper (gradients averaged across workers);
    EMA, optimizer and checkpoints keep using the bare module, so checkpoints match the single-process ones."""

    def wrap(self, wrapped: torch.nn.Module) -> None:
        self.wrapped = wrapped

    def _forward(self, x_t, t, y):
        bare, self.model = self.model, self.wrapped
        try:
            return super()._forward(x_t, t, y)
        finally:
            self.model = bare


def build_trainer(cfg: Config, spec: TeacherSpec, device: torch.device) -> tuple[DDPStudentTrainer, dict]:
    torch.manual_seed(student_init_seed(cfg.run.seed))   # same initial weights on every rank (and as the single-process run)
    model, student_config = build_student(cfg.student, spec.image_shape, spec.learned_variance, spec.num_classes)
    trainer = DDPStudentTrainer.from_config(model, spec.diffusion, cfg.distill, student_var_type(spec), device)
    trainer.wrap(trainer.model)
    return trainer, student_config


def checkpoint_config(student_config: dict, spec: TeacherSpec, trainer: StudentTrainer) -> dict:
    return model_config(student_config, spec.diffusion, spec.schedule, trainer.var_type, spec.clip_denoised,
                        spec.image_shape, spec.num_classes, v_bound=trainer.v_bound, teacher_identity=spec.identity,
                        autoencoder=spec.autoencoder)


def write_checkpoint(folder: Path, trainer: StudentTrainer, config: dict, pool: Pool | None) -> None:
    """The single-process checkpoint layout in ``folder`` (student, EMA, optimizer, step, RNG, pool snapshot)."""
    save_checkpoint(_CheckpointFolder(folder), trainer, config, {"torch": torch.get_rng_state()}, pool=pool)
    write_manifest(folder)


def restore_trainer(folder: Path, trainer: StudentTrainer) -> None:
    rng = load_checkpoint(_CheckpointFolder(folder), trainer, pool=None)
    torch.set_rng_state(rng["torch"])


class Prefetcher:
    """Draws the next batch in a background thread while the current step computes."""

    def __init__(self, pool: Pool, b: int, timeout_s: float, group: str | None = None):
        self.pool, self.b, self.timeout_s, self.group = pool, b, timeout_s, group
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pool-prefetch")
        self.pending: Future | None = None

    def request(self) -> None:
        self.pending = self.executor.submit(self.pool.draw, self.b, self.timeout_s, self.group)

    def take(self):
        """The prefetched draw (waits for it) -> (draw, seconds waited)."""
        t0 = time.perf_counter()
        if self.pending is None:
            self.request()
        draw, self.pending = self.pending.result(), None
        return draw, time.perf_counter() - t0

    def close(self) -> None:
        if self.pending is not None:        # a draw nobody will train on: return its slots
            try:
                self.pool.release(self.pending.result().lease_id)
            except Exception:  # noqa: BLE001 - the pool may be gone; its lease expires anyway
                pass
        self.executor.shutdown(wait=False)


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker. ``config``: cfg (dict), pool (RayPool or any picklable Pool), spec,
    run_root, storage (Ray Train's run folder, on a file system every node sees) and ledger (a TrainerLedger
    actor, told the step each resume starts at and this worker's actor)."""
    import ray.train
    import ray.train.torch

    cfg: Config = config_from_dict(config["cfg"])
    pool: Pool = config["pool"]
    spec: TeacherSpec = config["spec"]
    run_root = Path(config["run_root"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("ledger") is not None:
        config["ledger"].worker_started.remote(ray.get_runtime_context().current_actor)
    torch.set_num_threads(max(1, int(cfg.ray.worker_num_cpus)))
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    if cfg.metrics.enabled:
        metrics.serve_and_register("trainer", rank, cfg.metrics.port)

    # 1. Student, optimizer, EMA; resumed from the latest intact checkpoint of this run when there is one.
    trainer, student_config = build_trainer(cfg, spec, device)
    metrics_path = run_root / "metrics.jsonl"
    ck = ray.train.get_checkpoint()
    resume = resume_point(ck.path if ck is not None else None, config.get("storage"))
    if resume is not None:
        restore_trainer(resume, trainer)
    if rank == 0:
        rewind_metrics(metrics_path, trainer.step)
        if resume is not None:
            logger.info("resumed the student at step %d from %s", trainer.step, resume)
            if config.get("ledger") is not None:
                config["ledger"].resumed.remote(trainer.step)
    if world > 1:
        trainer.wrap(ray.train.torch.prepare_model(trainer.model, move_to_device=False))
    ck_config = checkpoint_config(student_config, spec, trainer)

    # 2. Algorithm 1: draw (prefetched), step, release; the teachers refill in their own processes.
    d, b = cfg.distill, cfg.distill.batch_size
    fetch = Prefetcher(pool, b, cfg.pool.block_timeout_s, cfg.pool.group)   # issue 8: this job's consumer group
    t_start, s_start, out = time.perf_counter(), trainer.step, {}
    last_ckpt = time.monotonic()
    try:
        while trainer.step < d.steps:
            t0 = time.perf_counter()
            draw, waited = fetch.take()
            if trainer.step + 1 < d.steps:
                fetch.request()
            t1 = time.perf_counter()
            out = trainer.distill_step(draw.batch, teacher_clip=spec.clip_denoised)
            pool.release(draw.lease_id)
            t2 = time.perf_counter()
            out.update(step=trainer.step, rank=rank, pool_wait_s=waited, train_s=t2 - t1, step_s=t2 - t0,
                       mean_t=float(draw.batch.t.float().mean()),
                       samples_per_s=b * world * (trainer.step - s_start) / max(t2 - t_start, 1e-9))
            record_step_metrics(out, rank, b)
            if rank == 0 and (trainer.step % cfg.run.log_every == 0 or trainer.step == d.steps):
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"time": time.time(), **out}) + "\n")
            if trainer.step < d.steps and checkpoint_due(cfg, trainer.step, last_ckpt, world, device):
                report(trainer, ck_config, pool, rank, out, config.get("storage"))
                last_ckpt = time.monotonic()
    finally:
        fetch.close()

    # 3. Final checkpoint and sample grid (rank 0).
    if rank == 0:
        write_samples(cfg, spec, trainer, run_root, device)
    report(trainer, ck_config, pool, rank, {**out, "step": trainer.step}, config.get("storage"))


def resume_point(latest: str | None, storage: str | None) -> Path | None:
    """The checkpoint a worker group starts from: the newest intact one among Ray Train's latest and those in
    ``storage``. Ray Train's may be damaged (a second run finds it on disk), or older than one a killed worker
    had persisted before the controller heard of it."""
    candidates = [Path(latest)] if latest is not None and checkpoint_problem(latest, CHECKPOINT_FILES) is None else []
    if storage is not None:
        newest, _ = newest_intact_checkpoint(Path(storage))
        candidates += [newest] if newest is not None else []
    return max(candidates, key=checkpoint_step, default=None)


def newest_intact_checkpoint(storage: Path) -> tuple[Path | None, list[str]]:
    """-> (the newest checkpoint_<step> folder in ``storage`` that passes its manifest, the newer damaged ones
    as "name (what is wrong)")."""
    damaged = []
    folders = [f for f in storage.glob("checkpoint_*") if f.is_dir()]     # not Ray's checkpoint_manager_snapshot.json
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(folder, CHECKPOINT_FILES)
        if problem is None:
            return folder, damaged
        damaged.append(f"{folder.name} ({problem})")
    return None, damaged


def checkpoint_step(folder: Path) -> tuple[int, str]:
    """Sort key: the step in checkpoint_<step>[_<suffix>], then the name."""
    digits = folder.name.removeprefix("checkpoint_").split("_")[0]
    return (int(digits) if digits.isdigit() else -1, folder.name)


def rewind_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (steps a restarted group redoes), atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if (logged := _logged_step(ln)) is not None and logged <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None         # a torn last line of a killed worker: dropped


def checkpoint_due(cfg: Config, step: int, last_ckpt: float, world: int, device: torch.device) -> bool:
    """``run.ckpt_every`` steps or ``run.ckpt_every_s`` seconds since the last one; rank 0's answer for all
    ranks (their clocks differ, and every rank must call ray.train.report together)."""
    r = cfg.run
    due = bool(r.ckpt_every and step % r.ckpt_every == 0) or bool(r.ckpt_every_s and time.monotonic() - last_ckpt >= r.ckpt_every_s)
    if world > 1 and r.ckpt_every_s:
        flag = torch.tensor([int(due)], device=device)
        torch.distributed.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def report(trainer: StudentTrainer, ck_config: dict, pool: Pool, rank: int, out: dict, storage: str | None = None) -> None:
    """ray.train.report on every rank; rank 0 attaches the checkpoint folder (checkpoint_<step>, with a suffix
    when a folder of that step is already there: a damaged one left by an earlier attempt)."""
    import ray.train

    name = f"checkpoint_{trainer.step:07d}"
    if storage is not None and (Path(storage) / name).exists():
        name += f"_{time.time_ns()}"
    with tempfile.TemporaryDirectory(prefix="dkdm-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            write_checkpoint(Path(tmp), trainer, ck_config, pool)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in out.items() if isinstance(v, (int, float))}, checkpoint=checkpoint,
                         checkpoint_dir_name=name)


class TrainerLedger:
    """The worker group's failures and the steps it resumed at (it lives outside the processes that fail),
    and Ray Train's controller and workers, so that the driver can abort a run it stops (run.abort_fit)."""

    def __init__(self):
        self.failures, self.resumed_at = 0, []
        self._controller, self._workers = None, []

    def set_controller(self, controller) -> None:
        self._controller = controller

    def controller(self):
        return self._controller

    def worker_started(self, worker) -> None:
        self._workers.append(worker)

    def workers(self) -> list:
        """Every train worker actor of the run (those of failed worker groups are dead already)."""
        return self._workers

    def failed(self) -> int:
        self.failures += 1
        return self.failures

    def resumed(self, step: int) -> None:
        self.resumed_at.append(step)

    def summary(self) -> dict:
        return {"trainer_restarts": self.failures, "trainer_resumed_at": self.resumed_at}


class TrainerFailureLog(UserCallback):
    """Runs on Ray Train's controller: one line per failed worker group, counted in a TrainerLedger actor."""

    def __init__(self, ledger, max_failures: int):
        self.ledger, self.max_failures = ledger, max_failures

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        import ray
        n = ray.get(self.ledger.failed.remote())
        what = "; ".join(f"rank {r}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
                         for r, e in sorted(worker_exceptions.items()))
        then = ("Ray Train restarts the worker group from the latest checkpoint" if n <= self.max_failures
                else "no restarts left: the run fails")
        logger.warning("trainer worker failed (%s); %s (failure %d of ray.max_failures=%d)", what, then, n,
                       self.max_failures)


class ControllerToLedger(ControllerCallback):
    """Runs on Ray Train's controller as it starts (a DeveloperAPI hook; Ray Train passes RunConfig
    callbacks that are not UserCallbacks to the controller): names the controller to the ledger, so
    that the driver can abort a run it stops (run.abort_fit)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def after_controller_start(self, train_run_context) -> None:
        import ray
        self.ledger.set_controller.remote(ray.get_runtime_context().current_actor)


def spec_decoder(spec: TeacherSpec, device):
    """A latent teacher's decoder, its autoencoder loaded on this worker from the recorded folder; None in pixel space."""
    if spec.autoencoder is None:
        return None
    ae = load_autoencoder(spec.autoencoder["path"], spec.autoencoder["sha256"]).to(device)
    return lambda z: decode_latents(ae, z)


def write_samples(cfg: Config, spec: TeacherSpec, trainer: StudentTrainer, run_root: Path, device) -> Path:
    """EMA samples -> samples/final.png (grid), final.npz (uint8, ADM layout) and final_float.npy ([N, C, H, W])."""
    x, y = sample_images(trainer.ema_model(), spec.diffusion, trainer.var_type, cfg.sample, spec.image_shape,
                         spec.num_classes, seed=eval_seed(cfg.run.seed), device=device, clip_denoised=spec.clip_denoised,
                         v_bound=trainer.v_bound, decode=spec_decoder(spec, device))
    folder = run_root / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    save_npz(x, folder / "final.npz", labels=y)
    np.save(folder / "final_float.npy", x.float().numpy())
    return save_grid(x, folder / "final.png")
