"""TeacherGroup on a real local Ray cluster (one per module): filling, refilling, restarts, seeds, metrics."""

from __future__ import annotations

import time
import urllib.request

import pytest
import ray
import torch

from common.config import config_from_dict
from common.pool import make_pool

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    sd = tmp_path_factory.mktemp("sd")
    env = {"DKDM_METRICS_SD_DIR": str(sd), "DKDM_METRICS_HOST": "127.0.0.1", "DKDM_METRICS_BIND": "127.0.0.1",
           "OMP_NUM_THREADS": "1"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             runtime_env={"env_vars": env}, log_to_driver=False)
    yield sd
    ray.shutdown()


def tiny_config(name: str, T: int = 40, num_slots: int = 64, claim_timeout_s: float = 60.0, microbatch: int = 16):
    return config_from_dict({
        "run": {"seed": 3, "device": "cpu"},
        "teacher": {"kind": "analytic", "device": "cpu",
                    "diffusion": {"num_timesteps": T, "schedule": "cosine", "var_type": "learned_range"},
                    "analytic": {"num_components": 4, "channels": 1, "image_size": 4}},
        "pool": {"backend": "ray", "name": name, "num_slots": num_slots, "shards": 2,
                 "claim_timeout_s": claim_timeout_s, "lease_timeout_s": 30.0},
        "distill": {"batch_size": 16, "teacher_microbatch": microbatch},
        "ray": {"teacher_num_cpus": 1.0, "max_restarts": 2},
        "metrics": {"enabled": True, "port": 0},
    })


def build(cfg, num_teachers: int):
    from common.teachers import make_teacher
    from teacher_workers.group import TeacherGroup

    t = make_teacher(cfg.teacher, "cpu")
    pool = make_pool(cfg.pool, num_slots=cfg.pool.num_slots, record_shape=t.image_shape,
                     has_logvar=t.learned_variance, has_label=False, num_timesteps=t.diffusion.num_timesteps,
                     seed=cfg.run.seed)
    return pool, TeacherGroup(cfg, pool, num_teachers=num_teachers)


def test_group_fills_pool_and_refills_after_release(ray_cluster):
    cfg = tiny_config("grp_fill")
    pool, group = build(cfg, num_teachers=2)
    try:
        full = lambda s: s.counts["READY"] == pool.num_slots  # noqa: E731
        assert group.wait_until(full, 120), pool.stats().counts
        before = pool.stats().produced_total
        for _ in range(3):
            d = pool.draw(16, timeout_s=30)
            assert (d.batch.t >= 0).all()
            pool.release(d.lease_id)
        assert group.wait_until(lambda s: full(s) and s.produced_total >= before + 48, 60), pool.stats().counts
        st = pool.stats()
        st.check_invariant()
        health = group.health()
        assert [h["worker"] for h in health] == [0, 1]
        assert sum(h["records"] for h in health) == st.produced_total
        # both teachers did their share of the warm-up, and the t of READY slots spans the chain
        assert all(h["records"] > 0 and h["forwards"] >= h["records"] and 0 < h["busy_fraction"] <= 1 for h in health)
        assert sum(1 for c in st.t_histogram if c > 0) >= len(st.t_histogram) // 2
        # each actor serves its metrics
        body = urllib.request.urlopen(f"http://127.0.0.1:{health[0]['metrics_port']}/metrics", timeout=10).read().decode()
        assert 'dkdm_teacher_records_total{worker="0"}' in body
        assert len(list(ray_cluster.glob("teacher-*.json"))) >= 2
    finally:
        group.stop()
        pool.close()


def test_seeds_differ_per_worker():
    """In-process (plain class): worker i draws its noise from seed + i, so two teachers never share noise."""
    from teacher_workers.group import TeacherActor

    cfg = tiny_config("grp_seed")
    cfg = cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"enabled": False}),
                                 "pool": cfg.pool.model_copy(update={"backend": "local"})})
    pool = make_pool(cfg.pool, num_slots=16, record_shape=(1, 4, 4), has_logvar=True, has_label=False, num_timesteps=40)
    a, b, a2 = (TeacherActor(cfg, pool, i, start=False) for i in (0, 1, 0))
    assert a.noise_probe() != b.noise_probe()
    assert a.noise_probe() == a2.noise_probe()      # and the same index reproduces its noise
    # the records they write differ too: each fills 8 slots with its own warm-up
    a.worker.refill_once(8, timeout_s=1)
    b.worker.refill_once(8, timeout_s=1)
    d = pool.draw(16, timeout_s=1)
    assert len(torch.unique(d.batch.x_t.flatten(1), dim=0)) == 16


def test_pool_timeout_says_whether_teachers_are_alive(ray_cluster):
    """A trainer that times out on an empty pool is told how many teachers are alive and what became of the others."""
    from student_trainer.run import PoolStarved, fit_watching

    cfg = tiny_config("grp_starve")
    cfg.teacher.fault.raise_after_forwards = 300      # every incarnation fails before any of its claims is filled
    cfg.ray.max_restarts = 20
    pool, group = build(cfg, num_teachers=1)

    class FirstDraw:
        """What a Ray Train worker does first: draw a batch (the pool stays empty)."""

        def fit(self):
            pool.draw(16, timeout_s=3)

    try:
        with pytest.raises(PoolStarved, match=r"pool timed out after 3s waiting for .*: [01] of 1 teachers alive "
                                              r"\(teacher 0: .*InjectedFault: teacher.fault: injected after 300 forwards"):
            fit_watching(FirstDraw(), group)
    finally:
        group.stop()
        pool.close()


@pytest.mark.slow
def test_killed_teacher_restarts_and_its_claims_expire(ray_cluster):
    # A long chain makes every warm-up claim take a while, so the kill lands while slots are FILLING.
    cfg = tiny_config("grp_kill", T=1000, num_slots=96, claim_timeout_s=15.0, microbatch=32)
    pool, group = build(cfg, num_teachers=1)
    try:
        assert group.wait_until(lambda s: s.counts["FILLING"] > 0, 60)
        pid0 = group.health()[0]["pid"]
        ray.kill(group.actors[0], no_restart=False)
        deadline = time.time() + 120
        while True:
            h = group.health()[0]
            if h.get("running") and h.get("pid") != pid0:
                break
            assert time.time() < deadline, h
            time.sleep(0.5)
        assert h["restarts"] == 1
        # the dead actor's claim went back to REFILL at its deadline; the restarted actor fills everything
        assert group.wait_until(lambda s: s.counts["READY"] == pool.num_slots, 180), pool.stats().counts
        st = pool.stats()
        st.check_invariant()
        assert st.expired_claims_total >= 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{h['metrics_port']}/metrics", timeout=10).read().decode()
        assert 'dkdm_teacher_restarts_total{worker="0"} 1.0' in body
    finally:
        group.stop()
        pool.close()
