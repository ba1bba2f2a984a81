"""Networks: ADM UNet (guided-diffusion compatible), DiT, a small MLP; named sizes; checkpoint I/O.

Networks know ``(x, t, y)`` and nothing of schedules.

The student contract
--------------------
Any ``nn.Module`` whose ``forward(x, t, y=None)`` takes

- ``x``: [N, C, H, W] noisy images,
- ``t``: [N] the network's own (original, 0-based) timesteps,
- ``y``: [N] integer labels, or None for an unconditional network,

and returns either eps [N, C, H, W] or eps and the raw variance values
concatenated on the channel axis [N, 2C, H, W] (guided-diffusion's learn_sigma
layout: the first C channels are eps) can be a student. ``build_network`` makes
the ones this project ships; checkpoints are ``config.json`` plus
``model.safetensors`` (``save_pretrained`` / ``from_pretrained``).
"""

from common.models.adm import UNetModel, create_model, load_guided_diffusion, timestep_embedding
from common.models.checkpoint import CheckpointError, from_pretrained, load_extra, save_pretrained
from common.models.dit import DiT
from common.models.mlp import MLPDenoiser
from common.models.registry import (
    ADM_SIZES, DIT_SIZES, MLP_SIZES, ADMSize, Arch, DiTSize, MLPSize, adm_flags, build_network,
    dit_flags, mlp_flags, network_flags,
)
from common.models.state import StateDictMismatch, describe_mismatch, load_state_dict_strict

__all__ = [
    "UNetModel", "create_model", "load_guided_diffusion", "timestep_embedding", "DiT", "MLPDenoiser",
    "ADM_SIZES", "DIT_SIZES", "MLP_SIZES", "ADMSize", "DiTSize", "MLPSize", "Arch",
    "adm_flags", "dit_flags", "mlp_flags", "network_flags", "build_network",
    "save_pretrained", "from_pretrained", "load_extra", "CheckpointError",
    "StateDictMismatch", "describe_mismatch", "load_state_dict_strict",
]
