"""The student's Eq. 12 v is bounded the same way in training and in sampling (issue 22, item 2).

A student whose raw v overshoots [-1, 1] (+3 on half its outputs, -3 on the other half) is sampled
through both paths the CLI uses: ``sample_images``' denoiser and a checkpoint loaded as a ``dkdm``
teacher (``dkdm sample`` / ``dkdm eval``). Its log variance must stay in [log beta_tilde_t, log beta_t]
at every step of the 50-step evaluation chain, and equal the one L*_vlb fitted.
"""

from __future__ import annotations

import pytest
import torch

from common.diffusion import (
    ancestral_step,
    bound_v,
    make_diffusion,
    model_log_variance,
    normal_kl,
    q_posterior_mean_variance,
    q_sample,
    respace,
)
from common.diffusion.gaussian import _extract
from common.models import build_network
from common.models.checkpoint import save_pretrained
from common.records import RecordBatch
from common.teachers.base import TeacherLoadError
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer.checkpoints import model_config
from student_trainer.losses import (
    DKDM_V_BOUND,
    HYBRID_V_BOUND,
    dkdm_loss,
    hybrid_loss,
    split_output,
)
from student_trainer.sampling import network_denoiser

SHAPE = (1, 4, 4)


def overshooting_student() -> torch.nn.Module:
    """A small MLP student whose raw v is about +3 on half the pixels and -3 on the other half."""
    torch.manual_seed(0)
    flags = {"image_size": 4, "in_channels": 1, "width": 32, "depth": 1, "time_embed_dim": 16, "learn_sigma": True}
    model = build_network("mlp", None, flags)
    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    with torch.no_grad():
        model.out.weight.normal_(0, 0.05)
        model.out.bias[n:] = torch.tensor([3.0, -3.0]).repeat(n // 2)
    return model.eval()


def walk_chain(d, denoise, n: int = 8) -> list[torch.Tensor]:
    """The ancestral sampler's steps (``p_sample``) over the whole chain; the log variance of each."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((n, *SHAPE), generator=gen)
    logvars = []
    for i in range(d.num_timesteps - 1, -1, -1):
        t = torch.full((n,), i, dtype=torch.long)
        eps, v = denoise(x, t)
        out = ancestral_step(d, x, t, eps, "learned_range", v, noise=torch.randn(x.shape, generator=gen))
        logvars.append(out["log_variance"])
        x = out["sample"]
    assert torch.isfinite(x).all()
    return logvars


def outside_eq12(d, logvars: list[torch.Tensor]) -> float:
    """The largest distance (nats) of any sampled log variance outside [log beta_tilde_t, log beta_t]."""
    worst = 0.0
    for k, lv in enumerate(logvars):
        t = torch.full((lv.shape[0],), d.num_timesteps - 1 - k, dtype=torch.long)
        lo = _extract(d, "posterior_log_variance_clipped", t, lv.shape)
        hi = _extract(d, "log_betas", t, lv.shape)
        worst = max(worst, float((lo - lv).clamp(min=0).max()), float((lv - hi).clamp(min=0).max()))
    return worst


@pytest.fixture(scope="module")
def chains():
    full = make_diffusion("cosine", 1000)
    return full, respace(full, "50")


def test_sampled_log_variance_stays_in_eq12_range_at_every_step(chains, tmp_path):
    full, d = chains
    model = overshooting_student()
    raw = network_denoiser(model, d, SHAPE[0], "none")
    assert outside_eq12(d, walk_chain(d, raw)) > 1.0           # the raw v does overshoot the range

    # The denoiser sample_images uses, with the DKDM student's bound.
    assert outside_eq12(d, walk_chain(d, network_denoiser(model, d, SHAPE[0], DKDM_V_BOUND))) < 1e-5
    # A checkpoint of it loaded as a dkdm teacher (dkdm sample / eval), respaced to the 50-step chain.
    build = {"arch": "mlp", "size": None, "flags": {"image_size": 4, "in_channels": 1, "width": 32, "depth": 1,
                                                     "time_embed_dim": 16, "learn_sigma": True}}
    save_pretrained(tmp_path, model, model_config(build, full, "cosine", "learned_range", True, SHAPE, None,
                                                  v_bound=DKDM_V_BOUND))
    teacher = DKDMTeacher.from_folder(str(tmp_path), use_ema=False, respacing="50")
    assert teacher.v_bound == DKDM_V_BOUND
    assert outside_eq12(teacher.diffusion, walk_chain(teacher.diffusion, teacher.predict)) < 1e-5


@torch.no_grad()
def test_sampling_uses_the_log_variance_that_l_vlb_fitted(chains):
    _, d = chains
    model = overshooting_student()
    n = 16
    gen = torch.Generator().manual_seed(2)
    t = torch.randint(0, d.num_timesteps, (n,), generator=gen)
    x_t = q_sample(d, torch.rand((n, *SHAPE), generator=gen) * 2 - 1, t, torch.randn((n, *SHAPE), generator=gen))
    out = model(x_t, d.map_timesteps(t))
    eps_s, v = split_output(out, SHAPE[0])
    assert float(v.abs().max()) > 2.0
    # A teacher whose Gaussian is the student's as sampled: L*_vlb is zero only if the loss evaluates
    # the very log variance the sampler uses.
    sampled = ancestral_step(d, x_t, t, eps_s, "learned_range", network_denoiser(model, d, 1, DKDM_V_BOUND)(x_t, t)[1],
                             clip_denoised=False)
    rec = RecordBatch(x_t=x_t, t=t, eps=eps_s, logvar=sampled["log_variance"], y=None)
    losses = dkdm_loss(d, out, rec, student_var_type="learned_range", teacher_clip=False)
    assert float(losses["l_vlb"]) < 1e-6
    # Unbounded sampling would not be what the loss fitted.
    raw_lv = model_log_variance(d, t, "learned_range", v, shape=x_t.shape)
    assert float((raw_lv - sampled["log_variance"]).abs().max()) > 0.1


def test_hybrid_loss_is_iddpm_with_raw_v(chains):
    """The baselines keep IDDPM's L_hybrid: v enters Eq. 12 unbounded (and is sampled unbounded)."""
    full, _ = chains
    model = overshooting_student()
    n = 16
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand((n, *SHAPE), generator=gen) * 2 - 1
    t = torch.randint(1, full.num_timesteps, (n,), generator=gen)         # the KL branch (t > 0)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = q_sample(full, x0, t, noise)
    out = model(x_t, t)
    eps_s, v = split_output(out, SHAPE[0])
    got = hybrid_loss(full, out, x0, x_t, t, noise, var_type="learned_range", lambda_vlb=1.0)
    mean_q, _, logvar_q = q_posterior_mean_variance(full, x0, x_t, t)
    x0_s = (x_t - _extract(full, "sqrt_one_minus_alphas_cumprod", t, x_t.shape) * eps_s) \
        / _extract(full, "sqrt_alphas_cumprod", t, x_t.shape)
    mean_s, _, _ = q_posterior_mean_variance(full, x0_s, x_t, t)
    frac = (v + 1) / 2                                                     # IDDPM's Eq. 15, v as it comes
    logvar_s = frac * _extract(full, "log_betas", t, v.shape) \
        + (1 - frac) * _extract(full, "posterior_log_variance_clipped", t, v.shape)
    kl = normal_kl(mean_q, logvar_q, mean_s, logvar_s).mean(dim=(1, 2, 3)) / torch.log(torch.tensor(2.0))
    want = ((noise - eps_s) ** 2).mean(dim=(1, 2, 3)) + kl * full.num_timesteps
    assert HYBRID_V_BOUND == "none"
    torch.testing.assert_close(got["loss"], want.mean(), rtol=1e-4, atol=1e-5)


def test_bound_v_and_checkpoint_field(tmp_path):
    v = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(bound_v(v, "none"), v)
    assert bound_v(v, "clamp").tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    torch.testing.assert_close(bound_v(v, "tanh"), torch.tanh(v))
    with pytest.raises(ValueError, match="unknown v_bound 'sigmoid'"):
        bound_v(v, "sigmoid")
    model = overshooting_student()
    build = {"arch": "mlp", "size": None, "flags": {"image_size": 4, "in_channels": 1, "width": 32, "depth": 1,
                                                     "time_embed_dim": 16, "learn_sigma": True}}
    config = model_config(build, make_diffusion("cosine", 10), "cosine", "learned_range", True, SHAPE, None,
                          v_bound="clamp")
    old = {k: v for k, v in config.items() if k != "v_bound"}           # written before the field existed
    assert DKDMTeacher(model, old).v_bound == "none"
    with pytest.raises(TeacherLoadError, match="v_bound must be one of none, clamp, tanh, got 'soft'") as e:
        DKDMTeacher(model, {**config, "v_bound": "soft"}, source=str(tmp_path))
    assert "\n" not in str(e.value)
