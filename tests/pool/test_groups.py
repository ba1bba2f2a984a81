"""Consumer groups (issue 8): every attached group trains on every record once; REFILL after all of them."""

from __future__ import annotations

import time

import pytest

from common.pool.base import PoolError
from pool_conftest import check_records, fill_claim

SHAPE = (1, 4, 4)


def fill_all(pool) -> int:
    n = 0
    while pool.stats().counts["REFILL"]:
        c = pool.claim_refill(pool.num_slots, timeout_s=1.0)
        assert fill_claim(pool, c, SHAPE)
        n += len(c)
    return n


def consume(pool, group: str, n: int, b: int = 4) -> list[int]:
    seen = []
    for _ in range(n // b):
        d = pool.draw(b, timeout_s=2.0, group=group)
        check_records(d.slots, d.batch)
        seen += d.slots.tolist()
        pool.release(d.lease_id)
    return seen


@pytest.fixture
def groups_harness(harness):
    return harness


def test_every_group_sees_every_record_once(groups_harness):
    pool = groups_harness.make(num_slots=12, shards=2)
    fill_all(pool)
    pool.attach_group("a")
    pool.attach_group("b")
    a = consume(pool, "a", 12)
    assert sorted(a) == list(range(12)), "group a trains on every record exactly once"
    st = pool.stats()
    st.check_invariant()
    assert st.counts["READY"] == 12 and st.counts["REFILL"] == 0, "no slot is refilled before every group used it"
    with pytest.raises(PoolError, match="new to consumer group 'a'"):
        pool.draw(1, timeout_s=0.2, group="a")          # a has seen everything: it waits (policy 'wait')
    g = pool.groups()
    assert g["b"]["lag"] == 12 and g["a"]["lag"] == 0 and g["a"]["consumed"] == 12
    b = consume(pool, "b", 8)
    assert pool.stats().counts["REFILL"] == 8
    b += consume(pool, "b", 4)
    assert sorted(b) == list(range(12))
    st = pool.stats()
    assert st.counts["REFILL"] == 12 and st.extra["groups"]["b"]["consumed"] == 12
    assert fill_all(pool) == 12                         # one teacher forward per record for both students
    assert sorted(consume(pool, "a", 12)) == list(range(12))
    with pytest.raises(PoolError, match="draw with group"):
        pool.draw(1, timeout_s=0.2)                     # plain draws do not mix with groups


def test_skip_policy_bounds_lag(groups_harness):
    pool = groups_harness.make(num_slots=12, shards=2)
    fill_all(pool)
    pool.attach_group("fast")
    pool.attach_group("slow", policy="skip", max_lag=4)
    consume(pool, "fast", 12)
    g = pool.groups()["slow"]
    assert g["lag"] == 4 and g["skipped"] == 8 and g["pending"] == 4
    st = pool.stats()
    assert st.counts["REFILL"] == 8, "the skipped records go to REFILL without waiting for the slow group"
    with pytest.raises(PoolError, match="max_lag"):
        pool.attach_group("bad", policy="skip")


def test_attach_and_detach_while_running(groups_harness):
    pool = groups_harness.make(num_slots=12, shards=2)
    fill_all(pool)
    pool.attach_group("a")
    pool.attach_group("b")
    consume(pool, "a", 8)
    pool.attach_group("c")                              # joins late: every record now held is new to it
    assert pool.groups()["c"]["pending"] == 12
    pool.detach_group("b")
    consume(pool, "c", 8)
    st = pool.stats()
    st.check_invariant()
    assert "b" not in st.extra["groups"]
    # records both a and c trained on went to REFILL (at least 8 + 8 - 12 of them), the rest wait
    assert st.counts["REFILL"] >= 4 and st.counts["READY"] + st.counts["REFILL"] == 12
    pool.detach_group("a")
    pool.detach_group("c")
    assert pool.groups() == {}
    d = pool.draw(2, timeout_s=1.0)                     # no groups left: a plain pool again
    pool.release(d.lease_id)


def test_dead_group_detached_after_lease_expiry(groups_harness):
    pool = groups_harness.make(num_slots=8, shards=2, lease_timeout_s=1.0)    # the live group consumes within it
    fill_all(pool)
    pool.attach_group("alive")
    pool.attach_group("dead")
    pool.draw(4, timeout_s=1.0, group="dead")           # ... and never releases nor calls again
    consume(pool, "alive", 8)
    assert pool.stats().counts["REFILL"] == 0
    end = time.time() + 2.2
    while time.time() < end:                            # the live group keeps polling (a blocked draw)
        with pytest.raises(PoolError):
            pool.draw(1, timeout_s=0.1, group="alive")
    st = pool.stats()
    st.check_invariant()
    assert set(st.extra.get("groups", {})) == {"alive"}, "the dead group is detached once its lease expired"
    assert st.counts["REFILL"] == 8 and st.counts["LEASED"] == 0
