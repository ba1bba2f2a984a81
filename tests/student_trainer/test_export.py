"""``dkdm export --format diffusers``: ADM students as UNet2DModel + DDPMScheduler, loaded by DDPMPipeline.

Every shipped ADM size's layout (narrowed to 32 base channels, random weights) must compute the
same function as its UNet2DModel to 1e-4; layouts diffusers cannot express are refused in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.diffusion import ancestral_step, make_diffusion
from common.models import build_network, save_pretrained
from common.models.diffusers_unet import ExportError, to_unet2d
from common.models.registry import ADM_SIZES, DIT_SIZES, MLP_SIZES
from student_trainer.checkpoints import model_config
from student_trainer.cli import main as cli_main
from student_trainer.export import ddpm_scheduler, export_diffusers
from weights import randomize

torch.set_num_threads(1)


def _randomize(model, seed=0):
    return randomize(model, seed, scale=0.05).eval()


def assert_same_function(model, unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.tensor([0, 737])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4


NARROW = {"num_channels": 32, "num_head_channels": 32, "dropout": 0.0}
# Each registered ADM size's layout, narrowed; plus the digits student and the variants a size could set.
LAYOUTS = [(size, {}) for size in ADM_SIZES] + [
    ("tiny-8", {"channel_mult": "1", "attention_resolutions": ""}),     # configs/digits.yaml's student
    ("14M", {"use_new_attention_order": False}),                       # guided-diffusion's legacy qkv order
    ("tiny-16", {"use_scale_shift_norm": False, "resblock_updown": False}),
    ("tiny-16", {"num_head_channels": -1, "num_heads": 1}),
]


@pytest.mark.parametrize("size,flags", LAYOUTS, ids=[f"{s}-{'-'.join(f) or 'as-registered'}" for s, f in LAYOUTS])
def test_adm_layout_maps_to_unet2d(size, flags):
    model = _randomize(build_network("adm", size, dict(NARROW, **flags)))
    assert_same_function(model, to_unet2d(model))


@pytest.mark.parametrize("arch,size,flags,reason", [
    *[("dit", s, {"input_size": 8, "depth": 1}, "DiT students do not map") for s in DIT_SIZES],
    *[("mlp", s, {}, "has no diffusers counterpart") for s in MLP_SIZES],
    ("adm", "tiny-8", {"class_cond": True, "num_classes": 4}, "class-conditional"),
    ("adm", "tiny-16", {"channel_mult": "0.5,1", "num_channels": 64}, "channel_mult starts at 0.5"),
    ("adm", "tiny-16", {"num_head_channels": -1, "num_heads": 2}, "one attention_head_dim"),
])
def test_layouts_diffusers_cannot_express_are_refused_in_one_line(arch, size, flags, reason):
    with pytest.raises(ExportError) as err:
        to_unet2d(build_network(arch, size, flags))
    assert reason in str(err.value) and "\n" not in str(err.value)


def student_checkpoint(folder, respacing="100", var_type="learned_range", size="tiny-8", flags=None, v_bound="none"):
    flags = flags if flags is not None else {"channel_mult": "1", "attention_resolutions": ""}
    model = _randomize(build_network("adm", size, flags))
    chain = make_diffusion("cosine", 1000, respacing)
    config = model_config({"arch": "adm", "size": size, "flags": flags}, chain, "cosine", var_type, True,
                          (model.in_channels, model.image_size, model.image_size), None, v_bound=v_bound)
    save_pretrained(folder, model, config)
    return model, chain


def test_export_loads_in_ddpm_pipeline_and_samples_the_trained_chain(tmp_path):
    from diffusers import DDPMPipeline

    model, chain = student_checkpoint(tmp_path / "ck")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "diffusers",
                     "--out", str(tmp_path / "hf")]) == 0
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "hf"))
    assert_same_function(model, pipe.unet)
    # The 100-step chain the student learned is what num_inference_steps=100 visits.
    pipe.scheduler.set_timesteps(chain.num_timesteps)
    assert sorted(int(t) for t in pipe.scheduler.timesteps) == [int(t) for t in chain.timestep_map]
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    info = json.loads((tmp_path / "hf" / "dkdm_export.json").read_text())
    assert info["num_inference_steps"] == 100 and info["weights"] == "model"
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_one_scheduler_step_is_the_projects_ancestral_step(tmp_path):
    """DDPMScheduler.step on the exported chain = ancestral_step on the student's respaced chain."""
    _, chain = student_checkpoint(tmp_path / "ck")
    scheduler, _ = ddpm_scheduler(json.loads((tmp_path / "ck" / "config.json").read_text())["diffusion"])
    scheduler.set_timesteps(chain.num_timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps, v = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    v = v.clamp(-1, 1)
    for i in (57, 1):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        theirs = scheduler.step(torch.cat([eps, v], 1), int(chain.timestep_map[i]), x,
                                generator=torch.Generator().manual_seed(i)).prev_sample
        ours = ancestral_step(chain, x, torch.full((3,), i), eps, "learned_range", v, True, noise)["sample"]
        assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("respacing,spacing", [("", "leading"), ("ddim50", "leading"), ("100", "linspace"),
                                               ("10,20", None)])
def test_scheduler_spacing_names_the_chain_or_says_it_cannot(tmp_path, caplog, respacing, spacing):
    student_checkpoint(tmp_path / "ck", respacing=respacing)
    section = json.loads((tmp_path / "ck" / "config.json").read_text())["diffusion"]
    scheduler, info = ddpm_scheduler(section)
    assert info["timestep_spacing"] == spacing
    assert len(scheduler.alphas_cumprod) == 1000
    if spacing is None:
        assert "set_timesteps(timesteps=...)" in caplog.text


def test_cli_refuses_what_diffusers_cannot_express_in_one_line(tmp_path, capsys):
    student_checkpoint(tmp_path / "ck", var_type="learned")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dkdm: error: var_type 'learned'") and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_a_dit_checkpoint(tmp_path, capsys):
    model = build_network("dit", "DiT-tiny/2", {})
    chain = make_diffusion("cosine", 1000)
    save_pretrained(tmp_path / "ck", model, model_config({"arch": "dit", "size": "DiT-tiny/2", "flags": {}}, chain,
                                                          "cosine", "learned_range", True, (1, 8, 8), None,
                                                          v_bound="none"))
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 2
    assert "DiT students do not map to diffusers" in capsys.readouterr().err


def test_a_bounded_v_is_exported_with_one_warning(tmp_path, caplog):
    """DKDM students clamp v when they sample; DDPMScheduler does not, which the export says once."""
    student_checkpoint(tmp_path / "ck", v_bound="clamp")
    export_diffusers(str(tmp_path / "ck"), str(tmp_path / "hf"))
    warnings = [r.getMessage() for r in caplog.records if "bounds its learned-range v" in r.getMessage()]
    assert len(warnings) == 1 and "'clamp'" in warnings[0]
    assert json.loads((tmp_path / "hf" / "dkdm_export.json").read_text())["v_bound"] == "clamp"
