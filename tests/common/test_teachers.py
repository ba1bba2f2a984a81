"""make_teacher and the checkpoint adapters: guided-diffusion .pt and the project's own folders."""

import pytest
import torch

from common.config import AnalyticConfig, DiffusionConfig, TeacherConfig
from common.diffusion import make_diffusion, predict_eps_from_xstart, respace
from common.models import build_network, create_model, save_pretrained
from common.teachers import Teacher, TeacherLoadError, make_teacher
from common.teachers.analytic import AnalyticTeacher
from common.teachers.dkdm_teacher import DKDMTeacher
from common.teachers.guided import GuidedDiffusionTeacher

torch.set_num_threads(1)

TINY_ADM = dict(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,1",
                num_head_channels=32, in_channels=1, learn_sigma=True, use_scale_shift_norm=True,
                resblock_updown=True, use_new_attention_order=True)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Fresh ADMs output zeros (zero_module on the last conv): give every weight a value.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(TeacherLoadError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --- the factory -----------------------------------------------------------------------

def test_make_teacher_analytic_follows_the_config():
    cfg = TeacherConfig(kind="analytic", device="cpu",
                        analytic=AnalyticConfig(num_components=3, image_size=4, class_conditional=True),
                        diffusion=DiffusionConfig(respacing="25", var_type="fixed_large"))
    teacher = make_teacher(cfg)
    assert isinstance(teacher, AnalyticTeacher) and isinstance(teacher, Teacher)
    assert teacher.diffusion.num_timesteps == 25 and teacher.var_type == "fixed_large"
    assert teacher.image_shape == (1, 4, 4) and teacher.num_classes == 3
    assert teacher.device == torch.device("cpu")
    eps, var_values = teacher.predict(torch.randn(2, 1, 4, 4), torch.tensor([0, 24]), torch.tensor([0, 2]))
    assert eps.shape == (2, 1, 4, 4) and var_values is None


@pytest.mark.parametrize("kind", ["guided_diffusion", "diffusers", "dkdm"])
def test_make_teacher_missing_path_is_one_line(kind, tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    msg = _one_line_error(lambda: make_teacher(TeacherConfig(kind=kind, path=str(missing), device="cpu")), "not found")
    assert str(missing) in msg


@pytest.mark.parametrize("path", ["openai/guided-diffusion", "google/ddpm-cifar10-32", "hf://google/ddpm-cifar10-32",
                                  "https://example.com/model.pt"])
@pytest.mark.parametrize("kind", ["guided_diffusion", "dkdm"])
def test_make_teacher_rejects_hub_ids_and_urls(kind, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so a relative "owner/name" cannot exist by accident
    msg = _one_line_error(lambda: make_teacher(TeacherConfig(kind=kind, path=path, device="cpu")), "hub id")
    assert path in msg


def test_make_teacher_guided_path_must_be_a_file(tmp_path):
    _one_line_error(lambda: make_teacher(TeacherConfig(kind="guided_diffusion", path=str(tmp_path), device="cpu")),
                    "not a file")


# --- guided-diffusion .pt ------------------------------------------------------------------

def _save_guided(tmp_path, **overrides):
    flags = dict(TINY_ADM, **overrides)
    model = _randomize(create_model(**flags))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model, flags, path


def test_guided_teacher_round_trips_through_a_saved_pt(tmp_path):
    model, flags, path = _save_guided(tmp_path)
    cfg = TeacherConfig(kind="guided_diffusion", path=str(path), flags=flags, device="cpu",
                        diffusion=DiffusionConfig(respacing="10"))
    teacher = make_teacher(cfg)
    assert isinstance(teacher, GuidedDiffusionTeacher)
    assert teacher.image_shape == (1, 8, 8) and teacher.num_classes is None and teacher.var_type == "learned_range"
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 4, 9])
    eps, v = teacher.predict(x, t)
    with torch.no_grad():
        out = model(x, teacher.diffusion.map_timesteps(t))   # the network sees original timesteps
    assert teacher.diffusion.map_timesteps(t).tolist() == [0, 444, 999]
    torch.testing.assert_close(eps, out[:, :1])
    torch.testing.assert_close(v, out[:, 1:])
    assert eps.abs().max() > 0
    # Same weights, same identity; other weights, other identity.
    assert teacher.identity() == make_teacher(cfg).identity()
    other = GuidedDiffusionTeacher(_randomize(create_model(**flags), seed=1), cfg.diffusion)
    assert other.identity()["weights_sha256"] != teacher.identity()["weights_sha256"]


def test_guided_teacher_x0_prediction_and_class_labels(tmp_path):
    model, flags, path = _save_guided(tmp_path, class_cond=True, num_classes=5, learn_sigma=False)
    dcfg = DiffusionConfig(var_type="fixed_small", prediction="x0", schedule="linear", num_timesteps=100)
    teacher = make_teacher(TeacherConfig(kind="guided_diffusion", path=str(path), flags=flags, diffusion=dcfg, device="cpu"))
    assert teacher.num_classes == 5
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 90]), torch.tensor([1, 4])
    eps, var_values = teacher.predict(x, t, y)
    assert var_values is None
    with torch.no_grad():
        x0 = model(x, t, y)
    torch.testing.assert_close(eps, predict_eps_from_xstart(make_diffusion("linear", 100), x, t, x0))
    with pytest.raises(ValueError, match="labels"):
        teacher.predict(x, t)


def test_guided_teacher_flag_errors_are_one_line(tmp_path):
    _, flags, path = _save_guided(tmp_path)

    def load(f, dcfg=DiffusionConfig()):
        return lambda: make_teacher(TeacherConfig(kind="guided_diffusion", path=str(path), flags=f,
                                                  diffusion=dcfg, device="cpu"))

    _one_line_error(load(dict(flags, num_channels=64)), str(path))             # shapes differ: strict load
    _one_line_error(load(dict(flags, bogus_flag=1)), "bogus_flag")
    _one_line_error(load(dict(flags, noise_schedule="linear")), "noise_schedule.*schedule")
    _one_line_error(load(flags, DiffusionConfig(var_type="fixed_small")), "learn_sigma")
    _one_line_error(load(dict(flags, rescale_timesteps=True)), "rescale_timesteps")
    # Agreeing diffusion flags pasted from a guided-diffusion command line are accepted.
    pasted = dict(flags, noise_schedule="cosine", diffusion_steps=1000, predict_xstart=False,
                  rescale_timesteps=False, timestep_respacing="250", use_kl=False)
    assert load(pasted)().diffusion.num_timesteps == 1000
    # learn_sigma left out: filled in from the config's var_type.
    no_sigma = {k: v for k, v in flags.items() if k != "learn_sigma"}
    assert load(no_sigma)().learned_variance


# --- the project's own checkpoints ------------------------------------------------------

def _save_dkdm(folder, learn_sigma=True, num_classes=None, respacing="", with_betas=True):
    flags = {"image_size": 8, "in_channels": 1, "width": 64, "depth": 2, "time_embed_dim": 32,
             "learn_sigma": learn_sigma, "num_classes": num_classes, "dropout": 0.0}
    model = _randomize(build_network("mlp", None, flags), seed=2)
    ema = _randomize(build_network("mlp", None, flags), seed=3).state_dict()
    d = make_diffusion("cosine", 1000, respacing)
    diffusion = {"schedule": "cosine", "num_timesteps": int(d.num_timesteps),
                 "var_type": "learned_range" if learn_sigma else "fixed_large", "prediction": "eps",
                 "clip_denoised": True}
    if with_betas:   # as student_trainer/checkpoints.py writes it
        diffusion.update(betas=[float(b) for b in d.betas], timestep_map=[int(i) for i in d.timestep_map])
    else:
        diffusion["respacing"] = respacing
    config = {"arch": "mlp", "size": None, "flags": flags, "diffusion": diffusion,
              "image_shape": [1, 8, 8], "num_classes": num_classes}
    save_pretrained(folder, model, config, ema_state=ema)
    return model, ema, d


@pytest.mark.parametrize("use_ema", [True, False])
def test_dkdm_teacher_round_trip(tmp_path, use_ema):
    model, ema, chain = _save_dkdm(tmp_path / "ck", respacing="100")
    cfg = TeacherConfig(kind="dkdm", path=str(tmp_path / "ck"), use_ema=use_ema, device="cpu",
                        diffusion=DiffusionConfig(respacing="20"))
    teacher = make_teacher(cfg)
    assert isinstance(teacher, DKDMTeacher)
    assert teacher.var_type == "learned_range" and teacher.image_shape == (1, 8, 8) and teacher.num_classes is None
    # The trained 100-step chain respaced to 20 steps: original timesteps are kept ones of the 100.
    assert teacher.diffusion.num_timesteps == 20
    assert set(teacher.diffusion.timestep_map.tolist()) <= set(chain.timestep_map.tolist())
    assert teacher.diffusion.fingerprint() == respace(chain, "20").fingerprint()
    if use_ema:
        model.load_state_dict(ema)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    eps, v = teacher.predict(x, t)
    with torch.no_grad():
        out = model(x, teacher.diffusion.map_timesteps(t))
    torch.testing.assert_close(eps, out[:, :1])
    torch.testing.assert_close(v, out[:, 1:])
    assert teacher.identity()["loaded_weights"] == ("ema" if use_ema else "model")


def test_dkdm_teacher_without_betas_and_conditional(tmp_path):
    model, ema, _ = _save_dkdm(tmp_path / "ck", learn_sigma=False, num_classes=3, with_betas=False)
    teacher = make_teacher(TeacherConfig(kind="dkdm", path=str(tmp_path / "ck"), device="cpu"))
    assert teacher.num_classes == 3 and teacher.var_type == "fixed_large" and teacher.diffusion.num_timesteps == 1000
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 2])
    eps, v = teacher.predict(x, t, y)
    model.load_state_dict(ema)
    with torch.no_grad():
        torch.testing.assert_close(eps, model(x, t, y))
    assert v is None


def test_dkdm_teacher_errors_are_one_line(tmp_path):
    _save_dkdm(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    _one_line_error(lambda: make_teacher(TeacherConfig(kind="dkdm", path=str(tmp_path / "ck"), use_ema=False,
                                                       device="cpu")), "model.safetensors")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: make_teacher(TeacherConfig(kind="dkdm", path=str(tmp_path / "empty"), device="cpu")),
                    "config.json")
    # A network checkpoint without the diffusion section is not a teacher.
    save_pretrained(tmp_path / "bare", build_network("mlp", "mlp-8", {}), {"arch": "mlp", "size": "mlp-8", "flags": {}})
    _one_line_error(lambda: make_teacher(TeacherConfig(kind="dkdm", path=str(tmp_path / "bare"), device="cpu")),
                    "diffusion")
