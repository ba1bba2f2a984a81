"""The pool contract: one narrow interface over every backend; the slot life cycle is states.py's.

On top of it (tests/pool's conformance suite checks both): shard ``i`` owns the global slots
``shard_ranges(num_slots, shards)[i]``; ``draw(b)`` returns exactly ``b`` records and ``claim_refill(n)``
between 1 and ``n`` slots, or raise PoolTimeout after ``timeout_s`` (None: ``block_timeout_s``), the
seconds waited summed per side in PoolStats and ``POOL_BLOCKED_SECONDS_TOTAL{side}``; records come
back on the CPU in the storage dtype; a record that fails to decode never reaches a caller (its slot
goes to REFILL, ``corrupt_total`` counts it); ``restore`` needs the snapshot's slot count and layout.
Trainers and teachers reach the backends only through ``common.pool`` and see only ``Pool``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch

from common import metrics
from common.pool.codec import (  # noqa: F401 - STORAGE_DTYPES: part of the contract
    FRAME_FIELDS, STORAGE_DTYPES, SlotArrays, new_arrays, read_snapshot)
from common.pool.errors import PoolError, PoolTimeout, RecordCorrupt  # noqa: F401 - part of the contract
from common.pool.identity import check_identity, identity_diff
from common.pool.memory import tune_malloc
from common.pool.states import (  # noqa: F401 - re-exported for the backends
    STATE_NAMES, SlotState, check_samples_per_insert, min_ready_slots, record_uses)
from common.records import RecordBatch

@dataclass
class Draw:
    """A leased batch of b records; ``slots`` are global slot ids [b]; ``deadline`` is time.time()."""

    lease_id: str
    slots: torch.Tensor
    batch: RecordBatch
    deadline: float = math.inf


@dataclass
class Claim:
    """Slots claimed for refill with their previous records (t = EMPTY_T where empty)."""

    claim_id: str
    slots: torch.Tensor
    batch: RecordBatch
    deadline: float = math.inf

    def __len__(self) -> int:
        return int(self.slots.shape[0])


# per-shard counters that PoolStats sums into ``<name>_total``
_SUMMED = ("produced", "consumed", "bytes_in", "bytes_out", "released", "expired_leases", "expired_claims", "corrupt",
           "fill_rejected", "draws", "fills")


@dataclass
class PoolStats:
    num_slots: int
    counts: dict[str, int]                      # state name -> count
    shard_counts: list[dict[str, int]]          # per shard
    produced_total: int = 0                     # records filled
    consumed_total: int = 0                     # records drawn (each draw of a record counts once)
    bytes_in_total: int = 0
    bytes_out_total: int = 0
    draw_blocked_seconds_total: float = 0.0
    fill_blocked_seconds_total: float = 0.0
    t_histogram: list[int] = field(default_factory=list)   # READY slots per chain index bucket over [0, T)
    extra: dict = field(default_factory=dict)
    warm: bool = False                          # min_ready records have been inserted
    released_total: int = 0                     # uses spent by release
    expired_leases_total: int = 0               # slots whose lease expired (LEASED -> READY)
    expired_claims_total: int = 0               # slots whose claim expired (FILLING -> REFILL)
    corrupt_total: int = 0                      # records that failed to decode (slot -> REFILL)
    fill_rejected_total: int = 0                # fills of unknown or expired claims
    draw_seconds_total: float = 0.0             # time inside draw calls (including blocking)
    fill_seconds_total: float = 0.0             # time inside fill calls
    draws_total: int = 0                        # draw calls served
    fills_total: int = 0                        # fill calls accepted
    # mean age of drawn records: records produced in the same shard between a record's fill and its draw
    record_age_mean: float = 0.0

    @classmethod
    def merged(cls, pool: Pool, per_shard: list[dict]) -> PoolStats:
        """The pool's stats from per-shard dicts (PoolShard.stats' keys; shard 0's carries the pool-wide seconds
        blocked and in calls per side, and the fills the pool rejected: PoolShard.add_time)."""
        blocked, seconds = per_shard[0]["blocked"], per_shard[0]["seconds"]
        tot = {k: sum(s[k] for s in per_shard) for k in (*_SUMMED, "inserted", "age_sum")}
        hist = np.sum([s["t_histogram"] for s in per_shard], axis=0).astype(int).tolist() if pool.t_buckets else []
        st = cls(num_slots=pool.num_slots, counts={n: sum(s["counts"][n] for s in per_shard) for n in STATE_NAMES},
                 shard_counts=[dict(s["counts"]) for s in per_shard], t_histogram=hist,
                 extra={"inserted_total": tot["inserted"]}, warm=tot["inserted"] >= pool.min_ready,
                 **{f"{k}_total": tot[k] for k in _SUMMED},
                 **{f"{side}_blocked_seconds_total": blocked.get(side, 0.0) for side in ("draw", "fill")},
                 **{f"{side}_seconds_total": seconds.get(side, 0.0) for side in ("draw", "fill")},
                 record_age_mean=tot["age_sum"] / max(tot["consumed"], 1))
        st.fill_rejected_total += per_shard[0].get("fill_rejected_client", 0)
        groups = merge_groups([s.get("groups") or {} for s in per_shard])
        if groups:       # consumer groups (issue 8): their lag and progress
            st.extra["groups"] = groups
        return st

    def check_invariant(self) -> None:
        """Raise PoolError unless every slot is in exactly one state (states.py's invariant)."""
        total = sum(self.counts.get(n, 0) for n in STATE_NAMES)
        if total != self.num_slots or any(v < 0 for v in self.counts.values()):
            raise PoolError(f"pool invariant broken: state counts {self.counts} do not sum to {self.num_slots} slots")
        shard_total = sum(sum(c.get(n, 0) for n in STATE_NAMES) for c in self.shard_counts)
        if self.shard_counts and shard_total != self.num_slots:
            raise PoolError(f"pool invariant broken: shard counts {self.shard_counts} do not sum to {self.num_slots}")


class Pool(ABC):
    """B+ as a shared set of slots. All methods are safe to call from several processes."""

    num_slots: int

    @abstractmethod
    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        """Lease b READY slots uniformly at random without replacement (blocks until allowed).

        ``group``: draw as that attached consumer group (only the records it has not trained on).
        """

    @abstractmethod
    def release(self, lease_id: str) -> None:
        """Spend one use of each leased record: LEASED -> REFILL (or READY with uses left). Idempotent."""

    @abstractmethod
    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        """Claim up to n REFILL slots (blocks until at least one is available)."""

    @abstractmethod
    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        """FILLING -> READY with new records, in the claim's slot order. False: unknown or expired claim."""

    @abstractmethod
    def stats(self) -> PoolStats: ...

    @abstractmethod
    def snapshot(self, path: str) -> None: ...

    @abstractmethod
    def restore(self, path: str) -> None: ...

    def close(self) -> None:
        pass

    # --- identity and consumer groups (identity.py, groups.py, docs/shared_pools.md) ---

    def bind_identity(self, identity: dict) -> dict:
        """Store ``identity`` with the pool if it has none, else refuse (PoolError) another one -> the identity
        the pool now holds. Backends keep it where their slots live."""
        held = getattr(self, "_identity", None)
        if held is None:
            self._identity = dict(identity)
            return self._identity
        check_identity(self.cfg.name, held, identity)
        return held

    def identity(self) -> dict | None:
        """The identity stored with the pool (None: none bound yet)."""
        return getattr(self, "_identity", None)

    @abstractmethod
    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        """Attach a consumer group: from now on it trains on every record once (groups.py). ``max_lag``:
        records, summed over the shards, split evenly (``shard_share``)."""

    @abstractmethod
    def detach_group(self, group: str) -> None: ...

    @abstractmethod
    def groups(self) -> dict[str, dict]:
        """Attached consumer groups -> {policy, max_lag, pending, lag, consumed, skipped, leased, idle_s}."""

    # --- what every backend keeps and checks the same way (not part of the contract) ---

    _POLL_S = (0.001, 0.05)      # seconds between polls for slots: the first pause, doubling up to the last

    def _init_layout(self, cfg, num_slots: int, record_shape, has_logvar: bool, has_label: bool, num_timesteps: int,
                     t_buckets: int) -> None:
        self.cfg, self.num_slots = cfg, int(num_slots)
        self.record_shape = tuple(int(s) for s in record_shape)
        self.storage_dtype, self.has_logvar, self.has_label = cfg.storage_dtype, bool(has_logvar), bool(has_label)
        self.num_timesteps, self.t_buckets = int(num_timesteps), int(t_buckets)
        self.ranges = shard_ranges(self.num_slots, cfg.shards)
        self.min_ready = min_ready_slots(cfg.min_ready_fraction, self.num_slots)
        tune_malloc()        # each draw's batch reuses freed pages instead of faulting them in (memory.tune_malloc)

    def _shard_kw(self, i: int, seed: int) -> dict:
        """PoolShard's arguments for shard i of this pool."""
        lo, hi = self.ranges[i]
        return dict(shard_id=i, lo=lo, n=hi - lo, record_shape=self.record_shape, storage_dtype=self.storage_dtype,
                    has_logvar=self.has_logvar, has_label=self.has_label, lease_timeout_s=self.cfg.lease_timeout_s,
                    claim_timeout_s=self.cfg.claim_timeout_s, samples_per_insert=self.cfg.samples_per_insert,
                    num_timesteps=self.num_timesteps, t_buckets=self.t_buckets, seed=seed)

    def _arrays(self, n: int, zeros: bool = False) -> dict[str, np.ndarray]:
        return new_arrays(n, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label, zeros)

    def _check_fill(self, batch: RecordBatch, n: int) -> None:
        """Raise ValueError (one line) unless ``batch`` is n records of this pool's layout."""
        if len(batch) != n:
            raise ValueError(f"fill got {len(batch)} records for a claim of {n} slots")
        want = (n, *self.record_shape)
        for name in ("x_t", "eps") + (("logvar",) if self.has_logvar else ()):
            v = getattr(batch, name)
            if v is None or tuple(v.shape) != want:
                got = None if v is None else tuple(v.shape)
                raise ValueError(f"fill: {name} has shape {got}, the pool stores {want}")
        if not self.has_logvar and batch.logvar is not None:
            raise ValueError("fill: records carry logvar but the pool was built without has_logvar")
        if self.has_label != (batch.y is not None):
            raise ValueError(f"fill: records {'lack' if self.has_label else 'carry'} labels y but the pool has "
                             f"has_label={self.has_label}")
        if n:
            lo, hi = (int(v) for v in torch.aminmax(batch.t))
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(f"fill: t must lie in [0, {self.num_timesteps}), got [{lo}, {hi}]")

    def _draw_args(self, b: int, timeout_s: float | None, group: str | None) -> tuple[float, str]:
        """-> (the draw's timeout, what it waits for); PoolError unless 1 <= b <= num_slots."""
        if not 1 <= b <= self.num_slots:
            raise PoolError(f"cannot draw {b} records from a pool of {self.num_slots} slots")
        what = f"{b} READY slots" if group is None else f"{b} records new to consumer group {group!r}"
        return self._claim_args(1, timeout_s), f"{what} (warm-up needs {self.min_ready} inserted)"

    def _claim_args(self, n: int, timeout_s: float | None) -> float:
        """-> the claim's timeout; PoolError unless n >= 1."""
        if n < 1:
            raise PoolError(f"claim_refill needs n >= 1, got {n}")
        return self.cfg.block_timeout_s if timeout_s is None else timeout_s

    def _split_draw(self, b: int, group: str | None) -> list[tuple[int, int]] | None:
        """A draw of b over the shards' counts now: None unless the pool is warm and holds b records to draw (a
        group draws among those new to it), else ``split_draw``'s [(shard, count)] of the shards drawn from."""
        per = self._counts(group)
        have = [c["READY" if group is None else "available"] for c in per]
        if sum(c["inserted"] for c in per) < self.min_ready or sum(have) < b:
            return None
        return [(i, m) for i, m in enumerate(split_draw(have, b, self.rng).tolist()) if m]

    def _wait_refill(self, timeout_s: float) -> list[dict]:
        """``_poll`` the shards' counts until one has a REFILL slot -> those counts (the wait counted as blocked)."""
        def refill():
            per = self._counts()
            return per if any(c["REFILL"] for c in per) else None

        per, blocked = self._poll(refill, "a REFILL slot", "fill", timeout_s)
        if blocked:
            self._add_time("fill", blocked, 0.0)
        return per

    def _poll(self, attempt, what: str, side: str, timeout_s: float, group: str | None = None) -> tuple:
        """Call ``attempt()`` until it returns other than None -> (that, seconds blocked; 0 if the first call did).

        It pauses ``_POLL_S[0]`` between calls, doubling up to ``_POLL_S[1]``. After ``timeout_s`` the seconds
        waited go to ``_add_blocked(side, s)`` and it raises PoolTimeout with the shards' counts summed.
        """
        start, pause, slept = time.monotonic(), self._POLL_S[0], False
        while (got := attempt()) is None:
            waited = time.monotonic() - start
            if waited >= timeout_s:
                self._add_blocked(side, waited)
                per = self._counts(group)
                c = ", ".join(f"{n}={sum(p[n] for p in per)}" for n in STATE_NAMES)
                raise PoolTimeout(f"pool timed out after {timeout_s:.3g}s waiting for {what} (slots: {c}, "
                                  f"inserted={sum(p['inserted'] for p in per)}, min_ready={self.min_ready})")
            self._sleep(min(pause, timeout_s - waited))
            pause = min(2 * pause, self._POLL_S[1])
            slept = True
        return got, time.monotonic() - start if slept else 0.0

    def _sleep(self, s: float) -> None:
        time.sleep(s)

    @abstractmethod
    def _add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Add seconds ``side`` spent blocked and inside its calls, and fills rejected, to the pool's totals."""

    def _add_blocked(self, side: str, s: float) -> None:
        """A timed-out call's seconds (``_poll``): blocked."""
        self._add_time(side, s, 0.0)

    def _timed(self, side: str, t0: float, blocked_s: float = 0.0, rejected: int = 0) -> float:
        """A call's seconds since ``t0`` (perf_counter) to the totals (``_add_time``) and its histogram -> them."""
        dt = time.perf_counter() - t0
        self._add_time(side, blocked_s, dt, rejected)
        metrics.observe(metrics.POOL_DRAW_SECONDS if side == "draw" else metrics.POOL_FILL_SECONDS, dt)
        return dt

    def _layout(self) -> dict:
        """What a snapshot must share with the pool it restores into."""
        return {"num_slots": self.num_slots, "record_shape": list(self.record_shape),
                "storage_dtype": self.storage_dtype, "has_logvar": self.has_logvar, "has_label": self.has_label}

    def _snapshot_header(self) -> dict:
        header = {**self._layout(), "inserted_total": sum(c["inserted"] for c in self._counts())}
        identity = self.identity()           # a round trip on ray and redis
        if identity is not None:              # issue 8: a snapshot only restores into a pool of the same identity
            header["identity"] = json.dumps(identity, sort_keys=True)
        return header

    def _load_snapshot(self, path: str) -> tuple[dict, list[tuple[SlotArrays, np.ndarray, int]]]:
        """Read a snapshot of this pool's layout -> (header, [(arrays, bad, inserted_extra)] per shard range).

        ``inserted_extra`` (shard 0's only): the snapshot's inserted records beyond the READY ones it restores,
        so that a pool warm when snapshotted is warm when restored.
        """
        header, frames = read_snapshot(path)
        for key, mine in self._layout().items():
            if header.get(key) != mine:
                raise PoolError(f"snapshot {path} has {key}={header.get(key)!r}, this pool has {key}={mine!r}")
        if "identity" in header:
            theirs, mine = json.loads(header["identity"]), self.identity()
            if mine is None:
                self.bind_identity(theirs)      # the restored records carry their identity with them
            elif identity_diff(theirs, mine) is not None:
                raise PoolError(f"snapshot {path} {identity_diff(theirs, mine)}")
        parts = sorted(frames, key=lambda fb: fb[0].lo)
        covered = sum(len(a) for a, _ in parts)
        if covered != self.num_slots or (parts and parts[0][0].lo != 0):
            raise PoolError(f"snapshot {path} covers {covered} slots, this pool has {self.num_slots}")
        full = {n: None if getattr(parts[0][0], n) is None else np.concatenate([getattr(a, n) for a, _ in parts])
                for n in FRAME_FIELDS}
        bad = np.concatenate([b for _, b in parts])
        ready = int((((full["state"] == 0) | (full["state"] == 1)) & ~bad).sum())
        extra = max(0, int(header.get("inserted_total", 0)) - ready)
        return header, [(SlotArrays(lo=lo, **{n: None if v is None else v[lo:hi] for n, v in full.items()}), bad[lo:hi],
                         extra if lo == 0 else 0) for lo, hi in self.ranges]


# --- shared pieces every backend uses -------------------------------------------------


def new_key() -> str:
    """A lease or claim id, unique across processes."""
    return uuid.uuid4().hex


def shard_share(total: int | None, i: int, shards: int) -> int | None:
    """Shard i's part of ``total`` (its slots, or of a pool-wide lag bound; None: None) split evenly over the
    shards, the first ``total % shards`` getting one more."""
    if total is None:
        return None
    base, extra = divmod(int(total), shards)
    return base + (1 if i < extra else 0)


def shard_ranges(num_slots: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous global slot ranges [lo, hi) per shard, ``shard_share`` slots each."""
    if shards < 1 or num_slots < shards:
        raise PoolError(f"cannot split {num_slots} slots into {shards} shards (need at least one slot per shard)")
    ends = list(accumulate(shard_share(num_slots, i, shards) for i in range(shards)))
    return list(zip([0, *ends[:-1]], ends))


def t_histogram(t: np.ndarray, num_timesteps: int, buckets: int) -> list[int]:
    """Counts of chain indices t in [0, T) over ``buckets`` equal-width buckets (EMPTY_T ignored)."""
    t = np.asarray(t)
    t = t[(t >= 0) & (t < num_timesteps)]
    idx = (t * buckets) // max(num_timesteps, 1)
    return np.bincount(idx, minlength=buckets)[:buckets].astype(int).tolist()


def split_draw(ready: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """How many of b draws come from each shard [S]: multivariate hypergeometric over READY counts.

    Drawing b of all READY slots uniformly without replacement, the number that lands in
    shard i is hypergeometric; drawing that many uniformly within each shard is then the
    same distribution as one uniform draw over the union.
    """
    ready = np.asarray(ready, dtype=np.int64)
    if b > int(ready.sum()):
        raise PoolError(f"cannot draw {b} of {int(ready.sum())} READY slots")
    if b == 0:
        return np.zeros_like(ready)
    return rng.multivariate_hypergeometric(ready, b).astype(np.int64)


def split_claim(refill, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to n REFILL slots per shard in a random shard order (it spreads the teachers over the shards;
    each shard picks its slots at random) -> [(shard, count)]."""
    out = []
    for i in rng.permutation(len(refill)).tolist():
        m = min(n - sum(k for _, k in out), int(refill[i]))
        if m:
            out.append((i, m))
    return out


def merge_groups(per_shard: list[dict[str, dict]]) -> dict[str, dict]:
    """Per-shard group stats (PoolShard.group_stats) -> pool-wide: counts summed, idle the least."""
    out: dict[str, dict] = {}
    for groups in per_shard:
        for name, g in groups.items():
            o = out.setdefault(name, {"policy": g["policy"], "max_lag": None, "pending": 0, "leased": 0, "lag": 0,
                                      "consumed": 0, "skipped": 0, "idle_s": g["idle_s"]})
            for k in ("pending", "leased", "lag", "consumed", "skipped"):
                o[k] += g[k]
            if g["max_lag"] is not None:
                o["max_lag"] = (o["max_lag"] or 0) + g["max_lag"]
            o["idle_s"] = min(o["idle_s"], g["idle_s"])
    return out
