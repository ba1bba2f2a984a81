"""One run seed, independent streams: the teachers' noise, the student's initialisation and the
evaluation noise each come from their own derived seed (issue 22, item 5)."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.seeds import (
    STREAMS,
    data_mix_seed,
    data_seed,
    eval_seed,
    stream_seed,
    student_init_seed,
    teacher_seed,
)


def normals(seed: int, n: int = 8) -> list[float]:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("run_seed", [0, 1, 12345])
def test_streams_differ_and_are_reproducible(run_seed):
    seeds = [teacher_seed(run_seed), student_init_seed(run_seed), eval_seed(run_seed), data_seed(run_seed),
             data_mix_seed(run_seed)]
    assert len(set(seeds)) == len(STREAMS) == len(seeds)
    draws = [normals(s) for s in seeds]
    assert all(draws[i] != draws[j] for i in range(len(draws)) for j in range(i))
    assert run_seed not in seeds                                   # no stream is the run seed itself
    # reproducible: the same (seed, stream) gives the same seed, in this process and by definition
    assert [stream_seed(run_seed, s) for s in STREAMS] == seeds
    assert all(0 <= s < 2**63 for s in seeds)
    # the run seed changes every stream
    assert teacher_seed(run_seed + 1) not in seeds and eval_seed(run_seed + 1) not in seeds


def test_worker_seeds_stay_base_plus_index_within_the_teacher_stream():
    base = teacher_seed(5)
    worker_seeds = [base + i for i in range(4)]
    assert not set(worker_seeds) & {student_init_seed(5), eval_seed(5)}
    assert stream_seed(-1, "teacher") == stream_seed(2**64 - 1, "teacher")     # a negative seed wraps
    with pytest.raises(ValueError, match="unknown random stream 'noise'"):
        stream_seed(0, "noise")


def test_a_distillation_session_draws_each_stream_from_its_own_seed(tmp_path):
    from common.models import build_network
    from student_trainer.distill import build_session

    cfg = load_config("configs/mixture.yaml", [f"run.out_dir={tmp_path}", "run.seed=3", "distill.batch_size=8",
                                               "pool.rho=0.02", "metrics.enabled=false"])
    s = build_session(cfg)
    try:
        teacher_noise = torch.randn(8, generator=s.worker.gen).tolist()
        init = {k: v.clone() for k, v in s.trainer.model.state_dict().items()}
    finally:
        s.pool.close()
    assert teacher_noise == normals(teacher_seed(3))               # worker 0: the teacher stream + 0
    torch.manual_seed(student_init_seed(3))
    again = build_network(s.student_config["arch"], s.student_config["size"], s.student_config["flags"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in init.items())
    torch.manual_seed(3)                                           # the run seed itself no longer initialises it
    old = build_network(s.student_config["arch"], s.student_config["size"], s.student_config["flags"])
    assert not all(torch.equal(v, old.state_dict()[k]) for k, v in init.items())
    assert teacher_noise != normals(eval_seed(3)) != normals(student_init_seed(3))
