"""LocalPool: N PoolShards in one process behind one condition variable (the single-process loop's backend).

Blocking calls wait in 50 ms slices, since the expiry of a lease or claim notifies nobody. Snapshots
copy one shard at a time under the lock and encode and write outside it.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch

from common.config import PoolConfig
from common.pool.base import Claim, Draw, Pool, PoolStats, merge_groups, new_key, shard_share, split_claim
from common.pool.codec import batch_over, to_arrays, write_snapshot
from common.pool.shard import PoolShard
from common.records import RecordBatch


class LocalPool(Pool):
    def __init__(self, cfg: PoolConfig, num_slots: int, record_shape: tuple[int, int, int], has_logvar: bool = False,
                 has_label: bool = False, num_timesteps: int = 1000, seed: int = 0, t_buckets: int = 10):
        self._init_layout(cfg, num_slots, record_shape, has_logvar, has_label, num_timesteps, t_buckets)
        self.shards = [PoolShard(**self._shard_kw(i, seed)) for i in range(len(self.ranges))]
        self.rng = np.random.default_rng(seed + 7919)
        self.cond = threading.Condition()
        self.claims: dict[str, list[tuple[int, int]]] = {}      # claim id -> [(shard, count)] in slot order

    _POLL_S = (0.05, 0.05)

    def _sleep(self, s: float) -> None:
        self.cond.wait(s)            # a release or fill ends the wait early

    def _counts(self, group: str | None = None) -> list[dict]:
        return [s.counts(time.time(), group) for s in self.shards]

    def _add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        self.shards[0].add_time(side, blocked_s, call_s, rejected)

    def _gather(self, method: str, asked: list[tuple[int, int]], key_id: str, now: float, **kw):
        """Each shard's part (shard, m) of a draw or claim, written straight into its rows of one batch (one copy)
        -> (global slots, the batch's arrays)."""
        out, slots, off = self._arrays(sum(m for _, m in asked)), [], 0
        for i, m in asked:
            part, _ = getattr(self.shards[i], method)(m, key_id, now, out={k: v[off:] for k, v in out.items()}, **kw)
            slots.append(part)
            if "count_call" in kw:
                kw["count_call"] = False     # a pool call is counted once, by the first shard
            off += m
        return torch.from_numpy(np.concatenate(slots)), out

    # --- the contract ---------------------------------------------------------------------

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        timeout_s, what = self._draw_args(b, timeout_s, group)
        t0 = time.perf_counter()
        with self.cond:
            asked, blocked = self._poll(lambda: self._split_draw(b, group), what, "draw", timeout_s, group)
            lease_id = new_key()
            now = time.time()
            slots, out = self._gather("draw", asked, lease_id, now, group=group, count_call=True)
            deadline = now + self.cfg.lease_timeout_s
        batch = batch_over(out, self.storage_dtype)
        self._timed("draw", t0, blocked)
        return Draw(lease_id=lease_id, slots=slots, batch=batch, deadline=deadline)

    def release(self, lease_id: str) -> None:
        with self.cond:
            now = time.time()
            if sum(s.release(lease_id, now) for s in self.shards):
                self.cond.notify_all()

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        timeout_s = self._claim_args(n, timeout_s)
        with self.cond:
            per = self._wait_refill(timeout_s)
            claim_id = new_key()
            now = time.time()
            layout = split_claim([c["REFILL"] for c in per], n, self.rng)
            slots, out = self._gather("claim", layout, claim_id, now)
            self.claims[claim_id] = layout
            deadline = now + self.cfg.claim_timeout_s
        return Claim(claim_id=claim_id, slots=slots, batch=batch_over(out, self.storage_dtype), deadline=deadline)

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        t0 = time.perf_counter()
        with self.cond:
            layout = self.claims.get(claim_id)
            now = time.time()
            if layout is None or any(self.shards[i].claim_size(claim_id) != m for i, m in layout):
                self.claims.pop(claim_id, None)
                self._add_time("fill", 0.0, 0.0, rejected=1)
                return False
            self._check_fill(batch, sum(m for _, m in layout))
            records, off = to_arrays(batch, self.storage_dtype), 0
            for i, m in layout:
                self.shards[i].fill(claim_id, {k: v[off:off + m] for k, v in records.items()}, now, count_call=off == 0)
                off += m
            del self.claims[claim_id]
            self.cond.notify_all()
        self._timed("fill", t0)
        return True

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        with self.cond:
            now = time.time()
            for i, s in enumerate(self.shards):
                s.attach_group(group, policy, shard_share(max_lag, i, len(self.shards)), now)
            self.cond.notify_all()

    def detach_group(self, group: str) -> None:
        with self.cond:
            for s in self.shards:
                s.detach_group(group)
            self.cond.notify_all()

    def groups(self) -> dict[str, dict]:
        with self.cond:
            return merge_groups([s.group_stats() for s in self.shards])

    def stats(self) -> PoolStats:
        with self.cond:
            now = time.time()
            st = PoolStats.merged(self, [s.stats(now) for s in self.shards])
            self.cond.notify_all()       # expiry may have freed slots for waiters
        return st

    def snapshot(self, path: str) -> None:
        with self.cond:
            header = self._snapshot_header()

        def frames():
            for s in self.shards:
                with self.cond:          # the pool stops for one shard's copy only
                    arrays = s.snapshot()
                yield arrays

        # The draw/claim generators too, so a resumed single-process run continues exactly (JSON: 128-bit ints).
        header["rng"] = json.dumps({"pool": self.rng.bit_generator.state,
                                    "shards": [sh.rng.bit_generator.state for sh in self.shards]})
        write_snapshot(path, header, frames())

    def restore(self, path: str) -> None:
        header, parts = self._load_snapshot(path)
        with self.cond:
            self.claims.clear()
            for s, part in zip(self.shards, parts):
                s.restore(*part)
            rng = json.loads(header["rng"]) if "rng" in header else None
            if rng is not None and len(rng["shards"]) == len(self.shards):   # same layout: continue the streams
                self.rng.bit_generator.state = rng["pool"]
                for sh, state in zip(self.shards, rng["shards"]):
                    sh.rng.bit_generator.state = state
            self.cond.notify_all()
