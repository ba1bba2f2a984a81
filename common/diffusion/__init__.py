"""Diffusion math: schedules, respacing, posterior, KL, decoder NLL and samplers (torch + numpy only)."""

from common.diffusion.gaussian import (
    PREDICTION_TYPES,
    V_BOUNDS,
    VAR_TYPES,
    Diffusion,
    bound_v,
    eps_from_prediction,
    keep_timesteps,
    make_diffusion,
    model_log_variance,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
    respace,
)
from common.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from common.diffusion.samplers import (
    ancestral_sample,
    ancestral_step,
    ddim_sample,
    ddim_step,
    p_sample,
)
from common.diffusion.schedules import (
    SCHEDULE_NAMES,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    respaced_timesteps,
    space_timesteps,
)

__all__ = [
    "PREDICTION_TYPES", "SCHEDULE_NAMES", "VAR_TYPES", "V_BOUNDS", "Diffusion",
    "ancestral_sample", "ancestral_step", "approx_standard_normal_cdf", "betas_for_alpha_bar", "bound_v",
    "ddim_sample", "ddim_step", "discretized_gaussian_log_likelihood", "eps_from_prediction",
    "get_named_beta_schedule", "keep_timesteps", "make_diffusion", "mean_flat", "model_log_variance", "normal_kl",
    "p_mean_variance", "p_sample", "predict_eps_from_xstart", "predict_xstart_from_eps",
    "q_posterior_mean_variance", "q_sample", "respace", "respaced_timesteps", "space_timesteps",
]
