"""Posterior, conversions, variances, KL and decoder NLL against closed forms written out here."""

import math

import numpy as np
import pytest
import torch

from common.diffusion import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    eps_from_prediction,
    make_diffusion,
    mean_flat,
    model_log_variance,
    normal_kl,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
)

torch.set_num_threads(1)


def _abar(d, t):
    return torch.tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    d = make_diffusion("cosine", 1000)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 1.8 - 0.9
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    return d, x0, noise, t


def test_q_sample_is_eq4(setup):
    d, x0, noise, t = setup
    a = _abar(d, t)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    got = q_sample(d, x0, t, noise)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-6)


def test_posterior_mean_from_true_x0_equals_model_mean_from_true_eps(setup):
    d, x0, noise, t = setup
    x_t = q_sample(d, x0, t, noise)
    out = p_mean_variance(d, x_t, t, noise, "fixed_small", clip_denoised=False)
    mean, var, log_var = q_posterior_mean_variance(d, x0, x_t, t)
    # t = 999 has 1 - abar ~ 1e-9 in the denominator of x0 recovery: compare where it is well-conditioned.
    ok = t < 999
    assert torch.allclose(out["pred_xstart"][ok], x0[ok], atol=2e-3)
    assert torch.allclose(out["mean"][ok], mean[ok], atol=1e-4)
    # DDPM Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), in float64 from the betas.
    beta = torch.tensor(d.betas[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)
    a = _abar(d, t)
    mu = (x_t.double() - beta / (1 - a).sqrt() * noise.double()) / (1 - beta).sqrt()
    assert torch.allclose(out["mean"].double()[ok], mu[ok], atol=1e-4)
    # Eq. 7: beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t, shaped [N, 1, 1, 1]
    a_prev = torch.tensor(np.append(1.0, d.alphas_cumprod[:-1])[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)
    assert var.shape == (6, 1, 1, 1)
    assert torch.allclose(var.double(), (1 - a_prev) / (1 - a) * beta, rtol=1e-5)
    assert out["variance"].shape == x_t.shape and torch.all(out["variance"][0] == 0)
    assert torch.allclose(log_var[1:].double(), ((1 - a_prev) / (1 - a) * beta)[1:].log(), atol=1e-5)


def test_clip_denoised_and_denoised_fn(setup):
    d, x0, noise, t = setup
    x_t = q_sample(d, x0 * 3, t, noise)
    out = p_mean_variance(d, x_t, t, noise, "fixed_large", clip_denoised=True, denoised_fn=lambda x: x * 2)
    raw = predict_xstart_from_eps(d, x_t, t, noise)
    assert torch.equal(out["pred_xstart"], (raw * 2).clamp(-1, 1))
    mean, _, _ = q_posterior_mean_variance(d, out["pred_xstart"], x_t, t)
    assert torch.allclose(out["mean"], mean)


def test_eps_xstart_round_trip_and_v_and_x0_conversions(setup):
    d, x0, noise, t = setup
    x_t = q_sample(d, x0, t, noise)
    a = _abar(d, t)
    v = (a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()).float()
    assert torch.allclose(eps_from_prediction(d, x_t, t, v, "v"), noise, atol=1e-5)
    ok = t > 0  # at t = 0, eps from x0 divides by sqrt(1/abar - 1) ~ 6e-3
    assert torch.allclose(eps_from_prediction(d, x_t, t, x0, "x0")[ok], noise[ok], atol=1e-3)
    assert eps_from_prediction(d, x_t, t, noise, "eps") is noise
    x0_hat = predict_xstart_from_eps(d, x_t, t, noise)
    assert torch.allclose(predict_eps_from_xstart(d, x_t, t, x0_hat)[ok], noise[ok], atol=1e-3)
    with pytest.raises(ValueError, match="'score'"):
        eps_from_prediction(d, x_t, t, noise, "score")


def test_model_log_variance_fixed_and_learned_range_interpolation():
    d = make_diffusion("linear", 100)
    t = torch.tensor([0, 1, 50, 99])
    shape = (4, 2, 3, 3)
    small = model_log_variance(d, t, "fixed_small", shape=shape)
    large = model_log_variance(d, t, "fixed_large", shape=shape)
    assert small.shape == shape and large.shape == shape
    post1 = d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1])
    assert small[0, 0, 0, 0].item() == pytest.approx(math.log(post1), rel=1e-6)   # clipped at t = 0
    assert large[0, 0, 0, 0].item() == pytest.approx(math.log(post1), rel=1e-6)   # guided-diffusion's t = 0 value
    assert large[2, 1, 2, 2].item() == pytest.approx(math.log(d.betas[50]), rel=1e-6)
    assert large[3, 0, 0, 0].item() == pytest.approx(math.log(d.betas[99]), rel=1e-6)

    lo = model_log_variance(d, t, "learned_range", var_values=-torch.ones(shape))
    hi = model_log_variance(d, t, "learned_range", var_values=torch.ones(shape))
    mid = model_log_variance(d, t, "learned_range", var_values=torch.zeros(shape))
    assert torch.allclose(lo, small)
    log_beta = torch.tensor(np.log(d.betas[t.numpy()]), dtype=torch.float32).view(-1, 1, 1, 1).expand(shape)
    assert torch.allclose(hi, log_beta)
    assert torch.allclose(mid, (small + log_beta) / 2)

    values = torch.randn(shape)
    assert torch.equal(model_log_variance(d, t, "learned", var_values=values), values)
    with pytest.raises(ValueError, match="var_values"):
        model_log_variance(d, t, "learned_range", shape=shape)
    with pytest.raises(ValueError, match="'fixed'"):
        model_log_variance(d, t, "fixed", shape=shape)


def test_p_mean_variance_learned_variance_is_exp_of_log_variance(setup):
    d, x0, noise, t = setup
    x_t = q_sample(d, x0, t, noise)
    v = torch.rand(x0.shape) * 2 - 1
    out = p_mean_variance(d, x_t, t, noise, "learned_range", var_values=v)
    assert torch.allclose(out["variance"], out["log_variance"].exp())
    assert torch.allclose(out["log_variance"], model_log_variance(d, t, "learned_range", v))


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lv1, lv2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-5)
    assert torch.allclose(normal_kl(m1, 0.0, m2, lv2), normal_kl(m1, torch.zeros_like(lv1), m2, lv2))
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros_like(m1), atol=1e-6)


def test_approx_cdf_is_close_to_erf():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert torch.allclose(approx_standard_normal_cdf(x), exact, atol=5e-4)


def test_decoder_nll_bins_sum_to_one_and_edges_extend_to_infinity():
    x = torch.linspace(-1, 1, 256).view(1, 256, 1, 1)
    means = torch.full_like(x, 0.3)
    log_scales = torch.full_like(x, math.log(0.6))
    logp = discretized_gaussian_log_likelihood(x, means, log_scales)
    # Adjacent bins of width 2/255 with edge bins to +-inf: the probabilities telescope to 1.
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # x = -1: P = Phi((-1 + 1/255 - mean) / s); x = 1: P = 1 - Phi((1 - 1/255 - mean) / s)
    lo = approx_standard_normal_cdf(torch.tensor((-1 + 1 / 255 - 0.3) / 0.6))
    hi = 1 - approx_standard_normal_cdf(torch.tensor((1 - 1 / 255 - 0.3) / 0.6))
    assert lo.item() > 0.01 and hi.item() > 0.1  # the edge bins carry real mass here
    assert logp[0, 0, 0, 0].item() == pytest.approx(math.log(lo.item()), rel=1e-5)
    assert logp[0, -1, 0, 0].item() == pytest.approx(math.log(hi.item()), rel=1e-5)

    # A sharp Gaussian on an edge value puts all its mass in the edge bin, including the tail beyond it.
    edges = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)
    sharp = discretized_gaussian_log_likelihood(edges, edges.clone(), torch.full_like(edges, math.log(1e-4)))
    assert torch.allclose(sharp, torch.zeros_like(sharp), atol=1e-6)
    # Far from the mean the probability is floored at 1e-12 instead of -inf.
    far = discretized_gaussian_log_likelihood(-edges, edges.clone(), torch.full_like(edges, math.log(1e-3)))
    assert torch.allclose(far, torch.full_like(far, math.log(1e-12)))
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(x, means[:, :3], log_scales)


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))


def test_tables_follow_the_data_device_and_dtype(setup):
    d, x0, noise, t = setup
    out = q_sample(d, x0.double(), t, noise.double())
    assert out.dtype == torch.float64  # float32 tables broadcast up, never down
    assert q_sample(d, x0, t, noise).device == x0.device
