"""The pool contract: one narrow interface over every backend.

The slot life cycle and the rules every backend follows are specified in states.py.
On top of them (the conformance suite, tests/pool, checks both):

* Global slot ids are ``0 .. num_slots-1``; shard ``i`` owns the contiguous range
  ``shard_ranges(num_slots, shards)[i]``.
* ``draw(b)`` returns exactly ``b`` records or raises PoolTimeout; ``claim_refill(n)``
  returns between 1 and ``n`` slots or raises PoolTimeout. ``timeout_s=None`` means the
  config's ``block_timeout_s``. A draw waits until the pool is warm and has b READY
  slots, a claim until a slot is in REFILL; seconds spent waiting are summed per side
  in ``PoolStats`` and in the metric ``POOL_BLOCKED_SECONDS_TOTAL{side}``.
* Drawn and claimed records come back with float tensors in the storage dtype (fp32,
  fp16 or bf16) on the CPU; the caller casts.
* Corruption: a stored record that fails to decode never reaches a caller; its slot
  goes to REFILL with t = EMPTY_T and ``corrupt_total`` counts it.
* ``snapshot(path)`` writes the whole pool shard by shard; ``restore(path)`` replaces
  the contents (slot count and record layout must match).

Backend constructors take ``(cfg: PoolConfig, num_slots, record_shape, has_logvar,
has_label, num_timesteps=1000, seed=0, t_buckets=10)`` as keyword arguments; trainers
and teachers reach them only through ``common.pool`` (``make_pool``, ``open_named_pool``,
``attach_pool``) and see only this module's ``Pool``.
"""

from __future__ import annotations

import math
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from common.pool.errors import PoolError, PoolTimeout, RecordCorrupt  # noqa: F401 - part of the contract
from common.pool.identity import check_identity
from common.pool.states import (  # noqa: F401 - re-exported for the backends
    STATE_NAMES,
    SlotState,
    check_samples_per_insert,
    min_ready_slots,
    record_uses,
)
from common.records import RecordBatch

STORAGE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        """Store ``identity`` with the pool if it has none; refuse (PoolError) if it holds another one.

        Returns the identity the pool now holds. Backends keep it where their slots live.
        """
        held = getattr(self, "_identity", None)
        if held is None:
            self._identity = dict(identity)
            return self._identity
        check_identity(getattr(getattr(self, "cfg", None), "name", "?"), held, identity)
        return held

    def identity(self) -> dict | None:
        """The identity stored with the pool (None: none bound yet)."""
        return getattr(self, "_identity", None)

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        """Attach a consumer group: from now on it trains on every record once (groups.py)."""
        raise PoolError(f"consumer groups are not supported by the {type(self).__name__} backend yet")

    def detach_group(self, group: str) -> None:
        raise PoolError(f"consumer groups are not supported by the {type(self).__name__} backend yet")

    def groups(self) -> dict[str, dict]:
        """Attached consumer groups -> {policy, max_lag, pending, lag, consumed, skipped, leased}."""
        return {}


# --- shared pieces every backend uses -------------------------------------------------


def new_key() -> str:
    """A lease or claim id, unique across processes."""
    return uuid.uuid4().hex


def shard_ranges(num_slots: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous global slot ranges [lo, hi) per shard; the first ``num_slots % shards`` get one more."""
    if shards < 1 or num_slots < shards:
        raise PoolError(f"cannot split {num_slots} slots into {shards} shards (need at least one slot per shard)")
    base, extra = divmod(num_slots, shards)
    out, lo = [], 0
    for i in range(shards):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


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


def timeout_message(what: str, timeout_s: float, counts: dict[str, int], extra: str = "") -> str:
    c = ", ".join(f"{n}={counts.get(n, 0)}" for n in STATE_NAMES)
    return f"pool timed out after {timeout_s:.3g}s waiting for {what} (slots: {c}{extra})"
