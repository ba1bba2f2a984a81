"""The Gaussian diffusion q(x_t | x_0) and its posterior, as pure functions of tensors.

Follows DDPM (Ho et al. 2020) and IDDPM (Nichol & Dhariwal 2021); equation numbers are
the IDDPM paper's. Tables are computed once in float64 numpy (``Diffusion``) and gathered
as float32 tensors at the chain indices ``t`` on the device of the data (``_extract``).
Tensors are ``[N, C, H, W]`` (any ``[N, ...]`` works); ``t`` is an int64 tensor ``[N]``
of 0-based chain indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from common.diffusion.schedules import get_named_beta_schedule, space_timesteps

VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
PREDICTION_TYPES = ("eps", "v", "x0")
V_BOUNDS = ("none", "clamp", "tanh")


@dataclass(frozen=True, eq=False)
class Diffusion:
    """Schedule tables of one diffusion chain, float64 numpy arrays of length ``num_timesteps``.

    ``timestep_map[i]`` is the original (network) timestep of chain index ``i``: the identity for
    a full chain, the kept steps for a respaced one (guided-diffusion's SpacedDiffusion).
    Build with ``Diffusion.from_betas``, ``make_diffusion`` or ``respace``.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    fixed_large_log_variance: np.ndarray
    timestep_map: np.ndarray
    num_timesteps: int
    # float32 tensors per (table, device), filled lazily; not part of the value.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas, timestep_map=None) -> "Diffusion":
        """All tables from float64 betas [T] (DDPM Eqs. 4, 6, 7); ``timestep_map`` [T] defaults to arange(T)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}")
        T = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = np.arange(T, dtype=np.int64)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},) like betas, got {timestep_map.shape}")

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        clipped_var = np.append(posterior_variance[1], posterior_variance[1:]) if T > 1 else posterior_variance
        # fixed_large uses beta_t, but posterior_variance[1] at t = 0 for a better decoder likelihood.
        large_var = np.append(posterior_variance[1], betas[1:]) if T > 1 else betas
        with np.errstate(divide="ignore"):
            tables = dict(
                betas=betas,
                alphas_cumprod=alphas_cumprod,
                alphas_cumprod_prev=alphas_cumprod_prev,
                alphas_cumprod_next=alphas_cumprod_next,
                sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
                sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
                posterior_variance=posterior_variance,
                posterior_log_variance_clipped=np.log(clipped_var),
                posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
                log_betas=np.log(betas),
                fixed_large_log_variance=np.log(large_var),
            )
        for arr in tables.values():
            arr.setflags(write=False)
        timestep_map.setflags(write=False)
        return cls(**tables, timestep_map=timestep_map, num_timesteps=T)

    def map_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Chain indices t [N] -> the network's original timesteps [N] (int64, same device)."""
        return self._table("timestep_map", t.device, torch.int64)[t.long()]

    def fingerprint(self) -> str:
        """sha256 of the betas and the timestep map: equal for interchangeable chains."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.betas, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.timestep_map, dtype="<i8").tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:
        # Device tensors stay out of pickles (Ray ships a Diffusion to actors on other devices).
        return {**self.__dict__, "_cache": {}}

    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, str(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            # Cast on the CPU first: float64 is not available on every accelerator.
            cached = torch.from_numpy(np.array(getattr(self, name))).to(dtype).to(device)
            self._cache[key] = cached
        return cached


def make_diffusion(schedule: str, num_timesteps: int, respacing: str = "", **schedule_kwargs: float) -> Diffusion:
    """A named schedule of ``num_timesteps`` steps, respaced when ``respacing`` is not empty."""
    d = Diffusion.from_betas(get_named_beta_schedule(schedule, num_timesteps, **schedule_kwargs))
    return respace(d, respacing) if respacing else d


def respace(d: Diffusion, respacing: str) -> Diffusion:
    """Keep the steps ``space_timesteps(d.num_timesteps, respacing)`` of ``d`` (respace.py's SpacedDiffusion).

    The new betas are rebuilt so the kept alphas_cumprod are unchanged:
    beta'_i = 1 - alphas_cumprod[k_i] / alphas_cumprod[k_{i-1}]. Respacing a respaced chain composes
    the timestep maps. ``respacing == ""`` returns ``d`` itself.
    """
    if not respacing:
        return d
    return _sub_chain(d, sorted(space_timesteps(d.num_timesteps, respacing)))


def keep_timesteps(d: Diffusion, timesteps) -> Diffusion:
    """The sub-chain of ``d`` at the original (network) timesteps ``timesteps``, each one on ``d``'s chain.

    A respacing named by original timesteps rather than by counts of ``d``'s own steps: a full chain
    and any respacing of it that holds ``timesteps`` give the same chain (the same timestep map, and
    betas equal up to float64 rounding), so models trained on different chains sample on the same steps.
    """
    index = {int(t): i for i, t in enumerate(d.timestep_map)}
    want = sorted({int(t) for t in timesteps})
    missing = [t for t in want if t not in index]
    if not want or missing:
        raise ValueError(f"timesteps {missing or want} are not on this {d.num_timesteps}-step chain "
                         f"(its timesteps run {int(d.timestep_map[0])}..{int(d.timestep_map[-1])})")
    return _sub_chain(d, [index[t] for t in want])


def _sub_chain(d: Diffusion, kept: list[int]) -> Diffusion:
    """The chain of ``d``'s indices ``kept`` (increasing), its alphas_cumprod unchanged (see ``respace``)."""
    last = 1.0
    new_betas = []
    for i in kept:
        new_betas.append(1.0 - d.alphas_cumprod[i] / last)
        last = d.alphas_cumprod[i]
    return Diffusion.from_betas(np.array(new_betas, dtype=np.float64), timestep_map=d.timestep_map[kept])


def _extract(d: Diffusion, name: str, t: torch.Tensor, shape: torch.Size | tuple[int, ...],
             device: torch.device | None = None) -> torch.Tensor:
    """Table ``name`` gathered at t [N] as float32 on ``device`` (default t's), shaped [N, 1, ..., 1] to broadcast against ``shape``."""
    device = t.device if device is None else device
    values = d._table(name, device)[t.to(device).long()]
    return values.reshape(values.shape[0], *([1] * (len(shape) - 1)))


def q_sample(d: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 9; DDPM Eq. 4). All [N, C, H, W]."""
    return (_extract(d, "sqrt_alphas_cumprod", t, x0.shape, x0.device) * x0
            + _extract(d, "sqrt_one_minus_alphas_cumprod", t, x0.shape, x0.device) * noise)


def q_posterior_mean_variance(d: Diffusion, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_{t-1} | x_t, x_0) (Eqs. 10-12 of IDDPM, DDPM Eqs. 6-7) -> (mean [N, C, H, W], var, log_var_clipped [N, 1, 1, 1])."""
    mean = (_extract(d, "posterior_mean_coef1", t, x_t.shape, x_t.device) * x0
            + _extract(d, "posterior_mean_coef2", t, x_t.shape, x_t.device) * x_t)
    var = _extract(d, "posterior_variance", t, x_t.shape, x_t.device)
    log_var = _extract(d, "posterior_log_variance_clipped", t, x_t.shape, x_t.device)
    return mean, var, log_var


def predict_xstart_from_eps(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(1 / alpha_bar_t) x_t - sqrt(1 / alpha_bar_t - 1) eps (Eq. 9 solved for x_0). [N, C, H, W]."""
    return (_extract(d, "sqrt_recip_alphas_cumprod", t, x_t.shape, x_t.device) * x_t
            - _extract(d, "sqrt_recipm1_alphas_cumprod", t, x_t.shape, x_t.device) * eps)


def predict_eps_from_xstart(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (sqrt(1 / alpha_bar_t) x_t - x_0) / sqrt(1 / alpha_bar_t - 1) (Eq. 9 solved for eps). [N, C, H, W]."""
    return ((_extract(d, "sqrt_recip_alphas_cumprod", t, x_t.shape, x_t.device) * x_t - x0)
            / _extract(d, "sqrt_recipm1_alphas_cumprod", t, x_t.shape, x_t.device))


def eps_from_prediction(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, prediction: str) -> torch.Tensor:
    """A network's output [N, C, H, W] converted to eps.

    ``eps``: as is. ``v`` (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x_0):
    eps = sqrt(abar) v + sqrt(1 - abar) x_t. ``x0``: ``predict_eps_from_xstart``.
    """
    if prediction == "eps":
        return out
    if prediction == "v":
        return (_extract(d, "sqrt_alphas_cumprod", t, x_t.shape, x_t.device) * out
                + _extract(d, "sqrt_one_minus_alphas_cumprod", t, x_t.shape, x_t.device) * x_t)
    if prediction == "x0":
        return predict_eps_from_xstart(d, x_t, t, out)
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def model_log_variance(d: Diffusion, t: torch.Tensor, var_type: str, var_values: torch.Tensor | None = None,
                       shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """log Sigma_theta(x_t, t), broadcast to ``shape`` (default: ``var_values.shape``).

    ``fixed_small``: log posterior variance, clipped at t = 0. ``fixed_large``: log beta_t, with
    the posterior variance at t = 1 used at t = 0 (guided-diffusion). ``learned``: ``var_values``
    is the log variance. ``learned_range`` (Eq. 15): v = ``var_values`` in [-1, 1],
    log Sigma = frac log beta_t + (1 - frac) log beta_tilde_t with frac = (v + 1) / 2.
    """
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; expected one of {', '.join(VAR_TYPES)}")
    if var_type in ("learned", "learned_range") and var_values is None:
        raise ValueError(f"var_type {var_type!r} needs the network's var_values")
    if shape is None:
        if var_values is None:
            raise ValueError("model_log_variance needs shape (or var_values) for a fixed variance")
        shape = var_values.shape
    device = var_values.device if var_values is not None else t.device
    if var_type == "learned":
        return var_values.float().expand(shape)
    if var_type == "learned_range":
        min_log = _extract(d, "posterior_log_variance_clipped", t, shape, device)
        max_log = _extract(d, "log_betas", t, shape, device)
        frac = (var_values.float() + 1) / 2
        return (frac * max_log + (1 - frac) * min_log).expand(shape)
    name = "posterior_log_variance_clipped" if var_type == "fixed_small" else "fixed_large_log_variance"
    return _extract(d, name, t, shape, device).expand(shape)


def bound_v(var_values: torch.Tensor, v_bound: str) -> torch.Tensor:
    """A network's raw Eq. 12 value [N, C, H, W] -> the v that ``model_log_variance`` interpolates with.

    ``none``: as is (IDDPM). ``clamp``: clamped to [-1, 1], so log Sigma stays between log beta_tilde_t
    and log beta_t. ``tanh``: tanh(v), the same range with a gradient everywhere. Training and sampling
    must apply the same bound, or the variance sampled is not the one the loss fitted.
    """
    if v_bound == "none":
        return var_values
    if v_bound == "clamp":
        return var_values.clamp(-1.0, 1.0)
    if v_bound == "tanh":
        return torch.tanh(var_values)
    raise ValueError(f"unknown v_bound {v_bound!r}; expected one of {', '.join(V_BOUNDS)}")


def _model_variance(d: Diffusion, t: torch.Tensor, var_type: str, log_variance: torch.Tensor) -> torch.Tensor:
    # The fixed variances are the tables themselves (fixed_small is exactly 0 at t = 0, as guided-diffusion).
    if var_type == "fixed_small":
        return _extract(d, "posterior_variance", t, log_variance.shape, log_variance.device).expand(log_variance.shape)
    return torch.exp(log_variance)


def p_mean_variance(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_type: str,
                    var_values: torch.Tensor | None = None, clip_denoised: bool = True,
                    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """p_theta(x_{t-1} | x_t) from a network's eps (Eqs. 11, 13): dict of [N, C, H, W] tensors
    ``mean``, ``variance``, ``log_variance``, ``pred_xstart``.

    pred_xstart is ``denoised_fn`` applied, then clipped to [-1, 1] when ``clip_denoised``; the mean is
    the posterior mean at pred_xstart.
    """
    log_variance = model_log_variance(d, t.to(x_t.device), var_type, var_values, shape=x_t.shape)
    variance = _model_variance(d, t, var_type, log_variance)
    pred_xstart = predict_xstart_from_eps(d, x_t, t, eps)
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}
