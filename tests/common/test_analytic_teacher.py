"""The analytic Gaussian-mixture teacher against autograd, torch.distributions and Monte Carlo."""

import math

import pytest
import torch

from common.config import AnalyticConfig, DiffusionConfig
from common.diffusion import ancestral_sample, make_diffusion, model_log_variance
from common.eval.exact import exact_nll, mode_coverage, sliced_wasserstein
from common.teachers.analytic import AnalyticTeacher, GaussianMixture, learned_range_v

torch.set_num_threads(1)
F64 = torch.float64


def _mixture(k=4, c=2, size=3, std=0.2, seed=0, weights=None) -> GaussianMixture:
    cfg = AnalyticConfig(num_components=k, channels=c, image_size=size, component_std=std, seed=seed)
    mix = GaussianMixture.from_config(cfg)
    if weights is not None:
        mix = GaussianMixture(mix.means, torch.tensor(weights, dtype=F64), std)
    return mix


def test_means_are_seeded_in_range_and_distinct():
    cfg = AnalyticConfig(num_components=8, channels=3, image_size=8, seed=3)
    a, b = GaussianMixture.from_config(cfg).means, GaussianMixture.from_config(cfg).means
    assert torch.equal(a, b)
    assert a.shape == (8, 3, 8, 8) and a.abs().max() <= 1.0
    assert not torch.equal(a, GaussianMixture.from_config(cfg.model_copy(update={"seed": 4})).means)
    pairwise = torch.cdist(a.flatten(1), a.flatten(1)) + 1e9 * torch.eye(8, dtype=F64)
    # Separated modes: every pair further apart than 2 s sqrt(D) (the typical radius of a component).
    assert pairwise.min() > 2 * cfg.component_std * math.sqrt(a[0].numel())
    one_pixel = GaussianMixture.from_config(AnalyticConfig(num_components=5, channels=1, image_size=1)).means
    assert len(set(one_pixel.flatten().tolist())) == 5


@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_eps_is_minus_sqrt_one_minus_abar_times_autograd_score(t):
    mix = _mixture(weights=[0.1, 0.2, 0.3, 0.4])
    a = float(make_diffusion("cosine", 1000).alphas_cumprod[t])
    g = torch.Generator().manual_seed(t)
    x0, _ = mix.sample(6, g)
    x = (math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g, dtype=F64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob_t(x, a).sum(), x)
    eps = mix.eps_t(x.detach(), a)
    torch.testing.assert_close(eps, -math.sqrt(1 - a) * grad, rtol=1e-9, atol=1e-9)
    # Per-component: the score of the single Gaussian N(sqrt(a) mu_k, v_a I).
    k = torch.tensor([0, 1, 2, 3, 0, 1])
    mu_t, var = math.sqrt(a) * mix.means[k], a * mix.std**2 + 1 - a
    torch.testing.assert_close(mix.score_t(x.detach(), a, component=k), (mu_t - x.detach()) / var)


def test_eps_is_stable_far_from_all_modes():
    mix = _mixture(std=0.01)
    x = 50 * torch.ones(2, *mix.image_shape, dtype=F64)
    for a in (1e-4, 0.5, 0.9999):
        eps = mix.eps_t(x, a)
        assert torch.isfinite(eps).all()
        _, var = mix.posterior_x0(x, a)
        assert torch.isfinite(var).all() and (var > 0).all()


def test_single_gaussian_log_prob_matches_torch_distributions():
    mix = _mixture(k=1, std=0.3)
    x = torch.randn(7, *mix.image_shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    for a in (1.0, 0.7, 0.05):
        scale = math.sqrt(a * 0.09 + 1 - a)
        ref = torch.distributions.Normal(math.sqrt(a) * mix.means[0], scale).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(mix.log_prob_t(x, a), ref)
    torch.testing.assert_close(mix.log_prob(x), mix.log_prob_t(x, 1.0))


def test_mixture_log_prob_matches_torch_mixture_same_family():
    mix = _mixture(k=3, c=1, size=2, std=0.15, weights=[0.5, 0.3, 0.2])
    ref_dist = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=mix.weights),
        torch.distributions.Independent(torch.distributions.Normal(mix.means.flatten(1), mix.std), 1))
    x, _ = mix.sample(50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(mix.log_prob(x), ref_dist.log_prob(x.flatten(1)))


def test_sampling_moments_and_component_frequencies():
    mix = _mixture(k=3, c=1, size=2, std=0.1, weights=[0.6, 0.3, 0.1])
    n = 40_000
    x, comp = mix.sample(n, torch.Generator().manual_seed(2))
    freq = torch.bincount(comp, minlength=3).to(F64) / n
    torch.testing.assert_close(freq, mix.weights, atol=0.01, rtol=0)
    torch.testing.assert_close(x.mean(0), torch.einsum("k,kchw->chw", mix.weights, mix.means), atol=0.01, rtol=0)
    resid = x - mix.means[comp]
    assert abs(resid.std().item() - 0.1) < 0.002


def _grid_posterior(mix, x_t, a, num=400_001):
    """p(x_0 | x_t) of a 1-pixel mixture on a fine grid of x_0 (quadrature): (grid [G], weights [G])."""
    grid = torch.linspace(-3, 3, num, dtype=F64)
    log_prior = mix.log_prob(grid.view(-1, 1, 1, 1))
    log_lik = -((x_t - math.sqrt(a) * grid) ** 2) / (2 * (1 - a))
    return grid, torch.softmax(log_prior + log_lik, 0)


@pytest.mark.parametrize("t", [3, 80, 300, 700])
def test_posterior_moments_and_reverse_variance_match_monte_carlo(t):
    mix = _mixture(k=3, c=1, size=1, std=0.2, weights=[0.5, 0.3, 0.2])
    d = make_diffusion("cosine", 1000)
    a = float(d.alphas_cumprod[t])
    teacher = AnalyticTeacher(mix, d, var_type="learned")
    for x_value in (-0.6, 0.1, 0.8):
        x_t = torch.full((1, 1, 1, 1), x_value, dtype=F64)
        grid, w = _grid_posterior(mix, x_value, a)
        ref_mean = (w * grid).sum()
        ref_var = (w * (grid - ref_mean) ** 2).sum()
        mean, var = mix.posterior_x0(x_t, a)
        assert abs(mean.item() - ref_mean.item()) < 1e-6
        assert abs(var.item() - ref_var.item()) < 1e-4 * ref_var.item()
        # Tweedie: E[x_0 | x_t] = (x_t - sqrt(1 - a) eps*) / sqrt(a)
        eps = mix.eps_t(x_t, a)
        torch.testing.assert_close(mean, (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a))
        # Monte Carlo Var[x_{t-1} | x_t]: x_0 ~ p(x_0 | x_t) (grid), then x_{t-1} ~ q(x_{t-1} | x_t, x_0).
        g = torch.Generator().manual_seed(t + 1)
        x0 = grid[torch.multinomial(w.float(), 200_000, replacement=True, generator=g)]
        mean_prev = d.posterior_mean_coef1[t] * x0 + d.posterior_mean_coef2[t] * x_value
        x_prev = mean_prev + math.sqrt(d.posterior_variance[t]) * torch.randn(x0.shape, generator=g, dtype=F64)
        mc_var_prev = x_prev.var().item()
        _, log_var = teacher.predict(x_t, torch.tensor([t]))
        assert abs(math.exp(log_var.item()) - mc_var_prev) < 0.05 * mc_var_prev


def test_learned_range_v_inverts_eq12_of_the_diffusion_module():
    d = make_diffusion("cosine", 1000, "100")
    mix = _mixture()
    lr_teacher = AnalyticTeacher(mix, d, var_type="learned_range")
    log_teacher = AnalyticTeacher(mix, d, var_type="learned")
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([1, 5, 20, 50, 80, 99])
    x0, _ = mix.sample(6, g)
    abar = lr_teacher.alpha_bar(t)[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g, dtype=F64)
    _, v = lr_teacher.predict(x_t.float(), t)
    _, log_var = log_teacher.predict(x_t, t)
    assert v.dtype == torch.float32 and v.abs().max() <= 1.0
    inside = (v.abs() < 1).double()
    assert inside.mean() > 0.5  # most exact variances lie between beta_tilde and beta
    recon = model_log_variance(d, t, "learned_range", v)
    torch.testing.assert_close(recon.double() * inside, log_var * inside, atol=2e-4, rtol=0)
    # Outside the range v saturates at the nearer end.
    lo, hi = torch.zeros(3), torch.ones(3)
    assert learned_range_v(torch.tensor([-5.0, 0.5, 5.0]), lo, hi).tolist() == [-1.0, 0.0, 1.0]


def test_respaced_chain_maps_to_original_alpha_bar():
    cfg = AnalyticConfig(num_components=3, channels=1, image_size=4)
    full = AnalyticTeacher.from_config(cfg, DiffusionConfig(var_type="fixed_small"))
    spaced = AnalyticTeacher.from_config(cfg, DiffusionConfig(var_type="fixed_small", respacing="50"))
    assert spaced.diffusion.num_timesteps == 50
    i = torch.tensor([0, 7, 49])
    orig = spaced.diffusion.map_timesteps(i)
    x = torch.randn(3, 1, 4, 4)
    eps_spaced, var_spaced = spaced.predict(x, i)
    eps_full, _ = full.predict(x, orig)
    assert var_spaced is None
    torch.testing.assert_close(eps_spaced, eps_full)
    assert spaced.identity() != full.identity()
    assert spaced.identity() == AnalyticTeacher.from_config(cfg, DiffusionConfig(var_type="fixed_small", respacing="50")).identity()


def test_class_conditional_label_selects_the_component():
    cfg = AnalyticConfig(num_components=4, channels=1, image_size=4)
    teacher = AnalyticTeacher.from_config(cfg, DiffusionConfig(respacing="20"), class_conditional=True)
    assert teacher.num_classes == 4
    with pytest.raises(ValueError, match="labels"):
        teacher.predict(torch.zeros(2, 1, 4, 4), torch.tensor([3, 3]))
    y = torch.tensor([2] * 200)
    x = ancestral_sample(teacher.diffusion, teacher.predict, (200, 1, 4, 4), teacher.var_type,
                         noise=torch.Generator().manual_seed(0), y=y)
    cov = mode_coverage(x, teacher.mixture)
    assert cov["histogram"][2] == 200 and cov["off_mode_fraction"] == 0.0


@pytest.mark.slow
def test_ancestral_sampling_with_exact_teacher_recovers_the_mixture():
    """100-step respaced ancestral sampling with the exact eps and exact variance reproduces q_0."""
    cfg = AnalyticConfig()  # 8 components, 1 x 8 x 8, std 0.1
    n = 1000
    exact, _ = GaussianMixture.from_config(cfg).sample(n, torch.Generator().manual_seed(1))
    results = {}
    for var_type in ("learned_range", "fixed_small"):
        teacher = AnalyticTeacher.from_config(cfg, DiffusionConfig(respacing="100", var_type=var_type))
        x = ancestral_sample(teacher.diffusion, teacher.predict, (n, 1, 8, 8), teacher.var_type,
                             clip_denoised=True, noise=torch.Generator().manual_seed(0))
        results[var_type] = x
    mix = teacher.mixture
    proj = torch.Generator().manual_seed(7)
    sw_model = sliced_wasserstein(results["learned_range"], exact, generator=proj)
    exact2, _ = mix.sample(n, torch.Generator().manual_seed(2))
    sw_floor = sliced_wasserstein(exact2, exact, generator=torch.Generator().manual_seed(7))
    sw_noise = sliced_wasserstein(torch.randn_like(exact), exact, generator=torch.Generator().manual_seed(7))
    assert sw_model < 2 * sw_floor and sw_model < 0.1 * sw_noise
    assert mode_coverage(results["learned_range"], mix)["coverage"] == 1.0
    # The exact reverse variance gives the right spread; fixed_small on 100 steps is too narrow.
    nll_exact = exact_nll(exact, mix)
    assert abs(exact_nll(results["learned_range"], mix) - nll_exact) < 1.0
    assert exact_nll(results["fixed_small"], mix) < nll_exact - 3.0


def test_teacher_pickles_for_remote_workers():
    import pickle

    teacher = AnalyticTeacher.from_config(AnalyticConfig(image_size=4), DiffusionConfig(respacing="10"))
    clone = pickle.loads(pickle.dumps(teacher))
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    for a, b in zip(teacher.predict(x, t), clone.predict(x, t)):
        torch.testing.assert_close(a, b)
    assert clone.identity() == teacher.identity()
