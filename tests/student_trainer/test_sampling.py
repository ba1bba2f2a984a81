"""Equal sampling chains (issue 22): a baseline trained on the full T = 1000 chain and a DKDM student on
a respaced chain are sampled on the same original timesteps when ``sample.timesteps`` names them."""

import numpy as np
import pytest
import torch

from common.config import SampleConfig, StudentConfig
from common.diffusion import make_diffusion, respaced_timesteps
from common.models import save_pretrained
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer.checkpoints import model_config
from student_trainer.losses import HYBRID_V_BOUND
from student_trainer.sampling import sample_images, sample_teacher
from student_trainer.student import build_student

torch.set_num_threads(1)
SHAPE = (1, 8, 8)
# the mixture's chains: DKDM distils on 100 of the 1000 steps and is scored on 50 of those
DKDM_CHAIN, STEPS = "100", "50"


def _network(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model, build = build_student(StudentConfig(arch="mlp"), SHAPE, learn_sigma=True, num_classes=None)
    with torch.no_grad():       # every weight non-zero, so the samples depend on the timesteps
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval(), build


def _checkpoint(folder, respacing: str) -> str:
    """The same network saved as a baseline (full chain, respacing "") or a DKDM student (respaced chain)."""
    model, build = _network()
    d = make_diffusion("cosine", 1000, respacing)
    save_pretrained(folder, model, model_config(build, d, "cosine", "learned_range", True, SHAPE, None,
                                                v_bound=HYBRID_V_BOUND))
    return str(folder)


class _Recorder(torch.nn.Module):
    """Wraps a network and keeps the original timesteps it is called with, step by step."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x, t, *rest):
        self.seen.append(sorted(set(t.tolist())))
        return self.model(x, t, *rest)


def _sample_checkpoint(folder: str, cfg: SampleConfig) -> tuple[list[int], torch.Tensor]:
    teacher = DKDMTeacher.from_folder(folder)
    teacher.model = _Recorder(teacher.model)
    x, _ = sample_teacher(teacher, cfg, seed=3)
    assert all(len(ts) == 1 for ts in teacher.model.seen)
    return [ts[0] for ts in teacher.model.seen], x


def test_baseline_and_dkdm_checkpoints_sample_on_identical_original_timesteps(tmp_path):
    baseline = _checkpoint(tmp_path / "baseline", "")
    dkdm = _checkpoint(tmp_path / "dkdm", DKDM_CHAIN)
    ts = respaced_timesteps(1000, DKDM_CHAIN, STEPS)
    cfg = SampleConfig(steps=STEPS, timesteps=ts, num_samples=4, batch_size=4)
    seen_b, x_b = _sample_checkpoint(baseline, cfg)
    seen_d, x_d = _sample_checkpoint(dkdm, cfg)
    assert seen_b == seen_d == ts[::-1] and len(ts) == 50
    # the same weights on the same steps: the same chain, so the same samples (betas equal to rounding)
    torch.testing.assert_close(x_b, x_d, atol=1e-5, rtol=0)
    # without it (``steps`` alone) each samples 50 steps of its own chain: 50 of 1000 vs 50 of 100 of 1000
    plain = SampleConfig(steps=STEPS, num_samples=4, batch_size=4)
    seen_b, _ = _sample_checkpoint(baseline, plain)
    seen_d, _ = _sample_checkpoint(dkdm, plain)
    assert seen_d == ts[::-1] and seen_b == respaced_timesteps(1000, STEPS)[::-1] and seen_b != seen_d


def test_a_network_on_the_full_chain_follows_the_timesteps_too():
    """sample_images (the trainers' path: a bare network on its chain) visits the same timesteps."""
    ts = respaced_timesteps(1000, DKDM_CHAIN, STEPS)
    cfg = SampleConfig(steps=STEPS, timesteps=ts, num_samples=2, batch_size=2)
    seen = {}
    for respacing in ("", DKDM_CHAIN):
        net = _Recorder(_network()[0])
        sample_images(net, make_diffusion("cosine", 1000, respacing), "learned_range", cfg, SHAPE, None, seed=0,
                      device=torch.device("cpu"), v_bound=HYBRID_V_BOUND)
        seen[respacing] = [s[0] for s in net.seen]
    assert seen[""] == seen[DKDM_CHAIN] == ts[::-1]


def test_timesteps_off_the_chain_are_refused():
    d = make_diffusion("cosine", 1000, "100")
    net = _network()[0]
    cfg = SampleConfig(timesteps=[0, 5, 999], num_samples=1, batch_size=1)   # 5 is not on the 100-step chain
    with pytest.raises(ValueError, match=r"\[5\] are not on this 100-step chain"):
        sample_images(net, d, "learned_range", cfg, SHAPE, None, seed=0, device=torch.device("cpu"),
                      v_bound=HYBRID_V_BOUND)
    assert np.array_equal(d.timestep_map, respaced_timesteps(1000, "100"))
