"""Samplers: noise injection and order, t = 0 handling, DDIM eta = 0 / eta = 1 relations, exact denoisers."""

import pytest
import torch

from common.diffusion import (
    ancestral_sample,
    ancestral_step,
    ddim_sample,
    ddim_step,
    make_diffusion,
    p_mean_variance,
    p_sample,
)

torch.set_num_threads(1)
SHAPE = (3, 2, 4, 4)


def wiggly_denoiser(x, t):
    """A deterministic, non-trivial eps(x_t, t) with a learned_range-style variance head."""
    tt = t.float().view(-1, 1, 1, 1)
    return 0.7 * x + 0.3 * torch.sin(x * 3 + tt / 7), torch.tanh(x + tt / 50)


def point_mass_denoiser(d, target):
    """The exact eps for data that is the single image ``target``: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar = torch.tensor(d.alphas_cumprod, dtype=torch.float32)

    def denoise(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt(), None

    return denoise


def recorded_noise(seed, calls):
    g = torch.Generator().manual_seed(seed)

    def noise_fn(k, shape):
        calls.append(k)
        return torch.randn(shape, generator=g)

    return noise_fn


def test_generator_and_noise_fn_draw_in_the_same_order_and_skip_the_last_step():
    d = make_diffusion("linear", 1000, "20")
    calls = []
    a = ancestral_sample(d, wiggly_denoiser, SHAPE, "learned_range", noise=recorded_noise(5, calls))
    b = ancestral_sample(d, wiggly_denoiser, SHAPE, "learned_range", noise=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert calls == list(range(20))  # x_T, then steps from t = 19 .. 1; none for t = 0
    c = ancestral_sample(d, wiggly_denoiser, SHAPE, "learned_range", noise=torch.Generator().manual_seed(6))
    assert not torch.allclose(a, c)


def test_x_T_is_used_and_noise_fn_is_not_asked_for_it():
    d = make_diffusion("cosine", 1000, "10")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    calls = []
    ancestral_sample(d, wiggly_denoiser, SHAPE, "fixed_large", noise=recorded_noise(1, calls), x_T=x_T)
    assert calls == list(range(1, 10))
    with pytest.raises(ValueError, match="x_T"):
        ancestral_sample(d, wiggly_denoiser, (1, 2, 4, 4), "fixed_large", x_T=x_T)
    with pytest.raises(TypeError, match="noise"):
        ancestral_sample(d, wiggly_denoiser, SHAPE, "fixed_large", noise=3)


def test_p_sample_adds_no_noise_at_t0_and_the_log_variance_elsewhere():
    d = make_diffusion("cosine", 100)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 100
    t = torch.tensor([0, 5, 99])
    eps, v = wiggly_denoiser(x, t)
    out = p_sample(d, wiggly_denoiser, x, t, "learned_range", clip_denoised=True, noise=z)
    pmv = p_mean_variance(d, x, t, eps, "learned_range", v, clip_denoised=True)
    expected = pmv["mean"] + (0.5 * pmv["log_variance"]).exp() * z
    assert torch.equal(out["sample"][0], pmv["mean"][0])
    assert torch.allclose(out["sample"][1:], expected[1:])
    assert torch.equal(out["pred_xstart"], pmv["pred_xstart"])


def test_class_labels_pass_through_as_a_third_argument():
    d = make_diffusion("linear", 1000, "5")
    seen = []

    def conditional(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x) + y.float().view(-1, 1, 1, 1) / 10, None

    y = torch.tensor([1, 2, 3])
    ancestral_sample(d, conditional, SHAPE, "fixed_small", noise=torch.Generator().manual_seed(0), y=y)
    ddim_sample(d, conditional, SHAPE, noise=torch.Generator().manual_seed(0), y=y)
    assert len(seen) == 10 and all(torch.equal(s, y) for s in seen)


def test_ddim_eta0_is_deterministic_given_x_T_and_draws_no_step_noise():
    d = make_diffusion("cosine", 1000, "ddim25")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    calls = []
    a = ddim_sample(d, wiggly_denoiser, SHAPE, eta=0.0, noise=recorded_noise(1, calls), x_T=x_T)
    b = ddim_sample(d, wiggly_denoiser, SHAPE, eta=0.0, noise=torch.Generator().manual_seed(99), x_T=x_T)
    assert calls == [] and torch.equal(a, b)


def test_ddim_eta1_equals_ancestral_fixed_small_with_the_same_noise():
    d = make_diffusion("cosine", 1000, "30")
    for clip in (True, False):
        a = ddim_sample(d, wiggly_denoiser, SHAPE, eta=1.0, clip_denoised=clip, noise=torch.Generator().manual_seed(3))
        b = ancestral_sample(d, wiggly_denoiser, SHAPE, "fixed_small", clip_denoised=clip,
                             noise=torch.Generator().manual_seed(3))
        assert torch.allclose(a, b, atol=1e-4), (clip, (a - b).abs().max())


def test_one_ddim_eta1_step_matches_one_ancestral_step():
    d = make_diffusion("linear", 200)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 150])
    eps, _ = wiggly_denoiser(x, t)
    a = ddim_step(d, x, t, eps, eta=1.0, noise=z)
    b = ancestral_step(d, x, t, eps, "fixed_small", noise=z)
    # float32 tables: at t = 1 both go through 1 - abar ~ 1e-3, so rounding differs at ~1e-4
    assert torch.allclose(a["sample"], b["sample"], atol=2e-4)
    assert torch.equal(a["sample"][0], a["pred_xstart"][0])  # the last step returns x_0 itself
    assert torch.equal(a["pred_xstart"], b["pred_xstart"])


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_exact_denoiser_of_a_point_mass_lands_on_it(sampler):
    d = make_diffusion("cosine", 1000, "25")
    target = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    denoise = point_mass_denoiser(d, target)
    if sampler == "ddim":
        out = ddim_sample(d, denoise, SHAPE, noise=torch.Generator().manual_seed(1))
    else:
        out = ancestral_sample(d, denoise, SHAPE, "fixed_large", noise=torch.Generator().manual_seed(1))
    assert torch.allclose(out, target.expand(SHAPE), atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_gaussian_data_recovers_its_mean_and_std(sampler):
    # Data N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / var_t.
    mu, s = 0.3, 0.2
    # The full chain: with 100 steps the discretization error alone shrinks the std by ~7%.
    d = make_diffusion("cosine", 1000)
    abar = torch.tensor(d.alphas_cumprod, dtype=torch.float32)

    def denoise(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a), None

    shape, g = (4000, 1, 1, 1), torch.Generator().manual_seed(0)
    if sampler == "ddim":
        out = ddim_sample(d, denoise, shape, clip_denoised=False, noise=g)
    else:
        out = ancestral_sample(d, denoise, shape, "fixed_small", clip_denoised=False, noise=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tables_follow_the_data_and_cpu_generators_drive_cuda_samples():
    from common.diffusion import q_sample

    d = make_diffusion("cosine", 1000, "10")
    x = torch.randn(SHAPE, device="cuda")
    t_cpu = torch.tensor([0, 4, 9])
    assert q_sample(d, x, t_cpu, x).device.type == "cuda"
    eps, v = wiggly_denoiser(x, t_cpu.cuda())
    out = ancestral_step(d, x, t_cpu, eps, "learned_range", v)
    assert out["sample"].device.type == "cuda"
    cpu = ancestral_sample(d, wiggly_denoiser, SHAPE, "learned_range", noise=torch.Generator().manual_seed(0))
    gpu = ancestral_sample(d, wiggly_denoiser, SHAPE, "learned_range", noise=torch.Generator().manual_seed(0), device="cuda")
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
