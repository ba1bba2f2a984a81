"""The one teacher contract (k-diffusion's external.py idea: every foreign model behind one call).

A teacher is a network plus its diffusion. ``predict`` answers on the chain the
teacher was built for (the full chain, or a respacing of it): ``t`` are chain
indices, mapped to the network's own timesteps inside the adapter. Outputs are
always converted to eps (from eps, v or x0 predictions), so the rest of the
code sees one contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from common.diffusion import Diffusion
from common.models.state import TeacherLoadError  # noqa: F401 - defined below the networks, which raise it too




class Teacher(ABC):
    diffusion: Diffusion          # the distillation chain (tables in float64, timestep_map to the network's t)
    var_type: str                 # fixed_small | fixed_large | learned | learned_range
    clip_denoised: bool
    image_shape: tuple[int, int, int]
    num_classes: int | None       # None: unconditional
    device: torch.device

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t [N, C, H, W], t [N] chain indices -> (eps [N, C, H, W], var_values [N, C, H, W] or None).

        ``var_values`` is the raw variance output (log variance for ``learned``,
        the Eq. 12 interpolation value v in [-1, 1] for ``learned_range``).
        """

    @abstractmethod
    def identity(self) -> dict:
        """What makes two teachers interchangeable: weights checksum, diffusion settings, chain."""

    @property
    def learned_variance(self) -> bool:
        return self.var_type in ("learned", "learned_range")
