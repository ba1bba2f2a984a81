"""The pool benchmark's pieces (benchmarks/pool_bench.py) with a local pool, which needs no Ray cluster:
the ceiling's copies and the pools each phase starts from are checked, not their speed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import pool_bench

SHAPE = (3, 4, 4)


def test_ray_ceiling_copies_records_in_pool_shard_memory():
    batch = pool_bench.make_batch(4, SHAPE, 0)
    c = pool_bench.Ceiling("ray", None, 16, SHAPE, batch, seed=1)
    assert c.mem.path is not None and c.mem.path.startswith("/proc/")       # a memfd, as a Ray shard's
    got = c.call("draw", 4)
    assert [a.shape for a in got] == [(4, *SHAPE)] * 3
    c.call("refill", 4)
    assert sum(np.isin(c.store[0].reshape(16, -1)[:, 0], batch.x_t.numpy()[:, 0, 0, 0]).tolist()) >= 4
    c.close()


def test_phases_start_from_the_pools_they_measure():
    pool = pool_bench.build_pool("local", None, 2, 16, SHAPE, "draw", b=4)
    assert pool.stats().counts["READY"] == 16
    assert len(pool_bench.pool_call(pool, "draw", 4, pool_bench.make_batch(4, SHAPE, 0))) == 4
    assert pool.stats().counts["READY"] == 16, "draw+release leaves the slots READY (samples_per_insert = 1e9)"
    pool = pool_bench.build_pool("local", None, 2, 16, SHAPE, "refill", b=4)
    assert pool.stats().counts["REFILL"] == 16
    prev = pool_bench.pool_call(pool, "refill", 4, pool_bench.make_batch(4, SHAPE, 0))
    assert (prev.t >= 0).all(), "a steady-state claim hands over the slots' previous records"
