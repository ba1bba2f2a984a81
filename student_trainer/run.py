"""The distributed DKDM service: teacher actors fill a shared pool, Ray Train workers distill the student.

    python -m student_trainer.run                                   # embedded default: CPU, local Ray, minutes
    python -m student_trainer.run --config configs/mixture.yaml --set ray.num_teachers=2
    python -m student_trainer.run --config configs/mixture.yaml --dry-run
    ray start --head
    ray job submit --working-dir . -- python -m student_trainer.run --config configs/mixture.yaml \\
        --set run.out_dir=/shared/runs

Stages: validate the config (a user error is one line and exit status 2);
connect to Ray (``RAY_ADDRESS`` or ``ray.address``, else start a local cluster);
create (or attach to) the pool, restoring it from the run's latest checkpoint
when there is one (no warm-up); start the teacher group (its first claims are
the shuffle-denoise warm-up); run Ray Train's TorchTrainer with
``student_trainer.ray_train.train_loop``; print where the results are.

The pool backend defaults to ``ray`` here (a ``pool.backend`` in the config or
``--set`` wins). A second run with the same ``run.name`` and ``run.out_dir``
resumes: Ray Train finds the checkpoints under ``<run folder>/train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from common import metrics
from common.config import Config, config_from_dict, load_config
from student_trainer.cli import UserError, add_config_args, add_log_level, config_path, report, resolve, run_cli

from student_trainer.ray_console import install_log_filter, wait_for_train_cleanup

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TRAIN_NAME = "train"       # Ray Train's run name inside the run folder: <out_dir>/<run.name>/train/checkpoint_*

# The embedded default (no arguments): the analytic mixture (configs/mixture.yaml) on a local Ray
# cluster with the ray pool backend, sized to finish in a few minutes on 2 CPU cores.
DEFAULT_CONFIG: dict = {
    "run": {"name": "ray-mixture", "device": "cpu", "log_every": 25},
    "teacher": {"kind": "analytic", "device": "cpu",
                "analytic": {"num_components": 8, "channels": 1, "image_size": 8, "component_std": 0.1,
                             "mean_scale": 0.7, "seed": 0},
                "diffusion": {"schedule": "cosine", "num_timesteps": 1000, "var_type": "learned_range",
                              "clip_denoised": True, "respacing": "100"}},
    "student": {"arch": "mlp"},
    "pool": {"backend": "ray", "rho": 0.4, "shards": 2},
    "distill": {"batch_size": 64, "steps": 1500, "lr": 0.001, "ema_rate": 0.999, "teacher_microbatch": 256,
                "bf16": False},
    "sample": {"steps": "50", "num_samples": 256},
    "ray": {"num_teachers": 1, "num_workers": 1, "teacher_num_cpus": 1.0, "worker_num_cpus": 1.0},
}


def load_run_config(path: str | None, overrides: list[str]) -> Config:
    """The config file (or the embedded default) + overrides; pool.backend defaults to ray."""
    if path is None:
        from common.config import _set_dotted, parse_override
        tree = json.loads(json.dumps(DEFAULT_CONFIG))
        for item in overrides:
            key, value = parse_override(item)
            _set_dotted(tree, key, value)
        return config_from_dict(tree)
    cfg = load_config(config_path(path), overrides)
    if "backend" not in cfg.pool.model_fields_set:
        cfg.pool.backend = "ray"
    return cfg


def service_num_slots(cfg: Config, num_timesteps: int) -> int:
    """|B+| of the service: round(rho * T) * b slots per trainer worker (b its batch), so each worker draws
    from the paper's B+ as each rank of the reference holds its own; ``pool.num_slots`` is the whole pool's."""
    from student_trainer.distill import num_slots_for
    n = num_slots_for(cfg, num_timesteps)
    return n if cfg.pool.num_slots is not None else n * cfg.ray.num_workers


def check_sizes(cfg: Config, num_slots: int) -> None:
    """Every worker holds up to two batches (the one it trains on and the prefetched one)."""
    need = 2 * cfg.distill.batch_size * cfg.ray.num_workers
    if num_slots < need:
        raise UserError(f"pool of {num_slots} slots is too small for ray.num_workers={cfg.ray.num_workers} x "
                        f"distill.batch_size={cfg.distill.batch_size} (needs {need}: each worker prefetches a batch)")
    if cfg.distill.variant != "dynamic":
        raise UserError(f"distill.variant={cfg.distill.variant!r}: the distributed service runs the dynamic variant only")
    if cfg.pool.backend == "local":
        raise UserError("pool.backend=local cannot be shared by Ray processes; use ray or redis")


def connect(cfg: Config) -> str:
    """RAY_ADDRESS or ray.address, else a new local cluster with enough logical CPUs for the fleet."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    if address:
        ray.init(address=address, log_to_driver=True)
        install_log_filter()
        return address
    r = cfg.ray
    need = r.num_teachers * r.teacher_num_cpus + r.num_workers * r.worker_num_cpus + 1
    # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls every second:
    # without it the cleaner warns on every poll and its stop times out when the run ends.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=True,
             dashboard_host="127.0.0.1", resources=placement_resources(cfg) or None, runtime_env=env,
             log_to_driver=True)
    install_log_filter()
    return "local"


def placement_resources(cfg: Config) -> dict[str, float]:
    """The custom resources the whole fleet requests (ray.teacher_resources x teachers + ray.worker_resources x workers)."""
    r, total = cfg.ray, {}
    for asked, count in ((r.teacher_resources, r.num_teachers), (r.worker_resources, r.num_workers)):
        for name, amount in asked.items():
            total[name] = total.get(name, 0.0) + amount * count
    return total


def check_placement(cfg: Config) -> None:
    """A custom resource no node offers would leave teachers or trainer workers pending forever: say so now."""
    import ray
    offered = ray.cluster_resources()
    for name, amount in placement_resources(cfg).items():
        if offered.get(name, 0.0) < amount:
            raise UserError(f"the fleet asks for {amount:g} of resource {name!r} (ray.teacher_resources / "
                            f"ray.worker_resources) but the Ray cluster's nodes offer {offered.get(name, 0.0):g}")


def latest_checkpoint(storage: Path) -> Path | None:
    """The newest intact checkpoint folder Ray Train wrote for this run (checkpoint_<step>).

    Each is checked against the manifest written when it was committed (sizes and SHA-256);
    a damaged newer one is passed over, with one line saying so.
    """
    from student_trainer.ray_train import newest_intact_checkpoint
    folder, damaged = newest_intact_checkpoint(storage)
    if damaged and folder is not None:
        logger.warning("checkpoint %s damaged; resuming from the newest intact one, %s", ", ".join(damaged), folder.name)
    elif damaged:
        logger.warning("checkpoint %s damaged and no intact one left: starting from step 0", ", ".join(damaged))
    return folder


class PoolMonitor:
    """Driver thread: the pool's stats as Prometheus metrics every ``interval_s``, and the run's two
    progress bars, drawn here in the driver's terminal: the warm-up (READY slots), then training
    (steps = records consumed / global batch; the workers draw no bars of their own, which Ray would
    print as one log line per update)."""

    def __init__(self, pool, progress: bool, interval_s: float = 1.0, steps: int = 0, global_batch: int = 1,
                 step0: int = 0):
        self.pool, self.progress, self.interval_s = pool, progress, interval_s
        self.steps, self.global_batch, self.step0 = steps, global_batch, step0
        self.warm_s: float | None = None
        self._prev: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-monitor", daemon=True)

    def start(self) -> "PoolMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        t0, bar, consumed0, trained = time.time(), None, None, False
        while not self._stop.is_set():
            try:
                st = self.pool.stats()
            except Exception:  # noqa: BLE001 - the pool is going away
                break
            export_pool_stats(st, self._prev)
            if self.warm_s is not None and self.progress and self.steps and not trained:
                if bar is None:
                    from tqdm import tqdm
                    consumed0 = st.consumed_total
                    bar = tqdm(total=self.steps, initial=self.step0, desc="distill", unit="step", dynamic_ncols=True)
                bar.n = min(self.steps, self.step0 + (st.consumed_total - consumed0) // self.global_batch)
                bar.refresh()
                if bar.n >= self.steps:          # done: the bar stays as it is while Ray Train finishes
                    bar.close()
                    bar, trained = None, True
            if self.warm_s is None:
                if st.warm:
                    self.warm_s = time.time() - t0
                    if bar is not None:
                        bar.n = bar.total
                        bar.close()
                        bar = None
                    logger.info("pool warm: %d slots READY after %.1fs", st.num_slots, self.warm_s)
                elif self.progress:
                    if bar is None:
                        from tqdm import tqdm
                        bar = tqdm(total=st.num_slots, desc="shuffle-denoise warm-up", unit="slot", dynamic_ncols=True)
                    bar.n = st.counts["READY"]
                    bar.set_postfix(records_per_s=f"{st.produced_total / max(time.time() - t0, 1e-9):.0f}")
                    bar.refresh()
            self._stop.wait(self.interval_s)
        if bar is not None:
            bar.close()


def export_pool_stats(st, prev: dict[str, float]) -> None:
    """PoolStats -> gauges (slots per state and shard, READY t histogram) and counters (by delta)."""
    for i, counts in enumerate(st.shard_counts):
        for state, v in counts.items():
            metrics.set(metrics.POOL_SLOTS, v, shard=i, state=state)
    for k, v in enumerate(st.t_histogram):
        metrics.set(metrics.POOL_READY_T, v, shard="all", bucket=k)
    for name, value, labels in (
            (metrics.POOL_RECORDS_PRODUCED_TOTAL, st.produced_total, {"shard": "all"}),
            (metrics.POOL_RECORDS_CONSUMED_TOTAL, st.consumed_total, {"shard": "all"}),
            (metrics.POOL_BYTES_TOTAL, st.bytes_in_total, {"shard": "all", "direction": "in"}),
            (metrics.POOL_BYTES_TOTAL, st.bytes_out_total, {"shard": "all", "direction": "out"}),
            (metrics.POOL_EXPIRED_TOTAL, st.expired_leases_total, {"kind": "lease"}),
            (metrics.POOL_EXPIRED_TOTAL, st.expired_claims_total, {"kind": "claim"}),
            (metrics.POOL_CORRUPT_TOTAL, st.corrupt_total, {"shard": "all"})):
        key = name + json.dumps(labels, sort_keys=True)
        delta = value - prev.get(key, 0)
        if delta > 0:
            metrics.inc(name, delta, **labels)
            prev[key] = value


def open_pool(cfg: Config, spec, num_slots: int, identity: dict | None = None):
    """-> (pool, created). A running Ray pool of the same name is attached to (and left running).

    ``identity`` (common/pool/identity.py): the pool must have been built for this teacher, chain and
    layout; a pool made by ``dkdm pool create`` is attached to warm, another identity is refused.
    """
    from common.pool import attach_pool, make_pool, open_named_pool
    if identity is not None:
        return open_named_pool(cfg.pool, identity, num_slots, spec.image_shape, spec.learned_variance,
                               spec.num_classes is not None, spec.diffusion.num_timesteps, seed=cfg.run.seed)
    if cfg.pool.backend == "ray":
        from common.pool.base import PoolError
        try:
            pool = attach_pool(cfg.pool)
        except PoolError:
            pool = None
        if pool is not None:
            if pool.num_slots != num_slots or pool.record_shape != tuple(spec.image_shape):
                raise UserError(f"a Ray pool named {cfg.pool.name!r} is running with another layout; set pool.name")
            return pool, False
    pool = make_pool(cfg.pool, num_slots=num_slots, record_shape=spec.image_shape, has_logvar=spec.learned_variance,
                     has_label=spec.num_classes is not None, num_timesteps=spec.diffusion.num_timesteps,
                     seed=cfg.run.seed)
    return pool, True


def distill_on_ray(cfg: Config) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from common.teachers import make_teacher
    from student_trainer.ray_train import ControllerToLedger, TeacherSpec, TrainerFailureLog, TrainerLedger, train_loop
    from student_trainer.run_dir import RunDir
    from teacher_workers.group import TeacherGroup, on_the_drivers_node

    # 1. Validate and build what the driver needs: the run folder, the teacher's spec, the pool size.
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    run = RunDir(cfg)
    teacher = make_teacher(cfg.teacher, "cpu")
    spec = TeacherSpec.of(teacher, cfg.teacher.diffusion.schedule)
    num_slots = service_num_slots(cfg, spec.diffusion.num_timesteps)
    from common.pool.identity import teacher_pool_identity
    identity = teacher_pool_identity(teacher, num_slots, cfg.pool.storage_dtype, cfg.pool.rho, cfg.pool.samples_per_insert)
    check_sizes(cfg, num_slots)
    storage = run.root / TRAIN_NAME
    resume_from = latest_checkpoint(storage)

    # 2. Ray, the pool (restored when resuming: no warm-up), the teachers.
    where = connect(cfg)
    check_placement(cfg)
    if cfg.metrics.enabled:
        port = metrics.serve_and_register("driver", 0, cfg.metrics.port)
        logger.info("metrics: driver endpoint on port %d (file_sd targets in %s)", port,
                    os.environ.get("DKDM_METRICS_SD_DIR", "/tmp/dkdm/prom_sd"))
    pool, created = open_pool(cfg, spec, num_slots, identity)
    group = monitor = None
    try:
        if resume_from is not None and created:
            pool.restore(str(resume_from / "pool.snapshot"))
            logger.info("resuming %s from %s: pool restored (%d slots, no warm-up)", run.root, resume_from.name,
                        num_slots)
        if cfg.pool.group is not None:    # issue 8: share the pool with other jobs as a consumer group
            pool.attach_group(cfg.pool.group, cfg.pool.group_policy, cfg.pool.group_max_lag)
        teachers_running = not created and _teacher_running(cfg)
        if not teachers_running:
            step0 = int(json.loads((resume_from / "trainer_state.json").read_text())["step"]) if resume_from else 0
            group = TeacherGroup(cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + 7919 * step0})}),
                                 pool)
        step0 = int(json.loads((resume_from / "trainer_state.json").read_text())["step"]) if resume_from else 0
        monitor = PoolMonitor(pool, cfg.run.progress, steps=cfg.distill.steps,
                              global_batch=cfg.distill.batch_size * cfg.ray.num_workers, step0=step0).start()

        # 3. Ray Train: the student workers, restarted from the latest checkpoint when one fails (FailureConfig).
        use_gpu = cfg.ray.use_gpu
        ledger = ray.remote(TrainerLedger).options(num_cpus=0, scheduling_strategy=on_the_drivers_node()).remote()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "pool": pool, "spec": spec, "run_root": str(run.root),
                               "storage": str(storage), "ledger": ledger},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.worker_num_cpus, **({"GPU": 1} if use_gpu else {}),
                                                               **cfg.ray.worker_resources}),
            run_config=RunConfig(name=TRAIN_NAME, storage_path=str(run.root),
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=[TrainerFailureLog(ledger, cfg.ray.max_failures), ControllerToLedger(ledger)]))
        t0 = time.time()
        result = fit_watching(trainer, group, ledger)
        trainer_log = ray.get(ledger.summary.remote())
        health = group.health() if group is not None else []
        stats = pool.stats()
        stats.check_invariant()     # every slot in exactly one state, whatever failed during the run
    finally:
        if monitor is not None:
            monitor.stop()
        if group is not None:
            group.stop()
        if cfg.pool.group is not None and not created:
            try:
                pool.detach_group(cfg.pool.group)
            except Exception:  # noqa: BLE001 - the pool may be gone; an idle group is detached anyway
                pass
        if created:
            pool.close()
    wait_for_train_cleanup()       # Ray Train's cleaner exits before the cluster goes (student_trainer/ray_console.py)
    ray.shutdown()

    # 4. Where the results are.
    step = int(json.loads((Path(result.checkpoint.path) / "trainer_state.json").read_text())["step"])
    return {"run_dir": str(run.root), "checkpoint": str(result.checkpoint.path),
            "samples": str(run.root / "samples" / "final.png"), "metrics": str(run.metrics_path),
            "steps": step, "ray": where, "fit_s": round(time.time() - t0, 1),
            "warmup_s": None if monitor is None or monitor.warm_s is None else round(monitor.warm_s, 1),
            "resumed_from": resume_from.name if resume_from else None, **trainer_log,
            "pool": {"produced": stats.produced_total, "consumed": stats.consumed_total, "slots": stats.counts,
                     "expired_claims": stats.expired_claims_total, "expired_leases": stats.expired_leases_total},
            "teachers": [{k: h.get(k) for k in ("worker", "records", "forwards", "busy_fraction", "restarts", "failures")}
                         for h in health]}


def fit_watching(trainer, group, ledger=None, interval_s: float = 1.0):
    """``trainer.fit()`` while the driver watches the teachers (``TeacherGroup.watch``: restarts logged as
    they happen, TeacherFailed once a teacher's restarts are spent). Ray Train runs in a daemon thread,
    as under Tune, so that the driver can stop the run whatever Ray Train is waiting for; a run the driver
    stops (TeacherFailed, Ctrl-C) is aborted and its thread ended before this returns (abort_fit). A
    trainer that timed out on an empty pool is told with the teachers' state (PoolStarved)."""
    box: dict = {}
    done = threading.Event()    # not thread.is_alive(): on Python 3.11 a Ctrl-C that interrupts a join
                                # leaves the running thread marked stopped (seen in the Ctrl-C test)

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread below
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=fit, name="ray-train-fit", daemon=True).start()
    try:
        while not done.wait(interval_s):
            if group is not None:
                group.watch()
    except BaseException:
        abort_fit(done, ledger)
        raise
    err = box.get("error")
    if err is None:
        return box["result"]
    timeout = re.search(r"pool timed out after [^\n]*", str(err))
    if timeout is None:
        raise err
    teachers = group.alive() if group is not None else "teachers run elsewhere (attached pool)"
    raise PoolStarved(f"a trainer's draw failed, {timeout.group(0).rstrip('.')}: {teachers}") from None


def abort_fit(done: threading.Event, ledger, timeout_s: float = 60.0) -> None:
    """End a Ray Train run the driver stops (``done``: set when its fit thread ends): the controller's abort
    (what Ray Train does on Ctrl-C in a main thread), the controller killed if the run is still there,
    then its workers, dead before the driver drops the pool. A fit thread left blocked in ray.get
    outlives ray.shutdown and takes the process down (SIGABRT) once Ray is initialised again."""
    import ray
    if ledger is None:
        return
    controller = _controller(ledger, done, timeout_s)
    if controller is not None and not done.is_set():
        try:
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - abort ends the controller's process, so its call fails by design
            pass
        if not done.wait(timeout_s):
            ray.kill(controller)
            done.wait(timeout_s)
    if not done.is_set():
        logger.warning("Ray Train's run did not end after its abort; its thread is left to end with the cluster")
        return
    _wait_workers_gone(ledger, timeout_s)


def _controller(ledger, done: threading.Event, timeout_s: float):
    """Ray Train's controller as the ledger knows it, waiting while it may still be starting; None if unknown."""
    import ray
    deadline = time.monotonic() + timeout_s
    while not done.is_set() and time.monotonic() < deadline:
        try:
            controller = ray.get(ledger.controller.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - the ledger went with its node: nothing to abort through
            return None
        if controller is not None:
            return controller
        time.sleep(0.2)
    return None


def _wait_workers_gone(ledger, timeout_s: float) -> None:
    """The aborted run's train workers, dead before the driver drops the pool: the controller's abort kills
    them without waiting, and a worker still drawing then would fail on the dropped pool with a traceback."""
    import ray
    try:
        workers = ray.get(ledger.workers.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the ledger went with its node
        return
    deadline = time.monotonic() + timeout_s
    for w in workers:
        ray.kill(w)             # the abort's own kill may still be on its way
        while time.monotonic() < deadline:
            try:
                ray.get(w.__ray_ready__.remote(), timeout=1.0)
            except ray.exceptions.RayActorError:
                break           # dead
            except ray.exceptions.GetTimeoutError:
                pass
            time.sleep(0.1)


class PoolStarved(RuntimeError):
    """The trainers timed out on an empty pool (one line that says whether teachers are alive)."""


def _teacher_running(cfg: Config) -> bool:
    import ray
    try:
        ray.get_actor(f"dkdm_teacher.{cfg.pool.name}.0")
        return True
    except ValueError:
        return False


def cmd_run(args) -> None:
    cfg = resolve(args, lambda a: load_run_config(a.config, a.overrides))
    if cfg is None:         # --dry-run: printed
        return
    from student_trainer.report import finish
    result = distill_on_ray(cfg)
    report(finish(cfg, result, result["run_dir"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m student_trainer.run",
                                description="DKDM as a Ray service: teacher actors, a shared pool, Ray Train students")
    add_config_args(p)
    add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from teacher_workers.group import TeacherFailed

    args = build_parser().parse_args(argv)
    return run_cli(cmd_run, args, fatal=(TeacherFailed, PoolStarved))


if __name__ == "__main__":
    sys.exit(main())
