"""The pool contract: one narrow interface over every backend.

Slot life cycle (issue 4):

    REFILL --claim_refill--> FILLING --fill--> READY --draw--> LEASED --release--> REFILL
                                 |  (claim deadline passes)              |  (lease deadline passes)
                                 +-------------> REFILL      READY <-----+

Every slot starts in REFILL holding no record (t = EMPTY_T): the teacher that
claims it runs the shuffle-denoise warm-up for it. A claimed slot hands the
teacher its previous record, so the teacher can take the denoising step from
the stored eps/logvar and then needs exactly one forward for the new record.
The number of slots never changes; every slot is in exactly one state.

Trainers and teachers only ever import this module (and ``make_pool``); no
backend module (redis, ray) is imported outside ``common/pool``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from common.records import RecordBatch


class SlotState(enum.IntEnum):
    READY = 0
    LEASED = 1
    REFILL = 2
    FILLING = 3


class PoolError(RuntimeError):
    """Base class of the pool's errors."""


class PoolTimeout(PoolError):
    """A blocking call waited past its timeout (the message says what it waited for)."""


class RecordCorrupt(PoolError):
    """A stored record failed to decode or its checksum did not match."""


@dataclass
class Draw:
    """A leased batch of b records; ``slots`` are global slot ids [b]."""

    lease_id: str
    slots: torch.Tensor
    batch: RecordBatch


@dataclass
class Claim:
    """Slots claimed for refill with their previous records (t = EMPTY_T where empty)."""

    claim_id: str
    slots: torch.Tensor
    batch: RecordBatch


@dataclass
class PoolStats:
    num_slots: int
    counts: dict[str, int]                      # state name -> count
    shard_counts: list[dict[str, int]]          # per shard
    produced_total: int = 0                     # records filled
    consumed_total: int = 0                     # records drawn
    bytes_in_total: int = 0
    bytes_out_total: int = 0
    draw_blocked_seconds_total: float = 0.0
    fill_blocked_seconds_total: float = 0.0
    t_histogram: list[int] = field(default_factory=list)   # READY slots per chain index bucket
    extra: dict = field(default_factory=dict)


class Pool(ABC):
    """B+ as a shared set of slots. All methods are safe to call from several processes."""

    num_slots: int

    @abstractmethod
    def draw(self, b: int, timeout_s: float | None = None) -> Draw:
        """Lease b READY slots uniformly at random without replacement (blocks until allowed)."""

    @abstractmethod
    def release(self, lease_id: str) -> None:
        """LEASED -> REFILL. Idempotent; a no-op for an unknown or expired lease."""

    @abstractmethod
    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        """Claim up to n REFILL slots (blocks until at least one is available)."""

    @abstractmethod
    def fill(self, claim_id: str, batch: RecordBatch) -> None:
        """FILLING -> READY with new records, in the claim's slot order."""

    @abstractmethod
    def stats(self) -> PoolStats: ...

    @abstractmethod
    def snapshot(self, path: str) -> None: ...

    @abstractmethod
    def restore(self, path: str) -> None: ...

    def close(self) -> None:
        pass
