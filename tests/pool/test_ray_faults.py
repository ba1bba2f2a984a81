"""A ray-backend shard actor killed mid-run: Ray restarts it empty, the teachers warm it up again,
trainers draw from the other shards meanwhile, the slot invariant holds and the restart is counted."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import ray

from common.config import PoolConfig
from common.pool import PoolTimeout, make_pool
from pool_conftest import check_records, fill_claim, pool_worker

SHAPE = (1, 4, 4)
pytestmark = pytest.mark.slow


def _pool(shards: int, n: int):
    cfg = PoolConfig(backend="ray", name=f"faults-{uuid.uuid4().hex[:6]}", shards=shards, num_slots=n,
                     min_ready_fraction=0.5, lease_timeout_s=5, claim_timeout_s=5, block_timeout_s=60)
    return make_pool(cfg, n, SHAPE, has_logvar=False, has_label=False, num_timesteps=100)


def _warm(pool) -> None:
    while pool.stats().counts["REFILL"]:
        assert fill_claim(pool, pool.claim_refill(pool.num_slots, timeout_s=5), SHAPE)


def _pid(pool, i: int) -> int | None:
    """The process of shard actor i (None while Ray restarts it)."""
    try:
        return ray.get(pool.handles[i].stats.remote(), timeout=30)["pid"]
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
        return None


def _wait_refilled(pool, timeout_s: float = 60.0):
    """Until the restarted shard is warm again (no slot left empty) -> stats."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        st = pool.stats()
        if st.extra["shard_restarts"] == 1 and st.counts["READY"] + st.counts["LEASED"] == pool.num_slots:
            return st
        time.sleep(0.2)
    raise AssertionError(f"the restarted shard was not warmed up again: {pool.stats()}")


def test_a_killed_shard_restarts_empty_and_trainers_keep_drawing(ray_cluster, tmp_path):
    pool = _pool(shards=2, n=32)
    try:
        _warm(pool)
        stop = str(tmp_path / "stop")
        task = ray.remote(num_cpus=0.3, max_retries=0)(pool_worker)
        teacher = task.remote(pool, role="teacher", n_ops=100_000, seed=1, b=4, timeout_s=0.5, stop_path=stop)
        trainer = task.remote(pool, role="trainer", n_ops=400, seed=2, b=4, timeout_s=30)
        time.sleep(1.0)                                   # mid-run
        old = _pid(pool, 1)
        os.kill(old, signal.SIGKILL)
        assert ray.get(trainer, timeout=180)["draws"] == 400, "every draw was served (checked records) through the restart"
        st = _wait_refilled(pool)
        (tmp_path / "stop").write_text("stop")
        ray.get(teacher, timeout=60)
        st = pool.stats()
        st.check_invariant()
        assert st.extra["shard_restarts"] == 1 and _pid(pool, 1) != old
        assert pool.transports() == ["shared_memory"] * 2, "this client mapped the restarted shard's new memory"
        d = pool.draw(32, timeout_s=10)                   # every slot: both shards serve records again
        check_records(d.slots, d.batch)
        pool.release(d.lease_id)
    finally:
        pool.close()


def test_a_one_shard_pool_waits_for_the_re_warm_up(ray_cluster):
    pool = _pool(shards=1, n=8)
    try:
        _warm(pool)
        old = _pid(pool, 0)
        ray.kill(pool.handles[0], no_restart=False)       # Ray's own kill, restart allowed
        end = time.monotonic() + 60
        while _pid(pool, 0) in (old, None) and time.monotonic() < end:   # the kill is asynchronous
            time.sleep(0.1)
        st = pool.stats()
        assert st.counts["REFILL"] == 8 and st.extra["shard_restarts"] == 1, "back empty, every slot to warm up"
        with pytest.raises(PoolTimeout, match="READY"):
            pool.draw(2, timeout_s=0.5)                   # one shard: nothing to draw until the re-warm-up
        _warm(pool)                                       # the teachers' re-warm-up
        d = pool.draw(8, timeout_s=10)
        check_records(d.slots, d.batch)
        st = pool.stats()
        st.check_invariant()
        assert st.extra["shard_restarts"] == 1
    finally:
        pool.close()
