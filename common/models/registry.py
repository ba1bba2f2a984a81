"""Named network sizes (DiT's ``DiT_models`` idea) and ``build_network``.

ADM sizes are the reference's table (flags in guided-diffusion's names; the
parameter counts in the comments are for these flags and are tested), plus
tiny sizes for the CPU demos. Every size's flags are complete: ``adm_flags``,
``dit_flags`` and ``mlp_flags`` return a fresh dict, overridable per key.
"""

from __future__ import annotations

import inspect
from typing import Literal, get_args

import torch.nn as nn

from common.models.adm import check_model_flags, create_model
from common.models.dit import DiT
from common.models.mlp import MLPDenoiser

Arch = Literal["adm", "dit", "mlp"]

# The reference's pixel-space training flags (learned range variance, FiLM norm,
# residual up/downsampling, qkv-first attention).
_ADM_COMMON = dict(learn_sigma=True, class_cond=False, use_scale_shift_norm=True, resblock_updown=True,
                   use_new_attention_order=True, use_fp16=False, use_checkpoint=False,
                   num_heads=1, num_heads_upsample=-1, in_channels=3)


def _adm(image_size, num_channels, num_res_blocks, attention_resolutions, channel_mult,
         num_head_channels, dropout, **extra) -> dict:
    return dict(_ADM_COMMON, image_size=image_size, num_channels=num_channels,
                num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
                channel_mult=channel_mult, num_head_channels=num_head_channels, dropout=dropout, **extra)


ADMSize = Literal["57M", "44M", "32M", "24M", "14M", "celeba-295M", "celeba-57M", "tiny-8", "tiny-16"]

ADM_SIZES: dict[str, dict] = {
    # 32 px (CIFAR-10 / ImageNet 32): the 57M teacher and the students.
    "57M": _adm(32, 128, 3, "16,8", "1,2,2,2", 32, 0.3),           # 57.09M
    "44M": _adm(32, 128, 2, "16,8", "1,2,2,2", 32, 0.3),           # 44.18M
    "32M": _adm(32, 96, 3, "16,8", "1,2,2,2", 32, 0.3),            # 32.14M
    "24M": _adm(32, 96, 2, "16,8", "1,2,2,2", 32, 0.3),            # 24.87M
    "14M": _adm(32, 64, 3, "16,8", "1,2,2,2", 32, 0.3),            # 14.30M
    # 64 px (CelebA): the 295M teacher and the 57M student.
    "celeba-295M": _adm(64, 192, 3, "32,16,8", "1,2,3,4", 64, 0.1),  # 295.14M
    "celeba-57M": _adm(64, 96, 2, "32,16,8", "1,2,3,4", 32, 0.1),    # 57.21M
    # CPU demos. GroupNorm's 32 groups set the floor at 32 channels.
    "tiny-8": dict(_adm(8, 32, 1, "4", "1,1", 32, 0.0), in_channels=1),   # 0.35M, 1x8x8
    "tiny-16": _adm(16, 32, 1, "8", "1,2", 32, 0.0),                # 0.83M, 3x16x16
}

DiTSize = Literal["DiT-S/2", "DiT-S/4", "DiT-B/2", "DiT-B/4", "DiT-tiny/2"]

_DIT_COMMON = dict(input_size=32, in_channels=3, mlp_ratio=4.0, class_dropout_prob=0.0,
                   num_classes=None, learn_sigma=True)

DIT_SIZES: dict[str, dict] = {
    "DiT-S/2": dict(_DIT_COMMON, depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-S/4": dict(_DIT_COMMON, depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "DiT-B/2": dict(_DIT_COMMON, depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": dict(_DIT_COMMON, depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-tiny/2": dict(_DIT_COMMON, depth=2, hidden_size=64, num_heads=2, patch_size=2,
                       input_size=8, in_channels=1),
}

MLPSize = Literal["mlp-8", "mlp-8-wide"]

MLP_SIZES: dict[str, dict] = {
    "mlp-8": dict(image_size=8, in_channels=1, width=256, depth=3, time_embed_dim=128,
                  learn_sigma=False, num_classes=None, dropout=0.0),
    "mlp-8-wide": dict(image_size=8, in_channels=1, width=512, depth=4, time_embed_dim=128,
                       learn_sigma=False, num_classes=None, dropout=0.0),
}

_SIZES: dict[str, dict[str, dict]] = {"adm": ADM_SIZES, "dit": DIT_SIZES, "mlp": MLP_SIZES}
_BUILDERS = {"adm": create_model, "dit": DiT, "mlp": MLPDenoiser}

assert set(get_args(ADMSize)) == set(ADM_SIZES)
assert set(get_args(DiTSize)) == set(DIT_SIZES)
assert set(get_args(MLPSize)) == set(MLP_SIZES)


def _accepted(arch: str) -> list[str]:
    return [n for n in inspect.signature(_BUILDERS[arch]).parameters if n != "self"]


def _check_flags(arch: str, flags: dict) -> None:
    if arch == "adm":
        check_model_flags(flags)
        return
    unknown = sorted(set(flags) - set(_accepted(arch)))
    if unknown:
        raise ValueError(f"unknown {arch} flag(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(_accepted(arch))})")


def network_flags(arch: str, size: str | None, **overrides) -> dict:
    """The complete flags of a named size with ``overrides`` applied (unknown keys raise)."""
    if arch not in _SIZES:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(_SIZES)})")
    if size is None:
        flags = dict(overrides)
    else:
        if size not in _SIZES[arch]:
            raise ValueError(f"unknown {arch} size {size!r} (choose from {', '.join(_SIZES[arch])})")
        flags = dict(_SIZES[arch][size], **overrides)
    _check_flags(arch, flags)
    return flags


def adm_flags(size: ADMSize, **overrides) -> dict:
    """guided-diffusion ``create_model`` flags of a named ADM size, e.g. ``adm_flags("14M", dropout=0.1)``."""
    return network_flags("adm", size, **overrides)


def dit_flags(size: DiTSize, **overrides) -> dict:
    return network_flags("dit", size, **overrides)


def mlp_flags(size: MLPSize, **overrides) -> dict:
    return network_flags("mlp", size, **overrides)


def build_network(arch: Arch, size: str | None, flags: dict) -> nn.Module:
    """A network from a named size (or None: ``flags`` alone) with ``flags`` overriding the size's.

    Raises a one-line ValueError for an unknown arch, size or flag.
    """
    resolved = network_flags(arch, size, **(flags or {}))
    return _BUILDERS[arch](**resolved)
