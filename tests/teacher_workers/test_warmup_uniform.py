"""B+ as the paper has it: READY t is uniform over the chain after the warm-up and stays so under refills.

Chi-square tests of the READY t histogram (10 equal buckets over [0, T)) with the analytic teacher and
the local pool: one teacher, four teachers sharing the pool (threads, as separate processes would), and
a pool sized for two trainer workers drawn by two consumers. A warm-up that keeps starting chains while
the pool fills leaves the long chains (low end t) running when the pool is READY: low t comes out short
by about (N - K M) / (N + K M), which these sizes make a chi-square of several hundred.
"""

from __future__ import annotations

import threading

import pytest
import torch
from scipy.stats import chisquare

from common.config import config_from_dict
from common.pool import make_pool
from common.teachers import make_teacher
from teacher_workers.worker import TeacherWorker

T = 100
# p below this rejects uniformity; for a uniform pool the test then fails once in 10,000 runs.
P_MIN = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards: torch's thread pool only adds contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(num_slots: int, name: str, claim_timeout_s: float = 600.0):
    cfg = config_from_dict({
        "teacher": {"kind": "analytic", "device": "cpu",
                    "diffusion": {"num_timesteps": T, "schedule": "cosine", "var_type": "learned_range"},
                    "analytic": {"num_components": 4, "channels": 1, "image_size": 2}},
        "pool": {"backend": "local", "name": name, "num_slots": num_slots, "claim_timeout_s": claim_timeout_s},
        "metrics": {"enabled": False},
    })
    teacher = make_teacher(cfg.teacher, "cpu")
    pool = make_pool(cfg.pool, num_slots=num_slots, record_shape=teacher.image_shape,
                     has_logvar=teacher.learned_variance, has_label=False, num_timesteps=T, seed=1)
    return teacher, pool


def warm_up(teacher, pool, num_teachers: int, microbatch: int) -> list[TeacherWorker]:
    workers = [TeacherWorker(teacher, pool, microbatch=microbatch, seed=11, worker_index=i) for i in range(num_teachers)]
    threads = [threading.Thread(target=w.fill_all, args=(pool.num_slots,), kwargs={"timeout_s": 1.0}) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return workers


def assert_uniform(pool, when: str) -> None:
    st = pool.stats()
    st.check_invariant()
    assert st.counts["READY"] == pool.num_slots, st.counts
    hist = st.t_histogram
    chi2, p = chisquare(hist)
    assert p > P_MIN, f"READY t not uniform {when}: buckets (low t first) {hist}, chi-square {chi2:.1f}, p = {p:.2g}"


def dynamic_steps(pool, worker: TeacherWorker, steps: int, b: int, consumers: int = 1) -> None:
    """Algorithm 1's loop without the student: each consumer draws b, releases, the teacher refills."""
    for _ in range(steps):
        for _ in range(consumers):
            d = pool.draw(b, timeout_s=5)
            pool.release(d.lease_id)
        left = b * consumers
        while left > 0:
            left -= worker.refill_once(left, timeout_s=5)


@pytest.mark.parametrize("num_teachers", [1, 4])
def test_ready_t_uniform_after_warmup_and_refills(num_teachers):
    teacher, pool = setup(2000, f"uni{num_teachers}")
    workers = warm_up(teacher, pool, num_teachers, microbatch=800 // num_teachers)
    assert sum(w.records for w in workers) == pool.num_slots     # one chain per slot, none wasted
    assert_uniform(pool, f"after the warm-up with {num_teachers} teacher(s)")
    if num_teachers == 1:        # the refills do not depend on how many teachers warmed the pool up
        dynamic_steps(pool, workers[0], steps=1000, b=32)
        assert_uniform(pool, "after 1000 refills of 32")


def test_pool_sized_per_trainer_worker_stays_uniform():
    """Two trainer workers: round(rho T) b slots each (the reference's per-rank B+), both draw every step."""
    from student_trainer.run import service_num_slots

    cfg = config_from_dict({"teacher": {"kind": "analytic", "diffusion": {"num_timesteps": T}},
                            "pool": {"rho": 0.5}, "distill": {"batch_size": 20}, "ray": {"num_workers": 2}})
    assert service_num_slots(cfg, T) == 2 * round(0.5 * T) * 20
    cfg.pool.num_slots = 300                  # an explicit size is the whole pool's
    assert service_num_slots(cfg, T) == 300
    teacher, pool = setup(2 * round(0.5 * T) * 20, "uni_w2")
    workers = warm_up(teacher, pool, 2, microbatch=200)
    assert_uniform(pool, "after the warm-up for 2 trainer workers")
    dynamic_steps(pool, workers[1], steps=500, b=20, consumers=2)
    assert_uniform(pool, "after 500 steps of 2 trainer workers")


def test_warmup_records_end_where_their_chain_ends():
    """Every warm-up record is one chain denoised from t = T-1 to its own end: its t is a draw of the end."""
    teacher, pool = setup(64, "uni_small")
    w = TeacherWorker(teacher, pool, microbatch=16, seed=5)
    w.fill_all(pool.num_slots)
    st = pool.stats()
    assert st.counts["READY"] == 64 and w.records == 64
    # forwards = sum over chains of (T - end): the mean end is (T - 1) / 2, so about 64 * (T + 1) / 2
    d = pool.draw(64, timeout_s=1)
    assert w.forwards == int((T - d.batch.t.long()).sum())
    assert torch.isfinite(d.batch.x_t).all()


def test_warm_up_stops_with_one_line_when_claims_keep_expiring():
    """A claim timeout shorter than a chain would cut every warm-up short forever: the teacher says so and stops."""
    from teacher_workers.worker import MAX_EXPIRED_IN_A_ROW, ClaimTimeoutTooShort

    teacher, pool = setup(64, "short_claims", claim_timeout_s=1e-3)   # every claim is late at its first forward
    worker = TeacherWorker(teacher, pool, microbatch=8, seed=3, claim_timeout_s=1e-3)
    with pytest.raises(ClaimTimeoutTooShort, match=r"pool.claim_timeout_s=0.001 s is shorter than a warm-up claim"):
        worker.fill_all(pool.num_slots, timeout_s=1.0)
    assert worker.records == 0 and worker._expired_in_a_row >= MAX_EXPIRED_IN_A_ROW
    pool.stats().check_invariant()
