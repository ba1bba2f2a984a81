"""A small time-conditioned MLP denoiser for tiny image-shaped spaces (e.g. 1x8x8).

Made for the analytic Gaussian-mixture experiments: fast on the CPU, no
attention, no normalization statistics over space. The image is flattened, run
through residual MLP blocks that add a projection of the timestep (and label)
embedding, and reshaped back. The output layer starts at zero (eps = 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.models.adm import timestep_embedding


class ResidualMLPBlock(nn.Module):
    """h + fc2(SiLU(fc1(LayerNorm(h)) + proj(emb))): h [N, D], emb [N, E] -> [N, D]."""

    def __init__(self, width: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb_proj = nn.Linear(emb_dim, width)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.act(self.fc1(self.norm(h)) + self.emb_proj(emb))
        return h + self.fc2(self.dropout(z))


class MLPDenoiser(nn.Module):
    """``forward(x [N, C, H, W], t [N], y [N] | None) -> [N, C or 2C, H, W]``."""

    def __init__(self, image_size: int = 8, in_channels: int = 1, width: int = 256, depth: int = 3,
                 time_embed_dim: int = 128, learn_sigma: bool = False, num_classes: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.time_embed_dim = time_embed_dim
        dim = in_channels * image_size * image_size

        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([ResidualMLPBlock(width, time_embed_dim, dropout) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, self.out_channels * image_size * image_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        n, c, hh, ww = x.shape
        if (c, hh, ww) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"MLPDenoiser built for [{self.in_channels}, {self.image_size}, "
                             f"{self.image_size}] inputs, got {list(x.shape[1:])}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed_dim))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = self.inp(x.reshape(n, -1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(torch.nn.functional.silu(self.out_norm(h)))
        return out.reshape(n, self.out_channels, hh, ww)
