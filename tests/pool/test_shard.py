"""PoolShard in isolation (a plain class), the shared helpers in base.py, and make_pool/pool_size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sstats

from common.config import PoolConfig
from common.pool import make_pool, pool_size
from common.pool.base import (
    PoolError,
    RecordCorrupt,
    STORAGE_DTYPES,
    SlotState,
    min_ready_slots,
    new_key,
    record_uses,
    shard_ranges,
    split_draw,
    t_histogram,
)
from common.pool import codec
from common.pool.codec import batch_over, new_arrays, read_snapshot, to_arrays, write_snapshot
from common.pool.local import LocalPool
from common.pool.shard import PoolShard
from pool_conftest import check_records, make_records

SHAPE = (2, 4, 4)


def shard(n=8, **kw) -> PoolShard:
    return PoolShard(shard_id=0, lo=100, n=n, record_shape=SHAPE, num_timesteps=50, record_metrics=False, **kw)


def fill(s: PoolShard, now=0.0, m=None):
    slots, prev = s.claim(m or s.n, "c", now)
    assert s.fill("c", to_arrays(make_records(torch.from_numpy(slots), torch.full((len(slots),), 10), SHAPE), "fp32"), now)
    return slots


def test_slots_start_empty_in_refill():
    s = shard()
    assert s.counts(0.0) == {"READY": 0, "LEASED": 0, "REFILL": 8, "FILLING": 0, "inserted": 0}
    assert (s.t == -1).all() and (s.state == SlotState.REFILL).all()


def test_transitions_with_explicit_clock():
    s = shard(lease_timeout_s=10, claim_timeout_s=5)
    slots = fill(s)
    assert slots.min() == 100 and slots.max() == 107, "global slot ids"
    got, batch = s.draw(3, "L", now=1.0)
    check_records(torch.from_numpy(got), batch)
    assert s.counts(1.0)["LEASED"] == 3
    assert s.counts(10.9)["LEASED"] == 3
    assert s.counts(11.0)["LEASED"] == 0, "the lease expires at its deadline"
    assert s.release("L", now=11.5) == 0, "release after expiry is a no-op"
    s.draw(2, "L2", now=12.0)
    assert s.release("L2", now=12.5) == 2 and s.release("L2", now=12.6) == 0
    s.claim(2, "C", now=13.0)
    assert s.counts(17.9)["FILLING"] == 2 and s.counts(18.0)["FILLING"] == 0
    assert s.fill("C", make_records(torch.arange(2), torch.zeros(2, dtype=torch.long), SHAPE), now=18.5) is False
    assert s.c["expired_leases"] == 3 and s.c["expired_claims"] == 2 and s.c["fill_rejected"] == 1


def test_draw_returns_at_most_ready_and_leases_are_disjoint():
    s = shard()
    fill(s)
    a, _ = s.draw(5, "A", 0.0)
    b, _ = s.draw(5, "B", 0.0)
    assert len(a) == 5 and len(b) == 3 and not set(a) & set(b)


def test_preallocated_storage_in_the_storage_dtype():
    sizes = {}
    for dt in ("fp32", "fp16", "bf16"):
        s = shard(n=16, storage_dtype=dt, has_logvar=True, has_label=True)
        sizes[dt] = sum(s.records[k].nbytes for k in ("x_t", "eps"))
        assert s.records["x_t"].shape == s.records["logvar"].shape == (16, *SHAPE)
        assert s.records["logvar"].dtype == np.float32          # whatever the storage dtype (issue 22)
    assert sizes["fp16"] == sizes["bf16"] == sizes["fp32"] // 2


def test_uses_and_samples_per_insert():
    s = shard(samples_per_insert=3.0)
    fill(s)
    for k in range(3):
        s.draw(8, f"L{k}", 0.0)
        s.release(f"L{k}", 0.0)
    assert s.counts(0.0)["REFILL"] == 8 and s.c["consumed"] == 24


@pytest.mark.parametrize("dtype,logvar,label", [("fp32", True, False), ("bf16", False, True), ("fp16", True, True)])
def test_new_arrays_are_the_memory_of_their_batch(dtype, logvar, label):
    arrays = new_arrays(6, (3, 4, 4), dtype, logvar, label)
    assert set(arrays) == {"x_t", "eps", "t"} | ({"logvar"} if logvar else set()) | ({"y"} if label else set())
    batch = batch_over(arrays, dtype)
    assert batch.x_t.dtype == STORAGE_DTYPES[dtype] and batch.x_t.shape == (6, 3, 4, 4) and len(batch) == 6
    assert (batch.logvar is not None) == logvar and (batch.y is not None) == label
    assert batch.logvar is None or batch.logvar.dtype == torch.float32
    arrays["eps"][2] = 0
    arrays["t"][:] = 7
    assert not batch.eps[2].any() and (batch.t == 7).all()          # the tensors are the arrays: no copy
    assert {k: v.__array_interface__["data"][0] for k, v in to_arrays(batch, dtype).items()} == \
        {k: v.__array_interface__["data"][0] for k, v in arrays.items()}


def test_new_key_is_unique():
    assert len({new_key() for _ in range(1000)}) == 1000


def test_record_uses_mean_is_k():
    rng = np.random.default_rng(0)
    u = record_uses(1.5, 20000, rng)
    assert set(np.unique(u)) == {1, 2} and abs(u.mean() - 1.5) < 0.02
    assert (record_uses(2.0, 10, rng) == 2).all()


def test_snapshot_restore_with_bad_records():
    s = shard(has_logvar=True)
    c_slots, _ = s.claim(8, "c", 0.0)
    recs = make_records(torch.from_numpy(c_slots), torch.arange(8), SHAPE, has_logvar=True)
    s.fill("c", to_arrays(recs, "fp32"), 0.0)
    s.draw(2, "L", 0.0)
    snap = s.snapshot(0.0)
    assert (snap.state == SlotState.READY).all(), "LEASED slots are saved as READY"
    bad = np.zeros(8, dtype=bool)
    bad[[2, 5]] = True
    t2 = shard(has_logvar=True)
    t2.restore(snap, bad)
    assert t2.counts(0.0) == {"READY": 6, "LEASED": 0, "REFILL": 2, "FILLING": 0, "inserted": 6}
    assert (t2.t[[2, 5]] == -1).all() and t2.c["corrupt"] == 2
    assert np.array_equal(t2.records["x_t"][0], s.records["x_t"][0]) and np.array_equal(t2.records["logvar"], s.records["logvar"])
    with pytest.raises(ValueError, match="owns"):
        shard(n=4).restore(snap, bad)


def test_snapshot_file_checksums(tmp_path):
    s = shard()
    fill(s)
    path = str(tmp_path / "s.snap")
    write_snapshot(path, {"num_slots": 8}, [s.snapshot(0.0)])
    header, frames = read_snapshot(path)
    (arrays, bad), = list(frames)
    assert header["num_slots"] == 8 and not bad.any() and np.array_equal(arrays.t, s.t)
    data = bytearray(open(path, "rb").read())
    data[20] ^= 0xFF                           # inside the header
    open(path, "wb").write(bytes(data))
    with pytest.raises(RecordCorrupt, match="s.snap: damaged header"):
        read_snapshot(path)
    with pytest.raises(RecordCorrupt, match="cannot open"):
        read_snapshot(str(tmp_path / "missing.snap"))


def test_snapshot_of_an_older_version_is_refused(tmp_path, monkeypatch):
    """Version 1 kept logvar in the storage dtype: read as today's fp32 it would be misread (issue 22)."""
    path = str(tmp_path / "v1.snap")
    monkeypatch.setattr(codec, "SNAPSHOT_VERSION", 1)
    write_snapshot(path, {"num_slots": 8}, [shard().snapshot(0.0)])
    monkeypatch.undo()
    with pytest.raises(RecordCorrupt, match=r"v1.snap: version 1 is not supported \(this build reads version 2"):
        read_snapshot(path)


def test_shard_ranges_and_helpers():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(PoolError, match="at least one slot"):
        shard_ranges(2, 3)
    assert min_ready_slots(1.0, 10) == 10 and min_ready_slots(0.0, 10) == 1 and min_ready_slots(0.25, 10) == 3
    assert t_histogram(np.array([0, 9, 10, 99, -1]), 100, 10) == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(PoolError):
        split_draw(np.array([1, 1]), 3, np.random.default_rng(0))


def test_split_draw_is_hypergeometric():
    rng = np.random.default_rng(3)
    ready, b, R = np.array([30, 10, 60]), 20, 4000
    first = np.array([split_draw(ready, b, rng)[0] for _ in range(R)])
    assert abs(first.mean() - b * 30 / 100) < 0.15
    hist = np.bincount(first, minlength=b + 1)
    exp = sstats.hypergeom(100, 30, b).pmf(np.arange(b + 1)) * R
    keep = exp > 5
    obs, exp = hist[keep], exp[keep]
    assert sstats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_pool_size_and_make_pool():
    assert pool_size(PoolConfig(rho=0.4), T=1000, b=128) == 51200
    assert pool_size(PoolConfig(num_slots=77), T=1000, b=128) == 77
    with pytest.raises(PoolError, match="empty pool"):
        pool_size(PoolConfig(rho=0.001), T=100, b=4)
    pool = make_pool(PoolConfig(shards=2), 8, SHAPE, has_logvar=False, has_label=False)
    assert isinstance(pool, LocalPool) and pool.stats().num_slots == 8
    with pytest.raises(PoolError, match="samples_per_insert"):
        make_pool(PoolConfig(samples_per_insert=0.5), 8, SHAPE, False, False)


def test_shard_records_metrics():
    from common import metrics

    s = PoolShard(shard_id=97, lo=0, n=6, record_shape=SHAPE, num_timesteps=50, lease_timeout_s=1.0)
    get = metrics.REGISTRY.get_sample_value
    assert get(metrics.POOL_SLOTS, {"shard": "97", "state": "REFILL"}) == 6
    fill(s)
    s.draw(4, "L", now=0.0)
    s.expire(now=5.0)
    s.stats()
    assert get(metrics.POOL_RECORDS_PRODUCED_TOTAL, {"shard": "97"}) == 6
    assert get(metrics.POOL_RECORDS_CONSUMED_TOTAL, {"shard": "97"}) == 4
    assert get(metrics.POOL_BYTES_TOTAL, {"shard": "97", "direction": "out"}) == 4 * s.record_bytes
    assert get(metrics.POOL_SLOTS, {"shard": "97", "state": "READY"}) == 6
    assert get(metrics.POOL_READY_T, {"shard": "97", "bucket": "2"}) == 6      # t = 10 of T = 50
    assert get(metrics.POOL_EXPIRED_TOTAL, {"kind": "lease"}) >= 4
