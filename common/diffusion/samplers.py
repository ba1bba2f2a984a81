"""Ancestral (DDPM) and DDIM samplers over a ``Diffusion`` chain, with injectable noise.

A denoiser is any callable ``denoise(x_t, t) -> (eps, var_values | None)`` on chain indices
``t`` [N] (a bare eps tensor is accepted too). When a class label ``y`` [N] is given to a
sampler it is passed through as a third positional argument, ``denoise(x_t, t, y)``; without
``y`` the denoiser is called with two arguments, so ``Teacher.predict`` fits both ways.

Noise is ``None`` (the global torch RNG), a ``torch.Generator`` or a callable
``noise_fn(step_index, shape) -> Tensor``. Step index 0 is x_T (drawn only when ``x_T`` is not
given); step index k >= 1 is the noise of the k-th reverse step, the one from chain index
t = T - k. No noise is drawn for the last step (t = 0), where none is added. With a generator,
the draws happen in exactly this order, which is also the order of diffusers' DDPMPipeline.
"""

from __future__ import annotations

from typing import Callable

import torch

from common.diffusion.gaussian import (
    Diffusion,
    _extract,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
)

Denoiser = Callable[..., "tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor"]
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]
Noise = "None | torch.Generator | NoiseFn"


def ancestral_step(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_type: str,
                   var_values: torch.Tensor | None = None, clip_denoised: bool = True,
                   noise: torch.Tensor | None = None,
                   denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """x_{t-1} = mean + exp(log_var / 2) z from the network's output at (x_t, t); no noise where t == 0.

    -> dict(sample, pred_xstart, log_variance), all [N, C, H, W]. ``noise`` z defaults to randn_like(x_t).
    """
    out = p_mean_variance(d, x_t, t, eps, var_type, var_values, clip_denoised, denoised_fn)
    if noise is None:
        noise = torch.randn_like(x_t)
    nonzero_mask = (t != 0).to(x_t.device, torch.float32).reshape(-1, *([1] * (x_t.ndim - 1)))
    sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"], "log_variance": out["log_variance"]}


def p_sample(d: Diffusion, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor, var_type: str,
             clip_denoised: bool = True, noise: torch.Tensor | None = None, y: torch.Tensor | None = None,
             denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One ancestral step x_t [N, C, H, W] -> x_{t-1}: dict(sample, pred_xstart) (guided-diffusion's p_sample)."""
    eps, var_values = _call(denoise, x_t, t, y)
    out = ancestral_step(d, x_t, t, eps, var_type, var_values, clip_denoised, noise, denoised_fn)
    return {"sample": out["sample"], "pred_xstart": out["pred_xstart"]}


def ancestral_sample(d: Diffusion, denoise: Denoiser, shape: tuple[int, ...], var_type: str,
                     clip_denoised: bool = True, noise: Noise = None, x_T: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, device: torch.device | str | None = None,
                     progress: bool = False,
                     denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Samples [N, C, H, W] by walking the chain t = T-1 .. 0 with ``p_sample`` (DDPM Algorithm 2)."""
    device, draw = _setup(shape, x_T, device, noise)
    x = x_T.to(device=device, dtype=torch.float32) if x_T is not None else draw(0)
    with torch.no_grad():
        for k, i in enumerate(_indices(d, progress), start=1):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            z = draw(k) if i > 0 else torch.zeros_like(x)
            x = p_sample(d, denoise, x, t, var_type, clip_denoised, z, y, denoised_fn)["sample"]
    return x


def ddim_step(d: Diffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, eta: float = 0.0,
              clip_denoised: bool = True, noise: torch.Tensor | None = None,
              denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One DDIM step (Song et al. 2021, Eq. 12) from the network's eps at (x_t, t) to the previous chain index.

    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev); eps is re-derived from the
    (clipped) pred_xstart as in guided-diffusion, so eta = 1 is the ancestral step with fixed_small variance.
    -> dict(sample, pred_xstart), [N, C, H, W]. No noise where t == 0; ``noise`` is ignored when eta == 0.
    """
    pred_xstart = predict_xstart_from_eps(d, x_t, t, eps)
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
    alpha_bar = _extract(d, "alphas_cumprod", t, x_t.shape, x_t.device)
    alpha_bar_prev = _extract(d, "alphas_cumprod_prev", t, x_t.shape, x_t.device)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    # The clamp only guards float32 rounding: 1 - abar_prev - sigma^2 >= 0 holds exactly.
    mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * eps
    if eta == 0:
        return {"sample": mean_pred, "pred_xstart": pred_xstart}
    if noise is None:
        noise = torch.randn_like(x_t)
    nonzero_mask = (t != 0).to(x_t.device, torch.float32).reshape(-1, *([1] * (x_t.ndim - 1)))
    return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": pred_xstart}


def ddim_sample(d: Diffusion, denoise: Denoiser, shape: tuple[int, ...], eta: float = 0.0,
                clip_denoised: bool = True, noise: Noise = None, x_T: torch.Tensor | None = None,
                y: torch.Tensor | None = None, device: torch.device | str | None = None,
                progress: bool = False,
                denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Samples [N, C, H, W] by DDIM steps over the chain t = T-1 .. 0 (respace ``d`` for fewer steps).

    With eta == 0 no step noise is drawn (only x_T, when not given).
    """
    device, draw = _setup(shape, x_T, device, noise)
    x = x_T.to(device=device, dtype=torch.float32) if x_T is not None else draw(0)
    with torch.no_grad():
        for k, i in enumerate(_indices(d, progress), start=1):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            eps, _ = _call(denoise, x, t, y)
            z = draw(k) if (i > 0 and eta != 0) else None
            x = ddim_step(d, x, t, eps, eta, clip_denoised, z, denoised_fn)["sample"]
    return x


def _call(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
    out = denoise(x, t) if y is None else denoise(x, t, y)
    if isinstance(out, torch.Tensor):
        return out, None
    eps, var_values = out
    return eps, var_values


def _indices(d: Diffusion, progress: bool):
    indices = range(d.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm  # lazy: only for interactive runs

        return tqdm(indices)
    return indices


def _setup(shape, x_T, device, noise) -> tuple[torch.device, Callable[[int], torch.Tensor]]:
    shape = tuple(int(s) for s in shape)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    device = torch.device(device) if device is not None else (x_T.device if x_T is not None else torch.device("cpu"))

    if noise is None:
        def draw(k: int) -> torch.Tensor:
            return torch.randn(shape, device=device)
    elif isinstance(noise, torch.Generator):
        def draw(k: int) -> torch.Tensor:
            # Draw on the generator's device, then move (like diffusers' randn_tensor).
            return torch.randn(shape, generator=noise, device=noise.device).to(device)
    elif callable(noise):
        def draw(k: int) -> torch.Tensor:
            z = noise(k, shape)
            if tuple(z.shape) != shape:
                raise ValueError(f"noise_fn({k}, {shape}) returned shape {tuple(z.shape)}")
            return z.to(device=device, dtype=torch.float32)
    else:
        raise TypeError(f"noise must be None, a torch.Generator or a callable noise_fn(step_index, shape), got {type(noise).__name__}")
    return device, draw
