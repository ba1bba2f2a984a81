"""Pool throughput against the raw ceiling of its storage, one JSON line per case.

    python benchmarks/pool_bench.py                      # the floor case and the grid, ray and redis
    python benchmarks/pool_bench.py --grid ""            # the floor case only (1 client, 1 shard)
    python benchmarks/pool_bench.py --quick              # a few seconds (tests run this)
    python benchmarks/pool_bench.py --backends redis --redis-url redis://host:6379/0

Records are b = 128 of 3x32x32 fp32 with x_t, eps and logvar (36 KiB of tensors each). Each case
measures, with every client a Ray task on this node running the same block at the same time:

* draw+release: draw b, release (the pool is built with samples_per_insert = 1e9, so a release
  puts the slots back to READY and no teacher is needed);
* refill, the service's steady state: claim b slots whose records were drawn and released once
  (the claim hands them over, as a teacher's does after the warm-up) and fill b new records.

Each phase runs ``rounds`` times a block of raw copies of the same bytes (the ceiling), then a
block of pool calls. The ceiling: for ray, a numpy gather of b records from random slots of
arrays in shared memory allocated as a shard's (draw), and that gather plus
a scatter into the same slots (refill); for redis, redis-py's MGET of b keys (draw), and that MGET
then an MSET of b values (refill), of values of the record's size on the same server. Rates are the
records of all clients over a block's wall time, medians over the rounds; ``ratio`` is the
median of each round's pool block over its ceiling block, run back to back.

Floor (checked in ``floor_ok`` of the one-client, one-shard case): draw+release and refill each
at least 10,000 records/s on both backends, and the ray backend's draw at least 0.3 of its
ceiling. The grid (shards x clients) is printed for comparison and has no target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.config import PoolConfig  # noqa: E402
from common.pool import make_pool  # noqa: E402
from common.records import RecordBatch  # noqa: E402

FLOOR_RECORDS_S = 10_000
FLOOR_RAY_DRAW_RATIO = 0.3
CEILING_SLOTS = 4096       # each client's ceiling store: far larger than the CPU's caches, as the pool is


def make_batch(n: int, shape: tuple[int, int, int], seed: int) -> RecordBatch:
    g = torch.Generator().manual_seed(seed)
    return RecordBatch(x_t=torch.randn(n, *shape, generator=g), t=torch.randint(0, 1000, (n,), generator=g),
                       eps=torch.randn(n, *shape, generator=g), logvar=torch.randn(n, *shape, generator=g))


def pool_call(pool, phase: str, b: int, batch: RecordBatch) -> RecordBatch:
    """One draw+release or claim+fill of b records -> the batch drawn or handed over."""
    if phase == "draw":
        d = pool.draw(b, timeout_s=60)
        pool.release(d.lease_id)
        return d.batch
    c = pool.claim_refill(b, timeout_s=60)
    pool.fill(c.claim_id, batch.index(slice(0, len(c))))
    return c.batch


class Ceiling:
    """The raw copies a phase's pool call must make at least, on the same kind of storage."""

    def __init__(self, backend: str, url: str | None, slots: int, shape, batch: RecordBatch, seed: int):
        self.backend, self.rng = backend, np.random.default_rng(seed)
        self.slots, self.src = slots, [batch.x_t.numpy(), batch.eps.numpy(), batch.logvar.numpy()]
        if backend == "ray":
            from common.pool.memory import ShardMemory

            self.mem = ShardMemory.create("bench-ceiling", slots, shape, "fp32", True, False, 1)
            self.store = [self.mem.a[name] for name in ("x_t", "eps", "logvar")]
            for a in self.store:
                a[...] = self.rng.standard_normal(a.shape, dtype=np.float32)
        else:
            import redis

            self.r = redis.Redis.from_url(url)
            self.value = np.concatenate([s[0].ravel() for s in self.src]).tobytes()
            self.keys = [f"bench-ceiling:{seed}:{i}" for i in range(slots)]
            for lo in range(0, slots, 64):
                self.r.mset({k: self.value for k in self.keys[lo:lo + 64]})

    def call(self, phase: str, b: int):
        idx = np.sort(self.rng.choice(self.slots, b, replace=False))
        if self.backend == "ray":
            out = [a[idx] for a in self.store]        # kept by the caller until the next call, as a drawn batch is
            if phase == "refill":
                for a, x in zip(self.store, self.src):
                    a[idx] = x
            return out
        keys = [self.keys[i] for i in idx.tolist()]      # MGET and MSET: redis-py's fastest way to move b values
        out = self.r.mget(keys)
        if phase == "refill":
            self.r.mset(dict.fromkeys(keys, self.value))
        return out

    def close(self) -> None:
        if self.backend == "ray":
            self.store = []
            self.mem.close()
        else:
            self.r.delete(*self.keys)
            self.r.close()


def client(pool, phase: str, b: int, iters: int, rounds: int, shape, barrier: str, seed: int, url: str | None,
           backend: str, warmup: int) -> list[tuple[str, int, float, float]]:
    """One client: ``rounds`` x (a ceiling block, a pool block) of ``iters`` calls each -> [(kind, records, t0, t1)].
    Before each block it writes ``ready-<seed>-<block>`` in ``barrier`` and starts once the driver writes ``go-<block>``."""
    torch.set_num_threads(1)
    batch = make_batch(b, shape, seed)
    ceiling = Ceiling(backend, url, min(pool.num_slots, CEILING_SLOTS), shape, batch, seed)
    for _ in range(warmup):                   # untimed: a process's first calls map memory and fault pages in
        pool_call(pool, phase, b, batch)
        ceiling.call(phase, b)
    out, block = [], 0
    try:
        for _ in range(rounds):
            for kind in ("ceiling", "pool"):
                open(os.path.join(barrier, f"ready-{seed}-{block}"), "w").close()
                while not os.path.exists(os.path.join(barrier, f"go-{block}")):
                    time.sleep(0.0005)
                block += 1
                t0, held = time.time(), None
                for _ in range(iters):     # each result is held until the next call, as a trainer holds its batch
                    held = ceiling.call(phase, b) if kind == "ceiling" else pool_call(pool, phase, b, batch)
                out.append((kind, iters * b, t0, time.time()))
                del held
    finally:
        ceiling.close()
    return out


def run_phase(ray, pool, phase: str, clients: int, b: int, iters: int, rounds: int, shape, url, backend, warmup):
    """All clients at once, block by block -> (pool records/s, ceiling records/s, ratio): medians over the rounds."""
    barrier = tempfile.mkdtemp(prefix="pool_bench_")
    try:
        fn = ray.remote(num_cpus=0)(client)
        refs = [fn.remote(pool, phase, b, iters, rounds, shape, barrier, i, url, backend, warmup) for i in range(clients)]
        for block in range(2 * rounds):
            end = time.time() + 300
            while sum(f.endswith(f"-{block}") and f.startswith("ready-") for f in os.listdir(barrier)) < clients:
                if time.time() > end or ray.wait(refs, timeout=0)[0]:
                    ray.get(refs)            # a client failed: its error
                    raise SystemExit(f"pool bench: clients did not reach block {block}")
                time.sleep(0.0005)
            open(os.path.join(barrier, f"go-{block}"), "w").close()
        res = ray.get(refs)
    finally:
        shutil.rmtree(barrier, ignore_errors=True)
    rates = {"ceiling": [], "pool": []}
    for k in range(2 * rounds):
        rows = [r[k] for r in res]
        rates[rows[0][0]].append(sum(r[1] for r in rows) / (max(r[3] for r in rows) - min(r[2] for r in rows)))
    ratios = np.divide(rates["pool"], rates["ceiling"])
    return float(np.median(rates["pool"])), float(np.median(rates["ceiling"])), float(np.median(ratios))


def build_pool(backend: str, url: str | None, shards: int, num_slots: int, shape, phase: str, b: int):
    """draw: every slot READY and never used up; refill: every slot filled, drawn and released once (REFILL
    with its record, which a claim hands over)."""
    cfg = PoolConfig(backend=backend, shards=shards, num_slots=num_slots, min_ready_fraction=0.0,
                     samples_per_insert=1e9 if phase == "draw" else 1, lease_timeout_s=300, claim_timeout_s=300,
                     name=f"bench-{uuid.uuid4().hex[:8]}", **({"redis_url": url} if url else {}))
    pool = make_pool(cfg, num_slots, shape, has_logvar=True, has_label=False)
    batch = make_batch(b, shape, 1)
    for _ in range(num_slots // b):
        pool_call(pool, "refill", b, batch)
    if phase == "refill":
        for _ in range(num_slots // b):
            pool_call(pool, "draw", b, batch)
    return pool


def run_case(ray, backend, url, shards, clients, b, iters, rounds, shape, warmup) -> dict:
    num_slots = clients * (warmup + rounds * iters) * b       # every refill call of the phase finds b REFILL slots
    row = {"backend": backend, "shards": shards, "clients": clients, "b": b, "record_shape": list(shape),
           "record_bytes": 3 * int(np.prod(shape)) * 4}
    for phase, name in (("draw", "draw_release"), ("refill", "refill")):
        pool = build_pool(backend, url, shards, num_slots, shape, phase, b)
        try:
            rps, ceil, ratio = run_phase(ray, pool, phase, clients, b, iters, rounds, shape, url, backend, warmup)
        finally:
            if backend == "redis":
                pool.destroy()
            pool.close()
        row.update({f"{name}_records_s": round(rps, 1), f"ceiling_{phase}_records_s": round(ceil, 1),
                    f"{phase}_ratio": round(ratio, 3)})
    if shards == 1 and clients == 1:
        row["floor_ok"] = (row["draw_release_records_s"] >= FLOOR_RECORDS_S and row["refill_records_s"] >= FLOOR_RECORDS_S
                           and (backend != "ray" or row["draw_ratio"] >= FLOOR_RAY_DRAW_RATIO))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ray,redis")
    ap.add_argument("--grid", default="1x2,2x1,2x2,4x4", help="more cases as SHARDSxCLIENTS, comma separated ('' for none)")
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--shape", default="3,32,32")
    ap.add_argument("--iters", type=int, default=8, help="calls per client and block")
    ap.add_argument("--rounds", type=int, default=5, help="(ceiling block, pool block) pairs per phase")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per client and phase")
    ap.add_argument("--redis-url", default=None, help="an existing server (default: start one in a temp folder)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--quick", action="store_true", help="a few seconds: b 32, 2 iters, 2 rounds, no grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.b, args.iters, args.rounds, args.warmup, args.grid = 32, 2, 2, 1, ""
    shape = tuple(int(s) for s in args.shape.split(","))
    cases = [(1, 1)] + [tuple(int(x) for x in c.split("x")) for c in args.grid.split(",") if c]
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")       # a local cluster on this machine only
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    tmp, server = tempfile.mkdtemp(prefix="pool_bench_"), None
    out = open(args.out, "a") if args.out else None
    try:
        for backend in (s for s in args.backends.split(",") if s):
            url = None
            if backend == "redis":
                if args.redis_url is None:
                    sys.path.insert(0, os.path.join(ROOT, "tests", "pool"))
                    from redis_fixtures import RedisServer

                    server = server or RedisServer(os.path.join(tmp, "redis"), persist=False).start()
                url = args.redis_url or server.url
            for shards, clients in cases:
                line = json.dumps(run_case(ray, backend, url, shards, clients, args.b, args.iters, args.rounds, shape,
                                           args.warmup))
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
    finally:
        if out:
            out.close()
        if server is not None:
            server.kill()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
