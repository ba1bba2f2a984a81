"""The pool contract: one narrow interface over every backend.

Slot life cycle (issue 4):

    REFILL --claim_refill--> FILLING --fill--> READY --draw--> LEASED --release--> REFILL
                                 |  (claim deadline passes)     ^         |  (uses left > 0)
                                 +-------------> REFILL          +---------+  READY
                                                          (lease deadline passes: READY)

Every slot starts in REFILL holding no record (t = EMPTY_T): the teacher that
claims it runs the shuffle-denoise warm-up for it. A claimed slot hands the
teacher its previous record, so the teacher can take the denoising step from
the stored eps/logvar and then needs exactly one forward for the new record.
The number of slots never changes; every slot is in exactly one state.

Rules every backend follows (the conformance suite, tests/pool, checks them):

* Global slot ids are ``0 .. num_slots-1``; shard ``i`` owns the contiguous
  range ``shard_ranges(num_slots, shards)[i]``.
* Every public call first expires overdue leases (LEASED -> READY, the record
  is still valid and its use is refunded) and overdue claims
  (FILLING -> REFILL); ``stats()`` included. Deadlines are wall-clock
  (``time.time()``) so that several processes agree on them.
* ``release`` is idempotent: an unknown, already released or expired lease is
  a no-op. ``fill`` with an unknown or expired claim is a no-op returning
  False (the teacher drops its records and claims again).
* ``draw(b)`` returns exactly ``b`` records, uniformly at random without
  replacement over all READY slots of all shards, or raises PoolTimeout.
  ``claim_refill(n)`` returns between 1 and ``n`` slots, or raises PoolTimeout.
  ``timeout_s=None`` means the config's ``block_timeout_s``.
* Drawn and claimed records come back with float tensors in the storage dtype
  (fp32, fp16 or bf16) on the CPU; the caller casts.

Rate limiting, in the manner of DeepMind Reverb's rate limiters:

* Warm-up (Reverb's MinSize): no draw is served before ``min_ready`` records
  have ever been inserted (``min_ready = ceil(min_ready_fraction * num_slots)``,
  at least 1). Inserts only grow, so once warm the pool stays warm; records
  restored from a snapshot count as inserted.
* Samples per insert k >= 1 (Reverb's SampleToInsertRatio, enforced per record
  rather than by a global counter, so shards need no coordination): a filled
  record receives a budget of ``record_uses(k, rng)`` uses, ``floor(k)`` plus
  one more with probability ``k - floor(k)``, so records are drawn k times on
  average. ``release`` spends one use: a slot with uses left goes back to
  READY (the same record will be drawn again), one with none goes to REFILL.
  An expired lease refunds nothing because nothing was spent. Hence
  ``consumed <= k * produced`` up to the rounding, exactly Reverb's bound with
  no error buffer. k = 1 (the paper): each record is trained on exactly once.
  k < 1 would mean discarding teacher forwards unread and is refused.
* Blocking: a draw waits until the pool is warm and has b READY slots; a claim
  waits until a slot is in REFILL. Both wait at most their timeout and then
  raise PoolTimeout naming what they waited for and the state counts. Seconds
  spent waiting are summed per side in ``PoolStats`` and in the metric
  ``POOL_BLOCKED_SECONDS_TOTAL{side}``.

Corruption: a stored record that fails to decode (RecordCorrupt) never reaches
a caller; its slot goes to REFILL with t = EMPTY_T, ``corrupt_total`` and the
metric ``POOL_CORRUPT_TOTAL`` count it, and a draw tops the batch up from other
READY slots. In-memory backends can only meet corruption in a snapshot file:
records whose checksum fails are restored as empty REFILL slots (counted); a
file whose structure is broken raises RecordCorrupt naming the file.

Snapshots: ``snapshot(path)`` writes the whole pool shard by shard (each shard
stops only for the copy of its own arrays), LEASED slots written as READY and
FILLING as REFILL (what they become after expiry). ``restore(path)`` replaces
the contents; the slot count and record layout must match.

Backend constructors take ``(cfg: PoolConfig, num_slots, record_shape,
has_logvar, has_label, num_timesteps=1000, seed=0, t_buckets=10)`` as keyword
arguments (``make_pool`` in ``common.pool`` calls them so).

Trainers and teachers only ever import this module (and ``make_pool``); no
backend module (redis, ray) is imported outside ``common/pool``.
"""

from __future__ import annotations

import enum
import itertools
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from common.records import RecordBatch


class SlotState(enum.IntEnum):
    READY = 0
    LEASED = 1
    REFILL = 2
    FILLING = 3


STATE_NAMES: tuple[str, ...] = tuple(s.name for s in SlotState)   # index = SlotState value


class PoolError(RuntimeError):
    """Base class of the pool's errors."""


class PoolTimeout(PoolError):
    """A blocking call waited past its timeout (the message says what it waited for)."""


class RecordCorrupt(PoolError):
    """A stored record failed to decode or its checksum did not match."""


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
    # refinements (all optional for backends; defaults mean "not measured")
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
    record_age_mean: float = 0.0                # mean age of drawn records (see ``record age`` below)

    # Record age: records produced in the same shard between a record's fill and its draw
    # (a pool-operation clock; about steps * b / shards in the dynamic loop with k = 1).

    def check_invariant(self) -> None:
        """Raise PoolError unless every slot is in exactly one state (issue 4's invariant)."""
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

    # --- identity and consumer groups (issue 8; common/pool/identity.py, docs/shared_pools.md) ---

    def bind_identity(self, identity: dict) -> dict:
        """Store ``identity`` with the pool if it has none; refuse (PoolError) if it holds another one.

        Returns the identity the pool now holds. Backends keep it where their slots live.
        """
        from common.pool.identity import check_identity

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
        """Attach a consumer group: from now on it trains on every record once (see shard.py)."""
        raise PoolError(f"consumer groups are not supported by the {type(self).__name__} backend yet")

    def detach_group(self, group: str) -> None:
        raise PoolError(f"consumer groups are not supported by the {type(self).__name__} backend yet")

    def groups(self) -> dict[str, dict]:
        """Attached consumer groups -> {policy, max_lag, pending, lag, consumed, skipped, leased}."""
        return {}


# --- shared pieces every backend uses -------------------------------------------------


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


def min_ready_slots(min_ready_fraction: float, num_slots: int) -> int:
    """Reverb's MinSize: READY records inserted before the first draw (at least 1)."""
    return max(1, min(num_slots, math.ceil(min_ready_fraction * num_slots - 1e-9)))


def check_samples_per_insert(k: float) -> float:
    if not k >= 1.0:
        raise PoolError(f"pool.samples_per_insert={k} is below 1: a slot pool cannot discard teacher records unread")
    return float(k)


class _Keys:
    """Lease and claim ids: 32 hex digits, a random 64-bit prefix per process (drawn again in a forked
    child) and a counter. Unique across processes as uuid4 is, at a fifth of its cost on a draw's hot
    path (uuid4 reads os.urandom every call: 14 us after a batch copy has evicted the caches, 3 us here)."""

    def __init__(self):
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix, self.count = os.urandom(8).hex(), itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"


new_key = _Keys()


def record_uses(k: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Use budget of n fresh records [n] int32: floor(k) plus one with probability k - floor(k)."""
    whole = math.floor(k)
    frac = k - whole
    uses = np.full(n, whole, dtype=np.int32)
    if frac > 0:
        uses += (rng.random(n) < frac).astype(np.int32)
    return uses


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
