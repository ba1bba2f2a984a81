"""Exact measures against the mixture: sliced Wasserstein, mode coverage, NLL."""

import math

import pytest
import torch

from common.config import AnalyticConfig
from common.eval.exact import exact_nll, mode_coverage, sliced_wasserstein
from common.teachers.analytic import GaussianMixture

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sliced_wasserstein_identical_and_same_distribution_are_near_zero():
    x = torch.randn(800, 1, 4, 4, generator=_gen(0))
    assert sliced_wasserstein(x, x.clone(), generator=_gen(1)) == 0.0
    y = torch.randn(800, 1, 4, 4, generator=_gen(2))
    # The finite-sample floor of W_2 between two sets of 800 normals is about 0.1.
    assert sliced_wasserstein(x, y, generator=_gen(1)) < 0.2


def test_sliced_wasserstein_of_a_shift_is_its_norm_over_sqrt_dim():
    # For y = x + d: W_2 along theta is |theta . d|, and E[(theta . d)^2] = |d|^2 / D on the sphere.
    x = torch.randn(500, 2, 4, 4, generator=_gen(0))
    d = torch.zeros(2, 4, 4)
    d[0] = 0.5
    dim = d.numel()
    expected = d.norm().item() / math.sqrt(dim)
    sw = sliced_wasserstein(x, x + d, num_projections=512, generator=_gen(3))
    assert sw == pytest.approx(expected, rel=0.2)
    # Unequal sizes use the common quantile grid and still see the shift.
    sw_uneq = sliced_wasserstein(x[:300], x[:200] + d, num_projections=512, generator=_gen(3))
    assert sw_uneq > 0.7 * expected
    with pytest.raises(ValueError, match="dimensions differ"):
        sliced_wasserstein(x, torch.randn(5, 3))


def test_sliced_wasserstein_sees_a_scale_change():
    x = torch.randn(1000, 8, generator=_gen(0))
    # W_2 between N(0, 1) and N(0, 4) in every direction is |1 - 2| = 1.
    assert sliced_wasserstein(x, 2 * torch.randn(1000, 8, generator=_gen(1)), generator=_gen(2)) == pytest.approx(1.0, rel=0.15)


def test_mode_coverage_counts_components_and_off_mode_samples():
    mix = GaussianMixture.from_config(AnalyticConfig(num_components=8, channels=1, image_size=4, component_std=0.05))
    x, comp = mix.sample(400, _gen(0))
    full = mode_coverage(x, mix)
    assert full["coverage"] == 1.0 and full["off_mode_fraction"] == 0.0
    assert full["histogram"] == torch.bincount(comp, minlength=8).tolist()

    keep = comp < 3
    partial = mode_coverage(x[keep], mix)
    assert partial["coverage"] == pytest.approx(3 / 8)
    assert sum(partial["histogram"][3:]) == 0

    noise = torch.randn(100, 1, 4, 4, generator=_gen(1)) * 3
    mixed = mode_coverage(torch.cat([x[keep][:100], noise]), mix)
    assert mixed["off_mode_fraction"] == pytest.approx(0.5, abs=0.02)

    # A minimum fraction ignores components with a few stray samples only.
    few = torch.cat([x[comp == 0][:50], x[comp == 1][:1]])
    assert mode_coverage(few, mix)["coverage"] == pytest.approx(2 / 8)
    assert mode_coverage(few, mix, min_fraction=0.05)["coverage"] == pytest.approx(1 / 8)


def test_exact_nll_of_exact_samples_is_the_entropy_for_one_gaussian():
    s, size = 0.2, 4
    mix = GaussianMixture.from_config(AnalyticConfig(num_components=1, channels=1, image_size=size, component_std=s))
    x, _ = mix.sample(5000, _gen(0))
    entropy = 0.5 * size * size * math.log(2 * math.pi * math.e * s**2)
    assert exact_nll(x, mix) == pytest.approx(entropy, abs=0.15)
    # Samples spread too wide are less likely.
    assert exact_nll(mix.means + 2 * s * torch.randn(500, 1, size, size, generator=_gen(1), dtype=F64), mix) > entropy + 5
