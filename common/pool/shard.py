"""PoolShard: n slots of B+ held as preallocated arrays, and every state transition on them.

A plain, single-threaded class (the owner serializes calls: LocalPool with its
lock, a Ray actor by running one method at a time). It never blocks; blocking,
rate limiting across shards and the random split of a draw over shards live in
the pool that owns the shards (local.py, ray_backend.py). See base.py for the
contract; this module implements it for one contiguous range of global slots.

Storage per slot: x_t, eps, logvar (optional) [n, C, H, W] in the storage dtype;
y (optional) [n] int64; t [n] int64 (EMPTY_T = no record); state [n] uint8;
uses [n] int32 (uses left of the record, samples_per_insert); produced_at [n]
int64 (value of the shard's produced counter when the record was filled, for
the record age); owner [n] object (lease or claim id) with deadline [n] float64.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import metrics
from common.pool.base import (
    STATE_NAMES,
    STORAGE_DTYPES,
    SlotState,
    check_samples_per_insert,
    record_uses,
    t_histogram,
)
from common.pool.codec import SlotArrays, from_numpy, to_numpy
from common.pool.groups import Group, ShardGroups  # noqa: F401 - Group: the type of PoolShard.groups values
from common.records import EMPTY_T, RecordBatch

READY, LEASED, REFILL, FILLING = (int(s) for s in SlotState)
_AGE_SAMPLE = 16      # records per draw whose age goes into the metric histogram (stats keep the exact mean)

SHARD_COUNTERS = (
    "produced", "consumed", "inserted", "released", "bytes_in", "bytes_out", "expired_leases", "expired_claims",
    "corrupt", "fill_rejected", "draws", "fills", "age_sum",
)


def _np(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy (bf16 as its int16 bits): gathers and scatters run in numpy,
    which is 10x to 100x faster than torch's index_select/index_put for [b, C, H, W] rows on CPU."""
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def check_batch(batch: RecordBatch, n: int, record_shape, has_logvar: bool, has_label: bool, num_timesteps: int) -> None:
    """Raise ValueError (one line) unless ``batch`` is n records of the pool's layout."""
    if len(batch) != n:
        raise ValueError(f"fill got {len(batch)} records for a claim of {n} slots")
    want = (n, *record_shape)
    for name in ("x_t", "eps") + (("logvar",) if has_logvar else ()):
        v = getattr(batch, name)
        if v is None or tuple(v.shape) != want:
            raise ValueError(f"fill: {name} has shape {None if v is None else tuple(v.shape)}, the pool stores {want}")
    if not has_logvar and batch.logvar is not None:
        raise ValueError("fill: records carry logvar but the pool was built without has_logvar")
    if has_label != (batch.y is not None):
        raise ValueError(f"fill: records {'lack' if has_label else 'carry'} labels y but the pool has has_label={has_label}")
    t = batch.t
    if n and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        raise ValueError(f"fill: t must lie in [0, {num_timesteps}), got [{int(t.min())}, {int(t.max())}]")


class PoolShard(ShardGroups):
    """Global slots [lo, lo + n) of a pool; ``rng`` seeded with seed + shard_id (STYLE: base seed plus index)."""

    def __init__(
        self,
        shard_id: int,
        lo: int,
        n: int,
        record_shape: tuple[int, int, int],
        storage_dtype: str = "fp32",
        has_logvar: bool = False,
        has_label: bool = False,
        lease_timeout_s: float = 60.0,
        claim_timeout_s: float = 60.0,
        samples_per_insert: float = 1.0,
        num_timesteps: int = 1000,
        t_buckets: int = 10,
        seed: int = 0,
        record_metrics: bool = True,
    ):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"pool.storage_dtype={storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        self.shard_id, self.lo, self.n = shard_id, lo, n
        self.record_shape = tuple(int(s) for s in record_shape)
        self.storage_dtype, self.has_logvar, self.has_label = storage_dtype, has_logvar, has_label
        self.lease_timeout_s, self.claim_timeout_s = lease_timeout_s, claim_timeout_s
        self.k = check_samples_per_insert(samples_per_insert)
        self.num_timesteps, self.t_buckets = num_timesteps, t_buckets
        self.rng = np.random.default_rng(seed + shard_id)
        self.record_metrics = record_metrics
        dt = STORAGE_DTYPES[storage_dtype]
        shape = (n, *self.record_shape)
        self.x_t = torch.zeros(shape, dtype=dt)
        self.eps = torch.zeros(shape, dtype=dt)
        self.logvar = torch.zeros(shape, dtype=dt) if has_logvar else None
        self.y = torch.zeros(n, dtype=torch.int64) if has_label else None
        self.t = np.full(n, EMPTY_T, dtype=np.int64)
        self.state = np.full(n, REFILL, dtype=np.uint8)
        self.uses = np.zeros(n, dtype=np.int32)
        self.produced_at = np.zeros(n, dtype=np.int64)
        self.leases: dict[str, tuple[np.ndarray, float]] = {}   # id -> (local slots, deadline)
        self.claims: dict[str, tuple[np.ndarray, float]] = {}
        self.c = dict.fromkeys(SHARD_COUNTERS, 0)
        # Consumer groups (opt-in, issue 8): name -> Group; rows of ``pending`` [G, n] say which
        # records a group has not trained on yet; the group's leases are in ``leases`` with its name.
        self.groups: dict[str, Group] = {}
        self.lease_group: dict[str, str] = {}
        self.record_bytes = 2 * self.x_t[0].nbytes + (self.x_t[0].nbytes if has_logvar else 0) + 8 + (8 if has_label else 0)
        self._publish()

    # --- bookkeeping ----------------------------------------------------------------

    def counts(self, now: float | None = None, group: str | None = None) -> dict[str, int]:
        """State counts (after expiry) plus ``inserted``, the records ever inserted (for the warm-up).

        With ``group``: also ``available``, the records that group may draw (and it counts as alive).
        """
        now = time.time() if now is None else now
        self.expire(now)
        out = dict(zip(STATE_NAMES, np.bincount(self.state, minlength=4).tolist()))
        out["inserted"] = self.c["inserted"]
        if group is not None:
            g = self._group_for_draw(group, now)
            out["available"] = int(g.pending.sum())
        return out

    def expire(self, now: float | None = None) -> tuple[int, int]:
        """Overdue leases -> READY (record kept, no use spent); overdue claims -> REFILL. -> (slots, slots)."""
        now = time.time() if now is None else now
        nl = nc = 0
        for lid in [k for k, (_, d) in self.leases.items() if d <= now]:
            idx, _ = self.leases.pop(lid)
            g = self.groups.get(self.lease_group.pop(lid, None))
            if g is not None:            # the group did not train on them: pending again
                g.leased[idx] = False
                g.pending[idx] = True
                self._settle(idx)
            else:
                self.state[idx] = READY
            nl += len(idx)
        for cid in [k for k, (_, d) in self.claims.items() if d <= now]:
            idx, _ = self.claims.pop(cid)
            self.state[idx] = REFILL
            nc += len(idx)
        if self.groups:
            self._expire_groups(now)
        if nl or nc:
            self.c["expired_leases"] += nl
            self.c["expired_claims"] += nc
            if self.record_metrics:
                if nl:
                    metrics.inc(metrics.POOL_EXPIRED_TOTAL, nl, kind="lease")
                if nc:
                    metrics.inc(metrics.POOL_EXPIRED_TOTAL, nc, kind="claim")
                self._publish()
        return nl, nc

    def empty_batch(self, n: int) -> RecordBatch:
        """Uninitialized storage for n records of this layout (a multi-shard draw gathers into it)."""
        dt = STORAGE_DTYPES[self.storage_dtype]
        return RecordBatch(
            x_t=torch.empty((n, *self.record_shape), dtype=dt), t=torch.empty(n, dtype=torch.int64),
            eps=torch.empty((n, *self.record_shape), dtype=dt),
            logvar=torch.empty((n, *self.record_shape), dtype=dt) if self.has_logvar else None,
            y=torch.empty(n, dtype=torch.int64) if self.has_label else None,
        )

    def _records(self, idx: np.ndarray, out: RecordBatch | None = None) -> RecordBatch:
        """Copies of the records at local slots idx, written into ``out`` (len(idx) records) when given."""
        if out is None:
            out = self.empty_batch(len(idx))
        for name in ("x_t", "eps", "logvar", "y"):
            src = getattr(self, name)
            if src is not None:
                _np(getattr(out, name))[...] = _np(src)[idx]
        _np(out.t)[...] = self.t[idx]
        return out

    def _publish(self) -> None:
        if not self.record_metrics:
            return
        for name, v in zip(STATE_NAMES, np.bincount(self.state, minlength=4).tolist()):
            metrics.set(metrics.POOL_SLOTS, v, shard=self.shard_id, state=name)

    # --- transitions ------------------------------------------------------------------

    def draw(self, m: int, lease_id: str, now: float | None = None, out: RecordBatch | None = None,
             group: str | None = None) -> tuple[np.ndarray, RecordBatch]:
        """Lease min(m, READY) slots chosen uniformly without replacement -> (global slots [m'], records).

        ``out``: m records of storage to write into (only used when exactly m slots are READY).
        ``group``: lease among the records that consumer group has not trained on yet.
        """
        now = time.time() if now is None else now
        self.expire(now)
        g = self._group_for_draw(group, now)
        ready = np.flatnonzero(self.state == READY) if g is None else np.flatnonzero(g.pending)
        m = min(int(m), len(ready))
        idx = np.sort(self.rng.choice(ready, size=m, replace=False)) if m else ready[:0]
        if m and g is not None:
            g.pending[idx] = False
            g.leased[idx] = True
            g.consumed += m
            self.lease_group[lease_id] = group
            self._settle(idx)
        elif m:
            self.state[idx] = LEASED
        if m:
            prev = self.leases.get(lease_id)
            self.leases[lease_id] = (idx if prev is None else np.concatenate([prev[0], idx]), now + self.lease_timeout_s)
            ages = self.c["produced"] - self.produced_at[idx]
            self.c["consumed"] += m
            self.c["draws"] += 1
            self.c["age_sum"] += int(ages.sum())
            self.c["bytes_out"] += m * self.record_bytes
            if self.record_metrics:
                metrics.inc(metrics.POOL_RECORDS_CONSUMED_TOTAL, m, shard=self.shard_id)
                metrics.inc(metrics.POOL_BYTES_TOTAL, m * self.record_bytes, shard=self.shard_id, direction="out")
                for a in ages[:_AGE_SAMPLE].tolist():   # the slots are random: a sample of the batch suffices
                    metrics.observe(metrics.POOL_RECORD_AGE_STEPS, a)
                self._publish()
        return idx + self.lo, self._records(idx, out if out is not None and len(out) == m else None)

    def release(self, lease_id: str, now: float | None = None) -> int:
        """Spend one use per leased slot: -> READY with uses left, else REFILL. Unknown lease: 0 (idempotent)."""
        self.expire(now)
        got = self.leases.pop(lease_id, None)
        if got is None:
            return 0
        idx, _ = got
        g = self.groups.get(self.lease_group.pop(lease_id, None))
        if g is not None:                # trained on by this group; REFILL once no group needs it
            g.leased[idx] = False
            g.seen = time.time() if now is None else now
            self._settle(idx)
        else:
            self.uses[idx] -= 1
            self.state[idx] = np.where(self.uses[idx] > 0, READY, REFILL).astype(np.uint8)
        self.c["released"] += len(idx)
        self._publish()
        return len(idx)

    def claim(self, m: int, claim_id: str, now: float | None = None, out: RecordBatch | None = None) -> tuple[np.ndarray, RecordBatch]:
        """Claim min(m, REFILL) slots (random ones) -> (global slots, their previous records)."""
        now = time.time() if now is None else now
        self.expire(now)
        refill = np.flatnonzero(self.state == REFILL)
        m = min(int(m), len(refill))
        idx = np.sort(self.rng.choice(refill, size=m, replace=False)) if m else refill[:0]
        if m:
            self.state[idx] = FILLING
            self.claims[claim_id] = (idx, now + self.claim_timeout_s)
            self._publish()
        return idx + self.lo, self._records(idx, out if out is not None and len(out) == m else None)

    def claim_size(self, claim_id: str) -> int:
        got = self.claims.get(claim_id)
        return 0 if got is None else len(got[0])

    def check_batch(self, batch: RecordBatch, n: int) -> None:
        check_batch(batch, n, self.record_shape, self.has_logvar, self.has_label, self.num_timesteps)

    def fill(self, claim_id: str, batch: RecordBatch, now: float | None = None) -> bool:
        """FILLING -> READY with ``batch`` (claim slot order). Unknown or expired claim: False, nothing changes."""
        self.expire(now)
        got = self.claims.get(claim_id)
        if got is None:
            self.c["fill_rejected"] += 1
            return False
        idx, _ = got
        self.check_batch(batch, len(idx))
        del self.claims[claim_id]
        dt = STORAGE_DTYPES[self.storage_dtype]
        for name in ("x_t", "eps", "logvar"):
            if getattr(self, name) is not None:
                _np(getattr(self, name))[idx] = _np(getattr(batch, name).detach().to("cpu", dt))
        if self.y is not None:
            self.y.numpy()[idx] = batch.y.detach().to("cpu", torch.int64).numpy()
        self.t[idx] = batch.t.cpu().numpy()
        self.uses[idx] = record_uses(self.k, len(idx), self.rng)
        self.produced_at[idx] = self.c["produced"]
        self.state[idx] = READY
        for g in self.groups.values():
            g.pending[idx] = True
        m = len(idx)
        for k in ("produced", "inserted"):
            self.c[k] += m
        self.c["fills"] += 1
        self.c["bytes_in"] += m * self.record_bytes
        if self.record_metrics:
            metrics.inc(metrics.POOL_RECORDS_PRODUCED_TOTAL, m, shard=self.shard_id)
            metrics.inc(metrics.POOL_BYTES_TOTAL, m * self.record_bytes, shard=self.shard_id, direction="in")
            self._publish()
        return True

    # --- stats, snapshot, restore ----------------------------------------------------------

    def stats(self, now: float | None = None) -> dict:
        counts = self.counts(now)
        hist = t_histogram(self.t[self.state == READY], self.num_timesteps, self.t_buckets)
        if self.record_metrics:
            for i, v in enumerate(hist):
                metrics.set(metrics.POOL_READY_T, v, shard=self.shard_id, bucket=i)
        return {"shard": self.shard_id, "counts": {k: counts[k] for k in STATE_NAMES}, "t_histogram": hist, **self.c,
                "groups": self.group_stats()}

    def snapshot(self, now: float | None = None) -> SlotArrays:
        """A copy of every slot, LEASED written as READY and FILLING as REFILL (their state after expiry)."""
        self.expire(now)
        state = self.state.copy()
        state[state == LEASED] = READY
        state[state == FILLING] = REFILL
        s = self.storage_dtype
        return SlotArrays(
            lo=self.lo, state=state, t=self.t.copy(), uses=self.uses.copy(), produced_at=self.produced_at.copy(),
            x_t=to_numpy(self.x_t, s).copy(), eps=to_numpy(self.eps, s).copy(),
            logvar=None if self.logvar is None else to_numpy(self.logvar, s).copy(),
            y=None if self.y is None else self.y.numpy().copy(),
        )

    def restore(self, arrays: SlotArrays, bad: np.ndarray, inserted_extra: int = 0) -> None:
        """Replace every slot with ``arrays`` (this shard's range); ``bad`` records become empty REFILL slots.

        ``inserted`` restarts at the restored READY count plus ``inserted_extra`` (the owner passes the
        snapshot's surplus to one shard, so a pool that was warm when snapshotted is warm when restored).
        """
        if len(arrays) != self.n or arrays.lo != self.lo:
            raise ValueError(f"shard {self.shard_id}: restore got slots [{arrays.lo}, {arrays.lo + len(arrays)}), owns [{self.lo}, {self.lo + self.n})")
        s = self.storage_dtype
        self.leases.clear()
        self.claims.clear()
        self.x_t.copy_(from_numpy(arrays.x_t, s))
        self.eps.copy_(from_numpy(arrays.eps, s))
        if self.logvar is not None:
            self.logvar.copy_(from_numpy(arrays.logvar, s))
        if self.y is not None:
            self.y.copy_(torch.from_numpy(arrays.y))
        self.t[:] = arrays.t
        self.uses[:] = arrays.uses
        self.produced_at[:] = arrays.produced_at
        state = arrays.state.copy()
        # A state byte outside the four states cannot come from a good record; treat it as damage.
        bad = bad | (state > FILLING)
        state[(state == LEASED)] = READY
        state[(state == FILLING)] = REFILL
        state[bad] = REFILL
        self.t[bad] = EMPTY_T
        self.uses[bad] = 0
        self.state[:] = state
        for g in self.groups.values():       # every attached group trains on the restored records
            g.leased[:] = False
            g.pending[:] = state == READY
        self.lease_group.clear()
        nbad = int(bad.sum())
        self.c["corrupt"] += nbad
        self.c["inserted"] = int((state == READY).sum()) + int(inserted_extra)
        if self.record_metrics and nbad:
            metrics.inc(metrics.POOL_CORRUPT_TOTAL, nbad, shard=self.shard_id)
        self._publish()

