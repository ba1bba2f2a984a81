"""Sampling a network or a teacher on a respacing of its chain: ancestral (IDDPM) or DDIM."""

from __future__ import annotations

from typing import Callable

import torch

from common.config import SampleConfig
import numpy as np

from common.diffusion import Diffusion, ancestral_sample, bound_v, ddim_sample, keep_timesteps, respace
from common.teachers.base import Teacher
from common.teachers.latent import latent_decoder
from student_trainer.losses import split_output


def network_denoiser(model: torch.nn.Module, d: Diffusion, channels: int, v_bound: str) -> Callable:
    """A network called with original timesteps -> the samplers' denoise(x_t, t[, y]) on d's chain indices;
    its Eq. 12 v bounded as in training (``bound_v``)."""

    @torch.no_grad()
    def denoise(x_t, t, y=None):
        ts = d.map_timesteps(t)
        out = model(x_t, ts, y) if y is not None else model(x_t, ts)
        eps, var_values = split_output(out.float(), channels)
        return eps, (None if var_values is None else bound_v(var_values, v_bound))

    return denoise


def sampling_chain(chain: Diffusion, cfg: SampleConfig) -> Diffusion:
    """The steps of ``chain`` a sampler visits: the original ``cfg.timesteps`` when given, else the
    ``cfg.steps`` respacing of ``chain``."""
    return keep_timesteps(chain, cfg.timesteps) if cfg.timesteps else respace(chain, cfg.steps)


def teacher_denoiser(teacher: Teacher, cfg: SampleConfig) -> tuple[Diffusion, Callable]:
    """(sampling chain, denoise on its indices): index i of the sampling chain is teacher chain index kept[i]."""
    d = sampling_chain(teacher.diffusion, cfg)
    # both timestep maps increase, and every step of d is on the teacher's chain
    kept = torch.from_numpy(np.searchsorted(teacher.diffusion.timestep_map, d.timestep_map)).long()

    def denoise(x_t, t, y=None):
        return teacher.predict(x_t, kept.to(t.device)[t], y)

    return d, denoise


def run_sampler(d: Diffusion, denoise: Callable, var_type: str, cfg: SampleConfig, image_shape: tuple[int, int, int],
                num_classes: int | None, seed: int, device: torch.device, num_samples: int | None = None,
                progress: bool = False, clip_denoised: bool = True,
                decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_samples`` images [N, C, H, W] in [-1, 1] (and labels [N] when class-conditional), in batches.

    ``decode``: a latent model's first-stage decoder (``latent_decoder``); its latents are decoded
    unclamped, batch by batch, instead of being clamped to [-1, 1] as pixels are."""
    n = num_samples or cfg.num_samples
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out, labels = [], []
    for start in range(0, n, cfg.batch_size):
        m = min(cfg.batch_size, n - start)
        y = None if num_classes is None else torch.randint(0, num_classes, (m,), generator=gen).to(device)
        noise = lambda k, shape: torch.randn(shape, generator=gen).to(device)  # noqa: E731
        shape = (m, *image_shape)
        if cfg.sampler == "ddim":
            x = ddim_sample(d, denoise, shape, eta=cfg.eta, clip_denoised=clip_denoised, noise=noise, y=y,
                            device=device, progress=progress)
        else:
            x = ancestral_sample(d, denoise, shape, var_type, clip_denoised=clip_denoised, noise=noise, y=y,
                                 device=device, progress=progress)
        out.append(x.clamp(-1, 1).cpu() if decode is None else decode(x).cpu())
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(out), (torch.cat(labels) if labels else None)


def sample_images(model: torch.nn.Module, chain: Diffusion, var_type: str, cfg: SampleConfig,
                  image_shape: tuple[int, int, int], num_classes: int | None, seed: int,
                  device: torch.device, num_samples: int | None = None, progress: bool = False,
                  clip_denoised: bool = True, *, v_bound: str,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples of a network trained on ``chain``, on ``sampling_chain(chain, cfg)``, its v bounded by
    ``v_bound`` (the trainer's, or a checkpoint's ``checkpoint_v_bound``); latents decoded by ``decode``."""
    d = sampling_chain(chain, cfg)
    denoise = network_denoiser(model.eval(), d, image_shape[0], v_bound)
    return run_sampler(d, denoise, var_type, cfg, image_shape, num_classes, seed, device, num_samples, progress,
                       clip_denoised, decode)


def sample_teacher(teacher: Teacher, cfg: SampleConfig, seed: int, num_samples: int | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples of any teacher (a checkpoint loaded as a ``dkdm`` teacher included); a latent teacher's are
    decoded to images by its autoencoder."""
    d, denoise = teacher_denoiser(teacher, cfg)
    return run_sampler(d, denoise, teacher.var_type, cfg, teacher.image_shape, teacher.num_classes, seed,
                       teacher.device, num_samples, progress, teacher.clip_denoised, latent_decoder(teacher))
