"""``dkdm pool``: persistent, named pools that outlive runs (issue 8).

    ray start --head                                    # a Ray pool lives as long as the cluster
    dkdm pool create --config configs/mixture.yaml --set pool.backend=ray --set pool.name=mix
    dkdm pool status --config configs/mixture.yaml --set pool.backend=ray --set pool.name=mix
    python -m student_trainer.run --config configs/mixture.yaml --set pool.name=mix   # attaches warm
    dkdm pool drop   --config configs/mixture.yaml --set pool.backend=ray --set pool.name=mix

``create`` builds the teacher, creates the pool named ``pool.name`` with the run's identity
(teacher weights checksum, chain, layout: common/pool/identity.py), runs the shuffle-denoise
warm-up in this process and leaves the pool running: Ray keeps it in detached actors for the
life of the cluster (``RAY_ADDRESS`` or ``ray.address`` must name a running cluster), Redis
in its keys. A pool of that name and the same identity is reported, not rebuilt; another
identity is refused. ``status`` prints states, fill, produced/consumed rates, consumer
groups and their lag as one JSON object. ``drop`` deletes the pool.
"""

from __future__ import annotations

import json
import os
import time

from common.config import Config
from common.pool.base import Pool, PoolError
from common.seeds import teacher_seed


class PoolCliError(PoolError):
    """A ``dkdm pool`` usage error (one line)."""


def _connect_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if not address:
        raise PoolCliError("a persistent Ray pool needs a running cluster: `ray start --head`, then set RAY_ADDRESS "
                           "or ray.address (a cluster started by this command would die with it)")
    ray.init(address=address, log_to_driver=False)


def _check_backend(cfg: Config) -> None:
    if cfg.pool.backend == "local":
        raise PoolCliError("pool.backend=local lives inside one process; `dkdm pool` needs pool.backend=ray or redis")
    if cfg.pool.backend == "ray":
        _connect_ray(cfg)


def attach(cfg: Config) -> Pool:
    """A client of the running pool ``cfg.pool.name`` (PoolError if there is none)."""
    from common.pool import attach_pool
    _check_backend(cfg)
    return attach_pool(cfg.pool)


def create(cfg: Config) -> dict:
    """Create (or find, same identity) the named pool, warm it up and leave it running -> status."""
    from common.pool import open_named_pool
    from common.pool.identity import teacher_pool_identity
    from common.teachers import make_teacher
    from student_trainer.run import service_num_slots
    from teacher_workers.worker import TeacherWorker

    _check_backend(cfg)
    teacher = make_teacher(cfg.teacher, "cpu" if cfg.teacher.device == "auto" else cfg.teacher.device)
    n = service_num_slots(cfg, teacher.diffusion.num_timesteps)     # as the run that attaches to it sizes it
    ident = teacher_pool_identity(teacher, n, cfg.pool.storage_dtype, cfg.pool.rho, cfg.pool.samples_per_insert)
    pool, created = open_named_pool(cfg.pool, ident, n, teacher.image_shape, teacher.learned_variance,
                                    teacher.num_classes is not None, teacher.diffusion.num_timesteps,
                                    seed=cfg.run.seed, detached=True)
    t0 = time.time()
    if not pool.stats().warm:        # new, or a previous create died during the warm-up
        worker = TeacherWorker(teacher, pool, microbatch=cfg.distill.teacher_microbatch, seed=teacher_seed(cfg.run.seed),
                               warmup="noise" if cfg.distill.variant == "iterative" else "shuffle",
                               claim_timeout_s=cfg.pool.claim_timeout_s)
        worker.fill_all(n, progress=cfg.run.progress)
    out = {"created": created, "warmup_s": round(time.time() - t0, 2), **status_of(pool, cfg.pool.name, 0.0)}
    if cfg.pool.backend == "ray":
        pool.owner = False           # detached actors: this client leaves them running
    return out


def status_of(pool: Pool, name: str, interval_s: float = 1.0) -> dict:
    """States, fill, rates over ``interval_s``, identity and consumer groups of a pool."""
    from common.pool.identity import identity_digest

    a = pool.stats()
    if interval_s > 0:
        time.sleep(interval_s)
        b = pool.stats()
    else:
        b = a
    dt = max(interval_s, 1e-9)
    ident = pool.identity()
    teacher = (ident or {}).get("teacher", {})
    return {
        "name": name, "backend": type(pool).__name__, "num_slots": b.num_slots, "counts": b.counts,
        "fill": round(b.counts.get("READY", 0) / b.num_slots, 4), "warm": b.warm,
        "produced_total": b.produced_total, "consumed_total": b.consumed_total,
        "produced_per_s": round((b.produced_total - a.produced_total) / dt, 2) if interval_s > 0 else None,
        "consumed_per_s": round((b.consumed_total - a.consumed_total) / dt, 2) if interval_s > 0 else None,
        "identity": None if ident is None else {"digest": identity_digest(ident), "teacher_kind": teacher.get("kind"),
                                                "weights_sha256": teacher.get("weights_sha256"), "chain": ident.get("chain")},
        "groups": pool.groups(),
    }


def status(cfg: Config, interval_s: float = 1.0) -> dict:
    pool = attach(cfg)
    try:
        return status_of(pool, cfg.pool.name, interval_s)
    finally:
        pool.close()


def watch(cfg: Config, interval_s: float, count: int | None = None) -> None:
    """``status`` every ``interval_s`` seconds as one JSON line each (rates over that interval), through
    one client of the pool, until ``count`` lines or Ctrl-C."""
    pool = attach(cfg)
    try:
        n = 0
        while count is None or n < count:
            print(json.dumps(status_of(pool, cfg.pool.name, interval_s)), flush=True)
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        pool.close()


def drop(cfg: Config) -> dict:
    """Delete the named pool: its actors (ray) or keys (redis)."""
    pool = attach(cfg)
    if cfg.pool.backend == "ray":
        pool.drop()
    else:
        pool.destroy()
        pool.close()
    return {"dropped": cfg.pool.name, "backend": cfg.pool.backend}


def cmd_pool(args) -> None:
    """Entry of ``dkdm pool {create,status,drop}`` (wired in student_trainer/cli.py)."""
    from student_trainer.cli import resolve

    cfg = resolve(args)
    if cfg is None:
        return
    if args.action == "status" and (args.watch or args.count):
        if args.interval <= 0 or (args.count is not None and args.count < 1):
            raise ValueError(f"pool status --watch needs --interval > 0 and --count >= 1, got {args.interval} and {args.count}")
        return watch(cfg, args.interval, args.count)
    if args.action == "create":
        out = create(cfg)
    elif args.action == "status":
        out = status(cfg, args.interval)
    else:
        out = drop(cfg)
    print(json.dumps(out))


def add_pool_parser(sub) -> None:
    from student_trainer.cli import add_config_args

    p = sub.add_parser("pool", help="persistent named pools: create (warm up and keep), status, drop")
    p.add_argument("action", choices=["create", "status", "drop"])
    add_config_args(p)
    p.add_argument("--interval", type=float, default=1.0, help="status: seconds over which rates are measured")
    p.add_argument("--watch", action="store_true", help="status: a JSON line every --interval seconds until Ctrl-C")
    p.add_argument("--count", type=int, default=None, help="status --watch: stop after this many lines")
    p.set_defaults(fn=cmd_pool)
