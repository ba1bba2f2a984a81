"""The diffusers adapter: save_pretrained round trips of tiny random UNets, eps conversions, and
DDPMPipeline's own samples reproduced by ``ancestral_sample`` from the same noise."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel, VQModel  # noqa: E402

from common.diffusion import ancestral_sample, get_named_beta_schedule  # noqa: E402
from common.teachers.base import TeacherLoadError  # noqa: E402
from common.teachers.diffusers_teacher import DiffusersTeacher, scheduler_settings, state_dict_sha256  # noqa: E402

torch.set_num_threads(1)
T = 50


def tiny_unet(seed=0, out_channels=3, **kwargs):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       **kwargs).eval()


def save_pipeline(folder, unet, scheduler):
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return str(folder)


def chain_inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([0, 7, 30, 49][:n])


def test_epsilon_teacher_returns_the_unets_own_output(tmp_path):
    unet = tiny_unet()
    path = save_pipeline(tmp_path / "ddpm", unet, DDPMScheduler(num_train_timesteps=T))
    teacher = DiffusersTeacher.from_folder(path, device="cpu")
    assert teacher.image_shape == (3, 8, 8) and teacher.num_classes is None
    assert teacher.var_type == "fixed_small" and teacher.clip_denoised and teacher.prediction == "eps"
    assert teacher.diffusion.num_timesteps == T
    x, t = chain_inputs()
    eps, var_values = teacher.predict(x, t)
    with torch.no_grad():
        expected = unet(x, t).sample
    assert var_values is None
    assert torch.allclose(eps, expected, atol=1e-6)


def test_v_prediction_is_converted_to_eps(tmp_path):
    unet = tiny_unet(seed=3)
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    teacher = DiffusersTeacher.from_folder(save_pipeline(tmp_path / "v", unet, scheduler), device="cpu", respacing="ddim10")
    assert teacher.prediction == "v"
    x, t = chain_inputs()
    t = torch.tensor([0, 3, 5, 9])                       # chain indices of the respaced chain
    orig = torch.tensor([0, 15, 25, 45])                  # stride 5
    eps, _ = teacher.predict(x, t)
    with torch.no_grad():
        v = unet(x, orig).sample
    abar = scheduler.alphas_cumprod[orig].view(-1, 1, 1, 1)  # diffusers' own float32 table
    assert torch.allclose(eps, abar.sqrt() * v + (1 - abar).sqrt() * x, atol=1e-5)


def test_sample_prediction_is_converted_to_eps(tmp_path):
    unet = tiny_unet(seed=4)
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type="sample")
    teacher = DiffusersTeacher.from_folder(save_pipeline(tmp_path / "x0", unet, scheduler), device="cpu")
    x, t = chain_inputs()
    eps, _ = teacher.predict(x, t)
    with torch.no_grad():
        x0 = unet(x, t).sample
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # At t = 0 the division by sqrt(1 - abar) ~ 0.01 amplifies float32 table rounding: relative tolerance.
    assert torch.allclose(eps, (x - abar.sqrt() * x0) / (1 - abar).sqrt(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("variance_type,prediction_type,num_steps,respacing", [
    ("fixed_small", "epsilon", T, ""),
    ("fixed_large", "v_prediction", T, ""),
    ("learned_range", "epsilon", T, ""),
    ("fixed_small", "epsilon", 10, "ddim10"),   # DDPMScheduler's "leading" spacing of 50 into 10: stride 5
])
def test_ddpm_pipeline_and_ancestral_sample_agree_from_the_same_generator(tmp_path, variance_type, prediction_type,
                                                                           num_steps, respacing):
    learned = variance_type.startswith("learned")
    unet = tiny_unet(seed=5, out_channels=6 if learned else 3)
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type, prediction_type=prediction_type)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=num_steps,
                      output_type="pt").images
    teacher = DiffusersTeacher.from_folder(str(tmp_path / "p"), device="cpu", respacing=respacing)
    assert teacher.diffusion.num_timesteps == num_steps
    # DDPMPipeline draws x_T, then one variance noise per step with t > 0: ancestral_sample's order.
    ours = ancestral_sample(teacher.diffusion, teacher.predict, (2, 3, 8, 8), teacher.var_type, teacher.clip_denoised,
                            noise=torch.Generator().manual_seed(7))
    assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), images, atol=1e-4)
    assert images.std() > 0.05  # a real image, not a constant


def test_manual_scheduler_loop_and_ancestral_sample_agree_on_an_injected_noise_sequence(tmp_path):
    unet = tiny_unet(seed=6)
    scheduler = DDPMScheduler(num_train_timesteps=T)
    teacher = DiffusersTeacher.from_folder(save_pipeline(tmp_path / "m", unet, scheduler), device="cpu")
    shape = (2, 3, 8, 8)
    # The whole noise sequence up front: index 0 is x_T, index k the noise of the step from t = T - k.
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(100 + k)) for k in range(T)]

    scheduler.set_timesteps(T)
    x = noises[0].clone()
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps, start=1):
            # scheduler.step draws its variance noise from this generator: the same tensor as noises[k].
            gen = torch.Generator().manual_seed(100 + k) if k < T else None
            x = scheduler.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    ours = ancestral_sample(teacher.diffusion, teacher.predict, shape, teacher.var_type, teacher.clip_denoised,
                            noise=lambda k, s: noises[k])
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_bare_unet_folder_with_scheduler_config_beside_it(tmp_path):
    unet = tiny_unet(seed=8)
    unet.save_pretrained(str(tmp_path / "bare"))
    DDPMScheduler(num_train_timesteps=T, clip_sample=False).save_pretrained(str(tmp_path / "bare"))
    assert (tmp_path / "bare" / "scheduler_config.json").is_file()
    teacher = DiffusersTeacher.from_folder(str(tmp_path / "bare"), device="cpu")
    assert teacher.clip_denoised is False
    x, t = chain_inputs()
    with torch.no_grad():
        assert torch.allclose(teacher.predict(x, t)[0], unet(x, t).sample, atol=1e-6)


def test_class_conditional_unet_takes_labels(tmp_path):
    unet = tiny_unet(seed=9, num_class_embeds=3)
    teacher = DiffusersTeacher.from_folder(save_pipeline(tmp_path / "c", unet, DDPMScheduler(num_train_timesteps=T)))
    assert teacher.num_classes == 3
    x, t = chain_inputs()
    y = torch.tensor([0, 1, 2, 1])
    eps, _ = teacher.predict(x, t, y)
    with torch.no_grad():
        assert torch.allclose(eps, unet(x, t, class_labels=y).sample, atol=1e-6)
    assert not torch.allclose(eps, teacher.predict(x, t, torch.tensor([2, 2, 0, 0]))[0])
    with pytest.raises(ValueError, match="class-conditional"):
        teacher.predict(x, t)


@pytest.mark.parametrize("ae_folder", ["vqvae", "vae"])
def test_latent_layout_decodes_with_the_scaling_factor(tmp_path, ae_folder):
    torch.manual_seed(0)
    if ae_folder == "vqvae":
        ae = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
                     norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3, scaling_factor=0.5)
    else:
        ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                           layers_per_block=1, norm_num_groups=4, scaling_factor=0.25)
    ae.eval()
    unet = tiny_unet(seed=10)
    root = tmp_path / "ldm"
    unet.save_pretrained(str(root / "unet"))
    ae.save_pretrained(str(root / ae_folder))
    DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                  clip_sample=False).save_pretrained(str(root / "scheduler"))
    teacher = DiffusersTeacher.from_folder(str(root), device="cpu")
    assert teacher.is_latent and teacher.var_type == "fixed_small" and not teacher.clip_denoised
    assert np.allclose(teacher.diffusion.betas, get_named_beta_schedule("scaled_linear", T), rtol=1e-12)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = teacher.decode(latents)
    with torch.no_grad():
        expected = ae.decode(latents / ae.config.scaling_factor).sample.clamp(-1, 1)
        unscaled = ae.decode(latents).sample.clamp(-1, 1)
    assert images.shape == (2, 3, 8, 8)
    assert torch.allclose(images, expected, atol=1e-5)
    assert not torch.allclose(images, unscaled, atol=1e-3)
    assert teacher.identity()["autoencoder_sha256"] == state_dict_sha256(ae)


def test_pixel_teacher_cannot_decode(tmp_path):
    teacher = DiffusersTeacher.from_folder(save_pipeline(tmp_path / "p", tiny_unet(), DDPMScheduler(num_train_timesteps=T)))
    assert not teacher.is_latent
    with pytest.raises(ValueError, match="no autoencoder"):
        teacher.decode(torch.zeros(1, 3, 8, 8))


def test_hub_id_is_refused_with_a_download_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherLoadError) as err:
        DiffusersTeacher.from_folder("google/ddpm-cifar10-32", device="cpu")
    assert str(err.value) == ("teacher path 'google/ddpm-cifar10-32' is not a local folder; download the model to a "
                              "local folder first (no network access at run time)")
    with pytest.raises(TeacherLoadError, match="does not exist"):
        DiffusersTeacher.from_folder(str(tmp_path / "missing" / "deeper" / "x"), device="cpu")


def test_load_errors_name_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="no diffusers UNet"):
        DiffusersTeacher.from_folder(str(tmp_path / "empty"))
    unet = tiny_unet()
    unet.save_pretrained(str(tmp_path / "nosched"))
    with pytest.raises(TeacherLoadError, match="no scheduler config"):
        DiffusersTeacher.from_folder(str(tmp_path / "nosched"))
    # A learned-variance scheduler over a 3-channel UNet.
    path = save_pipeline(tmp_path / "mismatch", unet, DDPMScheduler(num_train_timesteps=T, variance_type="learned_range"))
    with pytest.raises(TeacherLoadError, match="out_channels=3"):
        DiffusersTeacher.from_folder(path)
    path = save_pipeline(tmp_path / "sigmoid", unet, DDPMScheduler(num_train_timesteps=T, beta_schedule="sigmoid"))
    with pytest.raises(TeacherLoadError, match="'sigmoid'"):
        DiffusersTeacher.from_folder(path)


def test_scheduler_settings_map_to_guided_diffusion_terms():
    for cls in (DDPMScheduler, DDIMScheduler):
        for kwargs in ({}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                       {"beta_schedule": "squaredcos_cap_v2"}):
            sched = cls(num_train_timesteps=T, **kwargs)
            s = scheduler_settings(dict(sched.config))
            assert s.betas.dtype == np.float64
            assert np.allclose(s.betas, sched.betas.double().numpy(), rtol=1e-6, atol=1e-9), (cls, kwargs)
    linear = scheduler_settings({"num_train_timesteps": 10, "beta_start": 0.001, "beta_end": 0.01})
    assert np.array_equal(linear.betas, np.linspace(0.001, 0.01, 10))   # no 1000 / T scaling in diffusers
    assert np.array_equal(scheduler_settings({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]}).betas,
                          [0.1, 0.2, 0.3])
    for given, expected in [("fixed_small_log", "fixed_small"), ("fixed_large_log", "fixed_large"),
                            ("learned", "learned"), ("learned_range", "learned_range")]:
        assert scheduler_settings({"variance_type": given}).var_type == expected
    assert scheduler_settings({"prediction_type": "v_prediction"}).prediction == "v"
    with pytest.raises(TeacherLoadError, match="rescale_betas_zero_snr"):
        scheduler_settings({"rescale_betas_zero_snr": True})
    with pytest.raises(TeacherLoadError, match="clip_sample_range"):
        scheduler_settings({"clip_sample_range": 2.0})
    with pytest.raises(TeacherLoadError, match="trained_betas"):
        scheduler_settings({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2]})


def test_identity_is_stable_and_tracks_weights_and_chain(tmp_path):
    path = save_pipeline(tmp_path / "a", tiny_unet(seed=0), DDPMScheduler(num_train_timesteps=T))
    other = save_pipeline(tmp_path / "b", tiny_unet(seed=1), DDPMScheduler(num_train_timesteps=T))
    a1 = DiffusersTeacher.from_folder(path).identity()
    a2 = DiffusersTeacher.from_folder(path).identity()
    assert a1 == a2 and len(a1["weights_sha256"]) == 64
    json.dumps(a1)  # serializable into a run folder
    assert DiffusersTeacher.from_folder(other).identity()["weights_sha256"] != a1["weights_sha256"]
    spaced = DiffusersTeacher.from_folder(path, respacing="10").identity()
    assert spaced["weights_sha256"] == a1["weights_sha256"]
    assert spaced["chain_fingerprint"] != a1["chain_fingerprint"] and spaced["chain_length"] == 10


def test_spacings_the_chain_cannot_reproduce_are_named_in_one_line(caplog):
    caplog.set_level("INFO", logger="common.teachers.diffusers_teacher")
    for config in ({"timestep_spacing": "trailing"}, {"steps_offset": 1}):
        caplog.clear()
        scheduler_settings(config)
        assert len(caplog.records) == 1 and "has no respacing string" in caplog.records[0].getMessage()
    caplog.clear()
    scheduler_settings({"timestep_spacing": "linspace"})
    scheduler_settings({"variance_type": "fixed_large_log"})
    assert [r.getMessage() for r in caplog.records] == [
        "scheduler variance_type fixed_large_log is taken as fixed_large (variance beta_t at t >= 1)"]


@pytest.mark.parametrize("respacing,num_steps,warns", [("ddim10", 10, False), ("10", 10, False), ("ddim7", 7, True)])
def test_respacing_strings_match_diffusers_spacings(tmp_path, caplog, respacing, num_steps, warns):
    """"ddimN" is leading when N divides T, "N" is linspace; ddimN otherwise differs and says so."""
    spacing = "linspace" if respacing[0].isdigit() else "leading"
    scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    path = save_pipeline(tmp_path / "p", tiny_unet(), scheduler)
    teacher = DiffusersTeacher.from_folder(path, device="cpu", respacing=respacing)
    scheduler.set_timesteps(num_steps)
    same = sorted(int(t) for t in scheduler.timesteps) == [int(t) for t in teacher.diffusion.timestep_map]
    assert same != warns
    assert ("do not divide" in caplog.text) == warns


def test_fixed_large_log_samples_as_fixed_large(tmp_path):
    """The same variance at every step that adds noise: identical ancestral samples from one generator."""
    unet = tiny_unet(seed=9)
    samples = []
    for variance_type in ("fixed_large", "fixed_large_log"):
        path = save_pipeline(tmp_path / variance_type, unet, DDPMScheduler(num_train_timesteps=T,
                                                                            variance_type=variance_type))
        teacher = DiffusersTeacher.from_folder(path, device="cpu", respacing="ddim10")
        samples.append(ancestral_sample(teacher.diffusion, teacher.predict, (2, 3, 8, 8), teacher.var_type,
                                        teacher.clip_denoised, noise=torch.Generator().manual_seed(3)))
    assert torch.equal(*samples)
