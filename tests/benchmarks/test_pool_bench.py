"""The pool benchmark's copy ceilings (benchmarks/pool_bench.py): the Ray cases copy the same bytes in
private memory ("heap") and in shared memory allocated as the pool's shards ("ceiling") before each block
of pool calls. Here with a local pool, which needs no Ray cluster: the blocks and the storage are checked,
not their speed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common.config import PoolConfig
from common.pool import make_pool

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import pool_bench

SHAPE = (3, 4, 4)


def test_shared_store_holds_the_values_in_pool_shard_memory():
    like = [np.random.default_rng(i).standard_normal((16, *SHAPE), dtype=np.float32) for i in range(3)]
    s = pool_bench.SharedStore(16, SHAPE, like)
    assert s.mem.path is not None and s.mem.path.startswith("/proc/")       # a memfd, as a Ray shard's
    for a, x, name in zip(s.store, like, ("x_t", "eps", "logvar")):
        assert np.array_equal(a, x) and np.shares_memory(a, s.mem.a[name])
    s.close()


def test_client_loop_runs_heap_ceiling_and_pool_blocks_in_each_round():
    b, iters, rounds = 4, 4, 2
    cfg = PoolConfig(backend="local", shards=1, num_slots=b * iters, min_ready_fraction=0.0, samples_per_insert=1e9)
    pool = make_pool(cfg, b * iters, SHAPE, has_logvar=True, has_label=False)
    out = pool_bench.client_loop(pool, "fill", b, iters, SHAPE, None, 0, ceiling_slots=32, rounds=rounds)
    assert [k for k, *_ in out] == ["heap", "ceiling", "pool"] * rounds
    assert all(moved == b * iters // rounds for _, moved, _, _ in out)
    assert pool.stats().counts["READY"] == b * iters
