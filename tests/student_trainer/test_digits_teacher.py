"""The committed digits teacher (common/assets/digits_teacher) and the digits configs.

The teacher is a ``dkdm`` checkpoint trained by ``dkdm train --config configs/digits_teacher.yaml``;
its README records the rebuild command and the sha256 of its weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from common.config import SampleConfig, TeacherConfig, load_config
from common.eval.features import get_feature_net, sha256_file
from common.teachers import make_teacher
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer.sampling import sample_teacher

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "common" / "assets" / "digits_teacher"
RELATIVE_PATH = "common/assets/digits_teacher"
# The committed teacher gives 10 classes at mean max-probability 0.97 on the 64 samples below;
# clipped Gaussian noise gives 6 classes at 0.73.
MIN_CLASSES = 8
MIN_CONFIDENCE = 0.85


def recorded_checksums() -> dict[str, str]:
    """``sha256sum`` lines in the asset's README: {file name: hex digest}."""
    text = (ASSET / "README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^\s*([0-9a-f]{64})\s+(\S+\.safetensors)$", text, re.M)}


def test_checksums_match_readme():
    recorded = recorded_checksums()
    assert set(recorded) == {"model.safetensors", "ema.safetensors"}
    for name, digest in recorded.items():
        assert sha256_file(ASSET / name) == digest, f"{name} differs from the checksum in README.md"


def test_only_weights_and_config_are_committed():
    files = {p.name for p in ASSET.iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert files == {"config.json", "model.safetensors", "ema.safetensors", "README.md", "__init__.py"}
    assert sum((ASSET / f).stat().st_size for f in ("model.safetensors", "ema.safetensors")) < 3_000_000


def test_dkdm_teacher_kind_loads_it_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # the relative path falls back to the repository root
    teacher = make_teacher(TeacherConfig(kind="dkdm", path=RELATIVE_PATH, device="cpu"))
    assert isinstance(teacher, DKDMTeacher)
    assert teacher.image_shape == (1, 8, 8) and teacher.num_classes is None
    assert teacher.var_type == "learned_range" and teacher.learned_variance and teacher.clip_denoised
    assert teacher.diffusion.num_timesteps == 1000


def test_configs_agree_with_the_checkpoint():
    teacher_cfg = load_config(str(REPO / "configs" / "digits_teacher.yaml"))
    digits_cfg = load_config(str(REPO / "configs" / "digits.yaml"))
    teacher = DKDMTeacher.from_folder(str(ASSET), device="cpu")
    assert digits_cfg.teacher.kind == "dkdm" and digits_cfg.teacher.path == RELATIVE_PATH
    assert teacher.config["arch"] == teacher_cfg.student.arch and teacher.config["size"] == teacher_cfg.student.size
    for cfg in (teacher_cfg, digits_cfg):
        d = cfg.teacher.diffusion
        assert (d.schedule, d.num_timesteps, d.var_type, d.clip_denoised) == (
            teacher.diffusion_cfg.schedule, teacher.diffusion_cfg.num_timesteps, teacher.diffusion_cfg.var_type,
            teacher.diffusion_cfg.clip_denoised)
    assert digits_cfg.teacher.diffusion.respacing == "100" and digits_cfg.pool.rho == 0.4
    assert digits_cfg.distill.batch_size == 64


@pytest.mark.timeout(120)
def test_samples_are_confident_and_diverse_digits():
    torch.set_num_threads(1)
    teacher = make_teacher(TeacherConfig(kind="dkdm", path=str(ASSET), device="cpu"))
    x, _ = sample_teacher(teacher, SampleConfig(steps="25", num_samples=64, batch_size=64), seed=0)
    assert x.shape == (64, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    _, _, logits = get_feature_net("digits").features(x)
    probs = logits.softmax(dim=1)
    classes = probs.argmax(dim=1)
    assert len(classes.unique()) >= MIN_CLASSES, f"only classes {sorted(classes.unique().tolist())}"
    assert float(probs.max(dim=1).values.mean()) > MIN_CONFIDENCE
    # Not mode collapse onto one digit: no class takes more than a third of the samples.
    assert int(torch.bincount(classes, minlength=10).max()) <= 64 // 3


def test_noise_is_not_classified_confidently():
    """The thresholds above mean something: clipped Gaussian noise fails them."""
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    probs = get_feature_net("digits").features(x)[2].softmax(dim=1)
    classes = probs.argmax(dim=1)
    assert len(classes.unique()) < MIN_CLASSES and float(probs.max(dim=1).values.mean()) <= MIN_CONFIDENCE
