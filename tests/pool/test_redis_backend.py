"""Redis-specific behaviour of the pool: server restarts, connection loss, several servers, a cluster.

Real redis-server processes (tests/pool/redis_fixtures.py), no mocks. The
backend-independent contract is checked by test_conformance.py.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from conftest import check_records, fill_claim
from redis_fixtures import RedisServer, free_port, make_redis_pool

from common.pool.base import PoolError, PoolTimeout

SHAPE = (1, 4, 4)


def fill_all(pool) -> None:
    while pool.stats().counts["REFILL"]:
        c = pool.claim_refill(pool.num_slots, timeout_s=2.0)
        assert fill_claim(pool, c, SHAPE)


def test_restart_with_aof_loses_nothing(redis_server_aof):
    pool = make_redis_pool(redis_server_aof, 24, record_shape=SHAPE, shards=3, min_ready_fraction=1.0,
                           redis_retry_timeout_s=10.0)
    fill_all(pool)
    d = pool.draw(6)                              # LEASED across the restart
    c_rel = pool.draw(4)
    pool.release(c_rel.lease_id)                  # 4 REFILL
    claim = pool.claim_refill(2)                  # FILLING across the restart
    before = pool.stats()
    redis_server_aof.restart(kill=True)           # SIGKILL: only what AOF (fsync always) wrote survives
    after = pool.stats()
    after.check_invariant()
    assert after.counts == before.counts == {"READY": 14, "LEASED": 6, "REFILL": 2, "FILLING": 2}
    assert after.t_histogram == before.t_histogram
    assert (after.produced_total, after.consumed_total, after.warm) == (before.produced_total, before.consumed_total, True)
    assert after.extra["reinitialised_shards"] == 0
    # the lease and the claim made before the crash are still honoured
    pool.release(d.lease_id)
    assert fill_claim(pool, claim, SHAPE)
    rest = pool.draw(16, timeout_s=2.0)
    check_records(rest.slots, rest.batch)
    pool.close()


def test_restart_without_persistence_reinitialises_empty_and_teachers_rebuild(redis_server):
    pool = make_redis_pool(redis_server, 20, record_shape=SHAPE, shards=2, min_ready_fraction=1.0,
                           redis_retry_timeout_s=10.0)
    fill_all(pool)
    d = pool.draw(5)
    redis_server.restart(kill=True)               # the server comes back empty
    st = pool.stats()                              # the marker is gone: both shards re-initialised
    st.check_invariant()
    assert st.counts == {"READY": 0, "LEASED": 0, "REFILL": 20, "FILLING": 0}
    assert st.extra["reinitialised_shards"] == 2
    assert not st.warm and st.produced_total == 0
    pool.release(d.lease_id)                       # a lease of the lost pool: harmless
    with pytest.raises(PoolTimeout, match="warm-up"):
        pool.draw(1, timeout_s=0.2)               # not warm again until the teachers rebuild it
    c = pool.claim_refill(20)
    assert len(c) == 20 and (c.batch.t == -1).all(), "every slot restarts empty: teachers run the warm-up"
    assert fill_claim(pool, c, SHAPE)
    d = pool.draw(20, timeout_s=2.0)
    check_records(d.slots, d.batch)
    # a second client of the same pool sees the rebuilt pool and does not re-initialise it again
    other = make_redis_pool(redis_server, 20, record_shape=SHAPE, shards=2, name=pool.cfg.name)
    assert other.stats().counts["LEASED"] == 20
    other.close()
    pool.close()


def test_a_counter_written_just_after_the_server_lost_the_pool_does_not_hide_the_loss(redis_server):
    """Blocked seconds and rejected fills go straight to shard 0's meta hash (HINCRBY, no script). One that lands
    after the server came back empty makes a meta hash with counters and no layout: that is still a lost shard,
    re-created empty, and a client built then (a teacher Ray restarted at that moment) starts on it, where
    it used to fail in its constructor on every restart and take the run down."""
    pool = make_redis_pool(redis_server, 20, record_shape=SHAPE, shards=2, min_ready_fraction=1.0,
                           redis_retry_timeout_s=10.0)
    fill_all(pool)
    redis_server.restart(kill=True)               # the server comes back empty
    pool._add_time("fill", 0.5, 0.0, rejected=1)  # before any script of this client meets the loss
    teacher = make_redis_pool(redis_server, 20, record_shape=SHAPE, shards=2, name=pool.cfg.name)
    for client in (teacher, pool):
        st = client.stats()
        st.check_invariant()
        assert st.counts == {"READY": 0, "LEASED": 0, "REFILL": 20, "FILLING": 0}
    c = teacher.claim_refill(20)
    assert len(c) == 20 and (c.batch.t == -1).all()
    assert fill_claim(teacher, c, SHAPE)
    d = pool.draw(20, timeout_s=2.0)
    check_records(d.slots, d.batch)
    teacher.close()
    pool.close()


def test_connection_loss_is_retried_until_the_server_returns(redis_server):
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, redis_retry_timeout_s=20.0)
    fill_all(pool)
    redis_server.stop()
    timer = threading.Timer(0.8, redis_server.start)
    timer.start()
    t0 = time.monotonic()
    st = pool.stats()                              # blocks in the retry loop, then succeeds
    waited = time.monotonic() - t0
    timer.join()
    assert waited >= 0.5, waited
    assert pool.local["retries"] >= 2
    assert st.counts["REFILL"] == 8                # no persistence: the pool came back empty
    pool.close()


def test_connection_loss_becomes_a_clear_error_after_the_timeout(redis_server):
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, redis_retry_timeout_s=0.6)
    fill_all(pool)
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(PoolError, match=rf"redis server {redis_server.url} unreachable .*redis_retry_timeout_s=0.6"):
        pool.draw(2)
    assert 0.5 <= time.monotonic() - t0 < 5.0
    pool.close()


def test_shards_spread_over_several_servers(tmp_path):
    servers = [RedisServer(tmp_path / f"r{i}").start() for i in range(2)]
    try:
        pool = make_redis_pool(servers, 16, record_shape=SHAPE, shards=4, redis_retry_timeout_s=0.5)
        fill_all(pool)
        # shard i lives on server i mod 2, and only there
        for i in range(4):
            meta = pool.redis.key(i, "meta")
            assert servers[i % 2].client().exists(meta) == 1 and servers[1 - i % 2].client().exists(meta) == 0
        d = pool.draw(16)
        check_records(d.slots, d.batch)
        assert sorted(d.slots.tolist()) == list(range(16))
        pool.release(d.lease_id)
        assert pool.stats().counts["REFILL"] == 16
        servers[1].kill()
        with pytest.raises(PoolError, match=servers[1].url):
            pool.stats()
        pool.close()
    finally:
        for s in servers:
            s.kill()


def test_a_different_layout_under_the_same_name_is_refused(redis_server):
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2)
    with pytest.raises(PoolError, match="layout"):
        make_redis_pool(redis_server, 10, record_shape=SHAPE, shards=2, name=pool.cfg.name)
    pool.close()


def test_a_pool_of_an_older_layout_version_is_refused(redis_server, monkeypatch):
    """Version 4 kept logvar in the storage dtype: today's client would misread its records (issue 22)."""
    from common.pool import redis_backend

    monkeypatch.setattr(redis_backend, "LAYOUT_VERSION", "dkdm-pool-redis/4")
    old = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, has_logvar=True, storage_dtype="fp16")
    monkeypatch.undo()
    with pytest.raises(PoolError, match="has layout 'dkdm-pool-redis/4 .*this process expects 'dkdm-pool-redis/5 "):
        make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, has_logvar=True, storage_dtype="fp16",
                        name=old.cfg.name)
    old.close()


def test_every_key_of_a_shard_shares_one_cluster_hash_slot(redis_server):
    """Each script call touches one shard's keys, and all of them hash to one Redis Cluster slot."""
    from redis.crc import key_slot

    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=4, samples_per_insert=1.0)
    fill_all(pool)
    d = pool.draw(4)
    pool.release(pool.draw(2).lease_id)
    c = pool.claim_refill(1)
    client = redis_server.client()
    for s in range(4):
        keys = list(client.scan_iter(match=pool.redis.key(s, "*")))
        assert len(keys) >= 6 and len({key_slot(k) for k in keys}) == 1, keys
    assert sum(len(list(client.scan_iter(match=pool.redis.key(s, "r:*")))) for s in range(4)) == 8
    pool.release(d.lease_id)
    assert fill_claim(pool, c, SHAPE)
    pool.destroy()
    assert not list(client.scan_iter(match=f"{{{pool.cfg.name}:*"))
    pool.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is needed to create a cluster")
def test_redis_cluster(tmp_path):
    """Three masters, no replicas: the same layout runs on a Redis Cluster (each script in one hash slot)."""
    servers = [RedisServer(tmp_path / f"c{i}", port=free_port(cluster=True), extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"))
               for i in range(3)]
    try:
        for s in servers:
            s.start()
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in servers[0].client().execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster never became ok"
            time.sleep(0.2)
        pool = make_redis_pool(f"redis+cluster://127.0.0.1:{servers[0].port}", 24, record_shape=SHAPE, shards=6)
        fill_all(pool)
        d = pool.draw(24)
        check_records(d.slots, d.batch)
        pool.release(d.lease_id)
        st = pool.stats()
        st.check_invariant()
        assert st.counts["REFILL"] == 24 and st.consumed_total == 24
        # the shards really are spread: more than one master holds pool keys
        assert sum(s.client().dbsize() > 0 for s in servers) >= 2
        pool.close()
    finally:
        for s in servers:
            s.kill()


def test_snapshot_restores_across_backends(redis_server, tmp_path):
    """A snapshot written by the Redis backend restores into the local backend and back (one file format)."""
    from common.config import PoolConfig
    from common.pool import make_pool

    pool = make_redis_pool(redis_server, 12, record_shape=SHAPE, shards=2, min_ready_fraction=1.0)
    fill_all(pool)
    path = str(tmp_path / "redis.snap")
    pool.snapshot(path)
    local = make_pool(PoolConfig(backend="local", shards=3, min_ready_fraction=1.0), 12, SHAPE, False, False)
    local.restore(path)
    assert local.stats().counts["READY"] == 12 and local.stats().warm
    d = local.draw(12)
    check_records(d.slots, d.batch)
    local.release(d.lease_id)
    path2 = str(tmp_path / "local.snap")
    local.snapshot(path2)
    pool.restore(path2)
    st = pool.stats()
    assert st.counts == {"READY": 0, "LEASED": 0, "REFILL": 12, "FILLING": 0} and st.warm
    c = pool.claim_refill(12)
    assert (c.batch.t >= 0).all(), "released records come back to the refilling teacher"
    pool.close()


def test_pool_survives_pickling(redis_server):
    import pickle

    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2)
    fill_all(pool)
    copy = pickle.loads(pickle.dumps(pool))
    d = copy.draw(3)
    check_records(d.slots, d.batch)
    assert pool.stats().counts["LEASED"] == 3
    pool.release(d.lease_id)                       # a lease is the pool's, not the client's
    assert copy.stats().counts["REFILL"] == 3
    copy.close()
    pool.close()


def test_draw_blocked_time_is_shared_between_clients(redis_server):
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, min_ready_fraction=1.0)
    other = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, min_ready_fraction=1.0, name=pool.cfg.name)
    with pytest.raises(PoolTimeout):
        other.draw(1, timeout_s=0.3)
    assert pool.stats().draw_blocked_seconds_total >= 0.3
    other.close()
    pool.close()


def test_free_port_gives_distinct_servers(tmp_path):
    a = RedisServer(tmp_path / "a", port=free_port()).start()
    b = RedisServer(tmp_path / "b", port=a.port)
    try:
        with pytest.raises(RuntimeError, match="taken|exited"):
            b.start(timeout_s=2.0)                 # the port is taken: a clear error, no hang
        assert not b.running
    finally:
        b.kill()
        a.kill()


def test_threads_sharing_one_pool_object_get_their_own_records(redis_server):
    """Threads share one pool object (redis-py hands each call a connection of its own)."""
    pool = make_redis_pool(redis_server, 64, record_shape=(3, 8, 8), shards=1, samples_per_insert=1e9)
    while pool.stats().counts["REFILL"]:
        c = pool.claim_refill(64, timeout_s=2.0)
        assert fill_claim(pool, c, (3, 8, 8))
    errors = []

    def trainer():
        try:
            for _ in range(20):
                d = pool.draw(16, timeout_s=10.0)
                check_records(d.slots, d.batch)
                pool.release(d.lease_id)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=trainer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pool.close()


def test_a_pool_larger_than_maxmemory_is_refused_before_anything_is_written(redis_server):
    """Redis checks maxmemory when a script starts, not inside it: the init would overshoot, so the
    client compares the pool's size with the server's room first and names both."""
    client = redis_server.client()
    client.config_set("maxmemory", str(16 << 20))
    before = client.dbsize()
    with pytest.raises(PoolError, match=r"needs about \d+ MiB for 1000 slots.*maxmemory is 16 MiB"):
        make_redis_pool(redis_server, 1000, record_shape=(3, 32, 32), has_logvar=True)
    assert client.dbsize() == before
    pool = make_redis_pool(redis_server, 100, record_shape=(3, 32, 32), has_logvar=True)   # ~3.6 MiB fits
    assert pool.stats().counts["REFILL"] == 100
    again = make_redis_pool(redis_server, 100, record_shape=(3, 32, 32), has_logvar=True, name=pool.cfg.name)
    assert again.stats().counts["REFILL"] == 100, "attaching to an existing pool needs no new memory"
    again.close()
    pool.close()




def test_a_fill_of_a_lost_claim_is_refused_and_leaves_no_record(redis_server):
    """A fill stages its records next to the slots and the script renames them only if the claim still holds
    the slots; a claim lost meanwhile (here: another client resets the pool) leaves nothing behind."""
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, claim_timeout_s=60.0)
    other = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, claim_timeout_s=60.0, name=pool.cfg.name)
    c = pool.claim_refill(8)
    other.reset()
    assert not fill_claim(pool, c, SHAPE)
    st = pool.stats()
    assert st.counts == {"READY": 0, "LEASED": 0, "REFILL": 8, "FILLING": 0} and st.produced_total == 0
    client = redis_server.client()
    assert not [k for s in range(2) for k in client.scan_iter(match=pool.redis.key(s, "[rf]:*"))], "a record or a staged one is left"
    c2 = other.claim_refill(8)
    assert (c2.batch.t == -1).all(), "the refused records did not become previous records"
    assert fill_claim(other, c2, SHAPE)                 # a claim made by one client, filled by another
    d = pool.draw(8)
    check_records(d.slots, d.batch)
    other.close()
    pool.close()


def test_consumer_groups_are_shared_by_clients_of_one_pool(redis_server):
    """Groups live in Redis: two students in two clients (processes in the service) each see every record once."""
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, samples_per_insert=1.0)
    other = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, samples_per_insert=1.0, name=pool.cfg.name)
    fill_all(pool)
    pool.attach_group("a")
    other.attach_group("b")
    for client, group in ((pool, "a"), (other, "b")):
        d = client.draw(8, group=group)
        check_records(d.slots, d.batch)
        assert sorted(d.slots.tolist()) == list(range(8))
        client.release(d.lease_id)
    assert other.stats().counts["REFILL"] == 8
    assert set(pool.groups()) == {"a", "b"} and pool.groups()["b"]["consumed"] == 8
    with pytest.raises(PoolError, match="samples_per_insert=1"):
        make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, samples_per_insert=2.0).attach_group("c")
    other.close()
    pool.close()


def test_a_pool_client_tunes_malloc_in_its_process(redis_server):
    """A client process keeps freed batches mapped (memory.tune_malloc): once a pool is built there,
    the process's own call finds malloc tuned already."""
    import os
    import sys

    code = ("from common.pool.memory import tune_malloc; from redis_fixtures import make_redis_pool; "
            f"p = make_redis_pool({redis_server.url!r}, 8); print(tune_malloc()); p.destroy(); p.close()")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests", "pool")])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
