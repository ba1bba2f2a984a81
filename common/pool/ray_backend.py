"""RayPool: the pool as N shard actors (PoolShard behind ``ray.remote`` here, at the edge); docs/pool.md.

The client holds only actor handles and the layout, so it pickles into Ray tasks and actors;
``RayPool.attach(name)`` finds a running pool (actors ``dkdm_pool.<name>.<i>``; ``detached=True``
ones live in the namespace ``dkdm_pools`` and outlive the creating driver).

Each shard's part of an operation runs on this process's mapped view of the shard's memfd
(``pool.shared_memory``, a client on the actor's node: the same PoolShard transitions under the
file's lock, records copied once) or as an RPC to the actor (other nodes, and while consumer groups,
whose bookkeeping lives in the actor, are attached). Blocking is client-side polling (Pool._poll).

A shard actor that dies is restarted by Ray (``pool.shard_max_restarts``) empty, every slot in
REFILL; its leases and claims are gone with it. Tasks are not retried (``max_task_retries=0``): a
call in flight when the shard died answers "nothing from this shard", as its new incarnation would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from functools import partial

import numpy as np
import ray
import torch

from common import metrics
from common.config import PoolConfig
from common.pool.base import (STATE_NAMES, Claim, Draw, Pool, PoolError, PoolStats, PoolTimeout, check_identity,
                              merge_groups, new_key, shard_share, split_claim)
from common.pool.codec import batch_over, to_arrays, write_snapshot
from common.pool.memory import FLAG_CLOSED, ShardMemory
from common.pool.shard import SHARD_COUNTERS, OwnerOnly, PoolShard
from common.records import RecordBatch

logger = logging.getLogger(__name__)

SHARD_NUM_CPUS = 0.05
POOL_NAMESPACE = "dkdm_pools"     # detached (persistent) pools: any driver finds them whatever its namespace
_SERVER_METHODS = ("stats", "identity")    # ShardServer's own; the rest are PoolShard's (call)
DOWN_WAIT_S = 1.0                 # a poll reads the other shards' counts when one answers no sooner (restarting)


def actor_name(name: str, i: int) -> str:
    return f"dkdm_pool.{name}.{i}"


class ShardServer:
    """A PoolShard speaking numpy arrays over RPC, plus the pool's layout and identity.

    With ``pool.shared_memory`` the slots live in shared memory that clients on this node map
    (``where``); the actor refreshes the slot gauges every second, since clients' transitions
    do not pass through it.
    """

    def __init__(self, meta: dict, **shard_kw):
        with warnings.catch_warnings():          # Ray's property reads a deprecated field of its own
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.shard = None
        self.reset(meta, **shard_kw)
        if self.restarted:
            i, shards = shard_kw["shard_id"], meta["cfg"]["shards"]
            logger.warning("pool %r shard %d: its actor died and Ray restarted it empty; the teachers warm its %d slots "
                           "up again%s", meta["cfg"]["name"], i, shard_kw["n"],
                           ", and draws wait for that (the pool has one shard)" if shards == 1
                           else f" while draws come from the other {shards - 1} shards")
            metrics.inc(metrics.POOL_SHARD_RESTARTS_TOTAL, shard=i)
        threading.Thread(target=self._publish_loop, daemon=True).start()

    def reset(self, meta: dict, **shard_kw) -> None:
        """Become a fresh, empty shard with a new layout (RayPool(reuse_actors=True) keeps the process)."""
        self.shutdown()
        self.meta_, self.identity_, self.note = meta, None, None
        mem = None
        if meta["cfg"]["shared_memory"]:
            try:
                mem = ShardMemory.create(
                    f"{meta['cfg']['name']}-{shard_kw['shard_id']}", shard_kw["n"], shard_kw["record_shape"],
                    shard_kw["storage_dtype"], shard_kw["has_logvar"], shard_kw["has_label"], len(SHARD_COUNTERS))
            except PoolError as err:       # said once, in the actor's log and by where(): clients use RPCs
                self.note = str(err)
                logger.warning("pool shard %d: %s; clients will use RPCs", shard_kw["shard_id"], err)
        self.shard = PoolShard(**shard_kw, memory=mem)

    def _publish_loop(self) -> None:
        while True:
            time.sleep(1.0)
            if self.shard.mem.path is not None:
                self.shard._publish()

    def where(self) -> dict:
        """How a client reaches the slots: {"node_id", "path", "uid", "note"} (path None: RPCs only)."""
        mem = self.shard.mem
        return {"node_id": ray.get_runtime_context().get_node_id(), "path": mem.path,
                "uid": mem.uid if mem.path else None, "note": self.note}

    def shutdown(self) -> None:
        """Close the shared slots: clients that still map them see the shard as closed."""
        if self.shard is not None:
            self.shard.mem.close()

    def meta(self) -> dict:
        return self.meta_

    def identity(self, bind: dict | None = None) -> dict | None:
        """The pool identity this shard holds, ``bind`` stored first if it holds none."""
        if self.identity_ is None:
            self.identity_ = bind
        return self.identity_

    def call(self, method: str, *args, **kw):
        """Run a PoolShard method (a transition, counts, groups, snapshot, restore); a draw's or claim's records
        go back as numpy arrays (zero-copy pickle-5 buffers)."""
        out = getattr(self.shard, method)(*args, **kw)
        if method in ("draw", "claim"):
            return out[0], to_arrays(out[1], self.shard.storage_dtype)
        return out

    def stats(self) -> dict:
        return {**self.shard.stats(), "restarted": int(self.restarted), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}


def _find_actor(name: str, i: int):
    """The shard actor i of pool ``name``: in this driver's namespace, else among the persistent pools."""
    for ns in (None, POOL_NAMESPACE):
        with contextlib.suppress(ValueError):
            return ray.get_actor(actor_name(name, i), namespace=ns)
    return None


class RayPool(Pool):
    def __init__(self, cfg: PoolConfig, num_slots: int, record_shape: tuple[int, int, int], has_logvar: bool = False,
                 has_label: bool = False, num_timesteps: int = 1000, seed: int = 0, t_buckets: int = 10,
                 detached: bool = False, reuse_actors: bool = False):
        """Start ``cfg.shards`` shard actors named after ``cfg.name`` (Ray is initialized if it is not).

        ``reuse_actors``: running shard actors of the same name are reset to empty shards of this
        layout instead of refusing (saves the process start; the test suite uses it).
        """
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        meta = {"cfg": cfg.model_dump(), "num_slots": int(num_slots), "record_shape": list(record_shape),
                "has_logvar": has_logvar, "has_label": has_label, "t_buckets": t_buckets, "num_timesteps": num_timesteps}
        opts = {"num_cpus": SHARD_NUM_CPUS, "max_restarts": cfg.shard_max_restarts, "max_task_retries": 0,
                "resources": dict(cfg.shard_resources)}
        if cfg.shard_strategy == "spread":
            opts["scheduling_strategy"] = "SPREAD"
        if detached:
            opts.update(lifetime="detached", namespace=POOL_NAMESPACE)
        self._setup(meta, [], owner=not reuse_actors, seed=seed)
        refs = []
        for i in range(cfg.shards):
            shard_kw = self._shard_kw(i, seed)
            h = _find_actor(cfg.name, i)
            if h is not None and not reuse_actors:
                raise PoolError(f"a Ray pool named {cfg.name!r} already exists; attach with RayPool.attach({cfg.name!r}) or pick another pool.name")
            if h is None:
                h = ray.remote(ShardServer).options(name=actor_name(cfg.name, i), **opts).remote(meta, **shard_kw)
            else:
                refs.append(h.reset.remote(meta, **shard_kw))
            self.handles.append(h)
        self._get(refs + [h.meta.remote() for h in self.handles], "start the shard actors")    # fail here, not later

    def _setup(self, meta: dict, handles: list, owner: bool, seed: int | None = None) -> None:
        self.meta, self.handles, self.owner = meta, handles, owner
        self._init_layout(PoolConfig(**meta["cfg"]), meta["num_slots"], meta["record_shape"], meta["has_logvar"],
                          meta["has_label"], meta["num_timesteps"], meta["t_buckets"])
        self.rng = np.random.default_rng(None if seed is None else seed + 7919)
        self.leases: dict[str, list[int]] = {}               # lease id -> shards it spans
        self.claims: dict[str, list[tuple[int, int]]] = {}   # claim id -> [(shard, count)] in slot order
        self.views: dict[int, PoolShard | None] = {}         # shard -> its mapped slots (None: RPCs), once located

    @classmethod
    def attach(cls, name: str) -> "RayPool":
        """A client of the running pool named ``name`` (Ray must be initialized in this process)."""
        h0 = _find_actor(name, 0)
        if h0 is None:
            raise PoolError(f"no Ray pool named {name!r} is running (looked for actor {actor_name(name, 0)!r})")
        self = cls.__new__(cls)
        meta = self._get(h0.meta.remote(), f"read the layout of pool {name!r}")
        rest = [_find_actor(name, i) for i in range(1, meta["cfg"]["shards"])]
        if any(h is None for h in rest):
            raise PoolError(f"Ray pool {name!r} is incomplete: {sum(h is None for h in rest)} of its shard actors are gone")
        self._setup(meta, [h0] + rest, owner=False)
        return self

    def __getstate__(self):
        return {"meta": self.meta, "handles": self.handles}

    def __setstate__(self, state):
        self._setup(state["meta"], state["handles"], owner=False)

    # --- reaching a shard: its mapped slots here, or an RPC ----------------------------------

    def _view(self, i: int) -> PoolShard | None:
        """Shard i's slots mapped in this process, or None (it is reached by RPC). A view whose actor died
        is dropped and the shard located again (its restarted actor has new memory)."""
        if not self.cfg.shared_memory:
            return None
        v = self.views.get(i)
        if v is not None and not v.mem.owner_alive():
            dropped = v.mem.flags & FLAG_CLOSED
            v.mem.close()
            del self.views[i]
            if dropped:
                raise PoolError(f"pool {self.cfg.name!r}: a shard actor died for good (shard {i}: the pool was dropped)")
        if i not in self.views:
            try:
                self.views[i] = self._map(i)
            except ray.exceptions.ActorUnavailableError:     # restarting: an RPC now, located at a later call
                return None
        return self.views[i]

    def _map(self, i: int) -> PoolShard | None:
        ref = self.handles[i].where.remote()
        if not ray.wait([ref], timeout=DOWN_WAIT_S)[0]:
            raise ray.exceptions.ActorUnavailableError("restarting", None)
        info = self._get(ref, "locate a shard")
        if info["path"] is None:
            if info["note"]:
                warnings.warn(f"pool {self.cfg.name!r} shard {i} uses RPCs: {info['note']}", stacklevel=4)
            return None
        if info["node_id"] != ray.get_runtime_context().get_node_id() or not os.path.exists(info["path"]):
            return None
        kw = self._shard_kw(i, seed=int.from_bytes(os.urandom(4), "little"))
        mem = ShardMemory.attach(info["path"], kw["n"], kw["record_shape"], kw["storage_dtype"], kw["has_logvar"],
                                 kw["has_label"], len(SHARD_COUNTERS), info["uid"])
        return PoolShard(**kw, memory=mem, view=True)

    def transports(self) -> list[str]:
        """How this client reaches each shard: "shared_memory" or "rpc"."""
        return ["rpc" if self._view(i) is None else "shared_memory" for i in range(len(self.handles))]

    def _on_shards(self, calls: list[tuple[int, str, tuple, dict]], what: str, wait_s: float | None = None) -> list:
        """Run shard calls (shard, method, args, kwargs): on mapped views here, the others by parallel RPCs
        -> results in call order. A view's draw and claim take ``out`` (kwargs) and write their records there;
        RPC calls get no ``out``. A shard whose actor is restarting, or that has not answered within ``wait_s``,
        answers None. Each result is (True, value) from a view, (False, value) from an RPC."""
        out, remote = [None] * len(calls), []
        for k, (i, method, args, kw) in enumerate(calls):
            v = self._view(i)
            if v is not None:
                try:
                    out[k] = (True, getattr(v, method)(*args, **kw))
                    continue
                except OwnerOnly:          # consumer groups attached: their bookkeeping lives in the actor
                    pass
            kw = {key: val for key, val in kw.items() if key != "out"}
            remote.append((k, self.handles[i].call.remote(method, *args, **kw)))
        refs = [r for _, r in remote]
        ready = set(refs if wait_s is None else ray.wait(refs, num_returns=len(refs), timeout=wait_s)[0])
        for k, r in remote:
            try:
                out[k] = (False, self._get(r, what)) if r in ready else None
            except ray.exceptions.ActorUnavailableError:       # restarting: nothing from this shard for now
                pass
        return out

    def _get(self, refs, what: str):
        try:
            return ray.get(refs)
        except ray.exceptions.ActorUnavailableError:
            raise
        except ray.exceptions.RayActorError as err:
            name = getattr(self, "cfg", None) and self.cfg.name
            raise PoolError(f"pool {name!r}: a shard actor died for good while trying to {what} ({type(err).__name__}; "
                            f"restarts exhausted or the pool was dropped)") from None
        except ray.exceptions.RayTaskError as err:      # a PoolError raised in the shard: re-raise its one line
            cause = getattr(err, "cause", None)
            if not isinstance(cause, (PoolError, ValueError)):
                raise
            raise type(cause)(str(cause)) from None

    def _call_all(self, method: str, *args, what: str, per_shard=None) -> list:
        """``method`` on every shard actor -> their answers; a shard that is restarting is asked again
        once it is back. ``per_shard(i)``: extra arguments of shard i."""
        end = time.monotonic() + 60
        while True:
            refs = [(getattr(h, method).remote if method in _SERVER_METHODS else partial(h.call.remote, method))(
                *args, *(per_shard(i) if per_shard else ())) for i, h in enumerate(self.handles)]
            try:
                return self._get(refs, what)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > end:
                    raise PoolError(f"pool {self.cfg.name!r}: a shard actor stayed unreachable for 60 s while trying to {what}") from None
                time.sleep(0.2)

    # --- the contract ---------------------------------------------------------------------

    def _counts(self, group: str | None = None) -> list[dict]:
        """Every shard's counts (after expiry); a shard that is restarting counts as empty."""
        empty = {**{n: 0 for n in STATE_NAMES}, "inserted": 0, "available": 0}
        res = self._on_shards([(i, "counts", (), {"group": group}) for i in range(len(self.handles))],
                              "read the shard counts", DOWN_WAIT_S)
        return [empty if r is None else r[1] for r in res]

    def _take(self, asked: list[tuple[int, int]], method: str, key_id: str, out: dict, off: int, **kw) -> list:
        """Draw or claim m slots of each shard (shard, m), their records written into ``out`` from row ``off``
        on -> [(shard, global slots)] in row order. Views write straight into their rows; RPC replies are
        copied in; rows left by a shard that returned fewer than asked (another client was faster) are closed up."""
        calls, pos = [], off
        for i, m in asked:
            calls.append((i, method, (m, key_id), {**kw, "out": {k: v[pos:pos + m] for k, v in out.items()}}))
            if "count_call" in kw:
                kw["count_call"] = False     # a pool call is counted once, by the first shard
            pos += m
        got, rows, pos = [], [], off
        for (i, m), res in zip(asked, self._on_shards(calls, method)):
            if res is not None:
                local, (slots, records) = res
                if not local:
                    for name, a in records.items():
                        out[name][pos:pos + len(slots)] = a
                got.append((i, slots))
                rows.append(np.arange(pos, pos + len(slots)))
            pos += m
        keep = np.concatenate(rows) if rows else np.arange(0)
        if len(keep) < pos - off:
            for a in out.values():
                a[off:off + len(keep)] = a[keep]
        return got

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        timeout_s, what = self._draw_args(b, timeout_s, group)
        t0, deadline_s = time.perf_counter(), time.monotonic() + timeout_s
        lease_id, out, got, blocked = new_key(), self._arrays(b), [], 0.0
        self.leases[lease_id] = list(range(len(self.handles)))
        while (off := sum(len(s) for _, s in got)) < b:     # another client may take slots between count and lease
            try:
                asked, waited = self._poll(lambda: self._split_draw(b - off, group), what, "draw",
                                           deadline_s - time.monotonic(), group)
            except PoolTimeout:
                self.release(lease_id)      # hand back the part already leased
                raise
            blocked += waited
            got += self._take(asked, "draw", lease_id, out, off, group=group, count_call=off == 0)
        self.leases[lease_id] = sorted({i for i, _ in got})
        dt = self._timed("draw", t0, blocked)
        return Draw(lease_id=lease_id, slots=torch.from_numpy(np.concatenate([s for _, s in got])),
                    batch=batch_over(out, self.storage_dtype), deadline=time.time() + self.cfg.lease_timeout_s - dt)

    def release(self, lease_id: str) -> None:
        shards = self.leases.pop(lease_id, range(len(self.handles)))   # unknown here: ask every shard (idempotent)
        # a shard that does not answer soon is restarting (the lease died with it) or still gets the call in order
        self._on_shards([(i, "release", (lease_id,), {}) for i in shards], "release a lease", DOWN_WAIT_S)

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        deadline_s = time.monotonic() + self._claim_args(n, timeout_s)
        claim_id, got = new_key(), []
        while not got:          # another client may take the slots first: poll again
            per = self._wait_refill(deadline_s - time.monotonic())
            asked = split_claim([c["REFILL"] for c in per], n, self.rng)
            out = self._arrays(sum(m for _, m in asked))
            got = self._take(asked, "claim", claim_id, out, 0)
        self.claims[claim_id] = [(i, len(s)) for i, s in got]
        total = sum(len(s) for _, s in got)
        return Claim(claim_id=claim_id, slots=torch.from_numpy(np.concatenate([s for _, s in got])),
                     batch=batch_over({k: v[:total] for k, v in out.items()}, self.storage_dtype),
                     deadline=time.time() + self.cfg.claim_timeout_s)

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        t0 = time.perf_counter()
        layout = self.claims.pop(claim_id, None)
        if layout is None:     # claimed by another client object: ask the shards for their part
            sizes = self._on_shards([(i, "claim_size", (claim_id,), {}) for i in range(len(self.handles))], "look up a claim")
            layout = [(i, r[1]) for i, r in enumerate(sizes) if r is not None and r[1]]
        ok = bool(layout)
        if ok:
            self._check_fill(batch, sum(m for _, m in layout))
            records, calls, off = to_arrays(batch, self.storage_dtype), [], 0
            for i, m in layout:
                calls.append((i, "fill", (claim_id, {k: v[off:off + m] for k, v in records.items()}), {"count_call": off == 0}))
                off += m
            ok = all(r is not None and r[1] for r in self._on_shards(calls, "fill slots"))
        self._timed("fill", t0, rejected=0 if ok else 1)
        return ok

    def _add_blocked(self, side: str, s: float) -> None:
        """A timed-out call's seconds (``_poll``): blocked, and inside the call."""
        self._add_time(side, s, s)

    def _add_time(self, side: str, blocked_s: float, call_s: float, rejected: int = 0) -> None:
        """Add a call's seconds to the pool-wide totals kept on shard 0 (an RPC is not waited for)."""
        if self._view(0) is not None:
            self._on_shards([(0, "add_time", (side, blocked_s, call_s, rejected), {})], "add time")
        else:
            self.handles[0].call.remote("add_time", side, blocked_s, call_s, rejected)

    def stats(self) -> PoolStats:
        per = self._call_all("stats", what="read stats")
        st = PoolStats.merged(self, per)
        st.extra.update(shard_restarts=sum(p["restarted"] for p in per), shard_nodes=[p["node_id"] for p in per])
        return st

    def bind_identity(self, identity: dict) -> dict:
        """Every shard keeps the identity, so a restarted shard leaves it with the others."""
        held = self._call_all("identity", identity, what="store the pool identity")
        for h in held:
            check_identity(self.cfg.name, h, identity)
        return held[0]

    def identity(self) -> dict | None:
        held = self._call_all("identity", what="read the pool identity")
        return next((h for h in held if h is not None), None)

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        n = len(self.handles)
        self._call_all("attach_group", group, policy, what=f"attach consumer group {group!r}",
                       per_shard=lambda i: (shard_share(max_lag, i, n),))

    def detach_group(self, group: str) -> None:
        self._call_all("detach_group", group, what=f"detach consumer group {group!r}")

    def groups(self) -> dict[str, dict]:
        return merge_groups(self._call_all("group_stats", what="read the consumer groups"))

    def snapshot(self, path: str) -> None:
        frames = (self._get(h.call.remote("snapshot"), "snapshot a shard") for h in self.handles)   # one shard at a time
        write_snapshot(path, self._snapshot_header(), frames)

    def restore(self, path: str) -> None:
        _, parts = self._load_snapshot(path)
        self._call_all("restore", what="restore the shards", per_shard=lambda i: parts[i])
        self.leases.clear()
        self.claims.clear()

    def close(self) -> None:
        """Kill the shard actors if this client created them (attached clients leave them running).

        Without ``detached=True`` the actors also die when the creating client and every handle
        copied from it are garbage collected (Ray's owner semantics).
        """
        if self.owner:
            self.drop()

    def drop(self) -> None:
        """Kill every shard actor of this pool (detached ones included): the pool is gone for every client.
        Each actor first marks its shared slots closed, so clients still mapping them fail at once."""
        refs = [h.shutdown.remote() for h in self.handles]
        ray.wait(refs, num_returns=len(refs), timeout=10)
        for h in self.handles:
            with contextlib.suppress(Exception):     # already gone
                ray.kill(h, no_restart=True)
        self.owner = False
