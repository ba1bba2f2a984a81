"""Records of the enlarged batch set B+ (paper Sec. 3.3), moved in batches.

A record is one slot of B+: the state ``x_t`` at chain index ``t``, and the
teacher's outputs at ``(x_t, t)``: ``eps`` and, for teachers with a learned
variance, ``logvar`` (the teacher's per-element log variance of
p(x_{t-1} | x_t), already resolved from its raw variance output, Eq. 12).
``t`` is a 0-based index into the distillation chain (guided-diffusion's
convention: t = T-1 is pure noise, stepping from t = 0 yields x_0).
``t = -1`` marks an empty slot (no record yet: it needs the warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

EMPTY_T = -1


@dataclass
class RecordBatch:
    """N records: x_t, eps [N, C, H, W]; t [N] int64; logvar [N, C, H, W] or None; y [N] int64 or None."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    logvar: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RecordBatch":
        """Move to a device; float tensors optionally cast to ``dtype``."""

        def move(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:
                return None
            if v.is_floating_point() and dtype is not None:
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)

        return RecordBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def index(self, idx: torch.Tensor | slice) -> "RecordBatch":
        return RecordBatch(
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)}
        )

    @staticmethod
    def cat(batches: list["RecordBatch"]) -> "RecordBatch":
        def cat_field(name: str) -> torch.Tensor | None:
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate record batches: field {name!r} is present in some and absent in others")
            return torch.cat(vals)

        return RecordBatch(**{f.name: cat_field(f.name) for f in fields(RecordBatch)})
