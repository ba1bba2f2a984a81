"""DiT and the MLP denoiser: shapes, DiT's key names, positions, conditioning; the size registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import DiT, MLPDenoiser, adm_flags, build_network, dit_flags, mlp_flags
from common.models.dit import get_2d_sincos_pos_embed
from common.models.registry import ADM_SIZES, DIT_SIZES, MLP_SIZES
from weights import randomize

torch.set_num_threads(1)



@pytest.mark.parametrize("patch,learn_sigma", [(2, True), (2, False), (4, True)])
def test_dit_output_shape_1x8x8(patch, learn_sigma):
    m = DiT(input_size=8, patch_size=patch, in_channels=1, hidden_size=32, depth=2, num_heads=2,
            learn_sigma=learn_sigma)
    out = randomize(m)(torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 2 if learn_sigma else 1, 8, 8)
    assert m.x_embedder.num_patches == (8 // patch) ** 2


def test_dit_state_dict_keys_follow_dit():
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, class_dropout_prob=0.1)
    sd = m.state_dict()
    D = 32
    shapes = {
        "x_embedder.proj.weight": (D, 3, 2, 2), "pos_embed": (1, 16, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.2.weight": (D, D),
        "y_embedder.embedding_table.weight": (11, D),          # + the null class for CFG dropout
        "blocks.1.attn.qkv.weight": (3 * D, D), "blocks.1.attn.proj.weight": (D, D),
        "blocks.1.mlp.fc1.weight": (4 * D, D), "blocks.1.mlp.fc2.weight": (D, 4 * D),
        "blocks.1.adaLN_modulation.1.weight": (6 * D, D),
        "final_layer.linear.weight": (2 * 2 * 6, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.2.attn.qkv.weight" not in sd
    assert not m.pos_embed.requires_grad


def test_dit_parameter_count_formula():
    D, depth, p, c = 64, 2, 2, 1
    m = DiT(input_size=8, patch_size=p, in_channels=c, hidden_size=D, depth=depth, num_heads=2)
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    expected = (c * p * p * D + D) + 16 * D + (256 * D + D + D * D + D) + depth * block \
        + (2 * D * D + 2 * D) + (D * p * p * 2 * c + p * p * 2 * c)
    assert sum(q.numel() for q in m.parameters()) == expected


def test_sincos_positions():
    emb = get_2d_sincos_pos_embed(8, 3)          # [9, 8]: 4 channels for one axis, 4 for the other
    assert emb.shape == (9, 8)
    # token 5 is (row 1, col 2); the first half encodes the column (meshgrid puts w first)
    w = 1.0 / 10000 ** (np.arange(2) / 2.0)
    np.testing.assert_allclose(emb[5, :4], np.concatenate([np.sin(2 * w), np.cos(2 * w)]), atol=1e-6)
    np.testing.assert_allclose(emb[5, 4:], np.concatenate([np.sin(1 * w), np.cos(1 * w)]), atol=1e-6)


def test_dit_unpatchify_keeps_patches_in_place():
    """With the final linear reading each token's own pixels back, the output is the input."""
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, learn_sigma=False)
    x = torch.randn(2, 1, 8, 8)
    tokens = x.reshape(2, 1, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 4)   # [N, T, p*p*C]
    assert torch.equal(m.unpatchify(tokens), x)


def test_dit_class_conditioning():
    m = randomize(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                      num_classes=5)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        assert not torch.allclose(m(x, t, torch.tensor([0, 1])), m(x, t, torch.tensor([2, 3])))
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, t)
    with pytest.raises(ValueError, match="built for 8x8"):
        m(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_mlp_denoiser():
    m = MLPDenoiser(image_size=8, in_channels=1, width=64, depth=2, learn_sigma=True, num_classes=3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 999]), torch.tensor([0, 1, 2, 0])
    assert torch.count_nonzero(m(x, t, y)) == 0          # zero output layer: eps starts at 0
    randomize(m)
    out = m(x, t, y)
    assert out.shape == (4, 2, 8, 8)
    assert not torch.allclose(out, m(x, t + 100, y))
    out.square().mean().backward()                        # trains end to end
    assert m.inp.weight.grad is not None and m.inp.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for"):
        m(torch.randn(1, 3, 8, 8), torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("arch,size", [("adm", s) for s in ("tiny-8", "tiny-16")]
                         + [("dit", "DiT-tiny/2"), ("mlp", "mlp-8")])
def test_build_named_small_sizes(arch, size):
    torch.manual_seed(0)
    m = randomize(build_network(arch, size, {}))
    flags = {"adm": ADM_SIZES, "dit": DIT_SIZES, "mlp": MLP_SIZES}[arch][size]
    c = flags["in_channels"]
    s = flags.get("image_size", flags.get("input_size"))
    out = m(torch.randn(2, c, s, s), torch.tensor([1, 2]))
    assert out.shape[0] == 2 and out.shape[2:] == (s, s)
    assert out.shape[1] == (2 * c if flags["learn_sigma"] else c)


def test_tiny_8_size_is_small():
    m = build_network("adm", "tiny-8", {})
    assert sum(p.numel() for p in m.parameters()) < 400_000
    assert m.in_channels == 1 and m.out_channels == 2


def test_dit_named_sizes_on_meta():
    with torch.device("meta"):
        s2 = build_network("dit", "DiT-S/2", {})
        b4 = build_network("dit", "DiT-B/4", {"input_size": 64})
    assert len(s2.blocks) == 12 and s2.blocks[0].attn.qkv.weight.shape == (3 * 384, 384)
    assert s2.num_heads == 6 and s2.x_embedder.num_patches == 256
    assert b4.num_heads == 12 and b4.x_embedder.num_patches == 256 and b4.patch_size == 4


def test_flags_overrides_and_errors():
    f = adm_flags("14M", dropout=0.0, class_cond=True, num_classes=10)
    assert f["num_channels"] == 64 and f["dropout"] == 0.0 and f["num_classes"] == 10
    assert adm_flags("14M")["dropout"] == 0.3               # registry entries are not mutated
    assert dit_flags("DiT-S/4")["patch_size"] == 4 and mlp_flags("mlp-8")["image_size"] == 8
    with pytest.raises(ValueError, match="unknown ADM model flag.*num_chanels"):
        adm_flags("14M", num_chanels=3)
    with pytest.raises(ValueError, match="unknown adm size '13M'"):
        build_network("adm", "13M", {})
    with pytest.raises(ValueError, match="unknown dit flag.*depht"):
        build_network("dit", "DiT-tiny/2", {"depht": 3})
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        build_network("rnn", None, {})
    with pytest.raises(ValueError, match="missing ADM model flag"):
        build_network("adm", None, {"image_size": 8})
    m = build_network("mlp", None, {"image_size": 4, "in_channels": 2, "width": 32})
    assert m(torch.randn(1, 2, 4, 4), torch.tensor([0])).shape == (1, 2, 4, 4)
