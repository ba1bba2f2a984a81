"""PoolShard: n slots of B+ held as preallocated arrays, and states.py's transitions on them.

A plain class that never blocks: blocking and the split of a draw over shards live in the pool
(local.py, ray_backend.py). Its state lives in a ShardMemory (memory.py, which lists the arrays):
private, or shared by the shard actor and every client on its node. Transitions run under the
memory's lock; records are copied in and out of the slots a lease or claim holds after the lock
is released. A process that is not the memory's owner (``view=True``) raises OwnerOnly while consumer
groups are attached, since their bookkeeping (and consumer-group leases) lives in the owner process.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from common import metrics
from common.pool import states
from common.pool.base import STATE_NAMES, STORAGE_DTYPES, PoolError, check_samples_per_insert, record_uses, t_histogram
from common.pool.codec import RECORD_FIELDS, SlotArrays, batch_over, new_arrays
from common.pool.groups import ShardGroups
from common.pool.memory import FLAG_GROUPS, SECONDS, ShardMemory, lease_key
from common.pool.states import FILLING, LEASED, READY, REFILL
from common.records import EMPTY_T, RecordBatch

AGE_SAMPLE = 4       # records per draw whose age goes into the metric histogram (stats keep the exact mean)

SHARD_COUNTERS = (
    "produced", "consumed", "inserted", "released", "bytes_in", "bytes_out", "expired_leases", "expired_claims",
    "corrupt", "fill_rejected", "draws", "fills", "age_sum",
)


class OwnerOnly(Exception):
    """A view (non-owner process) was asked for a transition only the owner can run (consumer groups)."""


def _locked(fn):
    """Run a public method under the memory's lock (re-entrant; a no-op for private memory)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        with self.mem.lock:
            if self.view and self.mem.flags & FLAG_GROUPS:
                raise OwnerOnly(fn.__name__)
            return fn(self, *args, **kw)

    return wrapper


class PoolShard(ShardGroups):
    """Global slots [lo, lo + n) of a pool; ``rng`` seeded with seed + shard_id (STYLE: base seed plus index)."""

    def __init__(self, shard_id: int, lo: int, n: int, record_shape: tuple[int, int, int], storage_dtype: str = "fp32",
                 has_logvar: bool = False, has_label: bool = False, lease_timeout_s: float = 60.0,
                 claim_timeout_s: float = 60.0, samples_per_insert: float = 1.0, num_timesteps: int = 1000,
                 t_buckets: int = 10, seed: int = 0, record_metrics: bool = True, memory: ShardMemory | None = None,
                 view: bool = False):
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
        self.record_metrics, self.view = record_metrics, view
        if memory is None:
            memory = ShardMemory.private(n, self.record_shape, storage_dtype, has_logvar, has_label, len(SHARD_COUNTERS))
        self.mem = memory
        a = memory.a
        self.records = {name: a[name] for name in RECORD_FIELDS if name in a}
        self.t, self.state, self.uses, self.produced_at = a["t"], a["state"], a["uses"], a["produced_at"]
        self.owner, self.deadline = a["owner"], a["deadline"]
        self.c = a["counters"].view([(k, np.int64) for k in SHARD_COUNTERS])[0]    # the counters by name, a view
        self.seconds = a["seconds"]
        if not view:                     # a new shard: every slot empty, in REFILL
            with memory.lock:
                self.t[:] = EMPTY_T
                self.state[:] = REFILL
                self.owner[:] = 0
        self.leases: dict[str, tuple[np.ndarray, float]] = {}   # consumer-group leases: id -> (local slots, deadline)
        self.groups = {}                 # consumer groups (groups.py): name -> Group
        self.lease_group: dict[str, str] = {}
        self.record_bytes = sum(v[0].nbytes for v in self.records.values()) + 8
        self._publish()

    # --- bookkeeping ----------------------------------------------------------------

    @_locked
    def counts(self, now: float | None = None, group: str | None = None) -> dict[str, int]:
        """State counts (after expiry) plus ``inserted``, the records inserted since the shard started; with
        ``group`` also ``available``, the records that group may draw (and the group counts as alive)."""
        now = time.time() if now is None else now
        self.expire(now)
        out = dict(zip(STATE_NAMES, np.bincount(self.state, minlength=4).tolist()))
        out["inserted"] = int(self.c["inserted"])
        if group is not None:
            out["available"] = int(self._group_for_draw(group, now).pending.sum())
        return out

    @_locked
    def expire(self, now: float | None = None) -> tuple[int, int]:
        """states.expire on the plain leases and claims, then on the consumer groups' leases -> (slots, slots)."""
        now = time.time() if now is None else now
        nl, nc = states.expire(self.state, self.owner, self.deadline, now)
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
                for kind, k in (("lease", nl), ("claim", nc)):
                    if k:
                        metrics.inc(metrics.POOL_EXPIRED_TOTAL, k, kind=kind)
            self._publish()
        return nl, nc

    def _publish(self) -> None:
        """Slot-state gauges (the owner's job: a shared shard's owner also refreshes them periodically)."""
        if not self.record_metrics or self.view:
            return
        for name, v in zip(STATE_NAMES, np.bincount(self.state, minlength=4).tolist()):
            metrics.set(metrics.POOL_SLOTS, v, shard=self.shard_id, state=name)

    def _count(self, what: str, idx: np.ndarray, count_call: bool) -> None:
        """Counters and metrics of a draw (``what`` = "consumed") or a fill ("produced") of slots idx."""
        m, c = len(idx), self.c
        if what == "consumed":
            ages = c["produced"] - self.produced_at[idx]
            c["age_sum"] += int(ages.sum())
            if self.record_metrics:
                for a in ages[:AGE_SAMPLE].tolist():     # the slots are random: a sample of the batch suffices
                    metrics.observe(metrics.POOL_RECORD_AGE_STEPS, a)
        else:
            c["inserted"] += m
        c[what] += m
        c["draws" if what == "consumed" else "fills"] += int(count_call)
        c["bytes_out" if what == "consumed" else "bytes_in"] += m * self.record_bytes
        if self.record_metrics:
            name = metrics.POOL_RECORDS_CONSUMED_TOTAL if what == "consumed" else metrics.POOL_RECORDS_PRODUCED_TOTAL
            metrics.inc(name, m, shard=self.shard_id)
            metrics.inc(metrics.POOL_BYTES_TOTAL, m * self.record_bytes, shard=self.shard_id,
                        direction="out" if what == "consumed" else "in")
            self._publish()

    # --- transitions ------------------------------------------------------------------

    def draw(self, m: int, lease_id: str, now: float | None = None, out: dict | None = None,
             group: str | None = None, count_call: bool = True) -> tuple[np.ndarray, RecordBatch]:
        """Lease min(m, READY) slots chosen uniformly without replacement -> (global slots [m'], records).

        ``out``: arrays for m records (codec.new_arrays); the m' records go to its first rows.
        ``group``: lease among the records that consumer group has not trained on yet.
        ``count_call``: count a draw call (False for the other shards of a pool's draw: one call, one count).
        The records are copied after the lock is released: a leased slot's record cannot change meanwhile.
        """
        idx, deadline = self._take(m, lease_id, now, LEASED, group, count_call)
        return idx + self.lo, self._copy_out(idx, out, lease_id if group is None else None, LEASED, deadline)

    def claim(self, m: int, claim_id: str, now: float | None = None, out: dict | None = None) -> tuple[np.ndarray, RecordBatch]:
        """Claim min(m, REFILL) random slots -> (global slots, their previous records; t = EMPTY_T where empty)."""
        idx, deadline = self._take(m, claim_id, now, FILLING)
        return idx + self.lo, self._copy_out(idx, out, claim_id, FILLING, deadline)

    def _copy_out(self, idx: np.ndarray, out: dict | None, key_id: str | None, state: int, deadline: float) -> RecordBatch:
        """The records of local slots idx, copied into the first rows of ``out`` (new arrays if None); PoolError
        if the lease or claim ``key_id`` lost them meanwhile (the copy could mix two records)."""
        if out is None:
            out = new_arrays(len(idx), self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
        out = {k: v[:len(idx)] for k, v in out.items()}
        for name, src in self.records.items():
            np.take(src, idx, axis=0, out=out[name], mode="clip")     # "clip": one copy, no bounds buffer
        out["t"][:] = self.t[idx]
        if len(idx) and key_id is not None and time.time() >= deadline:
            self._check_held(idx, key_id, state)
        return batch_over(out, self.storage_dtype)

    @_locked
    def _check_held(self, idx: np.ndarray, key_id: str, state: int) -> None:
        if not states.held(self.state, self.owner, idx, lease_key(key_id), state).all():
            raise PoolError(f"lease or claim {key_id} expired while its records were copied; raise pool.lease_timeout_s")

    @_locked
    def _take(self, m: int, key_id: str, now: float | None, to: int, group: str | None = None,
              count_call: bool = True) -> tuple[np.ndarray, float]:
        """The draw's (to = LEASED; with ``group``, that group's pending -> leased) or the claim's (to = FILLING)
        transition of min(m, available) random slots -> (local slots, deadline)."""
        now = time.time() if now is None else now
        self.expire(now)
        g = self._group_for_draw(group, now) if to == LEASED else None
        free = np.flatnonzero(g.pending if g is not None else self.state == (READY if to == LEASED else REFILL))
        m = min(int(m), len(free))
        idx = np.sort(self.rng.choice(free, size=m, replace=False, shuffle=False)) if m else free[:0]
        deadline = now + (self.lease_timeout_s if to == LEASED else self.claim_timeout_s)
        if m and g is not None:
            g.pending[idx] = False
            g.leased[idx] = True
            g.consumed += m
            self.lease_group[key_id] = group
            self._settle(idx)
            prev = self.leases.get(key_id)
            self.leases[key_id] = (idx if prev is None else np.concatenate([prev[0], idx]), deadline)
        elif m:
            states.take(self.state, self.owner, self.deadline, idx, lease_key(key_id), deadline, to)
        if m and to == LEASED:
            self._count("consumed", idx, count_call)
        elif m:
            self._publish()
        return idx, deadline

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
            states.release(self.state, self.owner, self.uses, idx)
        self.c["released"] += len(idx)
        self._publish()
        return len(idx)

    def _owned(self, key_id: str, state: int) -> np.ndarray:
        """Local slots in ``state`` owned by a lease or claim id, ascending (a claim's slot order)."""
        return np.flatnonzero((self.owner == lease_key(key_id)) & (self.state == state))

    @_locked
    def claim_size(self, claim_id: str) -> int:
        self.expire()
        return len(self._owned(claim_id, FILLING))

    @_locked
    def fill(self, claim_id: str, records: dict[str, np.ndarray], now: float | None = None, count_call: bool = True) -> bool:
        """FILLING -> READY with ``records`` (codec.to_arrays, in the claim's slot order). Unknown or expired
        claim: False, nothing changes. ``count_call``: count a fill call (False for the other shards of a pool's fill)."""
        self.expire(now)
        idx = self._owned(claim_id, FILLING)
        if len(idx) == 0:
            self.c["fill_rejected"] += 1
            return False
        if len(records["t"]) != len(idx):
            raise ValueError(f"fill got {len(records['t'])} records for a claim of {len(idx)} slots")
        for name, dst in self.records.items():
            dst[idx] = records[name]
        self.produced_at[idx] = self.c["produced"]
        states.fill(self.state, self.owner, self.t, self.uses, idx, records["t"], record_uses(self.k, len(idx), self.rng))
        for g in self.groups.values():
            g.pending[idx] = True
        self._count("produced", idx, count_call)
        return True

    attach_group = _locked(ShardGroups.attach_group)
    detach_group = _locked(ShardGroups.detach_group)

    @_locked
    def group_stats(self) -> dict[str, dict]:
        self.expire()
        return ShardGroups.group_stats(self)

    # --- stats, snapshot, restore ----------------------------------------------------------

    @_locked
    def add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Pool-wide seconds a side spent blocked and inside its calls (kept on shard 0), fills rejected."""
        for k, v in ((f"{side}_blocked", blocked_s), (side, call_s), ("fill_rejected", rejected)):
            self.seconds[SECONDS.index(k)] += v
        if blocked_s > 0 and self.record_metrics:
            metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, blocked_s, side=side)

    @_locked
    def stats(self, now: float | None = None) -> dict:
        """Counts, counters and groups; ``blocked``, ``seconds`` and ``fill_rejected_client`` are add_time's."""
        counts = self.counts(now)
        hist = t_histogram(self.t[self.state == READY], self.num_timesteps, self.t_buckets)
        if self.record_metrics:
            for i, v in enumerate(hist):
                metrics.set(metrics.POOL_READY_T, v, shard=self.shard_id, bucket=i)
        t = dict(zip(SECONDS, self.seconds.tolist()))
        return {"shard": self.shard_id, "counts": {k: counts[k] for k in STATE_NAMES}, "t_histogram": hist,
                **dict(zip(SHARD_COUNTERS, self.c.item())), "groups": self.group_stats(),
                "blocked": {s: t[f"{s}_blocked"] for s in ("draw", "fill")},
                "seconds": {s: t[s] for s in ("draw", "fill")}, "fill_rejected_client": int(t["fill_rejected"])}

    @_locked
    def snapshot(self, now: float | None = None) -> SlotArrays:
        """A copy of every slot, LEASED written as READY and FILLING as REFILL (their state after expiry)."""
        self.expire(now)
        r = self.records
        return SlotArrays(lo=self.lo, state=states.settled(self.state), t=self.t.copy(), uses=self.uses.copy(),
                          produced_at=self.produced_at.copy(), x_t=r["x_t"].copy(), eps=r["eps"].copy(),
                          logvar=r["logvar"].copy() if "logvar" in r else None, y=r["y"].copy() if "y" in r else None)

    @_locked
    def restore(self, arrays: SlotArrays, bad: np.ndarray, inserted_extra: int = 0) -> None:
        """Replace every slot with ``arrays`` (this shard's range); ``bad`` records become empty REFILL slots.
        ``inserted`` restarts at the READY count plus ``inserted_extra`` (Pool._load_snapshot says why)."""
        if len(arrays) != self.n or arrays.lo != self.lo:
            raise ValueError(f"shard {self.shard_id}: restore got slots [{arrays.lo}, {arrays.lo + len(arrays)}), owns [{self.lo}, {self.lo + self.n})")
        self.leases.clear()
        self.lease_group.clear()
        self.owner[:] = 0
        for name, dst in self.records.items():
            dst[:] = getattr(arrays, name)
        self.t[:], self.uses[:], self.produced_at[:] = arrays.t, arrays.uses, arrays.produced_at
        state, bad = states.restored(arrays.state, self.t, self.uses, bad)
        self.state[:] = state
        for g in self.groups.values():       # every attached group trains on the restored records
            g.leased[:] = False
            g.pending[:] = state == READY
        nbad = int(bad.sum())
        self.c["corrupt"] += nbad
        self.c["inserted"] = int((state == READY).sum()) + int(inserted_extra)
        if self.record_metrics and nbad:
            metrics.inc(metrics.POOL_CORRUPT_TOTAL, nbad, shard=self.shard_id)
        self._publish()
