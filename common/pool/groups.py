"""Consumer groups of a shard (issue 8): several students train on every record of one pool.

Per group and slot the shard keeps whether the group still has to train on the slot's record
(``pending``) and whether it holds it leased; the slot's state follows from them (``_settle``, as
states.py says), so a record costs one teacher forward however many students train on it.

A group's ``lag``: the records every other group is done with that wait for it alone. Policy
``wait``: the others wait for it; ``skip``: past ``max_lag`` it skips its oldest such records, which go
to REFILL. A group with no live lease that has not been heard from (draw, release, counts) for
``lease_timeout_s`` is detached, so a dead student frees the pool once its leases expire.
"""

from __future__ import annotations

import time

import numpy as np

from common import metrics
from common.pool.errors import PoolError
from common.pool.memory import FLAG_GROUPS
from common.pool.states import LEASED, READY, REFILL

GROUP_POLICIES = ("wait", "skip")


def check_group(name: str, policy: str, max_lag: int | None, k: float) -> None:
    """PoolError (one line) unless a pool of samples per insert ``k`` can attach this group."""
    if policy not in GROUP_POLICIES:
        raise PoolError(f"consumer group {name!r}: policy={policy!r} is not one of {GROUP_POLICIES}")
    if policy == "skip" and (max_lag is None or max_lag < 0):
        raise PoolError(f"consumer group {name!r}: policy 'skip' needs max_lag >= 0 records, got {max_lag}")
    if k != 1.0:
        raise PoolError(f"consumer groups need pool.samples_per_insert=1, this pool has {k}")


class Group:
    """One consumer group's view of a shard: ``pending`` [n] records it has yet to train on, ``leased`` [n]."""

    def __init__(self, name: str, n: int, policy: str, max_lag: int | None, now: float):
        self.name, self.policy, self.max_lag = name, policy, max_lag
        self.pending = np.zeros(n, dtype=bool)
        self.leased = np.zeros(n, dtype=bool)
        self.consumed = 0
        self.skipped = 0
        self.seen = now


class ShardGroups:
    """PoolShard's consumer-group methods; the shard provides n, state, uses, owner, leases, produced_at, groups,
    mem (and runs them under its lock: they are called from its locked methods or through the pool's)."""

    def attach_group(self, name: str, policy: str = "wait", max_lag: int | None = None, now: float | None = None) -> None:
        """Attach (or re-configure) a group; it starts with every record now held in the shard pending."""
        now = time.time() if now is None else now
        self.expire(now)
        check_group(name, policy, max_lag, self.k)
        if ((self.state == LEASED) & (self.owner != 0)).any():
            raise PoolError("a plain (group-less) consumer holds leases on this pool: consumer groups and plain draws do not mix")
        g = self.groups.get(name)
        if g is not None:
            g.policy, g.max_lag, g.seen = policy, max_lag, now
            return
        g = Group(name, self.n, policy, max_lag, now)
        g.pending[:] = (self.state == READY) | (self.state == LEASED)
        self.groups[name] = g
        self.mem.set_flag(FLAG_GROUPS, True)        # from now on only this process runs transitions

    def detach_group(self, name: str, now: float | None = None) -> bool:
        """Drop a group: its leases end, records only it still needed go to REFILL. Unknown: False."""
        g = self.groups.pop(name, None)
        if g is None:
            return False
        for lid in [k for k, v in self.lease_group.items() if v == name]:
            del self.lease_group[lid]
            self.leases.pop(lid, None)
        held = np.flatnonzero(g.pending | g.leased)
        if self.groups:
            self._settle(held)
        else:                                # back to a plain pool: keep the records for the next consumer
            has = (self.state == READY) | (self.state == LEASED)
            self.state[has] = READY
            self.uses[has] = 1
            self.mem.set_flag(FLAG_GROUPS, False)
        self._publish()
        return True

    def _group_for_draw(self, group: str | None, now: float):
        if group is None:
            if self.groups:
                raise PoolError(f"this pool serves consumer groups {sorted(self.groups)}: draw with group=<name>")
            return None
        g = self.groups.get(group)
        if g is None:
            raise PoolError(f"consumer group {group!r} is not attached (attach_group first; a group idle for "
                            f"lease_timeout_s={self.lease_timeout_s:g}s with no live lease is detached)")
        g.seen = now
        return g

    def _settle(self, idx: np.ndarray) -> None:
        """Global state of slots holding a record, from the groups: LEASED by any, READY for any, else REFILL."""
        if len(idx) == 0 or not self.groups:
            return
        has = (self.state[idx] == READY) | (self.state[idx] == LEASED)
        leased = np.zeros(len(idx), dtype=bool)
        pending = np.zeros(len(idx), dtype=bool)
        for g in self.groups.values():
            leased |= g.leased[idx]
            pending |= g.pending[idx]
        new = np.where(leased, LEASED, np.where(pending, READY, REFILL)).astype(np.uint8)
        self.state[idx] = np.where(has, new, self.state[idx])
        done = idx[has & ~leased & ~pending]
        self.uses[done] = 0

    def lag(self, name: str) -> np.ndarray:
        """Mask [n] of records that wait only for group ``name``: every other group is done with them.

        Its count is the group's lag: slots held back from REFILL by this group alone.
        """
        g = self.groups[name]
        others = [o for o in self.groups.values() if o is not g]
        if not others:
            return np.zeros(self.n, dtype=bool)
        busy = np.zeros(self.n, dtype=bool)
        for o in others:
            busy |= o.pending | o.leased
        return g.pending & ~busy

    def _expire_groups(self, now: float) -> None:
        """Detach dead groups (no live lease and silent for lease_timeout_s); apply the skip policy."""
        live = set(self.lease_group.values())
        for name in [k for k, g in self.groups.items() if k not in live and now - g.seen > self.lease_timeout_s]:
            self.detach_group(name, now)
        for name, g in self.groups.items():
            if g.policy != "skip":
                continue
            lagging = np.flatnonzero(self.lag(name))
            over = len(lagging) - g.max_lag
            if over > 0:                      # skip the oldest records this group is behind on
                drop = lagging[np.argsort(self.produced_at[lagging], kind="stable")[:over]]
                g.pending[drop] = False
                g.skipped += over
                self._settle(drop)

    def group_stats(self) -> dict[str, dict]:
        out = {}
        for name, g in self.groups.items():
            lag = int(self.lag(name).sum())
            out[name] = {"policy": g.policy, "max_lag": g.max_lag, "pending": int(g.pending.sum()),
                         "leased": int(g.leased.sum()), "lag": lag, "consumed": g.consumed, "skipped": g.skipped,
                         "idle_s": max(0.0, time.time() - g.seen)}
            if self.record_metrics:
                metrics.set(metrics.POOL_GROUP_LAG, lag, shard=self.shard_id, group=name)
        return out
