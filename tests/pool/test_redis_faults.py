"""Faults of the Redis pool (issue 20): redis-server killed or stopped under load, and passwords.

A real redis-server started by the test is SIGKILLed (no persistence: the pool is re-created empty and
warmed up again) or stopped with SIGTERM (AOF: the pool is found as it was) while a trainer thread draws
and releases and a teacher thread claims and fills. What is checked: the slot invariant, that work resumes,
that leases and claims held across the restart expire back, and the log lines the outage leaves.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from pool_conftest import check_records, fill_claim
from redis_fixtures import RedisServer, make_redis_pool

from common.pool.base import PoolError, PoolTimeout
from common.config import mask_url

SHAPE = (1, 4, 4)
LOGGER = "common.pool.redis_backend"


class Load:
    """A trainer thread (draw 4, check, release) and a teacher thread (claim 4, fill) on one pool object."""

    def __init__(self, pool):
        self.pool, self.stop, self.errors = pool, threading.Event(), []
        self.done = {"draws": 0, "fills": 0}
        self.threads = [threading.Thread(target=self._loop, args=(role,), daemon=True) for role in ("trainer", "teacher")]
        for t in self.threads:
            t.start()

    def _loop(self, role: str) -> None:
        while not self.stop.is_set():
            try:
                if role == "trainer":
                    d = self.pool.draw(4, timeout_s=0.5)
                    check_records(d.slots, d.batch)
                    self.pool.release(d.lease_id)
                    self.done["draws"] += 1
                else:
                    c = self.pool.claim_refill(4, timeout_s=0.5)
                    self.done["fills"] += fill_claim(self.pool, c, SHAPE)
            except PoolTimeout:
                pass
            except Exception as err:  # noqa: BLE001 - reported by the test
                self.errors.append(err)
                return

    def wait_for(self, draws: int, fills: int, timeout_s: float = 30.0) -> None:
        start, deadline = dict(self.done), time.monotonic() + timeout_s
        while self.done["draws"] - start["draws"] < draws or self.done["fills"] - start["fills"] < fills:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, ("no progress", start, self.done)
            time.sleep(0.05)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        assert not self.errors, self.errors


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_sigkill_without_persistence_recreates_the_pool_and_teachers_warm_it_again(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool = make_redis_pool(redis_server, 32, record_shape=SHAPE, shards=2, min_ready_fraction=0.5,
                           lease_timeout_s=2.0, claim_timeout_s=2.0, redis_retry_timeout_s=20.0)
    load = Load(pool)
    load.wait_for(draws=5, fills=5)
    redis_server.kill()                                  # SIGKILL: everything in memory is gone
    time.sleep(0.5)
    redis_server.start()
    load.wait_for(draws=5, fills=10)                     # the pool was re-created, warmed up and is drawn again
    load.join()
    st = pool.stats()
    st.check_invariant()
    assert st.extra["reinitialised_shards"] == 2 and st.produced_total >= 10
    lines = outage_lines(caplog)
    assert sum("unreachable" in m for m in lines) == 1 and sum("reachable again" in m for m in lines) == 1, lines
    assert sum("re-created" in m for m in lines) == 1, lines
    recreated = next(m for m in lines if "re-created" in m)
    assert pool.cfg.name in recreated and "32 of their slots empty" in recreated and "warm them up again" in recreated
    pool.close()


def test_sigterm_with_aof_finds_the_pool_intact_and_held_leases_expire(redis_server_aof, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool = make_redis_pool(redis_server_aof, 32, record_shape=SHAPE, shards=2, min_ready_fraction=0.5,
                           lease_timeout_s=2.0, claim_timeout_s=2.0, redis_retry_timeout_s=20.0)
    while pool.stats().counts["REFILL"]:
        assert fill_claim(pool, pool.claim_refill(32), SHAPE)
    held = pool.draw(4, timeout_s=1.0)                   # held across the restart, never released
    pool.release(pool.draw(4, timeout_s=1.0).lease_id)
    claim = pool.claim_refill(2, timeout_s=1.0)          # ... and never filled
    load = Load(pool)
    load.wait_for(draws=5, fills=5)
    before = pool.stats()
    redis_server_aof.stop()                              # SIGTERM: AOF written ...
    time.sleep(0.5)
    redis_server_aof.start()                             # ... and the same data back
    load.wait_for(draws=5, fills=5)
    load.join()
    after = pool.stats()
    after.check_invariant()
    assert after.extra["reinitialised_shards"] == 0 and after.produced_total > before.produced_total
    time.sleep(2.1)                                      # the lease and the claim made before the restart expire
    st = pool.stats()
    st.check_invariant()
    assert st.counts["LEASED"] == 0 and st.counts["FILLING"] == 0, st.counts
    assert st.expired_leases_total >= 4 and st.expired_claims_total >= 2
    assert fill_claim(pool, claim, SHAPE) is False
    pool.release(held.lease_id)                          # expired: harmless
    lines = outage_lines(caplog)
    assert not any("re-created" in m for m in lines), lines
    assert sum("unreachable" in m for m in lines) == 1 and sum("reachable again" in m for m in lines) == 1, lines
    pool.close()


# --- passwords (issue 20 item 5) ---------------------------------------------------------------------------------


def test_mask_url_hides_every_password():
    assert mask_url("redis://:secret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_url("redis://trainer:secret@host:1/2") == "redis://trainer:***@host:1/2"
    assert mask_url("rediss://u:p%40ss@h:1/0,redis://h2:2/0") == "rediss://u:***@h:1/0,redis://h2:2/0"
    assert mask_url("redis+cluster://:pw@h:7000") == "redis+cluster://:***@h:7000"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_server_pw(tmp_path):
    server = RedisServer(tmp_path / "redis-pw", password="s3cret-pw").start()
    try:
        yield server
    finally:
        server.kill()


def test_a_password_in_the_url_works_and_never_reaches_a_log_or_an_error(redis_server_pw, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = redis_server_pw
    pool = make_redis_pool(server.url, 8, record_shape=SHAPE, shards=2, redis_retry_timeout_s=0.8)
    assert fill_claim(pool, pool.claim_refill(8), SHAPE)
    d = pool.draw(8)
    check_records(d.slots, d.batch)
    assert pool.stats().extra["urls"] == [f"redis://:***@127.0.0.1:{server.port}/0"]
    # a user of Redis's ACL with a password of its own
    server.client().acl_setuser("trainer", enabled=True, passwords=["+u5er-pw"], keys=["*"], commands=["+@all"])
    other = make_redis_pool(f"redis://trainer:u5er-pw@127.0.0.1:{server.port}/0", 8, record_shape=SHAPE, shards=2,
                            name=pool.cfg.name)
    assert other.stats().counts["LEASED"] == 8
    other.close()
    # a wrong password: one line, at once, the password masked
    t0 = time.monotonic()
    with pytest.raises(PoolError) as err:
        make_redis_pool(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", 8, record_shape=SHAPE, shards=2)
    msg = str(err.value)
    assert time.monotonic() - t0 < 5 and "\n" not in msg and "wrong-pw" not in msg and ":***@" in msg, msg
    assert "refused the credentials" in msg
    # an outage: its log lines and its error name the server without the password
    server.kill()
    with pytest.raises(PoolError) as err:
        pool.stats()
    lines = outage_lines(caplog) + [str(err.value)]
    assert any("unreachable" in m for m in lines) and all("s3cret-pw" not in m for m in lines), lines
    assert all(f"redis://:***@127.0.0.1:{server.port}/0" in m for m in lines if "unreachable" in m), lines
    pool.close()


def test_the_password_can_come_from_the_environment_and_is_never_saved(redis_server_pw, monkeypatch, tmp_path):
    """Compose gives the Ray nodes DKDM_REDIS_PASSWORD, so the job's command line and saved config carry none."""
    from common.config import REDIS_PASSWORD_ENV, config_from_dict, save_config

    bare = f"redis://127.0.0.1:{redis_server_pw.port}/0"
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    with pytest.raises(PoolError, match="refused the credentials|NOAUTH|Authentication"):
        make_redis_pool(bare, 8, record_shape=SHAPE, shards=1)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "s3cret-pw")
    pool = make_redis_pool(bare, 8, record_shape=SHAPE, shards=1)
    assert fill_claim(pool, pool.claim_refill(8), SHAPE)
    assert pool.stats().extra["urls"] == [f"redis://:***@127.0.0.1:{redis_server_pw.port}/0"]
    pool.close()
    cfg = config_from_dict({"pool": {"backend": "redis", "redis_url": redis_server_pw.url}})
    save_config(cfg, tmp_path / "config.json")
    saved = (tmp_path / "config.json").read_text()
    assert "s3cret-pw" not in saved and ":***@127.0.0.1" in saved
