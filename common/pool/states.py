"""The slot state machine of the record pool B+, specified once for every backend.

The numpy shard (shard.py) runs these functions on its arrays; the Redis backend's Lua
scripts implement the same transitions per slot. The conformance suite
(tests/pool/test_conformance.py) checks every backend against this text.

Life cycle of a slot::

    REFILL --claim--> FILLING --fill--> READY --draw--> LEASED --release--> REFILL
       ^                 |                ^                |   (no use left)
       +--claim expires--+                +--release-------+   (uses left)
                                          +--lease expires-+   (no use spent)

Invariants:

* The number of slots never changes and every slot is in exactly one state.
* A slot holds a record (t in [0, T)) or none (t = EMPTY_T). Every slot starts in
  REFILL with no record; the teacher that claims an empty slot runs the warm-up
  (Algorithm 1's shuffle-denoise) for it. A claim hands the teacher the slot's
  previous record, so one denoising step from the stored eps/logvar and one forward
  give the new record.
* LEASED and FILLING slots have an owner (the lease or claim id, stored as a nonzero
  int64 key) and a wall-clock deadline (``time.time()``, so processes agree); READY and
  REFILL slots have owner 0. A transition writes owner and deadline before the state,
  so a process killed inside one leaves every slot in one valid state.

Transitions (``now`` is wall-clock; every public call of a backend first expires):

* expire: LEASED past its deadline -> READY (the record is still valid, no use is
  spent); FILLING past its deadline -> REFILL (the record is unchanged).
* draw(b): b READY slots, uniformly without replacement over all READY slots of
  all shards (the split over shards is multivariate hypergeometric: ``split_draw``)
  -> LEASED under one lease id.
* release(lease): each slot spends one use; -> READY with uses left, else REFILL.
  Unknown, released or expired leases are a no-op (release is idempotent).
* claim(n): between 1 and n REFILL slots -> FILLING under one claim id.
* fill(claim, records): FILLING -> READY with the new records, in the claim's slot
  order, each with a fresh use budget. An unknown or expired claim changes nothing
  and the fill returns False (the teacher drops its records and claims again).

Samples per insert k >= 1 (Reverb's SampleToInsertRatio, enforced per record so
shards need no coordination): a filled record gets ``record_uses(k)`` uses, floor(k)
plus one with probability k - floor(k); so records are drawn k times on average and
consumed <= k * produced up to rounding. k = 1 is the paper: each record is trained
on exactly once. k < 1 would discard teacher forwards unread and is refused.

Warm-up (Reverb's MinSize): no draw is served before ``min_ready_slots`` records
have been inserted since the shard (re)started; inserts only grow, so a warm pool
stays warm. Records restored from a snapshot count as inserted.

Consumer groups (groups.py): with groups attached, each group has its own pending
and leased bit per slot; a slot is LEASED while any group holds it, READY while any
group still needs its record, and REFILL once every group has trained on it.
Groups need k = 1.

Snapshots write LEASED slots as READY and FILLING as REFILL (what they become after
expiry); a restore turns records whose checksum fails into empty REFILL slots.
"""

from __future__ import annotations

import enum
import math

import numpy as np

from common.pool.errors import PoolError
from common.records import EMPTY_T


class SlotState(enum.IntEnum):
    READY = 0
    LEASED = 1
    REFILL = 2
    FILLING = 3


STATE_NAMES: tuple[str, ...] = tuple(s.name for s in SlotState)   # index = SlotState value
READY, LEASED, REFILL, FILLING = (int(s) for s in SlotState)


def check_samples_per_insert(k: float) -> float:
    if not k >= 1.0:
        raise PoolError(f"pool.samples_per_insert={k} is below 1: a slot pool cannot discard teacher records unread")
    return float(k)


def min_ready_slots(min_ready_fraction: float, num_slots: int) -> int:
    """Reverb's MinSize: records inserted before the first draw (at least 1)."""
    return max(1, min(num_slots, math.ceil(min_ready_fraction * num_slots - 1e-9)))


def record_uses(k: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Use budget of n fresh records [n] int32: floor(k) plus one with probability k - floor(k)."""
    whole = math.floor(k)
    uses = np.full(n, whole, dtype=np.int32)
    if k > whole:
        uses += (rng.random(n) < k - whole).astype(np.int32)
    return uses


def expire(state: np.ndarray, owner: np.ndarray, deadline: np.ndarray, now: float) -> tuple[int, int]:
    """expire, in place: overdue LEASED -> READY, overdue FILLING -> REFILL -> (leases, claims) expired."""
    over = np.flatnonzero((owner != 0) & (deadline <= now))
    st = state[over]
    leased, claimed = over[st == LEASED], over[st == FILLING]
    owner[over] = 0
    state[leased] = READY
    state[claimed] = REFILL
    return len(leased), len(claimed)


def take(state: np.ndarray, owner: np.ndarray, deadline: np.ndarray, idx: np.ndarray, key: int, until: float,
         to: int) -> None:
    """draw (to = LEASED) or claim (to = FILLING) of slots idx for the lease or claim ``key``, due at ``until``."""
    owner[idx] = key
    deadline[idx] = until
    state[idx] = to


def held(state: np.ndarray, owner: np.ndarray, idx: np.ndarray, key: int, st: int) -> np.ndarray:
    """[len(idx)] bool: which slots idx the lease or claim ``key`` holds in state ``st``."""
    return (owner[idx] == key) & (state[idx] == st)


def release(state: np.ndarray, owner: np.ndarray, uses: np.ndarray, idx: np.ndarray) -> None:
    """release of leased slots idx: one use spent, READY with uses left, else REFILL."""
    owner[idx] = 0
    uses[idx] -= 1
    state[idx] = np.where(uses[idx] > 0, READY, REFILL)


def fill(state: np.ndarray, owner: np.ndarray, t: np.ndarray, uses: np.ndarray, idx: np.ndarray,
         new_t: np.ndarray, new_uses: np.ndarray) -> None:
    """fill of claimed slots idx whose records were written: FILLING -> READY with chain index new_t."""
    t[idx] = new_t
    uses[idx] = new_uses
    owner[idx] = 0
    state[idx] = READY


def settled(state: np.ndarray) -> np.ndarray:
    """The states after every lease and claim expired (what a snapshot writes)."""
    out = state.copy()
    out[out == LEASED] = READY
    out[out == FILLING] = REFILL
    return out


def restored(state: np.ndarray, t: np.ndarray, uses: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A snapshot's states with damaged records (``bad``, or a state byte outside the four) as empty REFILL
    slots; t and uses are cleared in place for them -> the states and the damaged mask."""
    bad = bad | (state > FILLING)
    out = settled(state)
    out[bad] = REFILL
    t[bad] = EMPTY_T
    uses[bad] = 0
    return out, bad
