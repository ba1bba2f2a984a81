"""Pipeline benchmark of the Ray service (issues 5 and 20): prints one JSON object.

    python benchmarks/pipeline_bench.py                       # 2 teachers x 1 trainer worker, 3 nodes, ~3 minutes
    python benchmarks/pipeline_bench.py --teachers 2 --workers 2 --seconds 20
    python benchmarks/pipeline_bench.py --single-node --config configs/mixture.yaml --set ray.use_gpu=true

By default a multi-node Ray cluster is started on this machine (ray.cluster_utils, every node on
127.0.0.1): a head (driver, pool shards), one node per teacher offering ``teacher: 1`` and one node
offering ``trainer: W``; teachers and trainers request those resources (``ray.teacher_resources``,
``ray.worker_resources``), so K teachers x W trainer workers run as the service places them.
``--single-node`` uses one local Ray instance instead. Measured in one run, with the ray pool backend:

(a) starvation: trainer steps/s in the full pipeline (K teachers refilling, samples_per_insert = 1)
    divided by its steps/s on a pre-filled pool with no teacher running (records reused:
    samples_per_insert huge, so the pool never drains), both with the same W trainers drawing at once
    (mean over trainers). Target >= 0.95 when teachers keep up.
(b) end-to-end records/s (records trained on in the full pipeline) divided by
    min(teacher capacity, trainer capacity), each measured alone: teacher capacity = records/s
    of the teacher group while the driver only draws and releases; trainer capacity = (a)'s
    denominator times b times W. Target >= 0.9.
(c) warm-up seconds (empty pool to all slots READY) with 1 and 2 teachers, and their ratio
    (target <= 0.6).
(d) speed-up of the pipeline's step rate over the single-process loop (student_trainer.distill,
    teacher and student sharing one device) on the same config.

Each trainer here is a Ray actor running the Ray Train worker's step (prefetched draw, step,
release) without Ray Train's ~20 s start, so the rates are the steady state. On a 2-core machine
every process shares the same two cores: the ratios then measure CPU contention as much as the pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A driver's 127.0.0.1 stays loopback (Ray resolves it to the machine's outward address otherwise);
# read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Config
from common.pool import make_pool
from common.teachers import make_teacher
from student_trainer.distill import build_session, train_step
from student_trainer.ray_train import Prefetcher, TeacherSpec, build_trainer
from student_trainer.run import load_run_config, service_num_slots
from teacher_workers.group import TeacherGroup

ROOT = Path(__file__).resolve().parents[1]
BENCH_OVERRIDES = ["run.progress=false", "metrics.enabled=false", "distill.steps=100000", "pool.shards=2"]


class BenchTrainer:
    """The Ray Train worker's inner loop (student_trainer.ray_train.train_loop) for a fixed time."""

    def __init__(self, cfg_json: dict, spec: TeacherSpec):
        from common.config import config_from_dict
        self.cfg = config_from_dict(cfg_json)
        torch.set_num_threads(max(1, int(self.cfg.ray.worker_num_cpus)))
        self.device = torch.device("cuda" if self.cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        self.spec = spec
        self.trainer, _ = build_trainer(self.cfg, spec, self.device)

    def run(self, pool, seconds: float) -> dict:
        b = self.cfg.distill.batch_size
        fetch = Prefetcher(pool, b, self.cfg.pool.block_timeout_s)
        steps, wait, t0 = 0, 0.0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            draw, waited = fetch.take()
            fetch.request()
            self.trainer.distill_step(draw.batch, teacher_clip=self.spec.clip_denoised)
            pool.release(draw.lease_id)
            steps, wait = steps + 1, wait + waited
        dt = time.perf_counter() - t0
        fetch.close()
        return {"steps": steps, "seconds": dt, "steps_per_s": steps / dt, "pool_wait_fraction": wait / dt}


def new_pool(cfg: Config, spec: TeacherSpec, n: int, name: str, samples_per_insert: float = 1.0):
    pcfg = cfg.pool.model_copy(update={"name": name, "samples_per_insert": samples_per_insert})
    return make_pool(pcfg, num_slots=n, record_shape=spec.image_shape, has_logvar=spec.learned_variance,
                     has_label=spec.num_classes is not None, num_timesteps=spec.diffusion.num_timesteps,
                     seed=cfg.run.seed)


def warmup(cfg: Config, spec: TeacherSpec, n: int, teachers: int, name: str, samples_per_insert: float = 1.0):
    """-> (pool, group, seconds until every slot is READY)."""
    pool = new_pool(cfg, spec, n, name, samples_per_insert)
    c = cfg.model_copy(update={"pool": pool.cfg})
    group = TeacherGroup(c, pool, num_teachers=teachers)   # returns once every actor is up (process start excluded)
    t0 = time.perf_counter()
    if not group.wait_until(lambda s: s.counts["READY"] == n, 1800, poll_s=0.05):
        raise RuntimeError(f"warm-up with {teachers} teacher(s) did not finish: {pool.stats().counts}")
    return pool, group, time.perf_counter() - t0


def teacher_capacity(pool, group, b: int, seconds: float) -> float:
    """Records/s the teachers produce while the driver only draws and releases (no training)."""
    p0, t0 = pool.stats().produced_total, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        d = pool.draw(b, timeout_s=60)
        pool.release(d.lease_id)
    return (pool.stats().produced_total - p0) / (time.perf_counter() - t0)


def train_together(trainers: list, pool, seconds: float) -> dict:
    """All trainers drawing from ``pool`` at once -> mean steps/s per trainer, mean wait fraction, seconds."""
    runs = ray.get([t.run.remote(pool, seconds) for t in trainers])
    return {"steps_per_s": sum(r["steps_per_s"] for r in runs) / len(runs),
            "pool_wait_fraction": sum(r["pool_wait_fraction"] for r in runs) / len(runs),
            "seconds": max(r["seconds"] for r in runs)}


def single_process_rate(cfg: Config, steps: int) -> float:
    """Steps/s of the single-process loop (teacher and student in one process, one device)."""
    c = cfg.model_copy(update={"pool": cfg.pool.model_copy(update={"backend": "local"})})
    s = build_session(c)
    s.worker.fill_all(s.pool.num_slots)
    train_step(s)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(s)
    return steps / (time.perf_counter() - t0)


def start_multinode(teachers: int, workers: int):
    """A head and one node per teacher (``teacher: 1``) plus one trainer node (``trainer: W``), on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")   # node agents start slowly on a busy machine
    store = 100 * 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False, "object_store_memory": store})
    for _ in range(max(teachers, 2)):        # (c) needs two teacher nodes
        c.add_node(num_cpus=1, resources={"teacher": 1}, node_ip_address="127.0.0.1", object_store_memory=store)
    c.add_node(num_cpus=workers, resources={"trainer": workers}, node_ip_address="127.0.0.1", object_store_memory=store)
    c.wait_for_nodes()
    return c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded default of student_trainer.run)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each rate measurement")
    ap.add_argument("--teachers", type=int, default=2, help="K: teachers in the full pipeline")
    ap.add_argument("--workers", type=int, default=1, help="W: trainer workers drawing from the pool at once")
    ap.add_argument("--single-node", action="store_true", help="one local Ray instance instead of a multi-node cluster")
    args = ap.parse_args(argv)
    placement = [] if args.single_node else ["ray.teacher_resources={teacher: 1}", "ray.worker_resources={trainer: 1}"]
    cfg = load_run_config(args.config, BENCH_OVERRIDES + [f"ray.num_workers={args.workers}"] + placement + args.overrides)
    spec = TeacherSpec.of(make_teacher(cfg.teacher, "cpu"), cfg.teacher.diffusion.schedule)
    n = service_num_slots(cfg, spec.diffusion.num_timesteps)
    b, K, W = cfg.distill.batch_size, args.teachers, args.workers
    cluster = None
    if args.single_node:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, K + W + 1), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    else:
        cluster = start_multinode(K, W)
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        out = measure(cfg, spec, n, b, K, W, args.seconds)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    out["config"]["nodes"] = "single" if args.single_node else f"head + {max(K, 2)} teacher nodes + 1 trainer node"
    single = single_process_rate(cfg, max(20, int(args.seconds * 5)))
    out["d_speedup_over_single_process"] = {"single_process_steps_per_s": round(single, 2),
                                            "pipeline_steps_per_s": out["a_starvation"]["pipeline_steps_per_s"],
                                            "speedup": round(out["a_starvation"]["pipeline_steps_per_s"] / single, 3)}
    print(json.dumps(out))
    return out


def measure(cfg: Config, spec: TeacherSpec, n: int, b: int, K: int, W: int, seconds: float) -> dict:
    """(a), (b), (c) on the connected Ray cluster."""
    out: dict = {"config": {"teacher": cfg.teacher.kind, "slots": n, "batch_size": b, "seconds": seconds,
                            "teachers": K, "trainer_workers": W, "device": "cuda" if cfg.ray.use_gpu else "cpu",
                            "cpus": os.cpu_count(), "num_timesteps": spec.diffusion.num_timesteps}}
    trainer_cls = ray.remote(BenchTrainer).options(num_cpus=cfg.ray.worker_num_cpus, num_gpus=1 if cfg.ray.use_gpu else 0,
                                                   resources=cfg.ray.worker_resources)
    trainers = [trainer_cls.remote(cfg.model_dump(mode="json"), spec) for _ in range(W)]

    # (c) warm-up with 1 teacher, then with 2.
    warm = {}
    for k in (1, 2):
        pool_k, group_k, warm[k] = warmup(cfg, spec, n, k, f"bench_w{k}")
        group_k.stop()
        pool_k.close()
    out["c_warmup"] = {"1_teacher_s": round(warm[1], 2), "2_teachers_s": round(warm[2], 2),
                       "ratio": round(warm[2] / warm[1], 3), "target": 0.6}

    # teacher capacity alone, then the full pipeline on the same pool.
    pool, group, _ = warmup(cfg, spec, n, K, "bench")
    cap_teacher = teacher_capacity(pool, group, b, seconds)
    group.wait_until(lambda s: s.counts["READY"] == n, 600, poll_s=0.05)
    s0 = pool.stats()
    full = train_together(trainers, pool, seconds)
    s1 = pool.stats()
    group.stop()
    pool.close()

    # trainer capacity alone: a pre-filled pool whose records are reused, no teacher running.
    pre, pre_group, _ = warmup(cfg, spec, n, 1, "bench_prefilled", samples_per_insert=1e9)
    pre_group.stop()
    alone = train_together(trainers, pre, seconds)
    pre.close()

    e2e = (s1.consumed_total - s0.consumed_total) / full["seconds"]
    cap_trainer = alone["steps_per_s"] * b * W
    out["a_starvation"] = {"pipeline_steps_per_s": round(full["steps_per_s"], 2),
                           "prefilled_steps_per_s": round(alone["steps_per_s"], 2),
                           "ratio": round(full["steps_per_s"] / alone["steps_per_s"], 3),
                           "pipeline_pool_wait_fraction": round(full["pool_wait_fraction"], 3), "target": 0.95}
    out["b_end_to_end"] = {"records_per_s": round(e2e, 1), "teacher_capacity_records_per_s": round(cap_teacher, 1),
                           "trainer_capacity_records_per_s": round(cap_trainer, 1),
                           "ratio": round(e2e / min(cap_teacher, cap_trainer), 3), "target": 0.9}
    return out


if __name__ == "__main__":
    main()
