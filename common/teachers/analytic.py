"""The exact teacher: an isotropic Gaussian mixture in an image-shaped space.

The data distribution is q_0 = sum_k w_k N(mu_k, s^2 I) over x in R^{C x H x W}. Under
the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps (DDPM Eq. 4, a = alpha_bar_t)
every component stays Gaussian, so the noised marginal is again a mixture,

    q_t = sum_k w_k N(sqrt(a) mu_k, v_a I),      v_a = a s^2 + 1 - a,

and its score, the optimal eps (eps* = -sqrt(1 - a) grad log q_t, Tweedie) and the
moments of x_0 | x_t are closed forms weighted by the responsibilities r_k(x_t).
This is the project's ground truth (edm2's toy_example.py uses a mixture the same way):
a student distilled from it can be scored exactly (common/eval/exact.py).

All math runs in float64; the teacher returns tensors in the caller's dtype.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from common.config import AnalyticConfig, DiffusionConfig
from common.diffusion import Diffusion, make_diffusion
from common.teachers.base import Teacher

_F64 = torch.float64


def smooth_means(cfg: AnalyticConfig) -> torch.Tensor:
    """Seeded, smooth image-shaped means mu [K, C, H, W] in [-1, 1] (float64).

    Each mean is mean_scale * tanh(z) with z a random low-frequency Fourier field of unit
    pointwise variance (a few cosines with integer frequencies 0..2 per axis), so the means
    look like blurry images, differ from each other and stay inside the data range. tanh
    (not a hard clip) keeps the means distinct even in a 1-pixel space.
    """
    g = torch.Generator().manual_seed(int(cfg.seed))
    k, c, h, w = cfg.num_components, cfg.channels, cfg.image_size, cfg.image_size
    num_waves = 6
    freqs = torch.randint(0, 3, (k, c, num_waves, 2), generator=g).to(_F64)
    phases = 2 * math.pi * torch.rand(k, c, num_waves, generator=g, dtype=_F64)
    amps = torch.randn(k, c, num_waves, generator=g, dtype=_F64)
    rows = torch.arange(h, dtype=_F64) / h
    cols = torch.arange(w, dtype=_F64) / w
    angle = 2 * math.pi * (freqs[..., 0, None, None] * rows[:, None] + freqs[..., 1, None, None] * cols[None, :])
    waves = amps[..., None, None] * torch.cos(angle + phases[..., None, None])   # [K, C, J, H, W]
    z = waves.sum(dim=2) / math.sqrt(num_waves / 2)
    return (cfg.mean_scale * torch.tanh(z)).clamp(-1.0, 1.0)


class GaussianMixture:
    """q_0 = sum_k w_k N(mu_k, s^2 I): means [K, C, H, W], weights [K] (sum 1), std s > 0."""

    def __init__(self, means: torch.Tensor, weights: torch.Tensor, std: float):
        means = torch.as_tensor(means, dtype=_F64)
        weights = torch.as_tensor(weights, dtype=_F64)
        if means.dim() != 4:
            raise ValueError(f"mixture means must have shape [K, C, H, W], got {tuple(means.shape)}")
        if weights.shape != (means.shape[0],) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"mixture weights must be {means.shape[0]} non-negative numbers, got {tuple(weights.shape)}")
        if not std > 0:
            raise ValueError(f"mixture component std must be > 0, got {std}")
        self.means = means
        self.weights = weights / weights.sum()
        self.std = float(std)

    @classmethod
    def from_config(cls, cfg: AnalyticConfig) -> "GaussianMixture":
        """Uniform weights, smooth seeded means (``smooth_means``), std = cfg.component_std."""
        means = smooth_means(cfg)
        return cls(means, torch.full((cfg.num_components,), 1.0 / cfg.num_components, dtype=_F64), cfg.component_std)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        return int(np.prod(self.image_shape))

    def to(self, device: torch.device | str) -> "GaussianMixture":
        self.means = self.means.to(device)
        self.weights = self.weights.to(device)
        return self

    # --- sampling and densities -------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples: (x [n, C, H, W] float64, component [n] int64)."""
        dev = self.means.device
        component = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(dev)
        noise = torch.randn((n, *self.image_shape), generator=generator, dtype=_F64).to(dev)
        return self.means[component] + self.std * noise, component

    def component_log_probs_t(self, x: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
        """log w_k + log N(x; sqrt(a) mu_k, v_a I): x [n, C, H, W], a scalar or [n] -> [n, K]."""
        x, a = self._prepare(x, a)
        var = _marginal_var(a, self.std)                                              # [n]
        # ||x - sqrt(a) mu_k||^2 expanded, so memory is [n, K] + [n, D], never [n, K, D];
        # the cancellation error is ~1e-16 * ||x||^2 in float64, far below 2 v_a.
        xf, mu = x.flatten(1), self.means.flatten(1)
        sq = (xf.pow(2).sum(1, keepdim=True) - 2 * a.sqrt()[:, None] * (xf @ mu.T)
              + a[:, None] * mu.pow(2).sum(1)[None]).clamp(min=0)                    # [n, K]
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * var)                     # [n]
        return self.weights.log()[None] + log_norm[:, None] - sq / (2 * var[:, None])

    def log_prob_t(self, x: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
        """log q_t(x) of the noised marginal at alpha_bar = a: x [n, C, H, W] -> [n] (float64)."""
        return torch.logsumexp(self.component_log_probs_t(x, a), dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q_0(x): x [n, C, H, W] -> [n] (float64)."""
        return self.log_prob_t(x, 1.0)

    def responsibilities(self, x: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
        """r_k(x) = posterior probability of component k given x_t = x: [n, K] (softmax, stable)."""
        return torch.softmax(self.component_log_probs_t(x, a), dim=1)

    # --- score, eps, posterior of x_0 ------------------------------------------------

    def _weights_for(self, x: torch.Tensor, a: torch.Tensor, component: torch.Tensor | None) -> torch.Tensor:
        if component is None:
            return self.responsibilities(x, a)
        component = torch.as_tensor(component, device=self.means.device).long()
        return torch.nn.functional.one_hot(component, self.num_components).to(_F64)

    def score_t(self, x: torch.Tensor, a: torch.Tensor | float, component: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log q_t(x) = (sqrt(a) sum_k r_k mu_k - x) / v_a: [n, C, H, W] (float64).

        With ``component`` [n], the score of that single component N(sqrt(a) mu_k, v_a I).
        """
        x, a = self._prepare(x, a)
        r = self._weights_for(x, a, component)
        mean_mu = torch.einsum("nk,kd->nd", r, self.means.flatten(1)).view_as(x)
        return (_bc(a.sqrt()) * mean_mu - x) / _bc(_marginal_var(a, self.std))

    def eps_t(self, x: torch.Tensor, a: torch.Tensor | float, component: torch.Tensor | None = None) -> torch.Tensor:
        """The MMSE noise prediction eps* = E[eps | x_t] = -sqrt(1 - a) * score_t: [n, C, H, W]."""
        x, a = self._prepare(x, a)
        return -_bc((1 - a).sqrt()) * self.score_t(x, a, component)

    def posterior_x0(self, x: torch.Tensor, a: torch.Tensor | float, component: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """E[x_0 | x_t] and Var[x_0 | x_t] per dimension: x [n, C, H, W] -> ([n, C, H, W], [n, C, H, W]).

        Given component k, x_0 | x_t is Gaussian with
            m_k = mu_k + (s^2 sqrt(a) / v_a) (x_t - sqrt(a) mu_k),   var_c = s^2 (1 - a) / v_a,
        so the mixture posterior has mean sum_k r_k m_k and variance
            var_c + sum_k r_k m_k^2 - (sum_k r_k m_k)^2 = var_c + ((1 - a) / v_a)^2 sum_k r_k (mu_k - mu_bar)^2,
        using m_k - m_bar = ((1 - a) / v_a)(mu_k - mu_bar).
        """
        x, a = self._prepare(x, a)
        s2 = self.std ** 2
        var = _marginal_var(a, self.std)
        r = self._weights_for(x, a, component)                                        # [n, K]
        mu = self.means.flatten(1)                                                    # [K, D]
        mu_bar = r @ mu                                                               # [n, D]
        # sum_k r_k (mu_k - mu_bar)^2 = sum_k r_k mu_k^2 - mu_bar^2 ([n, D] memory; |mu| <= 1 keeps
        # the float64 cancellation error ~1e-16, negligible next to var_c).
        spread = (r @ mu.pow(2) - mu_bar.pow(2)).clamp(min=0)                         # [n, D]
        shrink = (1 - a) / var                                                        # [n]
        mean = shrink[:, None] * mu_bar + (s2 * a.sqrt() / var)[:, None] * x.flatten(1)
        variance = (s2 * (1 - a) / var)[:, None] + shrink[:, None] ** 2 * spread
        return mean.view_as(x), variance.view_as(x)

    def _prepare(self, x: torch.Tensor, a: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device=self.means.device, dtype=_F64)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected x of shape [N, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        a = torch.as_tensor(a, dtype=_F64, device=x.device)
        if a.dim() == 0:
            a = a.expand(x.shape[0])
        return x, a


def _marginal_var(a: torch.Tensor, std: float) -> torch.Tensor:
    """v_a = a s^2 + (1 - a), the per-dimension variance of each noised component."""
    return a * std ** 2 + (1 - a)


def _bc(v: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1] for broadcasting against images."""
    return v[:, None, None, None]


def learned_range_v(log_variance: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 12 (IDDPM): log Sigma = f log beta_t + (1 - f) log beta_tilde_t, f = (v + 1) / 2.

    v = 2 (log Sigma - min_log) / (max_log - min_log) - 1, clamped to [-1, 1] (the network's output
    range in guided-diffusion). Where max_log == min_log any v gives the same variance: 0 is returned.
    """
    span = max_log - min_log
    safe = torch.where(span.abs() > 1e-12, span, torch.ones_like(span))
    v = 2 * (log_variance - min_log) / safe - 1
    return torch.where(span.abs() > 1e-12, v, torch.zeros_like(v)).clamp(-1.0, 1.0)


class AnalyticTeacher(Teacher):
    """The exact teacher of a ``GaussianMixture`` on a ``Diffusion`` chain (full or respaced).

    ``predict`` returns the exact eps* at alpha_bar of the chain index t (the chain's own
    table: a respaced chain keeps the original alpha_bar at its kept steps). Learned
    variance types get the exact per-dimension Var[x_{t-1} | x_t] (moment matching, the
    KL-optimal Gaussian reverse step):
        Var[x_{t-1} | x_t] = beta_tilde_t + coef1_t^2 Var[x_0 | x_t],
    as a log variance (``learned``) or as v in [-1, 1] (``learned_range``, Eq. 12 inverted).
    With ``class_conditional`` the label is the component: eps of that single Gaussian.
    """

    def __init__(self, mixture: GaussianMixture, diffusion: Diffusion, var_type: str = "learned_range",
                 clip_denoised: bool = True, class_conditional: bool = False,
                 device: torch.device | str = "cpu", diffusion_cfg: DiffusionConfig | None = None):
        if var_type not in ("fixed_small", "fixed_large", "learned", "learned_range"):
            raise ValueError(f"unknown var_type {var_type!r}")
        self.device = torch.device(device)
        self.mixture = mixture.to(self.device)
        self.diffusion = diffusion
        self.var_type = var_type
        self.clip_denoised = bool(clip_denoised)
        self.image_shape = mixture.image_shape
        self.num_classes = mixture.num_components if class_conditional else None
        self._diffusion_cfg = diffusion_cfg
        # The chain's tables as float64 tensors on the device, gathered at t in predict.
        self._tables = {name: torch.from_numpy(np.array(getattr(diffusion, name), dtype=np.float64)).to(self.device)
                        for name in ("alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                                     "posterior_log_variance_clipped", "log_betas")}

    @classmethod
    def from_config(cls, cfg: AnalyticConfig, diffusion_cfg: DiffusionConfig | None = None,
                    device: torch.device | str = "cpu", class_conditional: bool | None = None) -> "AnalyticTeacher":
        """Mixture from ``cfg``, chain ``make_diffusion(schedule, T, respacing)`` from ``diffusion_cfg``.

        ``class_conditional`` defaults to ``cfg.class_conditional``.
        """
        dcfg = diffusion_cfg or DiffusionConfig()
        if class_conditional is None:
            class_conditional = cfg.class_conditional
        diffusion = make_diffusion(dcfg.schedule, dcfg.num_timesteps, dcfg.respacing)
        return cls(GaussianMixture.from_config(cfg), diffusion, var_type=dcfg.var_type,
                   clip_denoised=dcfg.clip_denoised, class_conditional=class_conditional,
                   device=device, diffusion_cfg=dcfg)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar of the chain at chain indices t [N] -> [N] float64."""
        return self._tables["alphas_cumprod"][torch.as_tensor(t, device=self.device).long()]

    def _gather(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Chain table ``name`` at chain indices t [N] -> [N, 1, 1, 1] float64."""
        return _bc(self._tables[name][t])

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t [N, C, H, W], t [N] chain indices, y [N] component labels -> (eps, var_values or None)."""
        t = torch.as_tensor(t, device=self.device).long()
        if self.num_classes is None:
            y = None
        elif y is None:
            raise ValueError("this analytic teacher is class-conditional: predict needs labels y [N]")
        a = self.alpha_bar(t)

        def out(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=x_t.device, dtype=x_t.dtype)

        eps = self.mixture.eps_t(x_t, a, component=y)
        if not self.learned_variance:
            return out(eps), None
        log_variance = self.exact_reverse_log_variance(x_t, t, y)
        if self.var_type == "learned":
            return out(eps), out(log_variance)
        v = learned_range_v(log_variance, self._gather("posterior_log_variance_clipped", t), self._gather("log_betas", t))
        return out(eps), out(v)

    def exact_reverse_log_variance(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                                   ) -> torch.Tensor:
        """log Var[x_{t-1} | x_t] = log(beta_tilde_t + coef1_t^2 Var[x_0 | x_t]): [N, C, H, W] float64."""
        t = torch.as_tensor(t, device=self.device).long()
        _, var_x0 = self.mixture.posterior_x0(x_t, self.alpha_bar(t), component=y)
        return torch.log(self._gather("posterior_variance", t) + self._gather("posterior_mean_coef1", t) ** 2 * var_x0)

    def identity(self) -> dict:
        m = self.mixture
        digest = hashlib.sha256()
        for tensor in (m.means, m.weights):
            digest.update(tensor.detach().cpu().numpy().tobytes())
        digest.update(repr(m.std).encode())
        d = self.diffusion
        return {
            "kind": "analytic",
            "weights_sha256": digest.hexdigest(),
            "num_components": m.num_components,
            "component_std": m.std,
            "image_shape": list(self.image_shape),
            "class_conditional": self.num_classes is not None,
            "var_type": self.var_type,
            "clip_denoised": self.clip_denoised,
            "diffusion": self._diffusion_cfg.model_dump() if self._diffusion_cfg is not None else None,
            "chain_fingerprint": d.fingerprint(),
            "chain_length": int(d.num_timesteps),
            "timestep_map": [int(i) for i in np.asarray(d.timestep_map)],
        }
