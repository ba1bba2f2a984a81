"""Pool identity (issue 8): a run attaches only to a pool built for its teacher, chain and layout."""

from __future__ import annotations

import uuid

import pytest

from common.config import AnalyticConfig, PoolConfig, TeacherConfig
from common.pool.base import PoolError
from common.pool import attach_pool, open_named_pool
from common.pool.identity import identity_diff, identity_digest, pool_identity, teacher_pool_identity
from pool_conftest import fill_claim

SHAPE = (1, 4, 4)


def ident(weights: str = "a" * 64, chain: str = "c" * 64, num_slots: int = 12, dtype: str = "fp32") -> dict:
    teacher = {"kind": "analytic", "weights_sha256": weights, "var_type": "learned_range", "image_shape": list(SHAPE)}
    return pool_identity(teacher, chain, num_slots=num_slots, storage_dtype=dtype, record_shape=SHAPE,
                         has_logvar=False, has_label=False, num_timesteps=100, rho=0.4)


def fill_all(pool) -> None:
    while pool.stats().counts["REFILL"]:
        assert fill_claim(pool, pool.claim_refill(pool.num_slots, timeout_s=1.0), SHAPE)


def test_diff_names_what_differs():
    a, b = ident(), ident(weights="b" * 64)
    assert identity_diff(a, dict(a)) is None and identity_digest(a) == identity_digest(ident())
    msg = identity_diff(a, b)
    assert "different teacher" in msg and "weights_sha256" in msg and "aaaaaaaaaaaa" in msg and "bbbbbbbbbbbb" in msg
    assert "storage_dtype" in identity_diff(a, ident(dtype="fp16"))
    assert "chain" in identity_diff(a, ident(chain="d" * 64))


def test_real_teachers_differ_by_weights():
    def teacher(seed):
        from common.teachers import make_teacher
        cfg = TeacherConfig(kind="analytic", analytic=AnalyticConfig(num_components=2, channels=1, image_size=4, seed=seed))
        return make_teacher(cfg, "cpu")

    a, b = (teacher_pool_identity(teacher(s), 12, "fp32") for s in (0, 1))
    assert identity_diff(a, teacher_pool_identity(teacher(0), 12, "fp32")) is None
    assert "weights_sha256" in identity_diff(a, b)


def test_bind_and_refuse(harness):
    pool = harness.make(num_slots=12, shards=2)
    assert pool.identity() is None
    assert pool.bind_identity(ident()) == ident()
    assert pool.bind_identity(ident()) == ident()             # same identity: fine, idempotent
    with pytest.raises(PoolError, match=r"different teacher: weights_sha256 aaaaaaaaaaaa… vs bbbbbbbbbbbb…") as err:
        pool.bind_identity(ident(weights="b" * 64))
    assert "\n" not in str(err.value)
    assert pool.identity() == ident()


def test_snapshot_carries_identity(harness, tmp_path):
    pool = harness.make(num_slots=12, shards=2)
    pool.bind_identity(ident())
    fill_all(pool)
    path = str(tmp_path / "pool.snap")
    pool.snapshot(path)
    other = harness.make(num_slots=12, shards=2, name=f"other-{uuid.uuid4().hex[:6]}")
    other.bind_identity(ident(weights="b" * 64))
    with pytest.raises(PoolError, match="weights_sha256"):
        other.restore(path)
    fresh = harness.make(num_slots=12, shards=2, name=f"fresh-{uuid.uuid4().hex[:6]}")
    fresh.restore(path)                                     # no identity yet: adopts the snapshot's
    assert fresh.identity() == ident() and fresh.stats().counts["READY"] == 12


def _attach_warm(cfg: PoolConfig, **kw):
    pool, created = open_named_pool(cfg, ident(), 12, SHAPE, False, False, 100, **kw)
    assert created
    fill_all(pool)
    again, created2 = open_named_pool(cfg, ident(), 12, SHAPE, False, False, 100)
    assert not created2 and again.stats().warm
    d = again.draw(4, timeout_s=1.0)                       # warm: no warm-up, the draw is served at once
    again.release(d.lease_id)
    with pytest.raises(PoolError, match=f"pool '{cfg.name}' was built for a different teacher: weights_sha256"):
        open_named_pool(cfg, ident(weights="b" * 64), 12, SHAPE, False, False, 100)
    return pool


def test_named_ray_pool_attaches_warm(ray_cluster):
    cfg = PoolConfig(backend="ray", name=f"ident-{uuid.uuid4().hex[:6]}", shards=2, min_ready_fraction=1.0)
    pool = _attach_warm(cfg, detached=True)
    pool.drop()
    with pytest.raises(PoolError, match="no Ray pool named"):
        attach_pool(cfg)


def test_named_redis_pool_attaches_warm(redis_server):
    cfg = PoolConfig(backend="redis", redis_url=redis_server.url, name=f"ident-{uuid.uuid4().hex[:6]}", shards=2,
                     min_ready_fraction=1.0)
    pool = _attach_warm(cfg)
    attached = attach_pool(cfg)                        # layout read back from the marker hash
    assert attached.num_slots == 12 and attached.identity() == ident() and attached.stats().counts["READY"] == 8   # 4 drawn above
    pool.destroy()
