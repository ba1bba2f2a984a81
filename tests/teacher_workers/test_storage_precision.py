"""Issue 22: with fp16 storage the teacher's targets belong to the x_t the pool stores.

The teacher rounds x_t to the storage dtype before its forward (warm-up and refill), so the stored eps is
the teacher's eps at the stored x_t up to eps's own fp16 rounding, and the stored logvar (kept in fp32)
is the teacher's logvar there. Ground truth: the analytic Gaussian-mixture teacher, recomputed on the
records read back from the pool.
"""

from __future__ import annotations

import torch

from common.config import config_from_dict
from common.pool import make_pool
from common.teachers import make_teacher
from teacher_workers.worker import TeacherWorker, teacher_record

T = 100
N = 64


def half_ulp_fp16(v: torch.Tensor) -> torch.Tensor:
    """Half the fp16 spacing at |v| (fp16's largest rounding error there), subnormals included."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-14)))
    return torch.exp2(e - 11)


def check_targets(teacher, pool, when: str) -> None:
    """Every READY record's eps and logvar are the teacher's at the record's own (stored) x_t."""
    d = pool.draw(N, timeout_s=5)
    rec = d.batch
    assert rec.x_t.dtype == torch.float16 and rec.eps.dtype == torch.float16 and rec.logvar.dtype == torch.float32
    ref = teacher_record(teacher, rec.x_t.float(), rec.t, None)
    err = (rec.eps.float() - ref.eps).abs()
    bound = half_ulp_fp16(ref.eps) * (1 + 1e-3)
    assert (err <= bound).all(), (f"{when}: {int((err > bound).sum())} of {err.numel()} stored eps are not the teacher's "
                                  f"eps at the stored x_t (max error {float(err.max()):.3g})")
    assert torch.allclose(rec.logvar, ref.logvar, rtol=1e-6, atol=0), f"{when}: stored logvar is not the teacher's"
    pool.release(d.lease_id)


def test_fp16_records_hold_the_teachers_targets_at_the_stored_x_t():
    cfg = config_from_dict({
        "teacher": {"kind": "analytic", "device": "cpu",
                    "diffusion": {"num_timesteps": T, "schedule": "cosine", "var_type": "learned_range"},
                    "analytic": {"num_components": 4, "channels": 3, "image_size": 4}},
        "pool": {"backend": "local", "name": "fp16_targets", "num_slots": N, "storage_dtype": "fp16"},
        "metrics": {"enabled": False},
    })
    teacher = make_teacher(cfg.teacher, "cpu")
    pool = make_pool(cfg.pool, num_slots=N, record_shape=teacher.image_shape, has_logvar=True, has_label=False,
                     num_timesteps=T, seed=1)
    worker = TeacherWorker(teacher, pool, microbatch=32, seed=3)
    worker.fill_all(N)
    check_targets(teacher, pool, "after the warm-up")          # every slot released: all go to REFILL
    while pool.stats().counts["REFILL"]:
        worker.refill_once(N, timeout_s=5)
    check_targets(teacher, pool, "after one refill of every slot")
