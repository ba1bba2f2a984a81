"""Sampling a trained student (or any network) on a respacing of its chain: ancestral or DDIM."""

from __future__ import annotations

import torch

from common.config import SampleConfig
from common.diffusion import Diffusion, ancestral_sample, ddim_sample, respace
from student_trainer.losses import split_output


def network_denoiser(model: torch.nn.Module, d: Diffusion, channels: int):
    """A network called with original timesteps -> the samplers' denoise(x_t, t[, y]) on chain indices."""

    @torch.no_grad()
    def denoise(x_t, t, y=None):
        ts = d.map_timesteps(t)
        out = model(x_t, ts, y) if y is not None else model(x_t, ts)
        return split_output(out.float(), channels)

    return denoise


def sample_images(model: torch.nn.Module, chain: Diffusion, var_type: str, cfg: SampleConfig,
                  image_shape: tuple[int, int, int], num_classes: int | None, seed: int,
                  device: torch.device, num_samples: int | None = None, progress: bool = False,
                  clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_samples`` images [N, C, H, W] in [-1, 1] (and labels when class-conditional), batched."""
    n = num_samples or cfg.num_samples
    d = respace(chain, cfg.steps)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    denoise = network_denoiser(model.eval(), d, image_shape[0])
    out, labels = [], []
    for start in range(0, n, cfg.batch_size):
        m = min(cfg.batch_size, n - start)
        y = None if num_classes is None else torch.randint(0, num_classes, (m,), generator=gen).to(device)
        noise = lambda k, shape: torch.randn(shape, generator=gen).to(device)  # noqa: E731
        shape = (m, *image_shape)
        if cfg.sampler == "ddim":
            x = ddim_sample(d, denoise, shape, eta=cfg.eta, clip_denoised=clip_denoised, noise=noise, y=y, device=device,
                            progress=progress)
        else:
            x = ancestral_sample(d, denoise, shape, var_type, clip_denoised=clip_denoised, noise=noise, y=y,
                                 device=device, progress=progress)
        out.append(x.clamp(-1, 1).cpu())
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(out), (torch.cat(labels) if labels else None)
