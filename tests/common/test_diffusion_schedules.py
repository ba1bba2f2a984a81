"""Beta schedules and respacing: golden values derived here from the formulas, exact respaced sets."""

import math

import numpy as np
import pytest

from common.diffusion import (
    Diffusion,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    keep_timesteps,
    make_diffusion,
    respace,
    respaced_timesteps,
    space_timesteps,
)


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def test_linear_schedule_matches_ddpm_scaled_by_1000_over_T():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert betas[1] == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, abs=1e-15)
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4 * 1e-4) and short[-1] == pytest.approx(4 * 0.02)
    assert np.all(np.diff(betas) > 0)


def test_cosine_schedule_telescopes_to_alpha_bar_and_caps_at_0999():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1 - _cosine_alpha_bar(1 / T) / _cosine_alpha_bar(0), rel=1e-12)
    assert betas[500] == pytest.approx(1 - _cosine_alpha_bar(501 / T) / _cosine_alpha_bar(500 / T), rel=1e-12)
    assert betas[-1] == 0.999  # alpha_bar(1) ~ 0, so the raw beta ~ 1 is capped
    assert np.all(np.diff(betas) > 0)
    # Where nothing is capped, the cumulative product telescopes to alpha_bar((t+1)/T) / alpha_bar(0).
    d = Diffusion.from_betas(betas)
    for t in (0, 10, 500, 900, 990):
        assert d.alphas_cumprod[t] == pytest.approx(_cosine_alpha_bar((t + 1) / T) / _cosine_alpha_bar(0), rel=1e-9)


def test_scaled_linear_is_linear_in_sqrt_beta_with_ldm_defaults_and_kwargs():
    betas = get_named_beta_schedule("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.0015) and betas[-1] == pytest.approx(0.0195)
    steps = np.diff(np.sqrt(betas))
    assert np.allclose(steps, (math.sqrt(0.0195) - math.sqrt(0.0015)) / 999, rtol=1e-9)
    custom = get_named_beta_schedule("scaled_linear", 10, linear_start=0.00085, linear_end=0.012)
    assert custom[0] == pytest.approx(0.00085) and custom[-1] == pytest.approx(0.012)


def test_unknown_schedule_and_bad_arguments_are_one_line_value_errors():
    with pytest.raises(ValueError, match="'sigmoid'"):
        get_named_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="linear_start"):
        get_named_beta_schedule("cosine", 10, linear_start=0.1)
    with pytest.raises(ValueError, match="num_timesteps"):
        get_named_beta_schedule("linear", 0)


def test_betas_for_alpha_bar_with_custom_function_and_cap():
    betas = betas_for_alpha_bar(4, lambda s: 1 - s, max_beta=0.9)
    # 1 - (1 - (i+1)/4) / (1 - i/4): 1/4, 1/3, 1/2, 1 -> capped at 0.9
    assert np.allclose(betas, [0.25, 1 / 3, 0.5, 0.9])


def test_table_shapes_and_monotonicity():
    d = make_diffusion("cosine", 100)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        arr = getattr(d, name)
        assert arr.shape == (100,) and arr.dtype == np.float64, name
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    assert np.array_equal(d.timestep_map, np.arange(100))


def test_space_timesteps_single_section_50_of_1000():
    steps = space_timesteps(1000, "50")
    # stride (1000 - 1) / (50 - 1) = 20.387..., indices rounded: 0, 20, 41 (40.78), 61 (61.16), 82 (81.55), ..., 999
    assert len(steps) == 50
    assert min(steps) == 0 and max(steps) == 999
    assert {0, 20, 41, 61, 82, 999} <= steps
    assert 40 not in steps and 998 not in steps


def test_space_timesteps_ddim50_is_stride_20():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")  # strides give 10, 5, 4, 3, 2, 2, 2, 2, 1 steps: never 7


def test_space_timesteps_three_sections_of_1000():
    steps = space_timesteps(1000, "10,15,20")
    # sections of 334, 333, 333 steps (1000 % 3 = 1 extra step to the first)
    first = {s for s in steps if s < 334}
    second = {s for s in steps if 334 <= s < 667}
    third = {s for s in steps if s >= 667}
    assert first == set(range(0, 334, 37))            # stride 333 / 9 = 37 exactly
    assert len(second) == 15 and min(second) == 334 and max(second) == 666
    assert 334 + 24 in second                           # 332 / 14 = 23.71 -> 24
    assert len(third) == 20 and min(third) == 667 and max(third) == 999
    assert 667 + 17 in third                            # 332 / 19 = 17.47 -> 17
    assert len(steps) == 45


def test_space_timesteps_docstring_example_300_steps():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]  # 99 / 9 = 11
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299


@pytest.mark.parametrize("spec", ["", "abc", "10,x", "2000", "0", "ddimx"])
def test_space_timesteps_bad_specs(spec):
    with pytest.raises(ValueError) as err:
        space_timesteps(1000, spec)
    assert "\n" not in str(err.value)


def test_respaced_betas_reproduce_kept_alphas_cumprod():
    d = make_diffusion("cosine", 1000)
    for spec in ("50", "ddim25", "10,15,20"):
        kept = sorted(space_timesteps(1000, spec))
        r = respace(d, spec)
        assert r.num_timesteps == len(kept)
        assert np.array_equal(r.timestep_map, kept) and r.timestep_map.dtype == np.int64
        # atol: the last alpha_cumprod (~2e-9) goes through 1 - beta with beta ~ 1, losing relative digits
        assert np.allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
        # The first kept step keeps its own beta (alpha_cumprod of step 0 over 1).
        assert r.betas[0] == pytest.approx(d.betas[0], rel=1e-12)
    assert respace(d, "") is d
    assert np.array_equal(make_diffusion("cosine", 1000, "50").betas, respace(d, "50").betas)


def test_respacing_a_respaced_chain_composes_the_timestep_maps():
    d = make_diffusion("linear", 1000)
    r100 = respace(d, "100")
    r10 = respace(r100, "10")
    inner = sorted(space_timesteps(100, "10"))
    assert np.array_equal(r10.timestep_map, r100.timestep_map[inner])
    assert np.allclose(r10.alphas_cumprod, d.alphas_cumprod[r10.timestep_map], rtol=1e-12)


def test_keep_timesteps_gives_one_chain_from_a_full_and_a_respaced_chain():
    """Issue 22: the steps a 100-step chain visits with 50 of them, named as original timesteps, are the same
    chain whether cut from the full 1000-step chain or from the 100-step one."""
    d = make_diffusion("cosine", 1000)
    r100 = respace(d, "100")
    ts = respaced_timesteps(1000, "100", "50")
    assert ts == respace(r100, "50").timestep_map.tolist() and len(ts) == 50
    assert ts != respaced_timesteps(1000, "50")            # 50 of 100 of 1000 is not 50 of 1000
    assert respaced_timesteps(1000, "", "50") == respaced_timesteps(1000, "50") == sorted(space_timesteps(1000, "50"))
    from_full, from_r100 = keep_timesteps(d, ts), keep_timesteps(r100, ts)
    assert np.array_equal(from_full.timestep_map, ts) and np.array_equal(from_r100.timestep_map, ts)
    assert np.allclose(from_full.betas, from_r100.betas, rtol=1e-12, atol=0)
    assert np.array_equal(keep_timesteps(d, respaced_timesteps(1000, "50")).betas, respace(d, "50").betas)
    with pytest.raises(ValueError, match="not on this 100-step chain"):
        keep_timesteps(r100, [0, 1])


def test_map_timesteps_and_from_betas_validation():
    import torch

    r = make_diffusion("linear", 1000, "ddim10")
    t = torch.tensor([0, 3, 9])
    assert r.map_timesteps(t).tolist() == [0, 300, 900]
    assert r.map_timesteps(t).dtype == torch.int64
    with pytest.raises(ValueError, match="betas"):
        Diffusion.from_betas(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="timestep_map"):
        Diffusion.from_betas(np.array([0.1, 0.2]), timestep_map=[0])


def test_diffusion_is_frozen_and_pickles_without_its_device_cache():
    import dataclasses
    import pickle

    import torch

    from common.diffusion import q_sample

    d = make_diffusion("cosine", 100, "10")
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([0, 9])
    before = q_sample(d, x, t, x)
    assert d._cache  # filled by the gather
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.num_timesteps = 5
    e = pickle.loads(pickle.dumps(d))
    assert e._cache == {}
    assert np.array_equal(e.betas, d.betas) and np.array_equal(e.timestep_map, d.timestep_map)
    assert e.fingerprint() == d.fingerprint()
    assert torch.equal(q_sample(e, x, t, x), before)
