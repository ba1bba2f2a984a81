"""ADM UNet: guided-diffusion key/shape layout, exact pieces of its math, strict checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.models.adm import (
    AttentionBlock, QKVAttention, QKVAttentionLegacy, ResBlock, create_model, load_guided_diffusion, timestep_embedding,
)
from common.models.registry import adm_flags
from common.teachers.base import TeacherLoadError
from weights import randomize

torch.set_num_threads(1)

# A tiny guided-diffusion-style flag set: two levels, attention at 8 px (downsample factor 2).
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
            class_cond=True, num_classes=10, attention_resolutions="8", num_head_channels=32,
            use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True, in_channels=3)



def _resblock_keys(prefix: str, skip: bool) -> set[str]:
    names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    if skip:
        names.append("skip_connection")
    return {f"{prefix}.{n}.{w}" for n in names for w in ("weight", "bias")}


def _attn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{n}.{w}" for n in ("norm", "qkv", "proj_out") for w in ("weight", "bias")}


def _expected_tiny_keys() -> set[str]:
    """Worked out by hand from guided-diffusion's UNetModel for TINY.

    Encoder: 0 conv 3->32 | 1 RB 32->32 (ds 1) | 2 RB-down 32 | 3 RB 32->64 + attn (ds 2).
    Skips [32, 32, 32, 64]. Middle: RB, attn, RB at 64.
    Decoder at ds 2: 0 RB 128->64 + attn | 1 RB 96->64 + attn + RB-up;
    at ds 1: 2 RB 96->32 | 3 RB 64->32. Out: GroupNorm(32), conv 32->6.
    """
    keys = {"time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
            "label_emb.weight", "input_blocks.0.0.weight", "input_blocks.0.0.bias",
            "out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"}
    keys |= _resblock_keys("input_blocks.1.0", skip=False)
    keys |= _resblock_keys("input_blocks.2.0", skip=False)
    keys |= _resblock_keys("input_blocks.3.0", skip=True) | _attn_keys("input_blocks.3.1")
    keys |= _resblock_keys("middle_block.0", False) | _attn_keys("middle_block.1") | _resblock_keys("middle_block.2", False)
    keys |= _resblock_keys("output_blocks.0.0", True) | _attn_keys("output_blocks.0.1")
    keys |= _resblock_keys("output_blocks.1.0", True) | _attn_keys("output_blocks.1.1")
    keys |= _resblock_keys("output_blocks.1.2", False)
    keys |= _resblock_keys("output_blocks.2.0", True) | _resblock_keys("output_blocks.3.0", True)
    return keys


def test_state_dict_keys_match_guided_diffusion_layout():
    sd = create_model(**TINY).state_dict()
    assert set(sd) == _expected_tiny_keys()
    shapes = {
        "time_embed.0.weight": (128, 32), "time_embed.2.weight": (128, 128), "label_emb.weight": (10, 128),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (32,), "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),     # scale and shift: 2 * 32
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.qkv.weight": (192, 64, 1), "input_blocks.3.1.proj_out.weight": (64, 64, 1),
        "middle_block.1.qkv.weight": (192, 64, 1), "middle_block.2.emb_layers.1.weight": (128, 128),
        "output_blocks.0.0.in_layers.0.weight": (128,), "output_blocks.0.0.in_layers.2.weight": (64, 128, 3, 3),
        "output_blocks.1.0.in_layers.2.weight": (64, 96, 3, 3), "output_blocks.1.2.in_layers.2.weight": (64, 64, 3, 3),
        "output_blocks.2.0.in_layers.2.weight": (32, 96, 3, 3),
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.weight": (32,), "out.2.weight": (6, 32, 3, 3), "out.2.bias": (6,),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_conv_resampling_and_additive_embedding_keys():
    flags = dict(TINY, resblock_updown=False, use_scale_shift_norm=False, class_cond=False, learn_sigma=False)
    sd = create_model(**flags).state_dict()
    assert sd["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)     # strided conv Downsample
    assert sd["output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)  # Upsample conv
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)
    assert "label_emb.weight" not in sd and sd["out.2.weight"].shape == (3, 32, 3, 3)


def test_32px_table_layout_on_meta_device():
    with torch.device("meta"):
        m = create_model(**adm_flags("57M"))
    sd = m.state_dict()
    assert len(m.input_blocks) == 1 + 4 * 3 + 3 and len(m.output_blocks) == 4 * 4
    assert sd["out.2.weight"].shape == (6, 128, 3, 3)
    # blocks: 0 conv | 1-3 at 32 px | 4 down | 5-7 at 16 px | 8 down | 9-11 at 8 px | 12 down | 13-15 at 4 px.
    # Attention at 16 px (ds 2) and 8 px (ds 4), 32 channels per head: 256 channels -> 8 heads.
    assert m.input_blocks[5][1].num_heads == 8 and "input_blocks.11.1.qkv.weight" in sd
    assert not any(k.startswith(("input_blocks.1.1.", "input_blocks.13.1.")) for k in sd)
    assert isinstance(m.middle_block[1].attention, QKVAttention)


TABLE = [("57M", 57.09), ("44M", 44.18), ("32M", 32.14), ("24M", 24.87), ("14M", 14.30),
         ("celeba-295M", 295.14), ("celeba-57M", 57.21)]


@pytest.mark.parametrize("size,millions", TABLE)
def test_parameter_counts_match_reference_table(size, millions):
    with torch.device("meta"):
        m = create_model(**adm_flags(size))
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == millions


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    for dim in (6, 7, 32):
        emb = timestep_embedding(t, dim)
        assert emb.shape == (4, dim)
        half = dim // 2
        for n, tv in enumerate(t.tolist()):
            for i in range(half):
                f = math.exp(-math.log(10000) * i / half)
                assert emb[n, i].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
                assert emb[n, half + i].item() == pytest.approx(math.sin(tv * f), abs=1e-5)
            if dim % 2:
                assert emb[n, -1].item() == 0.0


def _reference_attention(q, k, v):
    """q, k, v [B, C, T] -> softmax over s of q_t . k_s / sqrt(C), applied to v."""
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v)


def test_qkv_attention_orders():
    torch.manual_seed(0)
    n, heads, ch, length = 2, 3, 4, 5
    q, k, v = (torch.randn(n, heads, ch, length) for _ in range(3))
    want = _reference_attention(*(z.reshape(n * heads, ch, length) for z in (q, k, v))).reshape(n, heads * ch, length)
    # new order: [q (all heads); k; v]
    new_layout = torch.cat([q.reshape(n, -1, length), k.reshape(n, -1, length), v.reshape(n, -1, length)], dim=1)
    # legacy order: per head [q_h; k_h; v_h]
    legacy_layout = torch.cat([q, k, v], dim=2).reshape(n, -1, length)
    assert torch.allclose(QKVAttention(heads)(new_layout), want, atol=1e-5)
    assert torch.allclose(QKVAttentionLegacy(heads)(legacy_layout), want, atol=1e-5)
    assert not torch.allclose(QKVAttentionLegacy(heads)(new_layout), want, atol=1e-3)
    # one head: both layouts coincide
    one = torch.randn(n, 3 * ch, length)
    assert torch.allclose(QKVAttention(1)(one), QKVAttentionLegacy(1)(one), atol=1e-6)


def test_forward_shapes_determinism_and_conditioning():
    torch.manual_seed(0)
    a = randomize(create_model(**TINY)).eval()
    b = create_model(**TINY).eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = a(x, t, y)
        assert out.shape == (3, 6, 16, 16)
        assert torch.equal(out, b(x, t, y))
        assert not torch.allclose(out, a(x, t, torch.tensor([4, 5, 6])))
        assert not torch.allclose(out, a(x, t + 1, y))
    with pytest.raises(ValueError, match="class-conditional"):
        a(x, t)


def test_fresh_model_outputs_zero():
    """zero_module on the last conv: an untrained ADM predicts exactly zero."""
    m = create_model(**TINY).eval()
    out = m(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0


def test_fp16_torso_converts_convs_only():
    flags = dict(TINY, use_fp16=True)
    m = create_model(**flags)
    assert m.input_blocks[0][0].weight.dtype == torch.float16
    assert m.time_embed[0].weight.dtype == torch.float32 and m.out[2].weight.dtype == torch.float32
    out = m(torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.tensor([1]))
    assert out.dtype == torch.float32


def test_load_guided_diffusion_round_trip(tmp_path):
    src = randomize(create_model(**TINY)).eval()
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    loaded = load_guided_diffusion(str(path), TINY)
    assert not loaded.training
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(src(x, t, y), loaded(x, t, y))


def test_load_guided_diffusion_strict_errors(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(create_model(**TINY).state_dict(), path)

    with pytest.raises(TeacherLoadError) as e:
        load_guided_diffusion(str(path), dict(TINY, learn_sigma=False))
    msg = str(e.value)
    assert "\n" not in msg and "mis-shaped 2" in msg
    assert "out.2.weight: checkpoint [6,32,3,3] vs model [3,32,3,3]" in msg

    with pytest.raises(TeacherLoadError) as e:
        load_guided_diffusion(str(path), dict(TINY, class_cond=False))
    assert "missing 0 keys" in str(e.value) and "unexpected 1 (label_emb.weight)" in str(e.value)

    with pytest.raises(TeacherLoadError) as e:     # attention also at 16 px: 3 blocks x 6 keys, five named
        load_guided_diffusion(str(path), dict(TINY, attention_resolutions="16,8"))
    assert "missing 18 keys" in str(e.value) and ", ...)" in str(e.value)

    with pytest.raises(TeacherLoadError, match="unknown ADM model flag.*diffusion_steps"):
        load_guided_diffusion(str(path), dict(TINY, diffusion_steps=1000))
    with pytest.raises(TeacherLoadError, match="missing ADM model flag.*num_channels"):
        load_guided_diffusion(str(path), {k: v for k, v in TINY.items() if k != "num_channels"})
    with pytest.raises(TeacherLoadError, match="not found.*nowhere.pt"):
        load_guided_diffusion(str(tmp_path / "nowhere.pt"), TINY)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherLoadError, match="cannot read"):
        load_guided_diffusion(str(bad), TINY)


def _gn(x, norm):
    return F.group_norm(x.float(), 32, norm.weight, norm.bias, eps=1e-5)


@pytest.mark.parametrize("mode", ["plain", "down", "up", "additive"])
def test_resblock_computes_guided_diffusion_formula(mode):
    """h = conv_in(SiLU(GN(x))) (resampled after the SiLU for up/down);
    FiLM: h = GN(h) * (1 + scale) + shift, or additive: GN(h + e); out = skip(x) + conv_out(SiLU(.))."""
    torch.manual_seed(0)
    rb = ResBlock(32, 16, 0.0, out_channels=64 if mode == "plain" else 32,
                  use_scale_shift_norm=mode != "additive", up=mode == "up", down=mode == "down")
    randomize(rb).eval()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    resample = {"down": lambda z: F.avg_pool2d(z, 2), "up": lambda z: F.interpolate(z, scale_factor=2)}
    rs = resample.get(mode, lambda z: z)
    il, el, ol = rb.in_layers, rb.emb_layers, rb.out_layers
    h = F.conv2d(rs(F.silu(_gn(x, il[0]))), il[2].weight, il[2].bias, padding=1)
    e = F.linear(F.silu(emb), el[1].weight, el[1].bias)[..., None, None]
    if mode == "additive":
        h = _gn(h + e, ol[0])
    else:
        scale, shift = e.chunk(2, dim=1)
        h = _gn(h, ol[0]) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), ol[3].weight, ol[3].bias, padding=1)
    skip = F.conv2d(x, rb.skip_connection.weight, rb.skip_connection.bias) if mode == "plain" else rs(x)
    with torch.no_grad():
        assert torch.allclose(rb(x, emb), skip + h, atol=1e-5)


def test_attention_block_formula():
    """out = x + proj_out(attention(qkv(GN(x)))) over the H*W positions, heads of num_head_channels."""
    torch.manual_seed(0)
    blk = randomize(AttentionBlock(64, num_head_channels=32, use_new_attention_order=True)).eval()
    x = torch.randn(2, 64, 4, 4)
    flat = x.reshape(2, 64, 16)
    qkv = F.conv1d(_gn(flat, blk.norm), blk.qkv.weight, blk.qkv.bias)
    q, k, v = (z.reshape(4, 32, 16) for z in qkv.chunk(3, dim=1))
    a = _reference_attention(q, k, v).reshape(2, 64, 16)
    want = flat + F.conv1d(a, blk.proj_out.weight, blk.proj_out.bias)
    with torch.no_grad():
        assert torch.allclose(blk(x), want.reshape(2, 64, 4, 4), atol=1e-5)
