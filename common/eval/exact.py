"""Exact measures of samples against the analytic Gaussian-mixture teacher.

With the mixture as ground truth no Inception network is needed: the likelihood of a
student's samples is exact, each sample can be attributed to a mode, and the sliced
Wasserstein distance to exact samples is a consistent two-sample distance.
"""

from __future__ import annotations

import math

import torch

from common.teachers.analytic import GaussianMixture


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance SW_2(x, y) between two sample sets [N, ...] and [M, ...].

    SW_2^2 = E_theta[W_2^2(theta^T x, theta^T y)] over directions theta uniform on the unit
    sphere, estimated with ``num_projections`` random directions; returns SW_2 (the square
    root), in the units of the data. W_2 is chosen over W_1 because it is the metric whose
    square decomposes into mean and spread errors (a mean shift d along theta adds exactly
    d^2). Each 1-D W_2^2 is computed between the empirical quantile functions: sorted
    projections when N == M, else both quantile functions evaluated on a common grid of
    max(N, M) mid-point levels. Samples are flattened and compared in float64.
    """
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
    y = y.detach().reshape(y.shape[0], -1).to(torch.float64).cpu()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: sample dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_wasserstein: both sample sets must be non-empty")
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)                  # [N, P]
    py, _ = torch.sort(y @ theta, dim=0)                  # [M, P]
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return math.sqrt(float((px - py).pow(2).mean()))


def _quantiles(sorted_proj: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function (step function) of sorted columns [N, P] at levels [L] -> [L, P]."""
    n = sorted_proj.shape[0]
    idx = torch.clamp((levels * n).floor().long(), 0, n - 1)
    return sorted_proj[idx]


def mode_coverage(samples: torch.Tensor, mixture: GaussianMixture, radius_std: float = 3.0,
                  min_fraction: float = 0.0) -> dict:
    """Which mixture components the samples [N, C, H, W] reach.

    A sample is assigned to its nearest mean when its distance is within
    radius_std * s * sqrt(D) (a component's samples lie at distance ~ s sqrt(D) from its mean,
    so 3 leaves a wide margin in any dimension); otherwise it is "near no mode". A component
    is covered when it holds more than ``min_fraction`` of the samples (0: at least one).
    Returns ``coverage`` (covered fraction of the K components), ``histogram`` (assigned
    count per component, a list of K ints), ``assigned_fraction`` (per component, of all
    samples), ``off_mode_fraction`` (samples near no mode) and ``radius``.
    """
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64).cpu()
    mu = mixture.means.reshape(mixture.num_components, -1).cpu()
    if x.shape[1] != mu.shape[1]:
        raise ValueError(f"mode_coverage: samples have {x.shape[1]} dimensions, the mixture {mu.shape[1]}")
    radius = radius_std * mixture.std * math.sqrt(mixture.dim)
    dist = torch.cdist(x, mu)                             # [N, K]
    nearest_dist, nearest = dist.min(dim=1)
    near = nearest_dist <= radius
    hist = torch.bincount(nearest[near], minlength=mixture.num_components)
    n = max(x.shape[0], 1)
    fraction = hist.to(torch.float64) / n
    covered = (hist > 0) & (fraction > min_fraction) if min_fraction > 0 else hist > 0
    return {
        "coverage": float(covered.to(torch.float64).mean()),
        "histogram": [int(c) for c in hist],
        "assigned_fraction": [float(f) for f in fraction],
        "off_mode_fraction": float((~near).to(torch.float64).sum() / n),
        "radius": radius,
    }


def exact_nll(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Mean negative log-likelihood -E[log q_0(x)] of samples [N, C, H, W] under the mixture (nats per sample).

    For exact samples this estimates the mixture's differential entropy; larger values mean the
    samples fall off the data manifold. Divide by D * ln 2 for bits per dimension.
    """
    return float(-mixture.log_prob(samples.detach().to(torch.float64)).mean())
