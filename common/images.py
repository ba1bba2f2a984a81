"""Image I/O: float images in [-1, 1] ``[N, C, H, W]`` <-> uint8 NHWC, PNG grids, ``.npz`` sample files.

The ``.npz`` layout follows the ADM evaluation suite (guided-diffusion's
``image_sample.py``): ``arr_0`` holds uint8 images ``[N, H, W, C]`` and
``arr_1`` the class labels when there are any.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

# Tiny images (8x8 digits) are upscaled with nearest neighbour to at least this many pixels per side.
GRID_MIN_CELL_PX = 32


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float images ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (round((x + 1) * 127.5), clipped)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects images [N, C, H, W], got shape {tuple(x.shape)}")
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1] (inverse of :func:`to_uint8`)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"from_uint8 expects images [N, H, W, C], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    return (x / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> one uint8 ``[rows * (H + p) + p, nrow * (W + p) + p, C]`` mosaic.

    ``nrow`` images per row (default: ceil(sqrt(N)), a near-square grid); padding is black.
    """
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_grid(x: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None,
              min_cell_px: int = GRID_MIN_CELL_PX) -> Path:
    """Write float images ``[N, C, H, W]`` in [-1, 1] as one PNG grid; returns the path.

    Images smaller than ``min_cell_px`` are upscaled by an integer factor with
    nearest neighbour (8x8 digits -> 32x32 cells) so they stay visible.
    Grayscale (C = 1) gives an ``L`` PNG, RGB (C = 3) an ``RGB`` one.
    """
    from PIL import Image

    images = to_uint8(x)
    if images.shape[0] == 0:
        raise ValueError("save_grid got no images")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid expects 1 or 3 channels, got {images.shape[-1]}")
    scale = max(1, math.ceil(min_cell_px / max(images.shape[1], images.shape[2])))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(images, nrow=nrow, padding=max(1, scale))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode).save(path)
    return path


def save_npz(samples: torch.Tensor | np.ndarray, path: str | os.PathLike,
             labels: torch.Tensor | np.ndarray | None = None) -> Path:
    """Write samples as ADM-style ``.npz``: ``arr_0`` uint8 ``[N, H, W, C]`` (+ ``arr_1`` int64 labels ``[N]``).

    ``samples`` are float ``[N, C, H, W]`` in [-1, 1] or already uint8 ``[N, H, W, C]``.
    The file is written to a temporary name and renamed, so it is never half-written.
    """
    arr = np.asarray(samples) if isinstance(samples, np.ndarray) else None
    images = arr if arr is not None and arr.dtype == np.uint8 else to_uint8(samples)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"save_npz: labels shape {labels.shape} does not match {images.shape[0]} samples")
        arrays["arr_1"] = labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path
