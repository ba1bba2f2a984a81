"""ADM UNet, checkpoint-compatible with openai/guided-diffusion's ``UNetModel``.

Written from the structure of guided-diffusion's ``unet.py``/``nn.py``/
``script_util.create_model``; module and parameter names are kept identical so
that a guided-diffusion ``.pt`` state dict loads strictly (same keys, same
shapes) and the forward pass computes the same function.

The network knows ``(x, timesteps, y)`` and nothing of schedules: ``forward``
returns the raw output, ``[N, C, H, W]`` (eps) or ``[N, 2C, H, W]`` (eps and the
variance values) when ``learn_sigma``.

Not kept from guided-diffusion: its hand-written gradient checkpointing
(``use_checkpoint`` uses ``torch.utils.checkpoint`` instead, and only when
asked; guided-diffusion always checkpoints attention), 1-D/3-D variants, and the
super-resolution / encoder models.
"""

from __future__ import annotations

import inspect
import math
import os
from abc import abstractmethod
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from common.models.state import StateDictMismatch, TeacherLoadError, load_state_dict_strict

NUM_CLASSES = 1000  # guided-diffusion's class_cond: ImageNet labels


# ----------------------------------------------------------------------------
# Building blocks (guided-diffusion's nn.py)
# ----------------------------------------------------------------------------

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The standard normalization: 32 groups, so ``channels`` must be a multiple of 32."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` (residual branches start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [N] -> [N, dim].

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i) with
    f_i = exp(-ln(max_period) * i / half), half = dim // 2 (Transformer
    positional encoding, cosines first as in guided-diffusion); an odd ``dim``
    gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that passes ``emb`` to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv ([N, C, H, W] -> [N, C', 2H, 2W])."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling ([N, C, H, W] -> [N, C', H/2, W/2])."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally up/downsampling.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied as
    ``GroupNorm(h) * (1 + scale) + shift`` (FiLM), else it is added to ``h``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: int | None = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W], emb [N, emb_channels] -> [N, C_out, H', W']."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _torch_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the norm/activation and the conv, as guided-diffusion does.
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention on qkv laid out per head: [N, H * 3 * C, T] -> [N, H * C, T] (split heads, then q/k/v)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attend(q, k, v, ch).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Attention on qkv laid out as [q; k; v]: [N, 3 * H * C, T] -> [N, H * C, T] (split q/k/v, then heads)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = (z.reshape(bs * self.n_heads, ch, length) for z in qkv.chunk(3, dim=1))
        return _attend(q, k, v, ch).reshape(bs, -1, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v; q, k, v [B, ch, T] -> [B, ch, T].

    Both q and k are scaled by ch^(-1/4) before the product (more stable in fp16
    than dividing afterwards) and the softmax runs in float32, as guided-diffusion.
    """
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a residual: [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by "
                                 f"num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order \
            else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _torch_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


# ----------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------

class UNetModel(nn.Module):
    """guided-diffusion's UNet with attention and timestep (and optional class) embedding.

    ``attention_resolutions`` are downsample factors (1 = full resolution);
    ``channel_mult`` gives the width of each level as a multiple of ``model_channels``.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: tuple = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        def res_block(ch_in: int, ch_out: int | None = None, up: bool = False, down: bool = False):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            up=up, down=down)

        def attention(ch: int, heads: int):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint,
                                  use_new_attention_order=use_new_attention_order)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # Encoder: remember each block's width for the skip connections.
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown \
                    else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch), attention(ch, num_heads), res_block(ch))

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16 (time embedding, norms and ``out`` stay float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(_conv_to(torch.float16))
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(_conv_to(torch.float32))
        self.dtype = torch.float32

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [N, C, H, W], timesteps [N] (the network's own timesteps), y [N] labels
        -> raw output [N, out_channels, H, W] (eps, then the variance values if learn_sigma)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)

        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _conv_to(dtype: torch.dtype):
    def convert(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return convert


# ----------------------------------------------------------------------------
# guided-diffusion's create_model and checkpoint loading
# ----------------------------------------------------------------------------

# Default widths per image size when channel_mult is "" (guided-diffusion's table,
# improved-diffusion's 32 px one, and small sizes for the CPU demos).
DEFAULT_CHANNEL_MULT: dict[int, tuple] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2),
    8: (1, 2),
}


def parse_channel_mult(channel_mult, image_size: int) -> tuple:
    """ "" -> the default for ``image_size``; "1,2,2,2" or a sequence -> a tuple of numbers."""
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; "
                             f"pass channel_mult (defaults exist for {sorted(DEFAULT_CHANNEL_MULT)})")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


def parse_attention_resolutions(attention_resolutions, image_size: int) -> tuple[int, ...]:
    """Resolutions "16,8" (or a sequence) -> downsample factors image_size // res; "" -> none."""
    if isinstance(attention_resolutions, str):
        parts = [r for r in attention_resolutions.split(",") if r.strip()]
    else:
        parts = list(attention_resolutions)
    return tuple(image_size // int(r) for r in parts)


def create_model(image_size: int, num_channels: int, num_res_blocks: int, channel_mult="",
                 learn_sigma: bool = False, class_cond: bool = False, use_checkpoint: bool = False,
                 attention_resolutions="16", num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, dropout: float = 0,
                 resblock_updown: bool = False, use_fp16: bool = False,
                 use_new_attention_order: bool = False, in_channels: int = 3,
                 num_classes: int = NUM_CLASSES) -> UNetModel:
    """guided-diffusion's ``script_util.create_model`` (same flags and semantics).

    Additions: ``in_channels`` (guided-diffusion fixes 3) and ``num_classes``
    (the label count when ``class_cond``; guided-diffusion fixes 1000).
    ``learn_sigma`` doubles the output channels.
    """
    return UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * 2 if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


MODEL_FLAGS = tuple(inspect.signature(create_model).parameters)


def check_model_flags(flags: dict) -> None:
    """Raise a one-line ValueError naming unknown flags or missing required ones."""
    unknown = sorted(set(flags) - set(MODEL_FLAGS))
    if unknown:
        raise ValueError(f"unknown ADM model flag(s) {', '.join(unknown)} "
                         f"(create_model accepts: {', '.join(MODEL_FLAGS)})")
    required = [n for n, p in inspect.signature(create_model).parameters.items()
                if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in flags]
    if missing:
        raise ValueError(f"missing ADM model flag(s) {', '.join(missing)}")


def load_guided_diffusion(checkpoint_path: str, flags: dict) -> UNetModel:
    """Build ``create_model(**flags)`` and load a guided-diffusion ``.pt`` state dict strictly.

    Returns the model in eval mode on the CPU. Raises ``TeacherLoadError`` (one
    line) for a missing file, an unreadable file, unknown or missing flags, or a
    state dict whose keys or shapes do not match.
    """
    try:
        check_model_flags(flags)
        model = create_model(**flags)
    except (ValueError, TypeError) as e:
        raise TeacherLoadError(f"guided-diffusion flags: {e}") from None
    if not os.path.isfile(checkpoint_path):
        raise TeacherLoadError(f"guided-diffusion checkpoint not found: {checkpoint_path}")
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(f"cannot read {checkpoint_path} as a torch state dict: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherLoadError(f"{checkpoint_path} does not hold a state dict of tensors")
    try:
        load_state_dict_strict(model, state)
    except StateDictMismatch as e:
        raise TeacherLoadError(f"{checkpoint_path}: {e}") from None
    return model.eval()   # a teacher: dropout off (the 57M teacher was trained with dropout 0.3)
