"""Latent (LDM) distillation end to end with a tiny random diffusers VQ autoencoder and UNet (issue 22).

The teacher works on 3x4x4 latents of 3x8x8 images. A DKDM student's checkpoint records the teacher's
autoencoder, so ``dkdm sample`` decodes its samples to images; ``dkdm synth`` writes decoded images; the
latent data-free and data-limited baselines encode (decoded or real) images, train on latents and decode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel, VQModel  # noqa: E402

from common.data import load_shards  # noqa: E402
from common.teachers.base import TeacherLoadError  # noqa: E402
from common.teachers.dkdm_teacher import DKDMTeacher  # noqa: E402
from common.teachers.latent import decode_latents, encode_images  # noqa: E402
from student_trainer.cli import main as dkdm  # noqa: E402

T = 50


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """A diffusers LDM folder: unet/ on 3x4x4 latents, vqvae/ (f = 2, 3 latent channels), scheduler/."""
    root = tmp_path_factory.mktemp("ldm")
    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, num_vq_embeddings=16,
            vq_embed_dim=3, scaling_factor=0.5).save_pretrained(str(root / "vqvae"))
    UNet2DModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(str(root / "unet"))
    DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                  clip_sample=False).save_pretrained(str(root / "scheduler"))
    return root


def overrides(ldm, tmp_path, name: str) -> list[str]:
    return ["--set", f"run.out_dir={tmp_path}", "--set", f"run.name={name}", "--set", "run.progress=false",
            "--set", "run.device=cpu", "--set", "metrics.enabled=false", "--set", "teacher.kind=diffusers",
            "--set", f"teacher.path={ldm}", "--set",
            f"teacher.diffusion={{schedule: scaled_linear, num_timesteps: {T}, var_type: fixed_small, clip_denoised: false}}",
            "--set", "student.arch=mlp", "--set", "student.flags={width: 32, depth: 1, time_embed_dim: 16}",
            "--set", "distill.steps=3", "--set", "distill.batch_size=4", "--set", "distill.lambda_vlb=0",
            "--set", "pool.num_slots=8", "--set", "sample.steps=5", "--set", "sample.num_samples=4",
            "--set", "sample.batch_size=4", "--set", "run.ckpt_every=0"]


def npz_images(path) -> np.ndarray:
    with np.load(path) as f:
        return f["arr_0"]


def test_latent_student_samples_decode_through_the_teachers_autoencoder(ldm, tmp_path, capsys):
    assert dkdm(["distill", "--config", "configs/mixture.yaml", *overrides(ldm, tmp_path, "dkdm")]) == 0
    ckpt = tmp_path / "dkdm" / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["image_shape"] == [3, 4, 4]                   # the student learned latents
    assert config["autoencoder"]["path"] == str((ldm / "vqvae").resolve())
    # dkdm sample: 3x8x8 images, decoded by the teacher's autoencoder (not 3x4x4 latents clamped)
    assert dkdm(["sample", "--checkpoint", str(ckpt), "--num", "3", "--steps", "5", "--out",
                 str(tmp_path / "s.npz")]) == 0
    images = npz_images(tmp_path / "s.npz")
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    student = DKDMTeacher.from_folder(str(ckpt))
    assert student.is_latent
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student.autoencoder.decode(z / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(student.autoencoder, z), want)
    # another autoencoder in the recorded folder is refused
    ae = VQModel.from_pretrained(str(ldm / "vqvae"))
    with torch.no_grad():
        ae.decoder.conv_out.bias.add_(1.0)
    ae.save_pretrained(str(tmp_path / "other_vqvae"))
    config["autoencoder"]["path"] = str(tmp_path / "other_vqvae")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match="other weights"):
        DKDMTeacher.from_folder(str(ckpt))


def test_latent_synth_and_data_free_and_data_limited_baselines(ldm, tmp_path):
    synth = tmp_path / "synth"
    common = overrides(ldm, tmp_path, "synth") + ["--set", f"data.synthetic_dir={synth}", "--set",
                                                   "data.num_synthetic=6", "--set", "data.synth_steps=5"]
    assert dkdm(["synth", "--config", "configs/mixture.yaml", *common]) == 0
    x, _ = load_shards(synth)
    assert x.shape == (6, 3, 8, 8)                             # decoded images, not latents
    # data-free: the decoded teacher samples, re-encoded; the student trains on latents and decodes
    free = overrides(ldm, tmp_path, "free") + ["--set", f"data.dataset=shards:{synth}"]
    assert dkdm(["train", "--config", "configs/mixture.yaml", *free]) == 0
    config = json.loads((tmp_path / "free" / "checkpoint" / "config.json").read_text())
    assert config["image_shape"] == [3, 4, 4] and config["autoencoder"]["sha256"]
    assert dkdm(["sample", "--checkpoint", str(tmp_path / "free" / "checkpoint"), "--num", "2", "--steps", "5",
                 "--out", str(tmp_path / "f.npz")]) == 0
    assert npz_images(tmp_path / "f.npz").shape == (2, 8, 8, 3)
    # data-limited: real images mixed with the decoded ones, all encoded
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    limited = overrides(ldm, tmp_path, "limited") + ["--set", f"data.dataset=npz:{tmp_path / 'real.npz'}",
                                                     "--set", f"data.synthetic_dir={synth}",
                                                     "--set", "data.real_percent=50"]
    assert dkdm(["train", "--config", "configs/mixture.yaml", *limited]) == 0
    assert json.loads((tmp_path / "limited" / "checkpoint" / "config.json").read_text())["image_shape"] == [3, 4, 4]


def test_encode_then_decode_round_trips_the_shapes(ldm):
    from common.teachers.latent import load_autoencoder
    ae = load_autoencoder(ldm / "vqvae")
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    z = encode_images(ae, x, batch_size=2)
    with torch.no_grad():
        want = ae.encode(x).latents * 0.5
    assert z.shape == (5, 3, 4, 4)
    torch.testing.assert_close(z, want)
    assert decode_latents(ae, z, batch_size=2).shape == (5, 3, 8, 8)
