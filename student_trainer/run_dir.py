"""The run folder: resolved config, metrics log, samples, checkpoints (``runs/<name>/``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from common.config import Config, save_config


class RunDir:
    def __init__(self, cfg: Config):
        self.root = Path(cfg.run.out_dir) / cfg.run.name
        self.samples = self.root / "samples"
        self.checkpoint = self.root / "checkpoint"
        self.metrics_path = self.root / "metrics.jsonl"
        self.samples.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.root / "config.json")

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "trainer_state.json").is_file()

    def begin_checkpoint(self) -> Path:
        tmp = self.root / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path) -> None:
        """Atomic replace: a crash mid-write leaves the previous checkpoint intact."""
        old = self.root / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint.exists():
            os.rename(self.checkpoint, old)
        os.rename(tmp, self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)
