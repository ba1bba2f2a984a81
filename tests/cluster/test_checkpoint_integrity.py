"""Real training checkpoints (ray_train.write_checkpoint: weights, optimizer, RNG, pool snapshot, manifest)
damaged on disk: ``latest_checkpoint`` passes over a damaged newest one, says so in one line and picks the
newest intact one; ``rewind_metrics`` keeps metrics.jsonl increasing in step after a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import config_from_dict
from common.models.checkpoint import MANIFEST_NAME, checkpoint_problem
from common.pool import make_pool
from common.teachers import make_teacher
from student_trainer.ray_train import (CHECKPOINT_FILES, TeacherSpec, build_trainer, checkpoint_config,
                                       resume_point, rewind_metrics, write_checkpoint)
from student_trainer.run import latest_checkpoint

CFG = {"teacher": {"kind": "analytic", "device": "cpu", "analytic": {"num_components": 2, "image_size": 4},
                   "diffusion": {"num_timesteps": 20}},
       "student": {"arch": "mlp"}, "pool": {"backend": "local", "num_slots": 8},
       "distill": {"batch_size": 4, "bf16": False}}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """checkpoint_0000010, _0000020, _0000030 of one tiny run."""
    cfg = config_from_dict(CFG)
    spec = TeacherSpec.of(make_teacher(cfg.teacher, "cpu"), cfg.teacher.diffusion.schedule)
    trainer, student_config = build_trainer(cfg, spec, torch.device("cpu"))
    pool = make_pool(cfg.pool, num_slots=8, record_shape=spec.image_shape, has_logvar=True, has_label=False,
                     num_timesteps=20)
    root = tmp_path_factory.mktemp("train")
    for step in (10, 20, 30):
        trainer.step = step
        write_checkpoint(root / f"checkpoint_{step:07d}", trainer, checkpoint_config(student_config, spec, trainer), pool)
    pool.close()
    (root / "checkpoint_manager_snapshot.json").write_text("{}")     # Ray Train's own file beside the folders
    return root


def _copy(storage: Path, tmp: Path) -> Path:
    import shutil
    shutil.copytree(storage, tmp / "train")
    return tmp / "train"


def _said(caplog) -> list[str]:
    """The driver's log lines about checkpoints."""
    return [r.getMessage() for r in caplog.records if r.name == "student_trainer.run"]


def test_intact_checkpoints_verify(storage, caplog):
    assert all(checkpoint_problem(f, CHECKPOINT_FILES) is None for f in storage.iterdir() if f.is_dir())
    assert latest_checkpoint(storage).name == "checkpoint_0000030"
    assert _said(caplog) == []      # nothing to say when the newest is intact


@pytest.mark.parametrize("damage", ["truncated safetensors", "corrupt config.json", "flipped byte in the pool snapshot",
                                    "missing manifest and truncated weights"])
def test_damaged_latest_falls_back_to_newest_intact(storage, tmp_path, caplog, damage):
    train = _copy(storage, tmp_path)
    newest = train / "checkpoint_0000030"
    if damage == "truncated safetensors":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt config.json":
        (newest / "config.json").write_text('{"arch": "mlp", "flags": ')
    elif damage == "flipped byte in the pool snapshot":
        data = bytearray((newest / "pool.snapshot").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "pool.snapshot").write_bytes(bytes(data))
    else:       # a checkpoint from before manifests: the files themselves are checked
        (newest / MANIFEST_NAME).unlink()
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:-7])
    assert checkpoint_problem(newest, CHECKPOINT_FILES) is not None
    assert latest_checkpoint(train).name == "checkpoint_0000020"
    lines = _said(caplog)
    assert len(lines) == 1 and "checkpoint_0000030" in lines[0] and "damaged" in lines[0], lines
    assert "checkpoint_0000020" in lines[0]
    # a worker passes over Ray Train's latest when it is the damaged one
    assert resume_point(str(newest), str(train)) == train / "checkpoint_0000020"


def test_worker_resumes_from_a_newer_checkpoint_than_ray_trains(storage):
    """A worker killed right after persisting a checkpoint, before Ray Train's controller registered it:
    the restarted group starts from that newer checkpoint, not Ray Train's older one (or none)."""
    assert resume_point(str(storage / "checkpoint_0000010"), str(storage)) == storage / "checkpoint_0000030"
    assert resume_point(None, str(storage)) == storage / "checkpoint_0000030"
    assert resume_point(None, str(storage / "absent")) is None


def test_all_damaged_starts_from_scratch(storage, tmp_path, caplog):
    train = _copy(storage, tmp_path)
    for folder in train.glob("checkpoint_0*"):
        (folder / "trainer_state.json").write_text("{")
    assert latest_checkpoint(train) is None
    out = _said(caplog)
    assert len(out) == 1 and "no intact one" in out[0]


def test_rewind_metrics_drops_redone_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30, 40)) + '{"step": 5')
    rewind_metrics(path, 20)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [10, 20]
    rewind_metrics(tmp_path / "absent.jsonl", 3)      # a first run has no log yet
