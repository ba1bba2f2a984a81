"""The project's networks as diffusers models: ADM -> ``UNet2DModel`` (weights renamed, not retrained).

The renaming is the guided-diffusion -> diffusers mapping of diffusers' own conversion scripts
(``scripts/convert_consistency_to_diffusers.py``: scale-shift ResBlocks, residual up/downsampling,
``attn_norm_num_groups=32``), written here for any ADM layout the registry builds:

    time_embed.{0,2}                      -> time_embedding.linear_{1,2}
    input_blocks.0.0                      -> conv_in
    input_blocks.k.0 (ResBlock)           -> down_blocks.L.resnets.j
    input_blocks.k.1 (AttentionBlock)     -> down_blocks.L.attentions.j
    input_blocks.k.0 (the level's down op)-> down_blocks.L.downsamplers.0
    middle_block.{0,1,2}                  -> mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.k.{0,1,..}              -> up_blocks.U.{resnets.i, attentions.i, upsamplers.0}
    out.{0,2}                             -> conv_norm_out, conv_out
    ResBlock in_layers.{0,2} emb_layers.1 out_layers.{0,3} skip_connection
                                          -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
    AttentionBlock norm, qkv, proj_out    -> group_norm, to_q/to_k/to_v, to_out.0

Layouts UNet2DModel cannot express are refused (``ExportError``, one line naming the reason):
class-conditional networks (DDPMPipeline samples unconditionally), ``channel_mult[0] != 1``
(diffusers sizes the timestep features by the first block's width), several heads of
per-level width (``num_head_channels=-1`` with ``num_heads > 1``), DiT (diffusers' DiT embeds
timesteps with other frequencies) and the MLP denoiser (no diffusers counterpart).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.models.adm import AttentionBlock, Downsample, ResBlock, UNetModel
from common.models.dit import DiT


class ExportError(ValueError):
    """A network whose layout no diffusers model reproduces (one line naming the reason)."""


def unet2d_config(model: UNetModel) -> dict:
    """``UNet2DModel`` config of an ADM UNet, or ``ExportError`` when the layout does not map."""
    refuse_layout(model)
    mc = model.model_channels
    widths = [int(m * mc) for m in model.channel_mult]
    levels = len(widths)
    attn = [2 ** level in model.attention_resolutions for level in range(levels)]
    updown = _resblock_updown(model)
    down_plain, up_plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown \
        else ("DownBlock2D", "UpBlock2D")
    return dict(
        sample_size=model.image_size, in_channels=model.in_channels, out_channels=model.out_channels,
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=["AttnDownBlock2D" if a else down_plain for a in attn],
        up_block_types=["AttnUpBlock2D" if a else up_plain for a in reversed(attn)],
        block_out_channels=widths, layers_per_block=model.num_res_blocks,
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        downsample_padding=1, mid_block_scale_factor=1, dropout=float(model.dropout), act_fn="silu",
        attention_head_dim=None if model.num_head_channels == -1 else model.num_head_channels,
        norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if _scale_shift(model) else "default",
        add_attention=True, class_embed_type=None, num_class_embeds=None,
    )


def refuse_layout(model: nn.Module) -> None:
    """Raise ``ExportError`` naming why ``model`` has no exact ``UNet2DModel`` counterpart."""
    if isinstance(model, DiT):
        raise ExportError("DiT students do not map to diffusers: DiTTransformer2DModel embeds timesteps with "
                          "frequencies exp(-ln(1e4) i / (half - 1)) (downscale_freq_shift=1), DiT and this project "
                          "with exp(-ln(1e4) i / half), so no renaming of weights reproduces the network")
    if not isinstance(model, UNetModel):
        raise ExportError(f"a {type(model).__name__} student has no diffusers counterpart "
                          "(only ADM UNets export, to UNet2DModel)")
    if model.num_classes is not None:
        raise ExportError("class-conditional students do not export: DDPMPipeline samples unconditionally")
    if model.channel_mult[0] != 1:
        raise ExportError(f"channel_mult starts at {model.channel_mult[0]}, not 1: UNet2DModel sizes its "
                          "timestep features by the first block's width, ADM by model_channels")
    if model.num_head_channels == -1 and (model.num_heads != 1 or model.num_heads_upsample != 1):
        raise ExportError("num_head_channels=-1 with several heads gives each level its own head width; "
                          "UNet2DModel has one attention_head_dim (set num_head_channels instead)")
    if not model.conv_resample and not _resblock_updown(model):
        raise ExportError("conv_resample=False (pooling without a conv) has no UNet2DModel block")


def _resblock_updown(model: UNetModel) -> bool:
    return any(isinstance(m, ResBlock) and m.updown for m in model.modules())


def _scale_shift(model: UNetModel) -> bool:
    return next(m for m in model.modules() if isinstance(m, ResBlock)).use_scale_shift_norm


def unet2d_state_dict(model: UNetModel) -> dict[str, torch.Tensor]:
    """The ADM state dict renamed (and qkv split) to ``UNet2DModel``'s keys."""
    src = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def copy(old: str, new: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{old}.{suffix}" in src:
                out[f"{new}.{suffix}"] = src[f"{old}.{suffix}"]

    copy("time_embed.0", "time_embedding.linear_1")
    copy("time_embed.2", "time_embedding.linear_2")
    copy("input_blocks.0.0", "conv_in")
    k = 1
    levels = len(model.channel_mult)
    for level in range(levels):
        for j in range(model.num_res_blocks):
            _map_sequential(model.input_blocks[k], f"input_blocks.{k}", f"down_blocks.{level}", j, copy, src, out)
            k += 1
        if level != levels - 1:
            _map_resample(model.input_blocks[k][0], f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0",
                          copy)
            k += 1
    _map_resblock("middle_block.0", "mid_block.resnets.0", copy)
    _map_attention(model.middle_block[1], "middle_block.1", "mid_block.attentions.0", copy, src, out)
    _map_resblock("middle_block.2", "mid_block.resnets.1", copy)
    k = 0
    for up in range(levels):
        for i in range(model.num_res_blocks + 1):
            _map_sequential(model.output_blocks[k], f"output_blocks.{k}", f"up_blocks.{up}", i, copy, src, out)
            k += 1
    copy("out.0", "conv_norm_out")
    copy("out.2", "conv_out")
    return out


def _map_sequential(seq: nn.Module, old: str, new: str, index: int, copy, src, out) -> None:
    """One ADM block (ResBlock [+ attention] [+ upsample]) -> a diffusers block's index-th members."""
    for pos, layer in enumerate(seq):
        if isinstance(layer, ResBlock) and pos == 0:
            _map_resblock(f"{old}.0", f"{new}.resnets.{index}", copy)
        elif isinstance(layer, AttentionBlock):
            _map_attention(layer, f"{old}.{pos}", f"{new}.attentions.{index}", copy, src, out)
        else:   # the level's upsampler, last in its block
            _map_resample(layer, f"{old}.{pos}", f"{new}.upsamplers.0", copy)


def _map_resample(layer: nn.Module, old: str, new: str, copy) -> None:
    if isinstance(layer, ResBlock):
        _map_resblock(old, new, copy)
    elif isinstance(layer, Downsample):
        copy(f"{old}.op", f"{new}.conv")
    else:
        copy(f"{old}.conv", f"{new}.conv")


def _map_resblock(old: str, new: str, copy) -> None:
    for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                 ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
        copy(f"{old}.{a}", f"{new}.{b}")


def _map_attention(block: AttentionBlock, old: str, new: str, copy, src, out) -> None:
    """qkv Conv1d [3C, C, 1] -> to_q/to_k/to_v Linear [C, C]; legacy order interleaves q, k, v per head."""
    copy(f"{old}.norm", f"{new}.group_norm")
    c, heads = block.channels, block.num_heads
    for suffix in ("weight", "bias"):
        qkv = src[f"{old}.qkv.{suffix}"].reshape(3 * c, -1)
        if type(block.attention).__name__ == "QKVAttentionLegacy":
            # [heads, 3, ch, ...] -> [3, heads, ch, ...]: q, k, v each in diffusers' head-major order.
            qkv = qkv.reshape(heads, 3, c // heads, -1).transpose(0, 1).reshape(3 * c, -1)
        for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
            out[f"{new}.{name}.{suffix}"] = part.squeeze(-1).contiguous() if suffix == "bias" \
                else part.contiguous()
        proj = src[f"{old}.proj_out.{suffix}"]
        out[f"{new}.to_out.0.{suffix}"] = proj.reshape(c, -1).squeeze(-1) if suffix == "bias" \
            else proj.reshape(c, c)


def to_unet2d(model: UNetModel):
    """An ADM UNet as a ``diffusers.UNet2DModel`` computing the same function (eval mode, float32)."""
    from diffusers import UNet2DModel   # heavy: only when exporting

    unet = UNet2DModel(**unet2d_config(model))
    state = unet2d_state_dict(model)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"the ADM -> UNet2DModel renaming left {len(missing)} diffusers keys unset "
                          f"({', '.join(missing[:3])}) and {len(unexpected)} ADM keys unused "
                          f"({', '.join(unexpected[:3])})")
    return unet.eval()
