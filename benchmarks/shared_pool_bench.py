"""Shared pool vs separate runs (issue 8), on the analytic mixture, one process, JSON lines on stdout.

1. CPU-seconds (time.process_time of this process) to train three students for the same steps from one
   shared pool (student_trainer.sweep: one warm-up, one refill per record) vs three separate runs
   (student_trainer.distill: each its own warm-up and refills); teacher forwards of each.
2. Time to the first training step: cold (build, shuffle-denoise warm-up, step) vs warm (build, restore
   the pool from a snapshot of a warm pool with the same identity, step): what a run attaching to a
   named pool skips. Wall seconds, as a user waits them.

    python -m benchmarks.shared_pool_bench                       # small: T=50 chain, 200 steps
    python -m benchmarks.shared_pool_bench --respacing 100 --steps 500
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from common.config import load_config
from common.pool.identity import teacher_pool_identity
from student_trainer.distill import build_session, run_session, train_step
from student_trainer.sweep import sweep

STUDENTS = [{"student.flags": {"width": 64, "depth": 2}}, {"student.flags": {"width": 128, "depth": 2}},
            {"student.flags": {"width": 256, "depth": 2}}]


def bench_config(out_dir: str, respacing: str, steps: int, batch_size: int, extra: list[str] | None = None):
    return load_config("configs/mixture.yaml", [
        "teacher.analytic.image_size=4", "teacher.analytic.num_components=4", f"teacher.diffusion.respacing={respacing}",
        "student.arch=mlp", f"distill.batch_size={batch_size}", "distill.teacher_microbatch=256", "pool.rho=0.4",
        f"distill.steps={steps}", "sample.num_samples=16", "sample.steps=5", "run.progress=false",
        f"run.out_dir={out_dir}", *(extra or [])])


def shared_vs_separate(out_dir: str, respacing: str, steps: int, batch_size: int) -> list[dict]:
    cfg = bench_config(out_dir, respacing, steps, batch_size)
    students = [{**o, "run.name": f"shared{i}", "run.seed": i} for i, o in enumerate(STUDENTS)]
    c0 = time.process_time()
    res = sweep(cfg, students)
    shared = {"bench": "three_students", "mode": "shared_pool", "cpu_s": time.process_time() - c0,
              "teacher_forwards": res["teacher_forwards"], "warmup_forwards": res["warmup_forwards"]}
    c0, forwards = time.process_time(), 0
    for i, o in enumerate(STUDENTS):
        overrides = [f"run.name=separate{i}", f"run.seed={i}", f"student.flags={json.dumps(o['student.flags'])}"]
        s = build_session(bench_config(out_dir, respacing, steps, batch_size, overrides))
        try:
            run_session(s)
        finally:
            s.pool.close()
        forwards += s.worker.forwards
    separate = {"bench": "three_students", "mode": "separate_runs", "cpu_s": time.process_time() - c0,
                "teacher_forwards": forwards}
    common = {"students": 3, "steps": steps, "batch_size": batch_size, "chain_T": cfg.teacher.diffusion.respacing,
              "num_slots": res["num_slots"]}
    ratio = {"bench": "three_students", "mode": "ratio", "cpu_s_shared_over_separate": shared["cpu_s"] / separate["cpu_s"],
             "forwards_shared_over_separate": shared["teacher_forwards"] / forwards}
    return [{**common, **shared}, {**common, **separate}, {**common, **ratio}]


def first_step(out_dir: str, respacing: str, batch_size: int) -> list[dict]:
    cfg = bench_config(out_dir, respacing, 1, batch_size, ["run.name=cold"])
    # Cold: a fresh pool, the warm-up, the first step.
    t0 = time.perf_counter()
    s = build_session(cfg)
    s.worker.fill_all(s.pool.num_slots)
    train_step(s)
    cold = time.perf_counter() - t0
    snap = f"{out_dir}/warm_pool.snapshot"
    s.pool.bind_identity(teacher_pool_identity(s.teacher, s.pool.num_slots, cfg.pool.storage_dtype, cfg.pool.rho,
                                               cfg.pool.samples_per_insert))
    s.pool.snapshot(snap)
    s.pool.close()
    # Warm: a new run whose pool is restored from the warm one (same identity): no warm-up.
    t0 = time.perf_counter()
    w = build_session(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "warm"})}))
    w.pool.bind_identity(teacher_pool_identity(w.teacher, w.pool.num_slots, cfg.pool.storage_dtype, cfg.pool.rho,
                                               cfg.pool.samples_per_insert))
    w.pool.restore(snap)
    train_step(w)
    warm = time.perf_counter() - t0
    w.pool.close()
    return [{"bench": "first_step", "mode": "cold_warmup", "wall_s": cold, "warmup_forwards": s.worker.forwards,
             "num_slots": s.pool.num_slots, "chain_T": respacing},
            {"bench": "first_step", "mode": "warm_snapshot_restore", "wall_s": warm, "teacher_forwards": w.worker.forwards,
             "num_slots": w.pool.num_slots, "chain_T": respacing}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--respacing", default="50", help="distillation chain length T (teacher.diffusion.respacing)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as out:
        build_session(bench_config(out, a.respacing, 1, a.batch_size, ["run.name=import_warmup"])).pool.close()
        for row in first_step(out, a.respacing, a.batch_size) + shared_vs_separate(out, a.respacing, a.steps, a.batch_size):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
