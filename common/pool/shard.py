"""PoolShard: n slots of B+ held as preallocated arrays, and every state transition on them.

A plain class that never blocks; blocking, rate limiting across shards and the
random split of a draw over shards live in the pool that owns the shards
(local.py, ray_backend.py). See base.py for the contract; this module implements
it for one contiguous range of global slots.

All of its state lives in a ShardMemory (memory.py): private arrays (LocalPool,
which serializes calls with its own lock) or a shared file that the shard actor
and every client on its node map (the Ray backend's fast path). Every public
transition runs under the memory's lock, so several processes may run transitions on
one shared shard (the exceptions say so: ready_slots, lease_slots and release_slots
expect a caller that holds the lock, as a whole-pool draw holds every shard's;
write_records and copy_out copy records of slots a lease or claim holds, with no lock); a process that is not the memory's owner (``view=True``) runs
only the plain transitions and raises OwnerOnly while consumer groups are
attached (their bookkeeping lives in the owner process).

Storage per slot: x_t, eps, logvar (optional) [n, C, H, W] in the storage dtype;
y (optional) [n] int64; t [n] int64 (EMPTY_T = no record); state [n] uint8;
uses [n] int32 (uses left of the record, samples_per_insert); produced_at [n]
int64 (value of the shard's produced counter when the record was filled, for
the record age); owner [n] int64 (memory.lease_key of the lease or claim, 0 =
none) with deadline [n] float64. A transition writes owner and deadline before
state. Consumer-group leases (several groups may lease one slot) are kept in the
owner's ``leases`` dict instead.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
import torch

from common import metrics
from common.pool.base import (
    STATE_NAMES,
    STORAGE_DTYPES,
    PoolError,
    SlotState,
    check_samples_per_insert,
    record_uses,
    t_histogram,
)
from common.pool.codec import SlotArrays, from_numpy, to_numpy
from common.pool.groups import Group, ShardGroups
from common.pool.memory import FLAG_GROUPS, SECONDS, WIRE_DTYPES, ShardMemory, lease_key
from common.records import EMPTY_T, RecordBatch

READY, LEASED, REFILL, FILLING = (int(s) for s in SlotState)
_READY8, _REFILL8 = np.uint8(READY), np.uint8(REFILL)
AGE_SAMPLE = 4       # records per draw whose age goes into the metric histogram (stats keep the exact mean)

SHARD_COUNTERS = (
    "produced", "consumed", "inserted", "released", "bytes_in", "bytes_out", "expired_leases", "expired_claims",
    "corrupt", "fill_rejected", "draws", "fills", "age_sum",
)
_CIDX = {k: i for i, k in enumerate(SHARD_COUNTERS)}
_C_PRODUCED, _C_CONSUMED, _C_INSERTED, _C_RELEASED, _C_BYTES_IN, _C_BYTES_OUT, _C_DRAWS, _C_FILLS, _C_AGE_SUM = (
    _CIDX[k] for k in ("produced", "consumed", "inserted", "released", "bytes_in", "bytes_out", "draws", "fills", "age_sum"))
_SIDX = {k: i for i, k in enumerate(SECONDS)}


class OwnerOnly(Exception):
    """A view (non-owner process) was asked for a transition only the owner can run (consumer groups)."""


class Counters:
    """The shard's counters over an int64 array of its memory, read and written by name."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __getitem__(self, k: str) -> int:
        return int(self.arr[_CIDX[k]])

    def __setitem__(self, k: str, v: int) -> None:
        self.arr[_CIDX[k]] = v

    def as_dict(self) -> dict[str, int]:
        return dict(zip(SHARD_COUNTERS, self.arr.tolist()))


def _locked(fn):
    """Run a public method under the memory's lock (re-entrant; a no-op for private memory)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        with self.mem.lock:
            if self.view and self.mem.flags & FLAG_GROUPS:
                raise OwnerOnly(fn.__name__)
            return fn(self, *args, **kw)

    return wrapper


def _np(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy (bf16 as its int16 bits): gathers and scatters run in numpy,
    which is 10x to 100x faster than torch's index_select/index_put for [b, C, H, W] rows on CPU."""
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


_RECORD_FIELDS = ("x_t", "eps", "logvar", "y")      # the per-record tensors (t apart: a shard keeps it in numpy)


def out_arrays(batch, names=_RECORD_FIELDS + ("t",)) -> dict[str, np.ndarray]:
    """A batch's (or shard's) fields as numpy arrays over its memory (bf16 as int16 bits; absent fields left out)."""
    return {name: _np(v) for name in names if (v := getattr(batch, name)) is not None}


def new_arrays(n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool, zeros: bool = False) -> dict[str, np.ndarray]:
    """Storage for n records as numpy arrays (out_arrays' names and dtypes): uninitialized, or zeros
    from calloc (numpy's np.zeros: the pages are mapped lazily, so zeros nobody reads cost nothing;
    torch.zeros would memset them)."""
    wire = WIRE_DTYPES[storage_dtype]
    new = np.zeros if zeros else np.empty
    shape = (n, *record_shape)
    out = {"x_t": new(shape, dtype=wire), "eps": new(shape, dtype=wire)}
    if has_logvar:
        out["logvar"] = new(shape, dtype=wire)
    if has_label:
        out["y"] = new(n, dtype=np.int64)
    out["t"] = new(n, dtype=np.int64)
    return out


def batch_over(arrays: dict[str, np.ndarray], storage_dtype: str) -> RecordBatch:
    """A RecordBatch of tensors over ``arrays`` (new_arrays or out_arrays: no copy)."""
    def floats(name):
        t = torch.from_numpy(arrays[name])
        return t.view(torch.bfloat16) if storage_dtype == "bf16" else t

    return RecordBatch(x_t=floats("x_t"), t=torch.from_numpy(arrays["t"]), eps=floats("eps"),
                       logvar=floats("logvar") if "logvar" in arrays else None,
                       y=torch.from_numpy(arrays["y"]) if "y" in arrays else None)


def new_batch(n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool, zeros: bool = False) -> RecordBatch:
    """Storage for n records (new_arrays as tensors)."""
    return batch_over(new_arrays(n, record_shape, storage_dtype, has_logvar, has_label, zeros), storage_dtype)


@functools.lru_cache(maxsize=16)
def _zero_rows(record_shape: tuple, storage_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One zero record row, one EMPTY_T and one zero label, shared by every zero_batch of this layout."""
    return (torch.zeros((1, *record_shape), dtype=STORAGE_DTYPES[storage_dtype]), torch.full((1,), EMPTY_T, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64))


@functools.lru_cache(maxsize=64)
def _zero_views(n: int, record_shape: tuple, storage_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_zero_rows broadcast to n rows (kept: three expand calls cost 15-25 us on a warm-up claim's path)."""
    z, t, y = _zero_rows(record_shape, storage_dtype)
    return z.expand(n, *record_shape), t.expand(n), y.expand(n)


def zero_batch(n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool) -> RecordBatch:
    """The previous records of n empty slots (a claim during the warm-up): every field is one shared
    row broadcast to n (no memory, nothing to zero; read only: an in-place write raises), t = EMPTY_T."""
    z, t, y = _zero_views(n, tuple(record_shape), storage_dtype)
    return RecordBatch(x_t=z, t=t, eps=z, logvar=z if has_logvar else None, y=y if has_label else None)


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
    if n:
        lo, hi = (int(v) for v in torch.aminmax(batch.t))
        if lo < 0 or hi >= num_timesteps:
            raise ValueError(f"fill: t must lie in [0, {num_timesteps}), got [{lo}, {hi}]")


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
        memory: ShardMemory | None = None,
        view: bool = False,
    ):
        """``memory``: where the slots live (default: private arrays); ``view``: this process maps a
        shard another process owns (it keeps no groups and publishes no gauges)."""
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
        self.view = view
        if memory is None:
            memory = ShardMemory.private(n, self.record_shape, storage_dtype, has_logvar, has_label, len(SHARD_COUNTERS))
        self.mem = mem = memory
        a = mem.a
        self.x_t, self.eps = mem.tensor("x_t"), mem.tensor("eps")
        self.logvar = mem.tensor("logvar") if has_logvar else None
        self.y = mem.tensor("y") if has_label else None
        self.t, self.state, self.uses, self.produced_at = a["t"], a["state"], a["uses"], a["produced_at"]
        self.owner, self.deadline = a["owner"], a["deadline"]
        self.c = Counters(a["counters"])
        self.seconds = a["seconds"]
        if not view:                     # a new shard: every slot empty, in REFILL
            with mem.lock:
                self.t[:] = EMPTY_T
                self.state[:] = REFILL
                self.owner[:] = 0
                self.deadline[:] = math.inf
        self.leases: dict[str, tuple[np.ndarray, float]] = {}   # consumer-group leases: id -> (local slots, deadline)
        # Consumer groups (opt-in, issue 8): name -> Group; rows of ``pending`` [G, n] say which
        # records a group has not trained on yet; the group's leases are in ``leases`` with its name.
        self.groups: dict[str, Group] = {}
        self.lease_group: dict[str, str] = {}
        self._src = out_arrays(self, _RECORD_FIELDS)     # the record fields as numpy arrays (copy_out)
        self.record_bytes = 2 * self.x_t[0].nbytes + (self.x_t[0].nbytes if has_logvar else 0) + 8 + (8 if has_label else 0)
        if record_metrics:      # this process's share of the shard's traffic (the Prometheus children, kept)
            self._m_consumed, self._m_out, self._m_produced, self._m_in, self._m_age = (
                metrics.labelled(metrics.POOL_RECORDS_CONSUMED_TOTAL, shard=shard_id),
                metrics.labelled(metrics.POOL_BYTES_TOTAL, shard=shard_id, direction="out"),
                metrics.labelled(metrics.POOL_RECORDS_PRODUCED_TOTAL, shard=shard_id),
                metrics.labelled(metrics.POOL_BYTES_TOTAL, shard=shard_id, direction="in"),
                metrics.labelled(metrics.POOL_RECORD_AGE_STEPS))
        self._publish()

    # --- bookkeeping ----------------------------------------------------------------

    @_locked
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

    @_locked
    def expire(self, now: float | None = None) -> tuple[int, int]:
        """Overdue leases -> READY (record kept, no use spent); overdue claims -> REFILL. -> (slots, slots)."""
        now = time.time() if now is None else now
        nl = nc = 0
        if now >= self.mem.next_deadline:         # a lower bound of every live deadline: scan only past it
            owned = np.flatnonzero(self.owner != 0)
            dl = self.deadline[owned]
            over = owned[dl <= now]
            if len(over):
                st = self.state[over]
                leased, claimed = over[st == LEASED], over[st == FILLING]
                self.owner[over] = 0
                self.state[leased] = READY
                self.state[claimed] = REFILL
                nl, nc = len(leased), len(claimed)
            rest = dl[dl > now]
            self.mem.next_deadline = float(rest.min()) if len(rest) else math.inf
        for lid in [k for k, (_, d) in self.leases.items() if d <= now]:
            idx, _ = self.leases.pop(lid)
            g = self.groups.get(self.lease_group.pop(lid, None))
            if g is not None:            # the group did not train on them: pending again
                g.leased[idx] = False
                g.pending[idx] = True
                self._settle(idx)
            nl += len(idx)
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

    def empty_batch(self, n: int, zeros: bool = False) -> RecordBatch:
        """Storage for n records of this layout (uninitialized, or zeros: lazily mapped zero pages)."""
        return new_batch(n, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label, zeros)

    def _records(self, idx: np.ndarray, out: RecordBatch | None = None) -> RecordBatch:
        """Copies of the records at local slots idx, written into ``out`` (len(idx) records) when given.

        One ``np.take(..., mode="clip")`` per field: a single copy straight into the output rows
        (mode "raise", numpy's default, buffers the output first and is 3x slower; idx is valid).
        """
        if out is None:
            out = self.empty_batch(len(idx))
        self.copy_out(idx, out_arrays(out), 0)
        return out

    def copy_out(self, idx: np.ndarray, dst: dict[str, np.ndarray], off: int) -> None:
        """_records for a caller that already holds the output's arrays (``out_arrays``): rows
        [off, off + len(idx)) of each get the records at local slots idx."""
        end = off + len(idx)
        for name, src in self._src.items():
            np.take(src, idx, axis=0, out=dst[name][off:end], mode="clip")
        dst["t"][off:end] = self.t[idx]

    def _publish(self) -> None:
        """Slot-state gauges (the owner's job: a shared shard's owner also refreshes them periodically)."""
        if not self.record_metrics or self.view:
            return
        for name, v in zip(STATE_NAMES, np.bincount(self.state, minlength=4).tolist()):
            metrics.set(metrics.POOL_SLOTS, v, shard=self.shard_id, state=name)

    # --- transitions ------------------------------------------------------------------

    def draw(self, m: int, lease_id: str, now: float | None = None, out: RecordBatch | None = None,
             group: str | None = None, count_call: bool = True) -> tuple[np.ndarray, RecordBatch]:
        """Lease min(m, READY) slots chosen uniformly without replacement -> (global slots [m'], records).

        ``out``: m records of storage to write into (only used when exactly m slots are READY).
        ``group``: lease among the records that consumer group has not trained on yet.
        ``count_call``: count a draw call (False for the other shards of a pool's draw: one call, one count).
        The records are copied after the lock is released: a leased slot's record cannot change
        while the lease holds, so several processes copy at once.
        """
        idx, deadline = self._lease(m, lease_id, now, group, count_call)
        batch = self._records(idx, out if out is not None and len(out) == len(idx) else None)
        if len(idx) and group is None and time.time() >= deadline:
            self._check_held(idx, lease_id, LEASED)
        return idx + self.lo, batch

    def _held(self, idx: np.ndarray, key_id: str, state: int) -> np.ndarray:
        """[len(idx)] bool: which of the slots idx the lease or claim ``key_id`` holds in ``state``."""
        return (self.owner[idx] == lease_key(key_id)) & (self.state[idx] == state)

    @_locked
    def _check_held(self, idx: np.ndarray, key_id: str, state: int) -> None:
        """PoolError unless the slots are still held by the lease or claim (their copy is then valid)."""
        if not self._held(idx, key_id, state).all():
            raise PoolError(f"lease or claim {key_id} expired while its records were copied; raise pool.lease_timeout_s")

    @_locked
    def _lease(self, m: int, lease_id: str, now: float | None, group: str | None,
               count_call: bool = True) -> tuple[np.ndarray, float]:
        """The draw's transition: READY -> LEASED (or a group's pending -> leased) -> (local slots, deadline)."""
        now = time.time() if now is None else now
        self.expire(now)
        g = self._group_for_draw(group, now)
        ready = np.flatnonzero(self.state == READY) if g is None else np.flatnonzero(g.pending)
        m = min(int(m), len(ready))
        idx = np.sort(self.rng.choice(ready, size=m, replace=False, shuffle=False)) if m else ready[:0]
        if m and g is not None:
            g.pending[idx] = False
            g.leased[idx] = True
            g.consumed += m
            self.lease_group[lease_id] = group
            self._settle(idx)
            prev = self.leases.get(lease_id)
            self.leases[lease_id] = (idx if prev is None else np.concatenate([prev[0], idx]), now + self.lease_timeout_s)
            self._count_draw(idx, AGE_SAMPLE, count_call)
        elif m:
            self.lease_slots(idx, lease_id, now, count_call=count_call)
        return idx, now + self.lease_timeout_s

    def lease_slots(self, idx: np.ndarray, lease_id: str, now: float, age_sample: int = AGE_SAMPLE,
                    count_call: bool = True) -> None:
        """READY -> LEASED for local slots idx that the caller, holding the lock, chose among ready_slots().
        ``age_sample``: how many of their ages go into the age histogram (a draw over S shards: 4 / S each).
        ``count_call``: as in draw.
        The caller holds the lock (a whole-pool draw holds every shard's): no lock of its own."""
        self._own(idx, lease_id, now + self.lease_timeout_s, LEASED)
        self._count_draw(idx, age_sample, count_call)

    def _count_draw(self, idx: np.ndarray, age_sample: int, count_call: bool = True) -> None:
        m = len(idx)
        arr = self.c.arr
        ages = arr[_C_PRODUCED] - self.produced_at[idx]
        arr[_C_CONSUMED] += m
        arr[_C_DRAWS] += count_call
        arr[_C_AGE_SUM] += ages.sum()
        arr[_C_BYTES_OUT] += m * self.record_bytes
        if self.record_metrics:
            self._m_consumed.inc(m)
            self._m_out.inc(m * self.record_bytes)
            for a in ages[:age_sample].tolist():   # the slots are random: a sample of the batch suffices
                self._m_age.observe(a)
            self._publish()

    @_locked
    def release(self, lease_id: str, now: float | None = None) -> int:
        """Spend one use per leased slot: -> READY with uses left, else REFILL. Unknown lease: 0 (idempotent)."""
        self.expire(now)
        got = self.leases.pop(lease_id, None)
        if got is not None:              # a consumer group's lease
            idx, _ = got
            g = self.groups.get(self.lease_group.pop(lease_id, None))
            if g is not None:            # trained on by this group; REFILL once no group needs it
                g.leased[idx] = False
                g.seen = time.time() if now is None else now
                self._settle(idx)
        else:
            idx = self._owned(lease_id, LEASED)
            if len(idx) == 0:
                return 0
            self._spend_uses(idx)
        self.c["released"] += len(idx)
        self._publish()
        return len(idx)

    def _spend_uses(self, idx: np.ndarray) -> None:
        """A plain lease's slots idx are handed back: one use spent, READY with uses left, else REFILL."""
        self.owner[idx] = 0
        left = self.uses[idx] - 1
        self.uses[idx] = left
        self.state[idx] = np.where(left > 0, _READY8, _REFILL8)

    def _own(self, idx: np.ndarray, key_id: str, deadline: float, state: int) -> None:
        """Slots idx now belong to a lease or claim: owner and deadline first, then the state."""
        self.owner[idx] = lease_key(key_id)
        self.deadline[idx] = deadline
        self.state[idx] = state
        if deadline < self.mem.next_deadline:
            self.mem.next_deadline = deadline

    def _owned(self, key_id: str, state: int) -> np.ndarray:
        """Local slots in ``state`` owned by a lease or claim id, ascending (a claim's slot order)."""
        return np.flatnonzero((self.owner == lease_key(key_id)) & (self.state == state))

    def claim(self, m: int, claim_id: str, now: float | None = None, out: RecordBatch | None = None) -> tuple[np.ndarray, RecordBatch]:
        """Claim min(m, REFILL) slots (random ones) -> (global slots, their previous records).

        The records are copied after the lock is released (a FILLING slot's record cannot change
        while the claim holds); empty slots (the warm-up) hand over zeros and t = EMPTY_T.
        ``out``: zero-filled storage for m records (``empty_batch(m, zeros=True)``: calloc'd pages
        cost nothing until written), used when exactly m slots are claimed.
        """
        idx, deadline = self._claim_slots(m, claim_id, now)
        m = len(idx)
        if m and (self.t[idx] == EMPTY_T).all():          # the warm-up: nothing to hand over but t
            if out is None or len(out) != m:
                return idx + self.lo, zero_batch(m, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
            out.t.fill_(EMPTY_T)
            return idx + self.lo, out
        batch = self._records(idx, out if out is not None and len(out) == m else None)
        if m and time.time() >= deadline:
            self._check_held(idx, claim_id, FILLING)
        return idx + self.lo, batch

    def ready_slots(self, state: int, now: float) -> np.ndarray:
        """The local slots in ``state`` after expiry. The caller holds the lock and passes them on to
        lease_slots or _claim_slots, so one pass under the lock both counts and takes."""
        self._expire_due(now)
        return np.flatnonzero(self.state == state)

    def _expire_due(self, now: float) -> None:
        """expire(now) when something may be overdue (a deadline passed, or group leases to check)."""
        if now >= self.mem.next_deadline or self.leases or self.groups:
            self.expire(now)

    def release_slots(self, lease_id: str, idx: np.ndarray, now: float) -> int:
        """release() for a plain lease whose local slots the caller knows, under a lock the caller holds."""
        self._expire_due(now)
        idx = idx[self._held(idx, lease_id, LEASED)]
        if len(idx):
            self._spend_uses(idx)
            self.c.arr[_C_RELEASED] += len(idx)
        return len(idx)

    @_locked
    def _claim_slots(self, m: int, claim_id: str, now: float | None, refill: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        now = time.time() if now is None else now
        if refill is None:
            self.expire(now)
            refill = np.flatnonzero(self.state == REFILL)
        m = min(int(m), len(refill))
        idx = np.sort(self.rng.choice(refill, size=m, replace=False, shuffle=False)) if m else refill[:0]
        if m:
            self._own(idx, claim_id, now + self.claim_timeout_s, FILLING)
            self._publish()
        return idx, now + self.claim_timeout_s

    @_locked
    def claim_size(self, claim_id: str) -> int:
        self.expire()
        return len(self._owned(claim_id, FILLING))

    def check_batch(self, batch: RecordBatch, n: int) -> None:
        check_batch(batch, n, self.record_shape, self.has_logvar, self.has_label, self.num_timesteps)

    @_locked
    def fill(self, claim_id: str, batch: RecordBatch, now: float | None = None, count_call: bool = True) -> bool:
        """FILLING -> READY with ``batch`` (claim slot order). Unknown or expired claim: False, nothing changes.
        ``count_call``: count a fill call (False for the other shards of a pool's fill)."""
        self.expire(now)
        idx = self._owned(claim_id, FILLING)
        if len(idx) == 0:
            self.c["fill_rejected"] += 1
            return False
        self.check_batch(batch, len(idx))
        self.write_records(idx, batch)
        self._commit_fill(idx, batch.t, count_call)
        return True

    def write_records(self, idx: np.ndarray, batch: RecordBatch) -> None:
        """Copy the tensors and labels of ``batch`` into local slots idx (not t: the commit writes it).

        Outside the lock only while the caller's claim holds these slots with time to spare
        (fill_begin): nobody else writes or reads a FILLING slot's record then.
        """
        dt = STORAGE_DTYPES[self.storage_dtype]
        for name, dst in self._src.items():       # this shard's record fields as numpy (y: int64)
            dst[idx] = _np(getattr(batch, name).detach().to("cpu", torch.int64 if name == "y" else dt))

    @_locked
    def fill_begin(self, claim_id: str, idx: np.ndarray, now: float, margin_s: float) -> int | None:
        """Before a fill writes its records outside the lock: -> the memory's generation, or None when
        the claim no longer holds every slot idx or its deadline is less than ``margin_s`` away (the
        caller then fills under the lock). The previous records are marked gone (t = EMPTY_T), so a
        snapshot, or a claim that expires later, never hands on a half-written record."""
        if not self._held(idx, claim_id, FILLING).all() or (self.deadline[idx] < now + margin_s).any():
            return None
        self.t[idx] = EMPTY_T
        return self.mem.generation

    @_locked
    def fill_commit(self, claim_id: str, idx: np.ndarray, t: torch.Tensor, generation: int, count_call: bool = True) -> bool:
        """FILLING -> READY for local slots idx whose records write_records copied in (fill_begin first).
        False (nothing changes) when the claim lost them or the shard was restored meanwhile."""
        self._expire_due(time.time())
        if self.mem.generation != generation or not self._held(idx, claim_id, FILLING).all():
            self.c["fill_rejected"] += 1
            return False
        self._commit_fill(idx, t, count_call)
        return True

    def _commit_fill(self, idx: np.ndarray, t: torch.Tensor, count_call: bool = True) -> None:
        """The fill's transition once the records are in: t, uses, age, owner cleared, then READY."""
        m, arr = len(idx), self.c.arr
        self.t[idx] = t.cpu().numpy()
        self.uses[idx] = record_uses(self.k, m, self.rng)
        self.produced_at[idx] = arr[_C_PRODUCED]
        self.owner[idx] = 0
        self.state[idx] = READY
        for g in self.groups.values():
            g.pending[idx] = True
        arr[_C_PRODUCED] += m
        arr[_C_INSERTED] += m
        arr[_C_FILLS] += count_call
        arr[_C_BYTES_IN] += m * self.record_bytes
        if self.record_metrics:
            self._m_produced.inc(m)
            self._m_in.inc(m * self.record_bytes)
            self._publish()

    attach_group = _locked(ShardGroups.attach_group)
    detach_group = _locked(ShardGroups.detach_group)
    group_stats = _locked(ShardGroups.group_stats)

    # --- stats, snapshot, restore ----------------------------------------------------------

    @_locked
    def add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Pool-wide seconds a side spent blocked and inside its calls (kept on shard 0), fills rejected."""
        self.seconds[_SIDX[f"{side}_blocked"]] += blocked_s
        self.seconds[_SIDX[side]] += call_s
        self.seconds[_SIDX["fill_rejected"]] += rejected
        if blocked_s > 0 and self.record_metrics:
            metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, blocked_s, side=side)

    def time_totals(self) -> tuple[dict, dict, int]:
        """(blocked seconds per side, call seconds per side, fills rejected) as add_time summed them."""
        s = self.seconds
        return ({"draw": float(s[_SIDX["draw_blocked"]]), "fill": float(s[_SIDX["fill_blocked"]])},
                {"draw": float(s[_SIDX["draw"]]), "fill": float(s[_SIDX["fill"]])}, int(s[_SIDX["fill_rejected"]]))

    @_locked
    def stats(self, now: float | None = None) -> dict:
        counts = self.counts(now)
        hist = t_histogram(self.t[self.state == READY], self.num_timesteps, self.t_buckets)
        if self.record_metrics:
            for i, v in enumerate(hist):
                metrics.set(metrics.POOL_READY_T, v, shard=self.shard_id, bucket=i)
        return {"shard": self.shard_id, "counts": {k: counts[k] for k in STATE_NAMES}, "t_histogram": hist, **self.c.as_dict(),
                "groups": self.group_stats()}

    @_locked
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

    @_locked
    def restore(self, arrays: SlotArrays, bad: np.ndarray, inserted_extra: int = 0) -> None:
        """Replace every slot with ``arrays`` (this shard's range); ``bad`` records become empty REFILL slots.

        ``inserted`` restarts at the restored READY count plus ``inserted_extra`` (the owner passes the
        snapshot's surplus to one shard, so a pool that was warm when snapshotted is warm when restored).
        """
        if len(arrays) != self.n or arrays.lo != self.lo:
            raise ValueError(f"shard {self.shard_id}: restore got slots [{arrays.lo}, {arrays.lo + len(arrays)}), owns [{self.lo}, {self.lo + self.n})")
        s = self.storage_dtype
        self.mem.bump_generation()          # fills copied in before the restore are refused
        self.leases.clear()
        self.owner[:] = 0
        self.deadline[:] = math.inf
        self.mem.next_deadline = math.inf
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

