"""Training checkpoints: config.json + safetensors (STYLE), written atomically into the run folder.

A checkpoint folder is also a loadable model (``common.models.checkpoint.from_pretrained``;
a ``dkdm`` teacher): its config.json rebuilds the network and its diffusion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.diffusion import Diffusion
from common.models.checkpoint import from_pretrained, save_pretrained
from common.pool.base import Pool
from student_trainer.run_dir import RunDir
from student_trainer.trainer import StudentTrainer


def model_config(build: dict, d: Diffusion, schedule: str, var_type: str, clip_denoised: bool,
                 image_shape: tuple[int, int, int], num_classes: int | None, *, v_bound: str, **extra) -> dict:
    """The network's build flags plus everything that defines its diffusion (exact betas included) and the
    bound its Eq. 12 v was trained with (``v_bound``, applied again when it is sampled)."""
    return {**build,
            "diffusion": {"schedule": schedule, "num_timesteps": int(d.num_timesteps), "var_type": var_type,
                          "prediction": "eps", "clip_denoised": clip_denoised,
                          "betas": [float(b) for b in d.betas],
                          "timestep_map": [int(v) for v in d.timestep_map]},
            "image_shape": list(image_shape), "num_classes": num_classes, "v_bound": v_bound, **extra}


def save_checkpoint(run: RunDir, trainer: StudentTrainer, config: dict, rng: dict[str, torch.Tensor],
                    pool: Pool | None = None) -> Path:
    """Student, EMA, optimizer, step, RNG states and (for distillation) B+, so a resume skips the warm-up."""
    tmp = run.begin_checkpoint()
    save_pretrained(tmp, trainer.model, config, ema_state=trainer.ema)
    trainer.save_state(tmp)
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    if pool is not None:
        pool.snapshot(str(tmp / "pool.snapshot"))
    run.commit_checkpoint(tmp)
    return run.checkpoint


def load_checkpoint(run: RunDir, trainer: StudentTrainer, pool: Pool | None = None) -> dict[str, torch.Tensor]:
    """Restores the trainer (and the pool) in place; returns the saved RNG states."""
    ck = run.checkpoint
    model, _ = from_pretrained(ck, use_ema=False)
    trainer.model.load_state_dict(model.state_dict())
    ema, _ = from_pretrained(ck, use_ema=True)
    trainer.ema = {k: v.detach().clone().to(trainer.device) for k, v in ema.state_dict().items()}
    trainer.load_state(ck)
    if pool is not None:
        pool.restore(str(ck / "pool.snapshot"))
    return load_file(str(ck / "rng.safetensors"))
