"""Checkpoints: config.json + safetensors round trips, EMA, extra, strict errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.models import CheckpointError, build_network, from_pretrained, load_extra, save_pretrained
from common.models.checkpoint import load_ema_state
from weights import randomize

torch.set_num_threads(1)



CASES = [
    ("adm", "tiny-8", {"class_cond": True, "num_classes": 4}),
    ("dit", "DiT-tiny/2", {"num_classes": 4}),
    ("mlp", "mlp-8", {"learn_sigma": True, "num_classes": 4, "width": 64}),
]


@pytest.mark.parametrize("arch,size,flags", CASES)
def test_round_trip_gives_identical_outputs(tmp_path, arch, size, flags):
    torch.manual_seed(0)
    model = randomize(build_network(arch, size, flags)).eval()
    config = {"arch": arch, "size": size, "flags": flags,
              "diffusion": {"schedule": "cosine", "num_timesteps": 1000, "var_type": "learned_range"}}
    save_pretrained(tmp_path / "ck", model, config)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]

    loaded, cfg = from_pretrained(tmp_path / "ck")
    assert cfg["diffusion"] == config["diffusion"] and cfg["arch"] == arch and cfg["loaded_weights"] == "model"
    assert not loaded.training
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_ema_and_extra(tmp_path):
    model = randomize(build_network("mlp", "mlp-8", {"width": 32}), seed=1)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    extra = {"step": 12, "pool_t": torch.arange(5)}
    save_pretrained(tmp_path, model, {"arch": "mlp", "size": "mlp-8", "flags": {"width": 32}},
                    ema_state=ema, extra=extra)

    m_ema, cfg = from_pretrained(tmp_path, use_ema=True)
    assert cfg["loaded_weights"] == "ema"
    for k, v in m_ema.state_dict().items():
        assert torch.equal(v, ema[k])
    m_raw, _ = from_pretrained(tmp_path, use_ema=False)
    assert torch.equal(m_raw.inp.weight, model.inp.weight)
    assert torch.equal(load_ema_state(tmp_path)["inp.weight"], ema["inp.weight"])

    got = load_extra(tmp_path)
    assert got["step"] == 12 and torch.equal(got["pool_t"], torch.arange(5))
    assert json.loads((tmp_path / "config.json").read_text())["extra"] == {"step": 12}

    # a later save without EMA removes the stale file, so use_ema falls back to the raw weights
    save_pretrained(tmp_path, model, {"arch": "mlp", "size": "mlp-8", "flags": {"width": 32}})
    assert not (tmp_path / "ema.safetensors").exists() and load_ema_state(tmp_path) is None
    _, cfg = from_pretrained(tmp_path, use_ema=True)
    assert cfg["loaded_weights"] == "model"


def test_weights_are_safetensors_not_pickle(tmp_path):
    model = build_network("adm", "tiny-8", {})
    save_pretrained(tmp_path, model, {"arch": "adm", "size": "tiny-8", "flags": {}})
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert set(sd) == set(model.state_dict())
    assert sd["out.2.weight"].shape == (2, 32, 3, 3)


def test_strict_errors(tmp_path):
    model = build_network("adm", "tiny-8", {})
    cfg = {"arch": "adm", "size": "tiny-8", "flags": {}}
    save_pretrained(tmp_path, model, cfg)

    # config changed after saving: a class-conditional, fixed-variance network no longer fits
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, flags={"class_cond": True, "num_classes": 3,
                                                                       "learn_sigma": False})))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "missing 1 keys (label_emb.weight)" in msg
    assert "out.2.weight: checkpoint [2,32,3,3] vs model [1,32,3,3]" in msg

    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, flags={"num_chanels": 3})))
    with pytest.raises(CheckpointError, match="cannot build the network.*num_chanels"):
        from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected 1 \(extra.weight\)"):
        from_pretrained(tmp_path)

    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        from_pretrained(tmp_path)


def test_save_rejects_bad_inputs(tmp_path):
    model = build_network("mlp", "mlp-8", {"width": 32})
    with pytest.raises(ValueError, match="needs 'arch'"):
        save_pretrained(tmp_path, model, {"flags": {}})
    with pytest.raises(ValueError, match="ema_state does not match"):
        save_pretrained(tmp_path, model, {"arch": "mlp", "size": "mlp-8", "flags": {"width": 32}},
                        ema_state={"inp.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="JSON"):
        save_pretrained(tmp_path, model, {"arch": "mlp", "size": "mlp-8", "flags": {"width": 32},
                                          "bad": object()})
