"""RayPool: the pool as N shard actors (PoolShard behind ``ray.remote`` here, at the edge).

The client object (RayPool) holds only actor handles and the layout, so it is
picklable: pass it to Ray tasks, actors or Train workers, or attach from another
driver with ``RayPool.attach(name)`` (actors are named ``dkdm_pool.<name>.<i>``;
``detached=True`` keeps them alive after the creating driver exits; named actors are
found within one Ray namespace, so drivers that share a pool pass the same
``ray.init(namespace=...)``). Without ``detached`` the actors die with the last
handle of the creating client (Ray's ownership).

Shared memory (``pool.shared_memory``, the default): each shard's slots live in a
memfd the actor owns (memory.py); a client on the actor's node maps it at its
first call and runs draws, releases, claims and fills itself, as the same
PoolShard code under the memory's lock: no RPC, records copied once. Clients on
other nodes (and consumer groups, whose bookkeeping lives in the actor) use RPCs,
where records cross the boundary as a few numpy arrays per call (Ray serializes
numpy with zero-copy pickle-5 buffers; objects over 100 KiB go through the
object store instead of being inlined), never one object per record.

A draw asks every shard for its counts, splits b over the shards
hypergeometrically (base.split_draw), leases from the shards in parallel and
concatenates; a shard that returns fewer than asked (another client got there
first) has its remainder re-split over fresh counts. Blocking is client-side
polling with exponential backoff (1 ms to 50 ms) until the limiter allows or the
timeout passes. A dead shard actor surfaces as PoolError naming the shard.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import warnings
from typing import NoReturn

import numpy as np
import ray
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
from common.pool.codec import to_numpy, write_snapshot
from common.pool.local import load_snapshot_for, merge_stats, snapshot_header, surplus_inserted
from common.pool.memory import FLAG_GROUPS, SECONDS, ShardMemory, tune_malloc
from common.pool.shard import (AGE_SAMPLE, FILLING, LEASED, READY, REFILL, SHARD_COUNTERS, OwnerOnly, PoolShard, batch_over,
                               check_batch, new_arrays, new_batch, zero_batch)
from common.records import EMPTY_T, RecordBatch

logger = logging.getLogger(__name__)

SHARD_NUM_CPUS = 0.05
_SIDX = {k: i for i, k in enumerate(SECONDS)}


def _to_wire(batch: RecordBatch, storage: str) -> dict:
    return {
        "x_t": to_numpy(batch.x_t, storage), "eps": to_numpy(batch.eps, storage), "t": batch.t.numpy(),
        "logvar": None if batch.logvar is None else to_numpy(batch.logvar, storage),
        "y": None if batch.y is None else batch.y.numpy(),
    }


def _view_wire(w: dict, storage: str) -> RecordBatch:
    """A fill's wire dict as tensors over the received (read-only, zero-copy) buffers, for reading only:
    PoolShard.fill copies them into its slots, so a private copy first would only double the traffic."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")

        def view(a, floating=True):
            if a is None:
                return None
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.view(torch.bfloat16) if floating and storage == "bf16" else t

        return RecordBatch(x_t=view(w["x_t"]), t=view(np.asarray(w["t"], dtype=np.int64), False), eps=view(w["eps"]),
                           logvar=view(w["logvar"]), y=view(None if w["y"] is None else np.asarray(w["y"], dtype=np.int64), False))


class _AllLocked:
    """Hold the locks of every shard, taken in shard order (so two clients never deadlock); OwnerOnly
    (nothing held) when consumer groups are attached to one of them."""

    __slots__ = ("views", "held")

    def __init__(self, views: list[PoolShard]):
        self.views, self.held = views, 0

    def __enter__(self):
        try:
            for v in self.views:
                v.mem.lock.__enter__()
                self.held += 1
            if any(v.mem.flags & FLAG_GROUPS for v in self.views):
                raise OwnerOnly("consumer groups attached")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        views, self.held = self.views[:self.held], 0
        for v in reversed(views):
            v.mem.lock.__exit__()


def fill_margin(claim_timeout_s: float) -> float:
    """A fill copies its records outside the lock only while its claim has this long left: nobody
    can take the slots before the deadline, so only a process stalled longer than this could write
    into slots that were claimed again (the Redis backend's fast fill keeps the same margin)."""
    return max(1.0, 0.1 * claim_timeout_s)


def _copy_rows(out: RecordBatch, off: int, rec: RecordBatch) -> None:
    """Write ``rec`` into rows [off, off + len(rec)) of ``out``."""
    n = len(rec)
    for name in ("x_t", "eps", "logvar", "t", "y"):
        dst = getattr(out, name)
        if dst is not None:
            dst[off:off + n].copy_(getattr(rec, name))


class ShardServer:
    """A PoolShard speaking numpy over RPC, plus the pool-wide bits kept on shard 0 (layout, blocked time).

    With ``pool.shared_memory`` the shard's slots live in shared memory (memory.py: a memfd) that
    clients on this node map (``where``); the actor marks it closed on ``shutdown``/reset (the pages
    go with the last process that maps them) and refreshes the slot gauges every second, since
    clients' transitions do not pass through it.
    """

    def __init__(self, meta: dict, **shard_kw):
        self.shard = None
        self.shm_note = None
        self.reset(meta, **shard_kw)
        self._gauges = threading.Thread(target=self._publish_loop, daemon=True)
        self._gauges.start()

    def reset(self, meta: dict, **shard_kw) -> None:
        """Become a fresh, empty shard with a new layout (RayPool(reuse_actors=True) keeps the process)."""
        self.shutdown()
        self.meta_ = meta
        mem = None
        if meta["cfg"].get("shared_memory", True):
            try:
                mem = ShardMemory.create(
                    f"{meta['cfg']['name']}-{shard_kw['shard_id']}", shard_kw["n"], shard_kw["record_shape"],
                    shard_kw.get("storage_dtype", "fp32"), shard_kw.get("has_logvar", False),
                    shard_kw.get("has_label", False), len(SHARD_COUNTERS))
            except PoolError as err:       # said once, in the actor's log and by where(): clients use RPCs
                self.shm_note = str(err)
                logger.warning("pool shard %s: %s; clients will use RPCs", shard_kw["shard_id"], err)
        self.shard = PoolShard(**shard_kw, memory=mem)
        self.identity_: dict | None = None

    def _publish_loop(self) -> None:
        while True:
            time.sleep(1.0)
            shard = self.shard
            if shard is not None and shard.mem.path is not None:
                shard._publish()

    def where(self) -> dict:
        """How a client reaches the slots: {"node_id", "path", "uid"} (path None: RPCs only; see ``note``)."""
        mem = self.shard.mem
        return {"node_id": ray.get_runtime_context().get_node_id(), "path": mem.path,
                "uid": mem.uid if mem.path else None, "note": self.shm_note}

    def shutdown(self) -> None:
        """Close the shared slots: clients that still map them see the shard as closed."""
        if self.shard is not None:
            self.shard.mem.close()

    def meta(self) -> dict:
        return self.meta_

    def bind_identity(self, identity: dict) -> dict:
        """Store the pool's identity if it has none (shard 0 keeps it) -> the identity held."""
        if self.identity_ is None:
            self.identity_ = identity
        return self.identity_

    def get_identity(self) -> dict | None:
        return self.identity_

    def counts(self, group: str | None = None) -> dict:
        return self.shard.counts(group=group)

    def draw(self, m: int, lease_id: str, group: str | None = None, count_call: bool = True) -> tuple[np.ndarray, dict, dict]:
        slots, batch = self.shard.draw(m, lease_id, group=group, count_call=count_call)
        return slots, _to_wire(batch, self.shard.storage_dtype), self.shard.counts(group=group)

    def attach_group(self, group: str, policy: str, max_lag: int | None) -> None:
        self.shard.attach_group(group, policy, max_lag)

    def detach_group(self, group: str) -> bool:
        return self.shard.detach_group(group)

    def group_stats(self) -> dict:
        self.shard.expire()
        return self.shard.group_stats()

    def release(self, lease_id: str) -> int:
        return self.shard.release(lease_id)

    def claim(self, m: int, claim_id: str) -> tuple[np.ndarray, dict]:
        slots, batch = self.shard.claim(m, claim_id)
        return slots, _to_wire(batch, self.shard.storage_dtype)

    def claim_size(self, claim_id: str) -> int:
        return self.shard.claim_size(claim_id)

    def fill(self, claim_id: str, w: dict, count_call: bool = True) -> bool:
        return self.shard.fill(claim_id, _view_wire(w, self.shard.storage_dtype), count_call=count_call)

    def add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        self.shard.add_time(side, blocked_s, call_s, rejected)

    def stats(self) -> dict:
        blocked, seconds, rejected = self.shard.time_totals()
        return {**self.shard.stats(), "blocked": blocked, "seconds": seconds, "extra": {"fill_rejected": rejected}}

    def snapshot(self):
        return self.shard.snapshot()

    def restore(self, arrays, bad, inserted_extra: int = 0) -> None:
        self.shard.restore(arrays, bad, inserted_extra)

    def ping(self) -> int:
        return os.getpid()


def actor_name(name: str, i: int) -> str:
    return f"dkdm_pool.{name}.{i}"


# Detached (persistent) pools live in this Ray namespace, so any driver on the cluster finds them
# whatever its own namespace (``dkdm pool create`` makes them; runs attach by pool.name).
POOL_NAMESPACE = "dkdm_pools"


def _find_actor(name: str, i: int):
    """The shard actor i of pool ``name``: in this driver's namespace, else among the persistent pools."""
    for ns in (None, POOL_NAMESPACE):
        try:
            return ray.get_actor(actor_name(name, i), namespace=ns)
        except ValueError:
            continue
    return None


class RayPool(Pool):
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
        detached: bool = False,
        reuse_actors: bool = False,
        shard_num_cpus: float = SHARD_NUM_CPUS,
    ):
        """Start ``cfg.shards`` shard actors named after ``cfg.name`` (Ray is initialized if it is not).

        ``reuse_actors``: running shard actors of the same name are reset to empty shards of this
        layout instead of refusing (saves the process start; the test suite uses it).
        """
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        ranges = shard_ranges(int(num_slots), cfg.shards)
        meta = {
            "cfg": cfg.model_dump(), "num_slots": int(num_slots), "record_shape": list(record_shape),
            "has_logvar": has_logvar, "has_label": has_label, "t_buckets": t_buckets, "seed": seed,
            "num_timesteps": num_timesteps,
        }
        actor_cls = ray.remote(ShardServer)
        handles, refs = [], []
        for i, (lo, hi) in enumerate(ranges):
            shard_kw = dict(
                shard_id=i, lo=lo, n=hi - lo, record_shape=tuple(record_shape), storage_dtype=cfg.storage_dtype,
                has_logvar=has_logvar, has_label=has_label, lease_timeout_s=cfg.lease_timeout_s,
                claim_timeout_s=cfg.claim_timeout_s, samples_per_insert=cfg.samples_per_insert,
                num_timesteps=num_timesteps, t_buckets=t_buckets, seed=seed)
            h = _find_actor(cfg.name, i)
            if h is not None and not reuse_actors:
                raise PoolError(f"a Ray pool named {cfg.name!r} already exists; attach with RayPool.attach({cfg.name!r}) or pick another pool.name")
            if h is not None:
                refs.append(h.reset.remote(meta, **shard_kw))
            else:
                opts = {"name": actor_name(cfg.name, i), "num_cpus": shard_num_cpus, "max_restarts": 0}
                if detached:
                    opts["lifetime"] = "detached"
                    opts["namespace"] = POOL_NAMESPACE
                h = actor_cls.options(**opts).remote(meta, **shard_kw)
            handles.append(h)
        self._setup(meta, handles, owner=not reuse_actors)
        self.rng = np.random.default_rng(seed + 7919)
        self._get(refs + [h.ping.remote() for h in handles], "start the shard actors")   # fail here, not at first use

    def _setup(self, meta: dict, handles: list, owner: bool) -> None:
        self.meta = meta
        self.cfg = PoolConfig(**meta["cfg"])
        self.num_slots = meta["num_slots"]
        self.record_shape = tuple(meta["record_shape"])
        self.storage_dtype = self.cfg.storage_dtype
        self.has_logvar, self.has_label, self.t_buckets = meta["has_logvar"], meta["has_label"], meta["t_buckets"]
        self.ranges = shard_ranges(self.num_slots, self.cfg.shards)
        self.handles = handles
        self.owner = owner
        self.min_ready = min_ready_slots(self.cfg.min_ready_fraction, self.num_slots)
        self.rng = np.random.default_rng()
        self.leases: dict[str, list[int]] = {}
        # claim id -> {"layout": [(shard, count)] in slot order, and for claims made on the mapped
        # path "parts": [(shard, local slots)], "deadline", "empty" (every slot was empty), "gen"}
        self.claims: dict[str, dict] = {}
        self._views: list[PoolShard | None] | None = None     # mapped shards, probed at first use
        self._whole: list[PoolShard] | None = None             # _views when every shard is mapped here
        self._pending = [0.0] * len(SECONDS)       # call seconds not yet added to shard 0 (_add_time; Python floats:
                                                   # no numpy call per draw)
        tune_malloc()        # each draw's batch reuses freed pages instead of faulting them in (memory.tune_malloc)

    # --- the shared-memory fast path --------------------------------------------------------

    def _shard_views(self) -> list[PoolShard | None]:
        """Per shard: a view of its slots when this process is on the shard actor's node, else None (RPCs)."""
        if self._views is None:
            views: list[PoolShard | None] = [None] * len(self.handles)
            if self.cfg.shared_memory:
                node = ray.get_runtime_context().get_node_id()
                for i, info in enumerate(self._get([h.where.remote() for h in self.handles], "locate the shards")):
                    if info["path"] is None:
                        if info.get("note"):
                            warnings.warn(f"pool {self.cfg.name!r} shard {i} uses RPCs: {info['note']}", stacklevel=3)
                        continue
                    if info["node_id"] != node or not os.path.exists(info["path"]):
                        continue
                    lo, hi = self.ranges[i]
                    mem = ShardMemory.attach(info["path"], hi - lo, self.record_shape, self.storage_dtype, self.has_logvar,
                                             self.has_label, len(SHARD_COUNTERS), info["uid"])
                    views[i] = PoolShard(
                        shard_id=i, lo=lo, n=hi - lo, record_shape=self.record_shape, storage_dtype=self.storage_dtype,
                        has_logvar=self.has_logvar, has_label=self.has_label, lease_timeout_s=self.cfg.lease_timeout_s,
                        claim_timeout_s=self.cfg.claim_timeout_s, samples_per_insert=self.cfg.samples_per_insert,
                        num_timesteps=self.meta["num_timesteps"], t_buckets=self.t_buckets,
                        seed=int.from_bytes(os.urandom(4), "little"), memory=mem, view=True)
            self._views = views
            self._whole = views if all(v is not None for v in views) else None
        return self._views

    def _view(self, i: int) -> PoolShard | None:
        """Shard i's view, or None; PoolError when its actor is gone (a dead shard, as over RPC)."""
        v = self._shard_views()[i]
        if v is not None and not v.mem.owner_alive():
            self._dead(i)
        return v

    def _dead(self, i: int) -> NoReturn:
        """PoolError: shard i's actor is gone (its shared slots are closed or its process died)."""
        raise PoolError(f"pool {self.cfg.name!r}: a shard actor died or its pool was dropped (shard {i}'s shared slots are closed)")

    def _local(self, i: int, method: str, *args, **kw):
        """Run a shard transition in this process -> (True, result), or (False, None) when it needs an RPC."""
        v = self._view(i)
        if v is None:
            return False, None
        try:
            return True, getattr(v, method)(*args, **kw)
        except OwnerOnly:         # consumer groups attached: their bookkeeping lives in the actor
            return False, None

    def _mapped(self) -> list[PoolShard] | None:
        """Every shard's view when all of them are mapped here (the whole-pool fast path), else None."""
        if self._views is None:
            self._shard_views()
        views = self._whole
        if views is not None:
            for i, v in enumerate(views):
                if not v.mem.owner_alive():
                    self._dead(i)
        return views

    def _add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Add a call's seconds to the pool-wide totals on shard 0. A mapped client keeps them until
        its next call that holds shard 0's lock anyway (or stats()), instead of locking it once more."""
        if self._whole is not None:
            p = self._pending
            p[_SIDX[f"{side}_blocked"]] += blocked_s
            p[_SIDX[side]] += call_s
            p[_SIDX["fill_rejected"]] += rejected
            if blocked_s > 0:
                metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, blocked_s, side=side)
            return
        done, _ = self._local(0, "add_time", side, blocked_s, call_s, rejected)
        if not done:
            self.handles[0].add_time.remote(side, blocked_s, call_s, rejected)

    def _flush_time(self, shard0: PoolShard) -> None:
        """Add the pending seconds to shard 0's totals (the caller holds its lock)."""
        if any(self._pending):
            shard0.seconds += self._pending
            self._pending = [0.0] * len(SECONDS)

    def flush(self) -> None:
        """Hand this client's pending call seconds to shard 0 (stats() and close() do it too)."""
        if self._views is not None and self._views[0] is not None and any(self._pending):
            with contextlib.suppress(PoolError):
                v = self._view(0)
                with v.mem.lock:
                    self._flush_time(v)

    # --- the whole pool mapped: one pass under every shard's lock ------------------------------

    def _blocked_until(self, attempt, what: str, side: str, timeout_s: float | None):
        """Call ``attempt()`` until it returns something other than None, sleeping 1 ms doubling to 50 ms
        between tries -> (its result, seconds blocked); PoolTimeout (one line) after ``timeout_s``."""
        timeout_s = self.cfg.block_timeout_s if timeout_s is None else timeout_s
        start, sleep = None, 0.001
        while True:
            got = attempt()
            if got is not None:
                return got, 0.0 if start is None else time.monotonic() - start
            start = time.monotonic() if start is None else start
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                waited = time.monotonic() - start
                self._add_time(side, waited, waited)
                per = self._counts()
                counts = {n: sum(c[n] for c in per) for n in STATE_NAMES}
                inserted = sum(c["inserted"] for c in per)
                raise PoolTimeout(timeout_message(what, timeout_s, counts, f", inserted={inserted}, min_ready={self.min_ready}"))
            time.sleep(min(sleep, left))
            sleep = min(sleep * 2, 0.05)

    def _draw_mapped(self, views: list[PoolShard], b: int, lease_id: str, dst: dict[str, np.ndarray]):
        """Lease b READY slots over every shard in one pass under their locks (counts, the split and
        the leases together: no race between them), then copy the records into ``dst`` (new_arrays)
        with no lock held -> [(shard, local slots)] in row order, or None while the pool is cold or short."""
        now = time.time()
        with _AllLocked(views):
            ready = [v.ready_slots(READY, now) for v in views]
            starts = [0, *itertools.accumulate(len(r) for r in ready)]
            if starts[-1] < b or sum(v.c["inserted"] for v in views) < self.min_ready:
                return None
            # b of the READY slots of every shard taken together, uniformly without replacement (as the
            # hypergeometric split over shards followed by a uniform draw in each, in one call; sorted,
            # so the order choice would shuffle them into is not needed)
            pos = np.sort(self.rng.choice(starts[-1], size=b, replace=False, shuffle=False))
            bounds = np.searchsorted(pos, starts).tolist()        # pos[bounds[i]:bounds[i + 1]] lie in shard i
            leased = [(i, ready[i][pos[lo:hi] - starts[i]]) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo]
            sample = -(-AGE_SAMPLE // len(leased))
            for j, (i, idx) in enumerate(leased):
                views[i].lease_slots(idx, lease_id, now, sample, count_call=j == 0)     # one call, counted once
            self._flush_time(views[0])
        off = 0
        for i, idx in leased:
            views[i].copy_out(idx, dst, off)
            off += len(idx)
        if time.time() >= now + self.cfg.lease_timeout_s:
            for i, idx in leased:
                views[i]._check_held(idx, lease_id, LEASED)
        return leased

    def _claim_mapped(self, views: list[PoolShard], n: int, claim_id: str):
        """Claim up to n REFILL slots, shard by shard in random order (as the RPC path) until n are
        claimed -> (Claim, its fill info), or None while no slot is in REFILL."""
        now = time.time()
        parts, want, empty, gen = [], n, True, {}
        order = self.rng.permutation(len(views)).tolist() if len(views) > 1 else [0]
        for i in order:    # shard by shard in random order, each under its own lock
            try:
                with _AllLocked([views[i]]):
                    refill = views[i].ready_slots(REFILL, now)
                    m = min(want, len(refill))
                    if m:
                        idx = views[i]._claim_slots(m, claim_id, now, refill=refill)[0]
                        parts.append((i, idx))
                        empty &= bool((views[i].t[idx] == EMPTY_T).all())
                        gen[i] = views[i].mem.generation
                        want -= m
                    if i == 0:
                        self._flush_time(views[0])
            except OwnerOnly:          # a consumer group attached meanwhile: keep what was claimed
                if not parts:
                    raise
                break
            if not want:
                break
        if not parts:
            return None
        deadline = now + self.cfg.claim_timeout_s
        total = sum(len(idx) for _, idx in parts)
        if empty:              # the warm-up: nothing to hand over but t
            batch = zero_batch(total, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
        else:
            dst, off = self._arrays(total), 0
            batch = batch_over(dst, self.storage_dtype)
            for i, idx in parts:
                views[i].copy_out(idx, dst, off)
                off += len(idx)
            if time.time() >= deadline:
                for i, idx in parts:
                    views[i]._check_held(idx, claim_id, FILLING)
        slots = torch.from_numpy(np.concatenate([idx + views[i].lo for i, idx in parts]))
        info = {"layout": [(i, len(idx)) for i, idx in parts], "parts": parts, "deadline": deadline,
                "empty": empty, "gen": gen}
        return Claim(claim_id=claim_id, slots=slots, batch=batch, deadline=deadline), info

    def _fill_mapped(self, views: list[PoolShard], claim_id: str, info: dict, batch: RecordBatch) -> bool:
        """Fill a claim made on the mapped path: the records are copied into the slots with no lock
        held while the claim has fill_margin() left (fill_begin marks the previous records gone
        first, unless every slot was empty), then one locked commit per shard; under the lock otherwise."""
        margin = fill_margin(self.cfg.claim_timeout_s)
        ok, off = True, 0
        whole = len(info["parts"]) == 1
        for i, idx in info["parts"]:
            v, part, first = views[i], batch if whole else batch.index(slice(off, off + len(idx))), off == 0   # counted once
            off += len(idx)
            now = time.time()
            if now >= info["deadline"] - margin:
                gen = None
            elif info["empty"]:                   # nothing to mark gone: the claim's generation
                gen = info["gen"][i]
            else:
                gen = v.fill_begin(claim_id, idx, now, margin)
            if gen is None:                       # too close to the deadline, or the claim is gone
                ok &= v.fill(claim_id, part, count_call=first)
                continue
            v.write_records(idx, part)
            ok &= v.fill_commit(claim_id, idx, part.t, gen, count_call=first)
        return ok

    @classmethod
    def attach(cls, name: str) -> "RayPool":
        """A client of the running pool named ``name`` (Ray must be initialized in this process)."""
        h0 = _find_actor(name, 0)
        if h0 is None:
            raise PoolError(f"no Ray pool named {name!r} is running (looked for actor {actor_name(name, 0)!r})")
        self = cls.__new__(cls)
        meta = self._get(h0.meta.remote(), f"read the layout of pool {name!r}")
        shards = PoolConfig(**meta["cfg"]).shards
        rest = [_find_actor(name, i) for i in range(1, shards)]
        if any(h is None for h in rest):
            raise PoolError(f"Ray pool {name!r} is incomplete: {sum(h is None for h in rest)} of its {shards} shard actors are gone")
        self._setup(meta, [h0] + rest, owner=False)
        return self

    def drop(self) -> None:
        """Kill every shard actor of this pool (detached ones included): the pool is gone for every client."""
        self._shutdown_actors()
        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.owner = False

    def __getstate__(self):
        return {"meta": self.meta, "handles": self.handles}

    def __setstate__(self, state):
        self._setup(state["meta"], state["handles"], owner=False)

    def _shutdown_actors(self) -> None:
        """Ask every live shard actor to mark its shared slots closed (before it is killed), so that
        clients still mapping them fail at once instead of working on memory nobody serves."""
        refs = []
        for h in self.handles:
            try:
                refs.append(h.shutdown.remote())
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception:  # noqa: BLE001 - a dead actor: its memory went with it
            pass

    def _get(self, refs, what: str):
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            name = getattr(self, "cfg", None) and self.cfg.name
            raise PoolError(f"pool {name!r}: a shard actor died or is unreachable while trying to {what} ({type(err).__name__})") from None
        except ray.exceptions.RayTaskError as err:      # a PoolError raised in the shard: re-raise its one line
            cause = err.cause if isinstance(getattr(err, "cause", None), PoolError) else None
            if cause is None:
                raise
            raise type(cause)(str(cause)) from None

    def _counts(self, group: str | None = None) -> list[dict]:
        out: list = [None] * len(self.handles)
        refs = []
        for i, h in enumerate(self.handles):
            done, c = self._local(i, "counts") if group is None else (False, None)
            if done:
                out[i] = c
            else:
                refs.append((i, h.counts.remote(group)))
        if refs:
            for (i, _), c in zip(refs, self._get([r for _, r in refs], "read the shard counts")):
                out[i] = c
        return out

    def _poll(self, ok, what: str, side: str, timeout_s: float | None, group: str | None = None) -> tuple[list[dict], float]:
        """Poll counts with backoff until ok(per-shard counts) -> (counts, seconds blocked); PoolTimeout after timeout."""
        def attempt():
            per = self._counts(group)
            return per if ok(per) else None

        return self._blocked_until(attempt, what, side, timeout_s)

    # --- the contract ---------------------------------------------------------------------

    def _empty(self, n: int, zeros: bool = False) -> RecordBatch:
        return new_batch(n, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label, zeros)

    def _arrays(self, n: int) -> dict[str, np.ndarray]:
        return new_arrays(n, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)

    def _take(self, asked: list[tuple[int, int]], method: str, key: str, out: RecordBatch, off: int, *extra,
              local: bool = True, count_call: bool = False):
        """Draw or claim ``m`` slots from each shard (mapped ones here unless ``local`` is False, the others
        by parallel RPCs), their records written into ``out`` from row ``off`` on (one copy per byte)
        -> (global slot arrays in row order, the next free row, fresh counts of shards that fell short).
        ``count_call`` (draws): the first shard asked counts the draw call (a call is counted once)."""
        slots, counts, refs = [], {}, []
        for k, (i, m) in enumerate(asked):
            kw = {"count_call": count_call and k == 0} if method == "draw" else {}
            done, res = self._local(i, method, m, key, out=out.index(slice(off, off + m)), **kw) if local else (False, None)
            if not done:
                refs.append((i, getattr(self.handles[i], method).remote(m, key, *extra, **kw)))
                continue
            got, rec = res
            if len(got) and len(got) != m:        # fewer than asked: they came in their own storage
                _copy_rows(out, off, rec)
            slots.append(got)
            off += len(got)
            if method == "draw" and len(got) < m:     # lost a race: the next round needs its counts
                counts[i] = self._view(i).counts()
        if refs:
            for (i, _), reply in zip(refs, self._get([r for _, r in refs], method)):
                if len(reply[0]):
                    _copy_rows(out, off, _view_wire(reply[1], self.storage_dtype))
                slots.append(reply[0])
                off += len(reply[0])
                if method == "draw":
                    counts[i] = reply[2]
        return slots, off, counts

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        if not 1 <= b <= self.num_slots:
            raise PoolError(f"cannot draw {b} records from a pool of {self.num_slots} slots")
        t0 = time.perf_counter()
        views = self._mapped() if group is None else None
        if views is not None:
            lease_id, dst = new_key(), self._arrays(b)
            what = f"{b} READY slots (warm-up needs {self.min_ready} inserted)"
            try:
                leased, blocked = self._blocked_until(lambda: self._draw_mapped(views, b, lease_id, dst), what, "draw", timeout_s)
            except OwnerOnly:             # consumer groups attached meanwhile: the path below
                pass
            else:
                self.leases[lease_id] = dict(leased)
                slots = torch.from_numpy(np.concatenate([idx + views[i].lo for i, idx in leased]))
                dt = time.perf_counter() - t0
                self._add_time("draw", blocked, dt)
                metrics.observe(metrics.POOL_DRAW_SECONDS, dt)
                return Draw(lease_id=lease_id, slots=slots, batch=batch_over(dst, self.storage_dtype),
                            deadline=time.time() + self.cfg.lease_timeout_s - dt)
        col = "READY" if group is None else "available"      # a group draws among the records new to it
        ok = lambda per: sum(c["inserted"] for c in per) >= self.min_ready and sum(c[col] for c in per) >= b  # noqa: E731
        what = f"{b} READY slots (warm-up needs {self.min_ready} inserted)"
        if group is not None:
            what = f"{b} records new to consumer group {group!r} (warm-up needs {self.min_ready} inserted)"
        per, blocked = self._poll(ok, what, "draw", timeout_s, group)
        lease_id, want, got_slots = new_key(), b, []
        self.leases[lease_id] = list(range(len(self.handles)))
        deadline = time.time() + self.cfg.lease_timeout_s
        out, off = self._empty(b), 0
        while want > 0:
            ready = np.array([c[col] for c in per])
            if ready.sum() < want:      # lost a race with another client: wait for the rest
                try:
                    per, more = self._poll(lambda p: sum(c[col] for c in p) >= want, what, "draw", timeout_s, group)
                except PoolTimeout:
                    self.release(lease_id)      # hand back the part already leased
                    raise
                blocked += more
                continue
            take = split_draw(ready, want, self.rng)
            asked = [(i, int(m)) for i, m in enumerate(take) if m > 0]
            # a consumer group's draw goes to the actors, where the groups live
            slots, off, fresh = self._take(asked, "draw", lease_id, out, off, group, local=group is None, count_call=off == 0)
            per = list(per)
            for i, c in fresh.items():
                per[i] = c
            got_slots += slots
            want = b - off
        slots = torch.from_numpy(np.concatenate(got_slots))      # shard order: the draw is random anyway
        dt = time.perf_counter() - t0
        self._add_time("draw", blocked, dt)
        metrics.observe(metrics.POOL_DRAW_SECONDS, dt)
        return Draw(lease_id=lease_id, slots=slots, batch=out, deadline=deadline)

    def release(self, lease_id: str) -> None:
        shards = self.leases.pop(lease_id, range(len(self.handles)))   # unknown here: ask every shard (idempotent)
        if isinstance(shards, dict):       # drawn on the mapped path: {shard: its local slots}, one locked pass
            views = self._mapped()
            if views is not None:
                try:
                    with _AllLocked([views[i] for i in shards]):
                        now = time.time()
                        for i, idx in shards.items():
                            views[i].release_slots(lease_id, idx, now)
                    return
                except OwnerOnly:          # consumer groups attached meanwhile: the per-shard calls below
                    pass
        refs = []
        for i in shards:
            done, _ = self._local(i, "release", lease_id)
            if not done:
                refs.append(self.handles[i].release.remote(lease_id))
        if refs:
            self._get(refs, "release a lease")

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        if n < 1:
            raise PoolError(f"claim_refill needs n >= 1, got {n}")
        timeout_s = self.cfg.block_timeout_s if timeout_s is None else timeout_s
        start, claim_id = time.monotonic(), new_key()
        views = self._mapped()
        if views is not None:
            try:
                (claim, info), blocked = self._blocked_until(lambda: self._claim_mapped(views, n, claim_id), "a REFILL slot",
                                                             "fill", timeout_s)
            except OwnerOnly:
                pass
            else:
                if blocked > 1e-4:
                    self._add_time("fill", blocked, 0.0)
                self.claims[claim_id] = info
                return claim
        while True:
            left = max(0.0, timeout_s - (time.monotonic() - start))
            per, blocked = self._poll(lambda p: sum(c["REFILL"] for c in p) >= 1, "a REFILL slot", "fill", left)
            if blocked > 1e-4:
                self._add_time("fill", blocked, 0.0)
            deadline = time.time() + self.cfg.claim_timeout_s
            refill = np.array([c["REFILL"] for c in per])
            asked, want = [], n
            for i in self.rng.permutation(len(self.handles)):
                m = min(want, int(refill[i]))
                if m:
                    asked.append((int(i), m))
                    want -= m
            out = self._empty(sum(m for _, m in asked), zeros=True)     # claim's ``out``: zero-filled
            parts, off, _ = self._take(asked, "claim", claim_id, out, 0)
            if off:            # else another client took them first: poll again
                break
        parts = [p for p in parts if len(p)]
        # (shard, count) in the order of the claim's slots (a global slot tells its shard)
        self.claims[claim_id] = {"layout": [(next(k for k, (lo, hi) in enumerate(self.ranges) if lo <= int(p[0]) < hi), len(p))
                                            for p in parts]}
        return Claim(claim_id=claim_id, slots=torch.from_numpy(np.concatenate(parts)), batch=out.index(slice(0, off)),
                     deadline=deadline)

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        t0 = time.perf_counter()
        info = self.claims.pop(claim_id, None)
        views = self._mapped() if info is not None and "parts" in info else None
        if views is not None:
            check_batch(batch, sum(m for _, m in info["layout"]), self.record_shape, self.has_logvar, self.has_label,
                        self.meta["num_timesteps"])
            try:
                ok = self._fill_mapped(views, claim_id, info, batch)
            except OwnerOnly:          # consumer groups attached since the claim: the path below
                views = None
            else:
                dt = time.perf_counter() - t0
                self._add_time("fill", 0.0, dt, 0 if ok else 1)
                metrics.observe(metrics.POOL_FILL_SECONDS, dt)
                return ok
        layout = None if info is None else info["layout"]
        if layout is None:     # claimed by another client object: ask the shards for their part
            sizes, refs = {}, {}
            for i, h in enumerate(self.handles):
                done, m = self._local(i, "claim_size", claim_id)
                if done:
                    sizes[i] = m
                else:
                    refs[i] = h.claim_size.remote(claim_id)
            if refs:
                sizes.update(zip(refs, self._get(list(refs.values()), "look up a claim")))
            layout = [(i, sizes[i]) for i in range(len(self.handles)) if sizes[i]]
        if not layout:
            self._add_time("fill", 0.0, 0.0, 1)
            return False
        check_batch(batch, sum(m for _, m in layout), self.record_shape, self.has_logvar, self.has_label, self.meta["num_timesteps"])
        off, refs, oks = 0, [], []
        wire = None
        for i, m in layout:
            part = batch.index(slice(off, off + m))
            done, ok = self._local(i, "fill", claim_id, part, count_call=off == 0)     # one call, counted once
            if done:
                oks.append(ok)
            else:
                wire = wire or _to_wire(batch, self.storage_dtype)
                refs.append(self.handles[i].fill.remote(claim_id, {k: (None if v is None else v[off:off + m]) for k, v in wire.items()},
                                                        count_call=off == 0))
            off += m
        remote = self._get(refs, "fill slots") if refs else []
        ok = all(oks) and all(remote)
        dt = time.perf_counter() - t0
        self._add_time("fill", 0.0, dt, 0 if ok else 1)
        metrics.observe(metrics.POOL_FILL_SECONDS, dt)
        return ok

    def stats(self) -> PoolStats:
        self.flush()
        per = self._get([h.stats.remote() for h in self.handles], "read stats")
        inserted = sum(p["inserted"] for p in per)
        st = merge_stats(self.num_slots, per, inserted >= self.min_ready, self.t_buckets, per[0]["blocked"], per[0]["seconds"])
        st.fill_rejected_total += per[0]["extra"]["fill_rejected"]
        return st

    def bind_identity(self, identity: dict) -> dict:
        from common.pool.identity import check_identity

        held = self._get(self.handles[0].bind_identity.remote(identity), "store the pool identity")
        check_identity(self.cfg.name, held, identity)
        return held

    def identity(self) -> dict | None:
        return self._get(self.handles[0].get_identity.remote(), "read the pool identity")

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        from common.pool.local import shard_lag

        n = len(self.handles)
        self._get([h.attach_group.remote(group, policy, shard_lag(max_lag, i, n)) for i, h in enumerate(self.handles)],
                  f"attach consumer group {group!r}")

    def detach_group(self, group: str) -> None:
        self._get([h.detach_group.remote(group) for h in self.handles], f"detach consumer group {group!r}")

    def groups(self) -> dict[str, dict]:
        from common.pool.local import merge_groups

        return merge_groups(self._get([h.group_stats.remote() for h in self.handles], "read the consumer groups"))

    def snapshot(self, path: str) -> None:
        inserted = sum(c["inserted"] for c in self._counts())

        def frames():
            for h in self.handles:     # one shard at a time: each stops only for its own copy
                yield self._get(h.snapshot.remote(), "snapshot a shard")

        write_snapshot(path, snapshot_header(self, inserted), frames())

    def restore(self, path: str) -> None:
        header, parts = load_snapshot_for(self, path, self.ranges)
        extra = surplus_inserted(header, parts)
        self._get([h.restore.remote(a, bad, extra if i == 0 else 0) for i, (h, (a, bad)) in enumerate(zip(self.handles, parts))],
                  "restore the shards")
        self.leases.clear()
        self.claims.clear()

    def close(self) -> None:
        """Kill the shard actors if this client created them (attached clients leave them running).

        Without ``detached=True`` the actors also die when the creating client and every handle
        copied from it are garbage collected (Ray's owner semantics).
        """
        self.flush()
        if self.owner:
            self._shutdown_actors()
            for h in self.handles:
                try:
                    ray.kill(h)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.owner = False
