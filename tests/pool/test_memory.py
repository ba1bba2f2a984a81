"""ShardMemory (common/pool/memory.py) and the Ray backend's shared-memory fast path.

Real processes throughout: a shard created here is mapped and driven by spawned
processes that lease, fill and get killed; the Ray tests run a real local cluster.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

from common.pool.base import PoolError, SlotState
from common.pool.memory import FLAG_GROUPS, ShardMemory, check_memory, lease_key, pid_alive
from common.pool.codec import to_arrays
from common.pool.shard import SHARD_COUNTERS, OwnerOnly, PoolShard
from common.records import RecordBatch

SHAPE = (1, 4, 4)
N = 64


def _layout():
    return dict(n=N, record_shape=SHAPE, storage_dtype="fp32", has_logvar=True, has_label=False, counters=len(SHARD_COUNTERS))


def _shard(mem: ShardMemory, view: bool) -> PoolShard:
    return PoolShard(0, 0, N, SHAPE, "fp32", has_logvar=True, lease_timeout_s=60, claim_timeout_s=60,
                     memory=mem, view=view, seed=os.getpid(), record_metrics=False)


def test_a_view_records_its_own_traffic_in_its_process():
    """Shard actors serve no metrics endpoint: the per-shard produced/consumed rates on the dashboard
    come from the processes that map the shard (trainers, teachers), so a view records what it moves."""
    from common import metrics

    owner = ShardMemory.create("metrics", **_layout())
    _shard(owner, view=False)           # the owner sets the slots up (empty, REFILL)
    view = PoolShard(57, 0, N, SHAPE, "fp32", has_logvar=True, memory=ShardMemory.attach(owner.path, uid=owner.uid, **_layout()),
                     view=True, seed=1)
    get = lambda name, **labels: metrics.REGISTRY.get_sample_value(name, {"shard": "57", **labels}) or 0.0  # noqa: E731
    before = (get(metrics.POOL_RECORDS_PRODUCED_TOTAL), get(metrics.POOL_RECORDS_CONSUMED_TOTAL),
              get(metrics.POOL_BYTES_TOTAL, direction="out"))
    slots, _ = view.claim(10, "c")
    assert view.fill("c", _records(slots, np.full(10, 3, dtype=np.int64)))
    view.draw(4, "l")
    assert get(metrics.POOL_RECORDS_PRODUCED_TOTAL) - before[0] == 10
    assert get(metrics.POOL_RECORDS_CONSUMED_TOTAL) - before[1] == 4
    assert get(metrics.POOL_BYTES_TOTAL, direction="out") - before[2] == 4 * view.record_bytes
    view.mem.close()
    owner.close()


def _batch(slots: np.ndarray, t: np.ndarray) -> RecordBatch:
    s = torch.from_numpy(slots.astype(np.float32)).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()
    return RecordBatch(x_t=s, t=torch.from_numpy(t), eps=-s, logvar=s / 1000)


def _records(slots: np.ndarray, t: np.ndarray) -> dict:
    """A shard's fill takes records as arrays (codec.to_arrays)."""
    return to_arrays(_batch(slots, t), "fp32")


def _client(path: str, uid: int, rounds: int, q) -> None:
    """Claim and fill, then draw and release, ``rounds`` times on a mapped shard; report what it saw."""
    torch.set_num_threads(1)
    shard = _shard(ShardMemory.attach(path, uid=uid, **_layout()), view=True)
    seen_bad = 0
    for r in range(rounds):
        cid = f"c{os.getpid()}-{r}"
        slots, _ = shard.claim(8, cid)
        if len(slots):
            assert shard.fill(cid, _records(slots, np.full(len(slots), 5, dtype=np.int64)))
        lid = f"l{os.getpid()}-{r}"
        slots, batch = shard.draw(4, lid)
        # every record names its slot: a torn or foreign record would show here
        seen_bad += int((batch.x_t[:, 0, 0, 0].numpy() != slots).sum())
        shard.release(lid)
    q.put(seen_bad)


def _hold_lock_and_die(path: str, uid: int) -> None:
    mem = ShardMemory.attach(path, uid=uid, **_layout())
    mem.lock.__enter__()
    os.kill(os.getpid(), signal.SIGKILL)


def test_processes_share_one_shard_and_keep_the_invariant():
    mem = ShardMemory.create("test", **_layout())
    owner = _shard(mem, view=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(mem.path, mem.uid, 30, q)) for _ in range(2)]
    for p in procs:
        p.start()
    bad = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert bad == [0, 0], "a drawn record did not belong to its slot"
    c = owner.counts()
    assert sum(c[s.name] for s in SlotState) == N and c["LEASED"] == 0 and c["FILLING"] == 0
    assert owner.c["draws"] == owner.c["consumed"] // 4 and owner.c["consumed"] == 2 * 30 * 4
    # the owner sees what the clients wrote: READY records name their slots
    ready = np.flatnonzero(owner.state == SlotState.READY)
    assert (owner.records["x_t"][ready, 0, 0, 0] == ready).all()
    mem.close()


def test_threads_of_one_process_take_turns_on_a_mapped_shard():
    """A trainer draws in a prefetching thread while its main thread releases: one view, two threads."""
    import threading

    mem = ShardMemory.create("test", **_layout())
    owner = _shard(mem, view=False)
    owner.k = 1000.0                        # records reused: the threads never run dry
    slots, _ = owner.claim(N, "warm")
    owner.fill("warm", _records(slots - owner.lo, np.zeros(N, dtype=np.int64)))
    view = _shard(ShardMemory.attach(mem.path, uid=mem.uid, **_layout()), view=True)
    errors, leased_twice = [], []

    def worker(k: int) -> None:
        try:
            for r in range(300):
                lid = f"t{k}-{r}"
                got, batch = view.draw(8, lid)
                if not ((view.owner[got] == lease_key(lid)) & (view.state[got] == SlotState.LEASED)).all():
                    leased_twice.append(lid)
                assert (batch.x_t[:, 0, 0, 0].numpy() == got).all()
                view.release(lid)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and leased_twice == []
    c = owner.counts()
    assert c["READY"] == N and c["LEASED"] == 0 and owner.c["consumed"] == 3 * 300 * 8
    mem.close()


def test_a_client_killed_holding_the_lock_does_not_wedge_the_shard():
    mem = ShardMemory.create("test", **_layout())
    owner = _shard(mem, view=False)
    p = mp.get_context("spawn").Process(target=_hold_lock_and_die, args=(mem.path, mem.uid))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == -signal.SIGKILL
    t0 = time.monotonic()
    assert owner.counts()["REFILL"] == N          # the kernel dropped the dead process's lock
    assert time.monotonic() - t0 < 5
    mem.close()


def test_a_killed_client_holding_a_lease_and_a_claim_expires_in_the_owner():
    mem = ShardMemory.create("test", **_layout())
    owner = _shard(mem, view=False)
    owner.lease_timeout_s = owner.claim_timeout_s = 0.3
    slots, _ = owner.claim(N, "warm")
    owner.fill("warm", _records(slots - owner.lo, np.zeros(N, dtype=np.int64)))
    view = _shard(ShardMemory.attach(mem.path, uid=mem.uid, **_layout()), view=True)
    view.lease_timeout_s = view.claim_timeout_s = 1.0
    view.draw(10, "lost-lease")
    view.release("never-drawn")                     # idempotent: unknown lease
    assert owner.counts()["LEASED"] == 10
    time.sleep(1.1)
    c = owner.counts()
    assert c["LEASED"] == 0 and c["READY"] == N and owner.c["expired_leases"] == 10
    view.release("lost-lease")                      # after expiry: harmless
    assert owner.counts()["READY"] == N
    mem.close()


def test_attach_refuses_another_segment_and_views_refuse_group_transitions():
    mem = ShardMemory.create("test", **_layout())
    _shard(mem, view=False)
    with pytest.raises(PoolError, match="not the expected segment"):
        ShardMemory.attach(mem.path, uid=mem.uid + 1, **_layout())
    with pytest.raises(PoolError, match="holds .* bytes, its layout needs"):
        ShardMemory.attach(mem.path, uid=mem.uid, **{**_layout(), "n": N + 100})
    view = _shard(ShardMemory.attach(mem.path, uid=mem.uid, **_layout()), view=True)
    mem.set_flag(FLAG_GROUPS, True)
    with pytest.raises(OwnerOnly):
        view.draw(1, "x")
    mem.set_flag(FLAG_GROUPS, False)
    assert view.counts()["REFILL"] == N
    mem.close()
    assert not view.mem.owner_alive(every_s=0.0)   # closed by its owner: clients treat the shard as dead


def test_memory_errors_are_one_line():
    with pytest.raises(PoolError, match="GiB of memory is available"):
        check_memory(1 << 60, "a pool shard")
    with pytest.raises(PoolError, match="needs .* GiB"):
        ShardMemory.create("huge", **{**_layout(), "n": 10**9, "record_shape": (3, 256, 256)})


def test_record_arrays_start_mid_page():
    """x_t, eps and logvar start 2048 bytes past a page, away from the page + 16 or + 64 where a
    malloc'd batch starts (a copy just ahead of its source modulo 4 KiB runs 3-4x slower)."""
    mem = ShardMemory.create("align", **_layout())
    try:
        assert [mem.a[k].ctypes.data % 4096 for k in ("x_t", "eps", "logvar")] == [2048] * 3
    finally:
        mem.close()


def test_tune_malloc_once_and_never_over_the_users_settings():
    import subprocess

    code = "from common.pool.memory import tune_malloc; print(tune_malloc(), tune_malloc())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
    env["MALLOC_TRIM_THRESHOLD_"] = "1000000"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    # a local pool's client tunes it when the pool is built (each draw's batch reuses freed pages)
    code = ("from common.config import PoolConfig; from common.pool import make_pool; from common.pool.memory import tune_malloc; "
            "make_pool(PoolConfig(backend='local', num_slots=8), 8, (1, 4, 4), has_logvar=False, has_label=False); "
            "print(tune_malloc())")
    env.pop("MALLOC_TRIM_THRESHOLD_")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_helpers():
    assert pid_alive(os.getpid())
    assert lease_key("a") != lease_key("b") and lease_key("a") == lease_key("a") and lease_key("a") != 0


# --- the Ray backend's fast path ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    if started:
        ray.shutdown()


def _ray_pool(name: str, shared: bool, shards: int = 2, n: int = 40, k: float = 1000):
    from common.config import PoolConfig
    from common.pool.ray_backend import RayPool

    cfg = PoolConfig(backend="ray", shards=shards, num_slots=n, min_ready_fraction=0.5, name=name, shared_memory=shared,
                     lease_timeout_s=60, claim_timeout_s=60, block_timeout_s=20, samples_per_insert=k)
    return RayPool(cfg, n, SHAPE, has_logvar=True)


def _fill_all(pool) -> None:
    left = pool.num_slots
    while left:
        c = pool.claim_refill(left, timeout_s=10)
        assert pool.fill(c.claim_id, _batch(c.slots.numpy(), np.full(len(c), 3, dtype=np.int64)))
        left -= len(c)


def _remote_client(pool, rounds: int) -> tuple[int, bool]:
    torch.set_num_threads(1)
    bad = 0
    for _ in range(rounds):
        d = pool.draw(6, timeout_s=20)
        bad += int((d.batch.x_t[:, 0, 0, 0].numpy() != d.slots.numpy()).sum())
        pool.release(d.lease_id)
    return bad, pool.transports()


@pytest.mark.parametrize("shared", [True, False])
def test_ray_pool_fast_path_and_rpc_path_agree(ray_local, shared):
    pool = _ray_pool(f"fast_{shared}", shared)
    try:
        assert pool.transports() == ["shared_memory" if shared else "rpc"] * 2
        _fill_all(pool)
        task = ray_local.remote(num_cpus=0)(_remote_client)
        res = ray_local.get([task.remote(pool, 20) for _ in range(2)])
        assert [r[0] for r in res] == [0, 0]
        assert all(r[1] == pool.transports() for r in res), "a co-located task maps the shards exactly when shared_memory is on"
        st = pool.stats()
        st.check_invariant()
        assert st.counts["LEASED"] == 0 and st.consumed_total == 2 * 20 * 6 and st.produced_total == 40
        assert st.draw_seconds_total > 0           # clients' call times reach shard 0 either way
    finally:
        pool.close()


def test_ray_pool_groups_go_through_the_actors_and_close_stops_clients(ray_local):
    pool = _ray_pool("fast_groups", True, shards=1, n=12, k=1)
    try:
        _fill_all(pool)
        pool.attach_group("a")
        d = pool.draw(4, group="a", timeout_s=10)        # a group draw: the actor's bookkeeping
        with pytest.raises(PoolError, match="draw with group"):
            pool.draw(1, timeout_s=1)                    # a plain draw, refused by the actor over RPC
        pool.release(d.lease_id)
        pool.detach_group("a")
        d = pool.draw(4, timeout_s=10)                   # plain again: the fast path
        pool.release(d.lease_id)
        st = pool.stats()
        st.check_invariant()
    finally:
        pool.close()
    with pytest.raises(PoolError, match="shard actor died for good"):
        pool.draw(1, timeout_s=1)


def test_ray_pool_claims_hand_over_records_and_a_fill_across_a_restore_is_refused(ray_local, tmp_path):
    """Mapped claims hand the previous records over, the fill commits new ones; a restore between a
    claim and its fill makes the fill fail (nothing half-written becomes READY)."""
    pool = _ray_pool("fast_fill", True, shards=2, n=16, k=1)
    try:
        _fill_all(pool)
        d = pool.draw(16, timeout_s=10)
        pool.release(d.lease_id)                         # k = 1: every slot back to REFILL with its record
        c = pool.claim_refill(8, timeout_s=10)
        assert (c.batch.t == 3).all() and (c.batch.x_t[:, 0, 0, 0].numpy() == c.slots.numpy()).all()
        assert pool.fill(c.claim_id, _batch(c.slots.numpy(), np.full(len(c), 7, dtype=np.int64)))
        rest = pool.claim_refill(16, timeout_s=10)         # the other 8
        assert len(rest) == 8
        assert pool.fill(rest.claim_id, _batch(rest.slots.numpy(), np.full(8, 9, dtype=np.int64)))
        d = pool.draw(16, timeout_s=10)
        t_of = dict(zip(d.slots.tolist(), d.batch.t.tolist()))
        assert sorted(t_of.values()) == [7] * 8 + [9] * 8 and all(t_of[s] == 7 for s in c.slots.tolist())
        assert (d.batch.x_t[:, 0, 0, 0].numpy() == d.slots.numpy()).all()
        pool.release(d.lease_id)
        snap = str(tmp_path / "pool.snap")
        pool.snapshot(snap)                                # every slot REFILL with a record
        c = pool.claim_refill(4, timeout_s=10)
        pool.restore(snap)
        assert pool.fill(c.claim_id, _batch(c.slots.numpy(), np.full(len(c), 5, dtype=np.int64))) is False
        st = pool.stats()
        st.check_invariant()
        assert st.counts["REFILL"] == 16 and st.counts["READY"] == 0 and st.fill_rejected_total >= 1
    finally:
        pool.close()
