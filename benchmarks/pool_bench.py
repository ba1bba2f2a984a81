"""Pool throughput against the raw ceiling of its storage, one JSON line per case.

    python benchmarks/pool_bench.py                    # ray and redis, shards 1 2 4, clients 1 2 4
    python benchmarks/pool_bench.py --quick            # a few seconds (tests run this)
    python benchmarks/pool_bench.py --backends redis --redis-url redis://host:6379/0

Records are b = 128 of 3x32x32 fp32 with x_t, eps and logvar (36 KiB of tensors each,
issue 4). Each case builds a pool of ``clients * (iters + warmup) * b`` slots, then (every
client first makes ``warmup`` untimed calls of each phase: a steady state is measured)

1. claim+fill: every client process claims b slots and fills them, ``iters`` times,
   until the pool is full (timed from a common start to the last client's end, per block);
2. draw+release: every client draws b and releases, ``draw_iters`` times (the pool is
   built with samples_per_insert = 1e9 so a release returns the slot to READY and
   the phase can run without teachers);
3. refill (the service's steady state): a second pool of the same size whose every slot was
   filled, drawn and released once (untimed), so each claim hands over the slots' previous
   records, as a teacher's claim does after the warm-up; every client claims b and fills,
   ``iters`` times. Phase 1 is the warm-up: its claims are of empty slots, and on Redis its
   records go into new hash fields, which cost the server about 3x the HSET time of
   overwriting (fresh memory) while the SET ceiling overwrites existing keys.

Throughput in records/s and GB/s of tensor bytes (1e9 bytes). The raw ceiling is
measured in the same run on the same machine:

- redis: ``redis-benchmark -t set|get -d <record bytes> -c <clients> -P <b> -r <keys>`` against
  the same server (SET is the ceiling of fill, GET of draw, a GET then a SET of each record,
  1 / (1 / get + 1 / set), of refill; every key is set first so each GET moves a value). Each phase runs in ``rounds`` blocks of pool calls, every client in the same
  block at once (multiprocessing barriers), and before each block a redis-benchmark run of at
  least 20 pipelines per connection while the clients wait: the ceiling and the pool meet the
  same load. A block's rate is all clients' records over its wall time; the figures are
  medians over the rounds and ``ratio`` the median of each pool block over the ceiling run
  just before it. (The previous version ran redis-benchmark once, after the case: on this
  shared machine its rate swung 2x between runs.)
- ray: a plain numpy copy of the same bytes between memory as large as the pool and a
  batch, done by every client process itself: for draw, b records gathered from random
  slots (``x[idx]`` per tensor field: what any draw must copy at least once), the gathered
  batch kept until the client's next call as a drawn batch is (a trainer holds it for its
  step; a batch freed at once would be gathered into the same cache-hot buffer every time);
  for fill, b records scattered into random slots (``x[idx] = batch``); for refill, a gather
  and a scatter of the same random slots. Each phase runs in
  ``rounds`` alternating blocks, a block of copies then a block of pool calls, every client
  in the same block at once (a file barrier per block), so the ceiling and the pool meet the
  same load on this shared machine. Each rate is records / summed block wall time, all
  clients together: with more clients than cores that is what the cores give. (The previous
  version summed each client's records / its own seconds in copies; with 4 clients on 2
  cores that counted the cores twice for the copies but not for the pool's lock waits.)
  The rates printed are medians over the rounds, and ``ratio`` the median of the rounds'
  ratios (each round's pool block over its ceiling block, run back to back).
  ``ceiling_hot_copy_records_s`` also reports ``np.copy`` of one b-record buffer over and
  over in one process (it stays in the CPU's cache, so no pool can meet it: it was the
  ceiling of the first version of this benchmark).

``ratio`` = pool throughput / ceiling (issue 4's target: at least 0.5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
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
from common.records import RecordBatch  # noqa: E402


def make_batch(n: int, shape: tuple[int, int, int], seed: int) -> RecordBatch:
    g = torch.Generator().manual_seed(seed)
    return RecordBatch(x_t=torch.randn(n, *shape, generator=g), t=torch.randint(0, 1000, (n,), generator=g),
                       eps=torch.randn(n, *shape, generator=g), logvar=torch.randn(n, *shape, generator=g))


def client_loop(pool, phase: str, b: int, iters: int, shape, barrier, seed: int,
                ceiling_slots: int = 0, warmup: int = 0, rounds: int = 1, before_block=None) -> list[tuple[str, int, float, float]]:
    """One client: ``iters`` claim+fill or draw+release calls of b records, in ``rounds`` blocks
    -> [(kind, records, start, end)] per block, kind "pool", "ceiling" or "heap".

    ``barrier``: a folder; before each block the client writes ``ready-<seed>-<block>`` and starts when
    the driver writes ``go-<block>`` (the driver releases a block once every client is ready for it,
    so all clients run the same kind of block at once and a block's wall time is comparable). Or a
    pair of multiprocessing barriers (arrive, go) of the clients and the driver, which runs a Redis
    ceiling block between the two (the clients wait blocked, using no CPU). ``before_block``: called
    before each block (one client in the driver's process: the Redis ceiling block).
    ``ceiling_slots`` > 0: each round is a block of plain copies of the same bytes between a batch and
    random slots of arrays of that many slots (gather for draw, scatter for fill) in private memory
    ("heap"), the same copies in shared memory allocated as the pool's shards are ("ceiling"), then a
    block of pool calls. ``warmup``: untimed calls first (a steady state is measured, not a process's first
    page faults).
    """
    torch.set_num_threads(1)
    batch = make_batch(b, shape, seed)
    rng = np.random.default_rng(seed)
    fields = [f for f in (batch.x_t, batch.eps, batch.logvar) if f is not None]
    getattr(pool, "_shard_views", lambda: None)()      # Ray: map co-located shards before the clock starts
    heap = [rng.standard_normal((ceiling_slots, *shape), dtype=np.float32) for _ in fields] if ceiling_slots else []
    shared = SharedStore(ceiling_slots, shape, heap) if ceiling_slots else None
    src = [f.numpy() for f in fields]
    for _ in range(warmup):                             # untimed: a process's first calls pay for page faults
        _one_call(pool, phase, b, batch)
    held = None

    def ceiling_copy(store):
        idx = np.sort(rng.choice(ceiling_slots, b, replace=False))
        if phase == "refill":     # a steady-state claim hands over the slots' records, its fill writes new ones
            prev = [a[idx] for a in store]
            for a, x in zip(store, src):
                a[idx] = x
            return prev
        if phase == "fill":
            for a, x in zip(store, src):
                a[idx] = x
            return None
        return [a[idx] for a in store]     # into a fresh batch the client keeps until its next call, as a draw's

    per_round = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    kinds = ("heap", "ceiling", "pool") if heap else ("pool",)
    out, block = [], 0
    for n in per_round:
        for kind in kinds:
            if isinstance(barrier, tuple):
                for party in barrier:
                    party.wait()
            elif barrier is not None:
                open(os.path.join(barrier, f"ready-{seed}-{block}"), "w").close()
                while not os.path.exists(os.path.join(barrier, f"go-{block}")):
                    time.sleep(0.0005)
            if before_block is not None:
                before_block()
            block += 1
            t0, moved = time.time(), 0
            for _ in range(n):
                if kind != "pool":
                    held = ceiling_copy(heap if kind == "heap" else shared.store)
                    moved += b
                else:
                    k, held = _one_call(pool, phase, b, batch)
                    moved += k
            out.append((kind, moved, t0, time.time()))
    if shared is not None:
        shared.close()          # its memory would outlive the call: a Ray worker runs later cases' clients too
    return out


class SharedStore:
    """The ceiling's arrays in shared memory allocated as a Ray pool shard's is (memory.ShardMemory.create:
    a memfd, every page reserved and mapped up front), holding the values of ``like``, one array per field.
    ``close()`` frees it (a Ray worker that runs the next case's client outlives this one)."""

    def __init__(self, slots: int, shape, like: list[np.ndarray]):
        from common.pool.memory import ShardMemory

        self.mem = ShardMemory.create("bench-ceiling", slots, shape, "fp32", True, False, 1)
        self.store = [self.mem.a[name] for name in ("x_t", "eps", "logvar")][:len(like)]
        for a, x in zip(self.store, like):
            a[...] = x

    def close(self) -> None:
        self.store = []
        self.mem.close()


def _one_call(pool, phase: str, b: int, batch):
    """One claim+fill (phase fill or refill) or draw+release of b records -> (records moved, the drawn
    batch or the claim's previous records)."""
    if phase in ("fill", "refill"):
        c = pool.claim_refill(b, timeout_s=60)
        pool.fill(c.claim_id, batch.index(slice(0, len(c))))
        return len(c), c.batch
    d = pool.draw(b, timeout_s=60)
    pool.release(d.lease_id)
    return len(d.batch), d.batch


def _proc_main(pool, phase, b, iters, shape, barrier, seed, warmup, rounds, q):
    q.put(client_loop(pool, phase, b, iters, shape, barrier, seed, 0, warmup, rounds))


def run_clients(backend: str, pool, phase: str, clients: int, b: int, iters: int, shape,
                ceiling_slots: int = 0, warmup: int = 0, rounds: int = 1,
                redis_ceiling_block=None) -> tuple[float, float | None, float | None, float | None, float | None]:
    """Run ``clients`` client processes at once, block by block
    -> (pool records/s, ceiling records/s, ratio, heap ceiling records/s, heap ratio); None where not measured.

    A block's rate is the records all clients moved in it over its wall time (from its release to
    the last client's end): the throughput of all clients together, which on a machine with fewer
    cores than clients is what the cores can give. With a ceiling: the medians over the rounds of
    the pool's rate, the ceiling's rate and of each round's ratio (its pool block over its ceiling
    block, run back to back: on a shared machine whose load swings from second to second, the
    per-round ratio is steadier than a ratio of totals). Ray: ``ceiling_slots`` > 0, the clients copy
    (the ceiling in shared memory as the pool's, and the heap ceiling in private memory).
    Redis: ``redis_ceiling_block()`` (-> records/s) runs redis-benchmark before each pool block while
    the clients wait.
    """
    blocks = rounds * (3 if ceiling_slots else 1)
    ceil_redis: list[float] = []
    if clients == 1 and backend == "redis":      # one client: run it here (no process start in --quick)
        hook = (lambda: ceil_redis.append(redis_ceiling_block())) if redis_ceiling_block else None
        res = [client_loop(pool, phase, b, iters, shape, None, 0, 0, warmup, rounds, before_block=hook)]
    elif backend == "redis":
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        sync = (ctx.Barrier(clients + 1), ctx.Barrier(clients + 1))      # (arrive, go) per block
        procs = [ctx.Process(target=_proc_main, args=(pool, phase, b, iters, shape, sync, i, warmup, rounds, q))
                 for i in range(clients)]
        for p in procs:
            p.start()
        for _ in range(blocks):
            sync[0].wait(timeout=600)        # every client finished the previous block and waits
            if redis_ceiling_block:
                ceil_redis.append(redis_ceiling_block())
            sync[1].wait(timeout=600)
        res = [q.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    else:
        barrier = tempfile.mkdtemp(prefix="pool_bench_barrier_")
        try:
            import ray

            fn = ray.remote(num_cpus=0)(client_loop)
            refs = [fn.remote(pool, phase, b, iters, shape, barrier, i, ceiling_slots, warmup, rounds) for i in range(clients)]
            for k in range(blocks):
                _release_barrier(barrier, clients, k)
            res = ray.get(refs)
        finally:
            shutil.rmtree(barrier, ignore_errors=True)

    def rates(kind: str) -> list[float]:
        out = []
        for k in range(len(res[0])):
            rows = [r[k] for r in res]
            if rows[0][0] == kind:
                out.append(sum(r[1] for r in rows) / (max(r[3] for r in rows) - min(r[2] for r in rows)))
        return out

    pool_r = rates("pool")
    ceil_r = ceil_redis or (rates("ceiling") if ceiling_slots else [])
    if not ceil_r:
        return float(np.median(pool_r)), None, None, None, None
    # each round's pool block ran right after its ceiling blocks, under the same load
    heap_r = rates("heap") if ceiling_slots else []
    heap, heap_ratio = (float(np.median(heap_r)), float(np.median(np.divide(pool_r, heap_r)))) if heap_r else (None, None)
    return float(np.median(pool_r)), float(np.median(ceil_r)), float(np.median(np.divide(pool_r, ceil_r))), heap, heap_ratio


def _release_barrier(barrier: str, clients: int, block: int, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while sum(f.startswith("ready-") and f.endswith(f"-{block}") for f in os.listdir(barrier)) < clients:
        if time.time() > deadline:
            raise SystemExit(f"pool bench: {clients} clients did not reach block {block} within {timeout_s:.0f}s")
        time.sleep(0.0005)
    open(os.path.join(barrier, f"go-{block}"), "w").close()


# --- raw ceilings -----------------------------------------------------------------------------------------


def _redis_benchmark() -> str:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark is not on PATH (Debian package redis-tools / redis-server)")
    return exe


def populate_ceiling_keys(port: int, record_bytes: int, keys: int) -> None:
    """SET every key redis-benchmark's ``-r keys`` names (``key:%012d``), so each GET moves a value."""
    import redis

    r = redis.Redis(port=port)
    value = os.urandom(record_bytes)
    for lo in range(0, keys, 64):
        r.mset({f"key:{i:012d}": value for i in range(lo, min(keys, lo + 64))})
    r.close()


def redis_ceiling_rate(port: int, test: str, record_bytes: int, clients: int, b: int, n: int, keys: int) -> float:
    """records/s of one redis-benchmark run: ``test`` (set or get) of n values of ``record_bytes`` over
    ``clients`` connections, each pipelining b requests (the pool moves b records per call)."""
    out = subprocess.run([_redis_benchmark(), "-p", str(port), "-t", test, "-d", str(record_bytes), "-c", str(clients),
                          "-n", str(n), "-P", str(b), "-r", str(keys), "--csv", "-q"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == test.upper():
            return float(cells[1])
    raise SystemExit(f"redis-benchmark printed no {test.upper()} rate: {out!r}")


def hot_copy_rate(record_bytes: int, b: int, seconds: float) -> float:
    """records/s of np.copy of one b-record buffer in one process (cache-hot: an upper bound)."""
    hot = np.random.default_rng(0).standard_normal(b * record_bytes // 8)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copy(hot)
        n += 1
    return n * b / (time.perf_counter() - t0)


# --- cases --------------------------------------------------------------------------------------------------------


def start_redis(tmp: str):
    sys.path.insert(0, os.path.join(ROOT, "tests", "pool"))
    from redis_fixtures import RedisServer

    return RedisServer(os.path.join(tmp, "redis"), persist=False).start()


def build_pool(backend: str, url: str | None, shards: int, num_slots: int, shape, samples_per_insert: float = 1e9):
    from common.pool import make_pool

    name = f"bench-{uuid.uuid4().hex[:8]}"
    cfg = PoolConfig(backend=backend, shards=shards, num_slots=num_slots, min_ready_fraction=0.0,
                     samples_per_insert=samples_per_insert, lease_timeout_s=300, claim_timeout_s=300, name=name,
                     **({"redis_url": url} if url else {}))
    return make_pool(cfg, num_slots, shape, has_logvar=True, has_label=False)


def build_refill_pool(backend: str, url: str | None, shards: int, num_slots: int, b: int, shape):
    """A pool in the service's steady state: every slot was filled once, drawn and released
    (samples_per_insert = 1), so it is REFILL and still holds its record, which a claim hands over."""
    pool = build_pool(backend, url, shards, num_slots, shape, samples_per_insert=1)
    batch = make_batch(b, shape, 1)
    for phase in ("fill", "draw"):
        for _ in range(num_slots // b):
            _one_call(pool, phase, b, batch)
    return pool


def _close(backend: str, pool) -> None:
    if backend == "redis":
        pool.destroy()
    pool.close()


def run_case(backend, url, port, shards, clients, b, iters, shape, record_bytes, draw_iters=None, warmup=0,
             rounds: int = 5) -> dict:
    num_slots = clients * (iters + warmup) * b
    pool = build_pool(backend, url, shards, num_slots, shape)
    extra = {}
    copies = num_slots if backend == "ray" else 0
    fill_rounds = max(1, min(rounds, iters // 4))          # blocks of at least 4 fills and 5 draws per client
    draw_rounds = max(1, min(rounds, (draw_iters or iters) // 5))
    hooks = {}
    if backend == "redis":
        keys = max(num_slots // 4, 256)
        populate_ceiling_keys(port, record_bytes, keys)
        for phase, tests, n_rounds, n_iters in (("fill", ("set",), fill_rounds, iters), ("draw", ("get",), draw_rounds, draw_iters or iters),
                                                ("refill", ("get", "set"), fill_rounds, iters)):
            n = clients * b * max(20, n_iters // n_rounds)     # at least 20 pipelines per connection (its clock has ms steps)
            # refill: a GET and a SET of each record, one after the other -> 1 / (1 / get + 1 / set) records/s
            hooks[phase] = (lambda tests=tests, n=n: 1.0 / sum(1.0 / redis_ceiling_rate(port, t, record_bytes, clients, b, n, keys)
                                                             for t in tests))
    res = {}
    try:
        res["fill"] = run_clients(backend, pool, "fill", clients, b, iters, shape, copies, warmup, fill_rounds, hooks.get("fill"))
        res["draw"] = run_clients(backend, pool, "draw", clients, b, draw_iters or iters, shape, copies, warmup, draw_rounds,
                                  hooks.get("draw"))
    finally:
        _close(backend, pool)
    pool = build_refill_pool(backend, url, shards, num_slots, b, shape)
    try:
        res["refill"] = run_clients(backend, pool, "refill", clients, b, iters, shape, copies, warmup, fill_rounds,
                                    hooks.get("refill"))
    finally:
        _close(backend, pool)
    if backend == "redis":
        how = "redis-benchmark SET/GET (refill: GET then SET), a block before each block of pool calls"
    else:
        how = ("numpy gather/scatter of the same bytes in shared memory allocated as the pool's shards "
               "(heap_*: in private memory), interleaved in each client")
        extra["ceiling_hot_copy_records_s"] = round(hot_copy_rate(record_bytes, b, 0.5), 1)
    gb = record_bytes / 1e9
    row = {"backend": backend, "shards": shards, "clients": clients, "b": b, "record_shape": list(shape),
           "record_bytes": record_bytes, "ceiling": how}
    for phase, name in (("draw", "draw_release"), ("fill", "claim_fill"), ("refill", "refill")):
        rps, ceil, ratio, heap, heap_ratio = res[phase]
        row.update({f"{name}_records_s": round(rps, 1), f"{name}_GB_s": round(rps * gb, 4),
                    f"ceiling_{phase}_records_s": round(ceil, 1), f"{phase}_ratio": round(ratio, 3)})
        if heap is not None:
            row.update({f"heap_ceiling_{phase}_records_s": round(heap, 1), f"heap_{phase}_ratio": round(heap_ratio, 3)})
    return {**row, **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ray,redis")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--shape", default="3,32,32")
    ap.add_argument("--iters", type=int, default=20, help="claim+fill batches per client (the pool holds clients * iters * b slots)")
    ap.add_argument("--draw-iters", type=int, default=50, help="draw+release batches per client (the records are reused)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per client and phase before the clock starts")
    ap.add_argument("--rounds", type=int, default=10, help="blocks of pool calls per phase, each after a ceiling block (ray: copies, redis: redis-benchmark)")
    ap.add_argument("--redis-url", default=None, help="an existing server (default: start one in a temp folder)")
    ap.add_argument("--quick", action="store_true", help="a few seconds: redis only, shards 1,2, clients 1, b 32, 3 iters")
    args = ap.parse_args(argv)
    if args.quick:
        args.backends, args.shards, args.clients, args.b, args.iters, args.draw_iters, args.warmup = "redis", "1,2", "1", 32, 3, 3, 0
    shape = tuple(int(s) for s in args.shape.split(","))
    record_bytes = 3 * int(np.prod(shape)) * 4          # x_t, eps, logvar in fp32
    backends = [s for s in args.backends.split(",") if s]
    tmp = tempfile.mkdtemp(prefix="pool_bench_")
    server = None
    try:
        for backend in backends:
            url = port = None
            if backend == "ray":
                try:
                    import ray
                    import common.pool.ray_backend  # noqa: F401
                except ImportError as err:
                    print(json.dumps({"backend": "ray", "skipped": f"not importable: {err}"}), flush=True)
                    continue
                started_ray = not ray.is_initialized()
                if started_ray:
                    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
                    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
            elif backend == "redis":
                if args.redis_url:
                    url = args.redis_url
                    port = int(url.split(":")[2].split("/")[0])
                else:
                    server = server or start_redis(tmp)
                    url, port = server.url, server.port
            for shards in (int(s) for s in args.shards.split(",")):
                for clients in (int(c) for c in args.clients.split(",")):
                    row = run_case(backend, url, port, shards, clients, args.b, args.iters, shape, record_bytes, args.draw_iters,
                                   args.warmup, args.rounds)
                    print(json.dumps(row), flush=True)
            if backend == "ray" and started_ray:
                # the next backend's cases do not share the cores with Ray's processes (in runs 13-16, with
                # Ray left running, Redis's GET ceiling was 18-22k/s for the three cases right after the
                # Ray cases and 25-33k/s for the later ones)
                ray.shutdown()
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
