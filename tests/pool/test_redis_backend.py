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

from common.pool.base import PoolError, PoolTimeout
from common.pool.redis_backend import _HASH_SENTINEL
from conftest import check_records, fill_claim
from redis_fixtures import RedisServer, free_port, make_redis_pool

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
    assert after.counts == before.counts == dict(READY=14, LEASED=6, REFILL=2, FILLING=2)
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
    assert st.counts == dict(READY=0, LEASED=0, REFILL=20, FILLING=0)
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
            meta = pool.keys(i)[0]
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


def test_every_key_of_a_shard_shares_one_cluster_hash_slot(redis_server):
    from redis.crc import key_slot

    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=4)
    slots = [{key_slot(k.encode()) for k in pool.keys(s, "some-lease")} for s in range(4)]
    assert all(len(s) == 1 for s in slots)
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
    assert st.counts == dict(READY=0, LEASED=0, REFILL=12, FILLING=0) and st.warm
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
    pool._fast(0).drain()                          # posted: another client sees it once it has run
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


@pytest.mark.slow
def test_pool_bench_quick_prints_one_json_line_per_case(capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import pool_bench

    assert pool_bench.main(["--quick"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r["backend"], r["shards"], r["clients"]) for r in rows] == [("redis", 1, 1), ("redis", 2, 1)]
    for r in rows:
        assert r["draw_release_records_s"] > 0 and r["claim_fill_records_s"] > 0
        assert r["draw_ratio"] == pytest.approx(r["draw_release_records_s"] / r["ceiling_draw_records_s"], abs=1e-3)
        assert r["draw_release_GB_s"] == pytest.approx(r["draw_release_records_s"] * r["record_bytes"] / 1e9, abs=1e-4)
        # the steady-state refill (claims hand over previous records) against a GET then a SET of each record
        assert r["refill_records_s"] > 0 and r["ceiling_refill_records_s"] > 0
        assert r["refill_ratio"] == pytest.approx(r["refill_records_s"] / r["ceiling_refill_records_s"], abs=1e-3)


def test_fast_fill_of_a_lost_claim_is_refused_and_leaves_no_stray_record(redis_server):
    """A fill takes the fast path (plain HSET of the records, then the state script) while its claim has
    time left; if the claim was lost meanwhile (here: another client resets the pool), the script refuses
    and removes the records the HSET wrote, so the slots stay empty."""
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, claim_timeout_s=60.0)
    other = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2, claim_timeout_s=60.0, name=pool.cfg.name)
    c = pool.claim_refill(8)
    other.reset()
    assert not fill_claim(pool, c, SHAPE)
    st = pool.stats()
    assert st.counts == dict(READY=0, LEASED=0, REFILL=8, FILLING=0) and st.produced_total == 0
    client = redis_server.client()
    assert all(client.hkeys(pool.keys(s)[7]) == [_HASH_SENTINEL.encode()] for s in range(2)), "a slot holds a record (a t entry)"
    c2 = other.claim_refill(8)
    assert (c2.batch.t == -1).all(), "the refused records did not become previous records"
    assert fill_claim(other, c2, SHAPE)
    d = pool.draw(8)
    check_records(d.slots, d.batch)
    other.close()
    pool.close()


def test_a_lease_is_one_field_and_one_zset_member_and_filling_stays_a_skiplist(redis_server):
    pool = make_redis_pool(redis_server, 6, record_shape=SHAPE, shards=1)
    client = redis_server.client()
    leased, filling, leases = pool.keys(0)[3], pool.keys(0)[4], pool.keys(0)[11]
    assert client.object("encoding", filling) == b"skiplist"
    for key in pool.keys(0)[5:10]:             # owner rec t uses born: hashtables however few their fields
        assert client.object("encoding", key) == b"hashtable", key
    assert pool.stats().counts == dict(READY=0, LEASED=0, REFILL=6, FILLING=0)
    fill_all(pool)
    assert client.object("encoding", filling) == b"skiplist", "an emptied zset is not deleted"
    d = pool.draw(4)
    held = client.hgetall(leases)
    assert list(held) == [d.lease_id.encode()]
    assert sorted(int(m) for m in held[d.lease_id.encode()].split(b",")) == sorted(d.slots.tolist())
    assert client.zrange(leased, 0, -1) == [d.lease_id.encode()]
    assert pool.stats().counts == dict(READY=2, LEASED=4, REFILL=0, FILLING=0)
    assert pool._counts()[0].tolist()[:4] == [2, 4, 0, 0], "the hot path's LEASED (by subtraction) agrees"
    pool.release(d.lease_id)
    pool._fast(0).drain()                          # the posted release has run
    assert client.hlen(leases) == 0 and client.zcard(leased) == 0
    assert pool.stats().counts == dict(READY=2, LEASED=0, REFILL=4, FILLING=0)
    pool.close()


def test_threads_sharing_one_pool_object_get_their_own_records(redis_server):
    """Each thread has its own connection (replies are views of its read buffer)."""
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


def _calls(client, *commands: str) -> dict[str, int]:
    """Successful calls of each command so far on the server (INFO commandstats; a first EVALSHA of a
    script fails with NOSCRIPT and is loaded and sent again)."""
    st = client.info("commandstats")
    return {c: int(st.get(f"cmdstat_{c}", {}).get("calls", 0)) - int(st.get(f"cmdstat_{c}", {}).get("failed_calls", 0))
            for c in commands}


def test_a_release_is_posted_and_the_same_client_sees_it_at_once(redis_server):
    """release() sends its script and returns without waiting for the reply, which the next call on the
    connection reads first, so the same client's next call already sees the slots released. A release whose
    reply is an error (the server's scripts flushed under the pool) or lost with its connection runs again
    (release is idempotent: every slot is released once)."""
    pool = make_redis_pool(redis_server, 8, record_shape=SHAPE, shards=2)
    fill_all(pool)
    client = redis_server.client()
    d = pool.draw(3)
    pool.release(d.lease_id)
    assert len(pool._fast(0).posted) == 1, "sent, its reply not read yet"
    st = pool.stats()
    assert st.counts == dict(READY=5, LEASED=0, REFILL=3, FILLING=0) and not pool._fast(0).posted
    d = pool.draw(2)
    client.script_flush()
    pool.release(d.lease_id)                       # NOSCRIPT: read by the next call, then run again
    pool.stats()
    assert pool.stats().counts == dict(READY=3, LEASED=0, REFILL=5, FILLING=0)
    d = pool.draw(2)
    pool.release(d.lease_id)
    client.client_kill_filter(_type="normal", skipme=True)     # the pool's connections: the reply is lost
    pool.stats()
    st = pool.stats()
    assert st.counts == dict(READY=1, LEASED=0, REFILL=7, FILLING=0) and st.released_total == 7
    assert pool.local["retries"] >= 1
    d = pool.draw(1)
    pool.release(d.lease_id)
    pool.close()                                   # reads the last reply before it closes
    assert redis_server.client().hlen(pool.keys(0)[11]) + redis_server.client().hlen(pool.keys(1)[11]) == 0, \
        "no lease left"


def test_shards_of_one_server_draw_and_claim_in_one_script_call(redis_server):
    """With every shard on one server a draw, a release or a claim is one EVALSHA over all shards (no counts round);
    a claim of empty slots reads no records (its script's one HMGET per shard of the t hash finds none), a claim
    of refilled slots reads their previous records."""
    pool = make_redis_pool(redis_server, 24, record_shape=SHAPE, shards=3, samples_per_insert=1.0)
    client = redis_server.client()
    before = _calls(client, "evalsha", "hmget")
    c = pool.claim_refill(24)
    assert len(c) == 24 and (c.batch.t == -1).all()
    assert _calls(client, "evalsha", "hmget") == {"evalsha": before["evalsha"] + 1, "hmget": before["hmget"] + 3}
    assert fill_claim(pool, c, SHAPE)
    before = _calls(client, "evalsha", "hmget")
    d = pool.draw(10)
    check_records(d.slots, d.batch)
    assert _calls(client, "evalsha")["evalsha"] == before["evalsha"] + 1, "no counts round before the draw"
    before = _calls(client, "evalsha")
    pool.release(d.lease_id)                        # uses spent: the 10 slots are REFILL with their records
    pool._fast(0).drain()                           # the posted release's reply: it has run
    assert _calls(client, "evalsha")["evalsha"] == before["evalsha"] + 1, "one release script for all shards"
    before = _calls(client, "evalsha", "hmget")
    c = pool.claim_refill(24)
    after = _calls(client, "evalsha", "hmget")
    assert after["evalsha"] == before["evalsha"] + 1 and after["hmget"] > before["hmget"] + 3
    assert sorted(c.slots.tolist()) == sorted(d.slots.tolist())
    check_records(c.slots, c.batch)                  # the previous records come back with the claim
    assert (c.batch.t >= 0).all()
    assert fill_claim(pool, c, SHAPE)
    pool.close()


def test_a_shard_lost_under_an_all_shard_script_is_reinitialised_alone(redis_server):
    pool = make_redis_pool(redis_server, 12, record_shape=SHAPE, shards=3, min_ready_fraction=0.0)
    fill_all(pool)
    redis_server.client().delete(*pool.keys(1)[:11])    # shard 1's keys are gone (its marker with them)
    d = pool.draw(8, timeout_s=2.0)                     # the draw script fails on the marker, shard 1 restarts
    check_records(d.slots, d.batch)
    lo, hi = pool.ranges[1]
    assert not any(lo <= s < hi for s in d.slots.tolist())
    st = pool.stats()
    assert st.extra["reinitialised_shards"] == 1 and st.shard_counts[1]["REFILL"] == hi - lo
    c = pool.claim_refill(12)
    assert sorted(c.slots.tolist()) == list(range(lo, hi)) and (c.batch.t == -1).all()
    pool.close()


def test_resp_connection_sends_the_commands_of_an_iterable_as_they_are_made(redis_server):
    """The fast fill hands execute a generator (records encoded chunk by chunk): every command is sent in
    order, one reply each; a generator that fails midway leaves the connection usable for the next call."""
    from common.pool.resp import RespConnection

    conn = RespConnection(redis_server.url)

    def commands():
        for i in range(4):
            yield ["SET", f"k{i}", b"%d" % i * (1500 * i + 1)]
        yield ["MGET", *(f"k{i}" for i in range(4))]

    replies = conn.execute(commands())
    assert replies[:4] == [b"OK"] * 4
    assert [bytes(v) for v in replies[4]] == [b"%d" % i * (1500 * i + 1) for i in range(4)]

    def broken():
        yield ["SET", "k9", b"1"]
        raise ValueError("encoding failed")

    with pytest.raises(ValueError):
        conn.execute(broken())
    assert conn.execute([["GET", "k0"], ["GET", "k1"]]) == [b"0", b"1" * 1501]
    conn.close()


def test_every_slot_record_is_preallocated_and_empty_means_no_t_entry(redis_server, tmp_path):
    """Init writes each slot's placeholder (record-sized zero bytes) so fills overwrite; a slot holds a
    record exactly when it has a t entry: claims, snapshots and restores go by that, not by the field."""
    pool = make_redis_pool(redis_server, 10, record_shape=SHAPE, shards=2)
    client = redis_server.client()
    for s, (lo, hi) in enumerate(pool.ranges):
        rec, t = pool.keys(s)[6], pool.keys(s)[7]
        assert client.hlen(rec) == hi - lo + 1 and client.hlen(t) == 1       # and each hash's sentinel
        assert {client.hstrlen(rec, str(m)) for m in range(lo, hi)} == {pool.fmt.record_bytes}
        assert client.hkeys(t) == [_HASH_SENTINEL.encode()]
    c = pool.claim_refill(10)
    assert (c.batch.t == -1).all(), "a placeholder was handed over as a previous record"
    pool.snapshot(str(tmp_path / "empty.snap"))
    assert fill_claim(pool, c, SHAPE)
    d = pool.draw(4)
    check_records(d.slots, d.batch)
    pool.release(d.lease_id)
    pool.snapshot(str(tmp_path / "some.snap"))
    pool.restore(str(tmp_path / "empty.snap"))
    st = pool.stats()
    assert st.counts == dict(READY=0, LEASED=0, REFILL=10, FILLING=0)
    assert sum(client.hlen(pool.keys(s)[6]) for s in range(2)) == 10 + 2, "restore rewrites the placeholders"
    assert (pool.claim_refill(10).batch.t == -1).all()
    pool.restore(str(tmp_path / "some.snap"))
    assert pool.stats().counts["REFILL"] == 4 and sum(client.hlen(pool.keys(s)[7]) for s in range(2)) == 10 + 2
    c = pool.claim_refill(10)
    assert int((c.batch.t != -1).sum()) == 4, "the released slots hand over their previous records"
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
