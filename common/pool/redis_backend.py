"""The Redis backend of the pool: each shard a group of keys, each transition one Lua call.

``common/pool/lua/`` runs states.py's transitions per shard (lib.lua lists the keys),
``redis_client.RedisShards`` makes the calls and ``redis_records`` stores a record per slot. Records
never pass through Lua, which would copy them twice more: a draw or claim runs its script (after a
counts round for the uniform split when there are several shards), then one MGET per shard; a fill
MSETs the records into staging keys that its script renames onto the claim's slots, or deletes if the
claim is gone, in one pipeline. A call retried after its reply was lost keeps the slots of its first
attempt under the same lease or claim id: a lease releases them with its own, a claim's fill is
refused and its slots expire back to REFILL.
"""

from __future__ import annotations

import json
import math
import time
import uuid

import numpy as np
import torch

from common import metrics
from common.config import PoolConfig, mask_url
from common.pool.base import (STATE_NAMES, Claim, Draw, Pool, PoolError, PoolStats, PoolTimeout,
                              check_samples_per_insert, merge_groups, new_key, record_uses, shard_share, split_draw,
                              t_histogram)
from common.pool.codec import SlotArrays, batch_over, to_arrays, write_snapshot
from common.pool.groups import check_group
from common.pool.identity import check_identity
from common.pool.redis_client import RedisShards, queued
from common.pool.redis_records import RecordCodec
from common.pool.shard import AGE_SAMPLE, SHARD_COUNTERS
from common.pool.states import READY, REFILL, restored
from common.records import EMPTY_T, RecordBatch

LAYOUT_VERSION = "dkdm-pool-redis/5"     # 5: logvar in fp32 (codec.field_storage)
_RESTORE_CHUNK = 4 << 20  # bytes of records per restore call


def _split(raw) -> list[int]:
    return [int(m) for m in raw.split(b",")] if raw else []


class RedisPool(Pool):
    """B+ in one or more Redis servers (or a Redis Cluster); any number of processes share it by name."""

    def __init__(self, cfg: PoolConfig, num_slots: int, record_shape: tuple[int, int, int], has_logvar: bool,
                 has_label: bool, num_timesteps: int = 1000, seed: int = 0, t_buckets: int = 10):
        self._init_layout(cfg, num_slots, record_shape, has_logvar, has_label, num_timesteps, t_buckets)
        self._seed, self.k = seed, check_samples_per_insert(cfg.samples_per_insert)
        self.shards = len(self.ranges)
        # a stream of its own per process: clients built with one seed must not draw the same splits
        self.rng = np.random.default_rng([seed, uuid.uuid4().int & 0xFFFFFFFF])
        self.layout = (f"{LAYOUT_VERSION} slots={self.num_slots} shards={self.shards} "
                       f"shape={'x'.join(map(str, self.record_shape))} dtype={self.storage_dtype} "
                       f"logvar={int(self.has_logvar)} label={int(self.has_label)} T={self.num_timesteps}")
        self.codec = RecordCodec(self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
        # tensor bytes of a record, counted as shard.py counts them (the stored record adds its header)
        self.record_bytes = sum(a.nbytes for a in self._arrays(1).values())
        self._claims: dict[str, list[tuple[int, list[int]]]] = {}   # claim id -> [(shard, slots in order)]
        self.redis = RedisShards(cfg, self.ranges, self.layout, self.record_bytes, self.codec.record_bytes)
        self.local = self.redis.local               # retries and re-created shards, then this client's seconds
        self.local.update(draw_s=0.0, fill_s=0.0)
        self.redis.init(list(range(self.shards)), force=False)

    def __reduce__(self):
        # A pool travels to other processes (Ray actors, workers) as its arguments; the copy reconnects.
        return (RedisPool, (self.cfg, self.num_slots, self.record_shape, self.has_logvar, self.has_label,
                            self.num_timesteps, self._seed, self.t_buckets))

    @classmethod
    def attach(cls, cfg: PoolConfig) -> RedisPool:
        """A client of the existing pool ``cfg.name`` with the layout stored in its shard 0 (never creates one)."""
        probe = RedisShards(cfg, [], "", 0, 0)
        try:
            raw = probe.exec([(0, queued("hget", probe.key(0, "meta"), "layout"))])[0]
        finally:
            probe.close()
        if raw is None:
            raise PoolError(f"no redis pool named {cfg.name!r} on {mask_url(probe.urls[0])} (no key {probe.key(0, 'meta')})")
        fields = dict(f.split("=", 1) for f in raw.decode().split()[1:])
        return cls(cfg.model_copy(update={"shards": int(fields["shards"]), "storage_dtype": fields["dtype"]}),
                   num_slots=int(fields["slots"]), record_shape=tuple(int(v) for v in fields["shape"].split("x")),
                   has_logvar=fields["logvar"] == "1", has_label=fields["label"] == "1", num_timesteps=int(fields["T"]))

    # --- helpers ---------------------------------------------------------------------------------

    def _counts(self, group: str | None = None) -> list[dict]:
        """Every shard's counts (PoolShard.counts' keys; ``available``: READY without a group)."""
        rows = self.redis.run([(s, ["counts", group or ""]) for s in range(self.shards)])
        return [dict(zip((*STATE_NAMES, "inserted", "available"), map(int, r))) for r in rows]

    def _add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Blocked seconds and rejected fills go to shard 0's meta hash (pool-wide), call seconds to this client's."""
        meta = self.redis.key(0, "meta")
        if blocked_s > 0:
            metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, blocked_s, side=side)
            self.redis.exec([(0, queued("hincrbyfloat", meta, f"{side}_blocked_s", blocked_s))])
        if rejected:
            self.redis.exec([(0, queued("hincrby", meta, "fill_rejected", rejected))])
        self.local[f"{side}_s"] += call_s

    def _read(self, members: dict[int, list[int]]) -> tuple[RecordBatch, np.ndarray]:
        """{shard: slots} -> (their intact records, shard by shard in the given order; ok [n]: which were intact)."""
        # execute_command: a cluster pipeline refuses pipe.mget, not an MGET of keys in one hash slot
        key = self.redis.key
        replies = self.redis.exec([(s, queued("execute_command", "MGET", *(key(s, f"r:{m}") for m in members[s]))) for s in members])
        for s, r in zip(members, replies):
            if isinstance(r, Exception):
                raise self.redis.error(s, "reading records", r)
        return self.codec.decode([p for r in replies for p in r])

    # --- the contract ----------------------------------------------------------------------------

    def _lease(self, lease_id: str, need: int, group: str | None, first: bool) -> dict | None:
        """One attempt to lease ``need`` slots -> {shard: (slots, ages)}; None when it leased none (too few slots,
        or another client was faster)."""
        argv = ["draw", need, lease_id, self.cfg.lease_timeout_s, group or ""]
        if self.shards == 1:
            r = self.redis.run([(0, [*argv, self.min_ready, 1, int(first)])])[0]
            return {0: (_split(r[0]), _split(r[1]))} if r[0] else None
        asked = self._split_draw(need, group)
        if asked is None:
            return None
        res = self.redis.run([(s, ["draw", m, *argv[2:], 0, 0, int(first and j == 0)])
                              for j, (s, m) in enumerate(asked)])
        return {s: (_split(r[0]), _split(r[1])) for (s, _), r in zip(asked, res) if r[0]} or None

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        timeout_s, what = self._draw_args(b, timeout_s, group)
        t0, lease_id = time.perf_counter(), new_key()
        parts, slots, ages, blocked, deadline = [], [], [], 0.0, math.inf
        while (have := sum(len(s) for s in slots)) < b:
            try:
                got, waited = self._poll(lambda: self._lease(lease_id, b - have, group, first=have == 0), what, "draw",
                                         t0 + timeout_s - time.perf_counter(), group)
            except PoolTimeout:
                # hand back the part already leased, its uses refunded (ops.lua's release, refund '1')
                self.redis.run([(s, ["release", lease_id, 1]) for s in range(self.shards)])
                self._add_time("draw", blocked, 0.0)
                raise
            blocked += waited
            deadline = min(deadline, time.time() + self.cfg.lease_timeout_s)
            batch, ok = self._read({s: m for s, (m, _) in got.items()})
            members = np.array([m for s in got for m in got[s][0]], dtype=np.int64)
            shard_of = np.repeat(list(got), [len(got[s][0]) for s in got])
            parts.append(batch)
            slots.append(members[ok])
            ages += [a for s in got for a in got[s][1]][:AGE_SAMPLE]
            if not ok.all():            # damaged records go to REFILL; the loop tops the batch up
                bad = {int(s): members[~ok & (shard_of == s)].tolist() for s in np.unique(shard_of[~ok])}
                self.redis.run([(s, ["corrupt", lease_id, *bad[s]]) for s in bad])
                for s, slots_bad in bad.items():
                    metrics.inc(metrics.POOL_CORRUPT_TOTAL, len(slots_bad), shard=s)
        self._timed("draw", t0, blocked)
        for a in ages[:AGE_SAMPLE]:        # the slots are random: a sample suffices (as shard.py)
            metrics.observe(metrics.POOL_RECORD_AGE_STEPS, a)
        batch = parts[0] if len(parts) == 1 else RecordBatch.cat(parts)
        return Draw(lease_id=lease_id, slots=torch.from_numpy(np.concatenate(slots)), batch=batch, deadline=deadline)

    def release(self, lease_id: str) -> None:
        self.redis.run([(s, ["release", lease_id, 0]) for s in range(self.shards)])     # refund '0': spend a use

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        """Claim up to n REFILL slots, spread uniformly over the shards' REFILL slots; previous records returned."""
        timeout_s, claim_id = self._claim_args(n, timeout_s), new_key()
        parts, blocked = self._poll(lambda: self._claim(claim_id, n), "a REFILL slot", "fill", timeout_s)
        self._add_time("fill", blocked, 0.0)
        self._claims[claim_id] = parts
        return Claim(claim_id=claim_id, slots=torch.tensor([m for _, members in parts for m in members], dtype=torch.int64),
                     batch=self._previous(parts), deadline=time.time() + self.cfg.claim_timeout_s)

    def _claim(self, claim_id: str, n: int) -> list[tuple[int, list[int]]] | None:
        """One attempt to claim up to n slots -> [(shard, slots in order)]; None when it claimed none."""
        split = {0: n}
        if self.shards > 1:
            refill = [c["REFILL"] for c in self._counts()]
            split = dict(enumerate(split_draw(refill, min(n, sum(refill)), self.rng).tolist()))
        split = {s: k for s, k in split.items() if k}
        res = self.redis.run([(s, ["claim", k, claim_id, self.cfg.claim_timeout_s]) for s, k in split.items()])
        return [(s, _split(r[0])) for s, r in zip(split, res) if r[0]] or None

    def _previous(self, parts: list[tuple[int, list[int]]]) -> RecordBatch:
        """The records claimed slots hold, in claim order; an empty slot (or a damaged record, which the
        teacher then starts anew) comes as zeros with t = EMPTY_T."""
        prev, ok = self._read(dict(parts))
        if ok.all():
            return prev
        out = self._arrays(len(ok), zeros=True)      # zeros: pages the kernel maps only when written
        out["t"][:] = EMPTY_T
        for name, v in to_arrays(prev, self.storage_dtype).items():
            out[name][ok] = v
        return batch_over(out, self.storage_dtype)

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        t0 = time.perf_counter()
        parts = self._claims.get(claim_id)
        if parts is None:      # claimed by another client object: its slots per shard, in order, from the shards
            key = self.redis.key
            raw = self.redis.exec([(s, queued("hget", key(s, "claims"), claim_id)) for s in range(self.shards)])
            parts = [(s, _split(r)) for s, r in enumerate(raw) if r and not isinstance(r, Exception)]
        n = sum(len(m) for _, m in parts)
        if n == 0:
            self._add_time("fill", 0.0, 0.0, rejected=1)
            return False
        self._check_fill(batch, n)
        self._claims.pop(claim_id, None)
        rows, t, uses = self.codec.encode(batch), batch.t.tolist(), record_uses(self.k, n, self.rng).tolist()
        calls, i = [], 0
        for j, (s, members) in enumerate(parts):      # one argument per list: redis-py encodes each argument
            staged, k = [], len(members)
            for m, row in zip(members, rows[i:i + k]):
                staged += [self.redis.key(s, f"f:{claim_id}:{m}"), row.data]
            argv = ["fill", claim_id, int(j == 0), *(",".join(map(str, v)) for v in (members, t[i:i + k], uses[i:i + k]))]
            calls.append((s, argv, [queued("execute_command", "MSET", *staged)]))
            i += k
        accepted = sum(int(r) for r in self.redis.run(calls))
        self._timed("fill", t0)
        if accepted:
            for s, members in parts:
                metrics.inc(metrics.POOL_RECORDS_PRODUCED_TOTAL, len(members), shard=s)
        return accepted == n

    def stats(self) -> PoolStats:
        per, blocked = [], {"draw": 0.0, "fill": 0.0}
        for s, (counts, flat, tvals, gstats) in enumerate(self.redis.run([(s, ["stats"]) for s in range(self.shards)])):
            meta = {k.decode(): v for k, v in zip(flat[::2], flat[1::2])}
            t = np.array([int(v) for v in tvals if v is not None], dtype=np.int64)
            per.append({**{k: int(meta.get(k, 0)) for k in SHARD_COUNTERS},
                        "counts": dict(zip(STATE_NAMES, map(int, counts))), "groups": self._group_rows(gstats),
                        "t_histogram": t_histogram(t, self.num_timesteps, self.t_buckets)})
            for side in blocked:
                blocked[side] += float(meta.get(f"{side}_blocked_s", 0.0))
            for name, v in per[-1]["counts"].items():
                metrics.set(metrics.POOL_SLOTS, v, shard=s, state=name)
        per[0].update(blocked=blocked, seconds={"draw": self.local["draw_s"], "fill": self.local["fill_s"]})
        st = PoolStats.merged(self, per)
        st.extra.update(backend="redis", urls=[mask_url(u) for u in self.redis.urls], **self.local)
        return st

    # --- consumer groups (the rules of groups.py, run by lua/groups.lua) --------------------------------

    @staticmethod
    def _group_rows(rows: list) -> dict[str, dict]:
        out = {}
        for name, blob, pending, leased, lag, idle in rows:
            g = json.loads(blob)
            out[name.decode()] = {"policy": g["policy"], "max_lag": g.get("max_lag"), "pending": int(pending),
                                  "leased": int(leased), "lag": int(lag), "consumed": int(g["consumed"]),
                                  "skipped": int(g["skipped"]), "idle_s": max(0.0, float(idle))}
        return out

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        check_group(group, policy, max_lag, self.k)
        lags = [shard_share(max_lag, s, self.shards) for s in range(self.shards)]
        self.redis.run([(s, ["attach", group, policy, "" if lag is None else lag, self.cfg.lease_timeout_s])
                        for s, lag in enumerate(lags)])

    def detach_group(self, group: str) -> None:
        self.redis.run([(s, ["detach", group]) for s in range(self.shards)])

    def groups(self) -> dict[str, dict]:
        return merge_groups([self._group_rows(r) for r in self.redis.run([(s, ["groups"]) for s in range(self.shards)])])

    # --- identity (issue 8): a JSON field of shard 0's meta hash, set once ------------------------------

    def bind_identity(self, identity: dict) -> dict:
        meta, blob = self.redis.key(0, "meta"), json.dumps(identity, sort_keys=True)
        _, held = self.redis.exec([(0, queued("hsetnx", meta, "identity", blob)), (0, queued("hget", meta, "identity"))])
        held = json.loads(held) if held is not None else identity
        check_identity(self.cfg.name, held, identity)
        return held

    def identity(self) -> dict | None:
        held = self.redis.exec([(0, queued("hget", self.redis.key(0, "meta"), "identity"))])[0]
        return None if held is None else json.loads(held)

    # --- snapshot and restore ---------------------------------------------------------------------------

    def _dump_shard(self, s: int) -> SlotArrays:
        """One shard as SlotArrays, copied by one atomic script call (a snapshot stops one shard at a time)."""
        ready, leased, held, uses, born, recs = self.redis.run([(s, ["dump"])])[0]
        lo, hi = self.ranges[s]
        a = self._arrays(hi - lo, zeros=True)
        a["t"][:] = EMPTY_T
        state = np.full(hi - lo, REFILL, dtype=np.uint8)        # LEASED written as READY, FILLING as REFILL
        state[[int(m) - lo for m in ready + leased]] = READY
        at = np.array([int(m) - lo for m in held], dtype=np.int64)
        out_uses, out_born = np.zeros(hi - lo, dtype=np.int32), np.zeros(hi - lo, dtype=np.int64)
        out_born[at] = [int(v or 0) for v in born]
        batch, ok = self.codec.decode(recs)
        for name, v in to_arrays(batch, self.storage_dtype).items():
            a[name][at[ok]] = v
        out_uses[at[ok]] = [int(u or 0) for u, g in zip(uses, ok) if g]
        state[(state == READY) & (a["t"] == EMPTY_T)] = REFILL     # READY without an intact record: empty
        out_uses[state == REFILL] = 0
        return SlotArrays(lo=lo, state=state, uses=out_uses, produced_at=out_born,
                          **{n: a.get(n) for n in ("t", "x_t", "eps", "logvar", "y")})

    def snapshot(self, path: str) -> None:
        """Write the pool to ``path`` in the snapshot format every backend reads, one shard at a time."""
        write_snapshot(path, self._snapshot_header(), (self._dump_shard(s) for s in range(self.shards)))

    def restore(self, path: str) -> None:
        """Replace the pool's contents with a snapshot (slot count and record layout must match; the shard
        count may differ) as states.restored says."""
        _, parts = self._load_snapshot(path)
        chunk = max(1, _RESTORE_CHUNK // self.codec.record_bytes)
        for s, (a, bad, extra) in enumerate(parts):
            state, bad = restored(a.state, a.t, a.uses, bad)
            keep = a.t != EMPTY_T         # restored emptied the damaged slots
            ready = (state == READY) & keep
            self.redis.run([(s, ["restore_begin", self.layout, a.lo, a.lo + len(a), self.record_bytes, extra])])
            for c0 in range(0, len(a), chunk):
                c1 = min(len(a), c0 + chunk)
                rows = self.codec.encode(batch_over({name: getattr(a, name)[c0:c1] for name in ("x_t", "t", "eps", "logvar", "y")
                                                     if getattr(a, name) is not None}, self.storage_dtype))
                pre, argv = [], ["restore_add", int(bad[c0:c1].sum())]
                for i in range(c0, c1):
                    m = a.lo + i
                    if keep[i]:
                        pre.append(queued("set", self.redis.key(s, f"r:{m}"), rows[i - c0].data))
                    argv += [m, "R" if ready[i] else "F", int(a.t[i]) if keep[i] else "", int(a.uses[i]), int(a.produced_at[i])]
                self.redis.run([(s, argv, pre)])
            if bad.any():
                metrics.inc(metrics.POOL_CORRUPT_TOTAL, int(bad.sum()), shard=s)
        self._claims.clear()

    # --- maintenance --------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Re-create every shard empty: all slots REFILL (teachers rebuild the pool); counters start at zero."""
        self.redis.init(list(range(self.shards)), force=True)
        self._claims.clear()

    def destroy(self) -> None:
        """Delete every key of this pool (benchmarks and tests clean up with it)."""
        self.redis.destroy()

    def close(self) -> None:
        if hasattr(self, "redis"):
            self.redis.close()
