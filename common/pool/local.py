"""LocalPool: N PoolShards in one process behind one lock (the single-process loop's backend).

Thread safe: every call holds the pool's condition variable; blocking calls wait
on it in short slices (expiry of a lease or claim needs no notification, so the
waiter re-checks at least every 50 ms). A draw splits b over the shards with a
multivariate hypergeometric draw on their READY counts (base.split_draw) and
draws uniformly within each shard, which is one uniform draw without
replacement over all READY slots. Snapshots copy one shard at a time under the
lock and encode and write outside it.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch

from common import metrics
from common.config import PoolConfig
from common.pool.base import (
    STATE_NAMES,
    Claim,
    Draw,
    Pool,
    PoolError,
    PoolStats,
    PoolTimeout,
    min_ready_slots,
    new_key,
    shard_ranges,
    split_draw,
    timeout_message,
)
from common.pool.codec import SlotArrays, batch_over, check_batch, new_arrays, read_snapshot, to_arrays, write_snapshot
from common.pool.identity import identity_diff
from common.pool.memory import tune_malloc
from common.pool.shard import SHARD_COUNTERS, PoolShard
from common.records import RecordBatch

_WAIT_SLICE_S = 0.05


def merge_stats(num_slots: int, shard_stats: list[dict], warm: bool, t_buckets: int, blocked: dict, seconds: dict) -> PoolStats:
    """Per-shard stat dicts (PoolShard.stats) -> PoolStats."""
    tot = {k: sum(s[k] for s in shard_stats) for k in SHARD_COUNTERS}
    counts = {n: sum(s["counts"][n] for s in shard_stats) for n in STATE_NAMES}
    hist = np.sum([s["t_histogram"] for s in shard_stats], axis=0).astype(int).tolist() if t_buckets else []
    names = ("produced", "consumed", "bytes_in", "bytes_out", "released", "expired_leases", "expired_claims", "corrupt",
             "fill_rejected", "draws", "fills")
    st = PoolStats(num_slots=num_slots, counts=counts, shard_counts=[dict(s["counts"]) for s in shard_stats],
                   t_histogram=hist, extra={"inserted_total": tot["inserted"]}, warm=warm,
                   **{f"{k}_total": tot[k] for k in names},
                   draw_blocked_seconds_total=blocked.get("draw", 0.0), fill_blocked_seconds_total=blocked.get("fill", 0.0),
                   draw_seconds_total=seconds.get("draw", 0.0), fill_seconds_total=seconds.get("fill", 0.0),
                   record_age_mean=tot["age_sum"] / max(tot["consumed"], 1))
    groups = merge_groups([s.get("groups") or {} for s in shard_stats])
    if groups:       # consumer groups (issue 8): their lag and progress
        st.extra["groups"] = groups
    return st


def shard_lag(max_lag: int | None, i: int, shards: int) -> int | None:
    """Shard i's part of a pool-wide lag bound (the first ``max_lag % shards`` shards get one more)."""
    if max_lag is None:
        return None
    base, extra = divmod(int(max_lag), shards)
    return base + (1 if i < extra else 0)


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


def snapshot_header(pool, inserted_total: int) -> dict:
    header = {
        "num_slots": pool.num_slots, "record_shape": list(pool.record_shape), "storage_dtype": pool.storage_dtype,
        "has_logvar": pool.has_logvar, "has_label": pool.has_label, "inserted_total": int(inserted_total),
    }
    identity = pool.identity()
    if identity is not None:          # issue 8: a snapshot only restores into a pool of the same identity
        header["identity"] = json.dumps(identity, sort_keys=True)
    return header


def check_snapshot_header(pool, header: dict, path: str) -> None:
    for key, mine in (("num_slots", pool.num_slots), ("record_shape", list(pool.record_shape)),
                      ("storage_dtype", pool.storage_dtype), ("has_logvar", pool.has_logvar), ("has_label", pool.has_label)):
        if header.get(key) != mine:
            raise PoolError(f"snapshot {path} has {key}={header.get(key)!r}, this pool has {key}={mine!r}")
    if "identity" in header:
        theirs, mine = json.loads(header["identity"]), pool.identity()
        diff = None if mine is None else identity_diff(theirs, mine)
        if diff is not None:
            raise PoolError(f"snapshot {path} {diff}")
        if mine is None:
            pool.bind_identity(theirs)      # the restored records carry their identity with them


def load_snapshot_for(pool, path: str, ranges: list[tuple[int, int]]):
    """Read a snapshot and cut it to this pool's shard ranges -> (header, [(arrays, bad)] per shard)."""
    header, frames = read_snapshot(path)
    check_snapshot_header(pool, header, path)
    parts = sorted(frames, key=lambda fb: fb[0].lo)
    covered = sum(len(a) for a, _ in parts)
    if covered != pool.num_slots or (parts and parts[0][0].lo != 0):
        raise PoolError(f"snapshot {path} covers {covered} slots, this pool has {pool.num_slots}")
    names = ("state", "t", "uses", "produced_at", "x_t", "eps", "logvar", "y")
    full = {n: (None if getattr(parts[0][0], n) is None else np.concatenate([getattr(a, n) for a, _ in parts])) for n in names}
    bad = np.concatenate([b for _, b in parts])
    out = []
    for lo, hi in ranges:
        arrays = SlotArrays(lo=lo, **{n: (None if v is None else v[lo:hi]) for n, v in full.items()})
        out.append((arrays, bad[lo:hi]))
    return header, out


def surplus_inserted(header: dict, parts) -> int:
    """Inserted records of the snapshot beyond the READY ones it restores (keeps a warm pool warm)."""
    ready = sum(int((((a.state == 0) | (a.state == 1)) & ~bad).sum()) for a, bad in parts)
    return max(0, int(header.get("inserted_total", 0)) - ready)


class LocalPool(Pool):
    def __init__(
        self,
        cfg: PoolConfig,
        num_slots: int,
        record_shape: tuple[int, int, int],
        has_logvar: bool = False,
        has_label: bool = False,
        num_timesteps: int = 1000,
        seed: int = 0,
        t_buckets: int = 10,
    ):
        self.cfg, self.num_slots = cfg, int(num_slots)
        self.record_shape = tuple(int(s) for s in record_shape)
        self.storage_dtype, self.has_logvar, self.has_label = cfg.storage_dtype, has_logvar, has_label
        self.t_buckets, self.num_timesteps = t_buckets, num_timesteps
        self.ranges = shard_ranges(self.num_slots, cfg.shards)
        self.shards = [
            PoolShard(i, lo, hi - lo, self.record_shape, cfg.storage_dtype, has_logvar, has_label,
                      cfg.lease_timeout_s, cfg.claim_timeout_s, cfg.samples_per_insert, num_timesteps, t_buckets, seed)
            for i, (lo, hi) in enumerate(self.ranges)
        ]
        self.min_ready = min_ready_slots(cfg.min_ready_fraction, self.num_slots)
        self.rng = np.random.default_rng(seed + 7919)
        self.cond = threading.Condition()
        tune_malloc()        # each draw's batch reuses freed pages instead of faulting them in
        self.claims: dict[str, list[tuple[int, int]]] = {}      # claim id -> [(shard, count)] in slot order
        self.blocked = {"draw": 0.0, "fill": 0.0}
        self.seconds = {"draw": 0.0, "fill": 0.0}
        self.fill_rejected = 0

    # --- helpers ------------------------------------------------------------------------

    def _arrays(self, n: int) -> dict[str, np.ndarray]:
        return new_arrays(n, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)

    def _counts(self, now: float, group: str | None = None) -> tuple[np.ndarray, np.ndarray, int, dict]:
        per = [s.counts(now, group) for s in self.shards]
        ready = np.array([c["READY" if group is None else "available"] for c in per])
        refill = np.array([c["REFILL"] for c in per])
        inserted = sum(c["inserted"] for c in per)
        counts = {n: sum(c[n] for c in per) for n in STATE_NAMES}
        return ready, refill, inserted, counts

    def _wait(self, ok, what: str, side: str, timeout_s: float | None, group: str | None = None):
        """Wait on the condition until ok(ready, refill, inserted) or timeout -> PoolTimeout. Holds the lock.

        ``group``: ``ready`` counts the records that consumer group may draw.
        """
        timeout_s = self.cfg.block_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        while True:
            ready, refill, inserted, counts = self._counts(time.time(), group)
            if ok(ready, refill, inserted):
                break
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                self._add_blocked(side, time.monotonic() - start)
                raise PoolTimeout(timeout_message(what, timeout_s, counts, f", inserted={inserted}, min_ready={self.min_ready}"))
            self.cond.wait(min(left, _WAIT_SLICE_S))
        self._add_blocked(side, time.monotonic() - start)
        return ready, refill

    def _add_blocked(self, side: str, s: float) -> None:
        if s > 1e-4:
            self.blocked[side] += s
            metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, s, side=side)

    # --- the contract ---------------------------------------------------------------------

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        if not 1 <= b <= self.num_slots:
            raise PoolError(f"cannot draw {b} records from a pool of {self.num_slots} slots")
        t0 = time.perf_counter()
        what = f"{b} READY slots (warm-up needs {self.min_ready} inserted)"
        if group is not None:
            what = f"{b} records new to consumer group {group!r} (warm-up needs {self.min_ready} inserted)"
        with self.cond:
            ready, _ = self._wait(lambda r, f, ins: ins >= self.min_ready and r.sum() >= b, what, "draw", timeout_s, group)
            lease_id = new_key()
            take = split_draw(ready, b, self.rng)
            now = time.time()
            out = self._arrays(b)      # each shard gathers straight into its rows: one copy
            parts, off = [], 0
            for i, m in enumerate(take.tolist()):
                if m:
                    parts.append(self.shards[i].draw(m, lease_id, now, out={k: v[off:] for k, v in out.items()},
                                                     group=group, count_call=not parts))      # one draw call, counted once
                    off += m
            deadline = now + self.cfg.lease_timeout_s
        slots = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        batch = batch_over(out, self.storage_dtype)
        dt = time.perf_counter() - t0
        self.seconds["draw"] += dt
        metrics.observe(metrics.POOL_DRAW_SECONDS, dt)
        return Draw(lease_id=lease_id, slots=slots, batch=batch, deadline=deadline)

    def release(self, lease_id: str) -> None:
        with self.cond:
            now = time.time()
            if sum(s.release(lease_id, now) for s in self.shards):
                self.cond.notify_all()

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        if n < 1:
            raise PoolError(f"claim_refill needs n >= 1, got {n}")
        with self.cond:
            _, refill = self._wait(lambda r, f, ins: f.sum() >= 1, "a REFILL slot", "fill", timeout_s)
            claim_id = new_key()
            now = time.time()
            layout, want = [], n
            # Random shard order spreads teachers over shards; within a shard the slots are random too.
            for i in self.rng.permutation(len(self.shards)).tolist():
                m = min(want, int(refill[i]))
                if m:
                    layout.append((i, m))
                    want -= m
            out = self._arrays(n - want)
            parts, off = [], 0
            for i, m in layout:
                parts.append(self.shards[i].claim(m, claim_id, now, out={k: v[off:] for k, v in out.items()}))
                off += m
            self.claims[claim_id] = layout
            deadline = now + self.cfg.claim_timeout_s
        slots = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        batch = batch_over(out, self.storage_dtype)
        return Claim(claim_id=claim_id, slots=slots, batch=batch, deadline=deadline)

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        t0 = time.perf_counter()
        with self.cond:
            layout = self.claims.get(claim_id)
            now = time.time()
            for s in self.shards:
                s.expire(now)
            if layout is None or any(self.shards[i].claim_size(claim_id) != m for i, m in layout):
                self.claims.pop(claim_id, None)
                self.fill_rejected += 1
                return False
            check_batch(batch, sum(m for _, m in layout), self.record_shape, self.has_logvar, self.has_label,
                        self.num_timesteps)
            records, off = to_arrays(batch, self.storage_dtype), 0
            for i, m in layout:
                self.shards[i].fill(claim_id, {k: v[off:off + m] for k, v in records.items()}, now, count_call=off == 0)
                off += m
            del self.claims[claim_id]
            self.cond.notify_all()
        dt = time.perf_counter() - t0
        self.seconds["fill"] += dt
        metrics.observe(metrics.POOL_FILL_SECONDS, dt)
        return True

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        """Attach consumer group ``group`` (``max_lag``: records, summed over shards, split evenly)."""
        with self.cond:
            now = time.time()
            for i, s in enumerate(self.shards):
                s.attach_group(group, policy, shard_lag(max_lag, i, len(self.shards)), now)
            self.cond.notify_all()

    def detach_group(self, group: str) -> None:
        with self.cond:
            for s in self.shards:
                s.detach_group(group)
            self.cond.notify_all()

    def groups(self) -> dict[str, dict]:
        with self.cond:
            now = time.time()
            for s in self.shards:
                s.expire(now)
            return merge_groups([s.group_stats() for s in self.shards])

    def stats(self) -> PoolStats:
        with self.cond:
            now = time.time()
            per = [s.stats(now) for s in self.shards]
            inserted = sum(p["inserted"] for p in per)
            st = merge_stats(self.num_slots, per, inserted >= self.min_ready, self.t_buckets, self.blocked, self.seconds)
            st.fill_rejected_total += self.fill_rejected
            self.cond.notify_all()       # expiry may have freed slots for waiters
        return st

    def snapshot(self, path: str) -> None:
        with self.cond:
            inserted = sum(s.c["inserted"] for s in self.shards)

        def frames():
            for s in self.shards:
                with self.cond:          # the pool stops for one shard's copy only
                    arrays = s.snapshot()
                yield arrays

        header = snapshot_header(self, inserted)
        # The draw/claim generators too, so a resumed single-process run continues exactly (JSON: 128-bit ints).
        header["rng"] = json.dumps({"pool": self.rng.bit_generator.state,
                                    "shards": [sh.rng.bit_generator.state for sh in self.shards]})
        write_snapshot(path, header, frames())

    def restore(self, path: str) -> None:
        header, parts = load_snapshot_for(self, path, self.ranges)
        extra = surplus_inserted(header, parts)
        with self.cond:
            self.claims.clear()
            for i, (s, (arrays, bad)) in enumerate(zip(self.shards, parts)):
                s.restore(arrays, bad, inserted_extra=extra if i == 0 else 0)
            rng = json.loads(header["rng"]) if "rng" in header else None
            if rng is not None and len(rng["shards"]) == len(self.shards):   # same layout: continue the streams
                self.rng.bit_generator.state = rng["pool"]
                for sh, state in zip(self.shards, rng["shards"]):
                    sh.rng.bit_generator.state = state
            self.cond.notify_all()
