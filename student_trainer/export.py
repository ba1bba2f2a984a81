"""``dkdm export``: a checkpoint folder as a diffusers ``DDPMPipeline`` folder (docs/export.md).

The UNet comes from ``common.models.diffusers_unet`` (ADM -> ``UNet2DModel``, weights renamed).
The scheduler is a ``DDPMScheduler`` on the network's full chain (``trained_betas``) with the
checkpoint's variance type; a student distilled on a respaced chain gets the full chain rebuilt
from its schedule name, and the ``timestep_spacing`` under which ``num_inference_steps`` equal to
the chain's length visits exactly the timesteps the student was trained on:

    guided-diffusion "N"              -> timestep_spacing="linspace"
    "ddimN" with N dividing T         -> timestep_spacing="leading" (steps_offset=0)
    anything else                     -> no spacing reproduces it: logged, and the exact timesteps
                                         are written to dkdm_export.json for set_timesteps(timesteps=...)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from common.diffusion import Diffusion, get_named_beta_schedule
from common.models.checkpoint import CheckpointError, from_pretrained
from common.models.diffusers_unet import ExportError, to_unet2d
from common.teachers.dkdm_teacher import checkpoint_v_bound

logger = logging.getLogger(__name__)

# The project's variance types as DDPMScheduler's. "learned" has none: diffusers' learned head
# outputs a variance, this project's (guided-diffusion's) a log variance.
_VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}
EXPORT_INFO = "dkdm_export.json"


def export_diffusers(checkpoint: str, out: str, use_ema: bool = True) -> dict:
    """Write ``out`` as a ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``).

    Raises ``ExportError`` (one line) for a layout, variance type or chain diffusers cannot express.
    """
    from diffusers import DDPMPipeline

    try:
        model, config = from_pretrained(checkpoint, use_ema=use_ema)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if "diffusion" not in config:
        raise ExportError(f"{checkpoint}/config.json has no 'diffusion' section: not a DKDM student checkpoint")
    unet = to_unet2d(model)
    scheduler, info = ddpm_scheduler(config["diffusion"])
    info["v_bound"] = v_bound_note(config)
    out_dir = Path(out)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out_dir), safe_serialization=True)
    info = dict(info, source=str(checkpoint), weights=config["loaded_weights"], v_bound=checkpoint_v_bound(config))
    if info["var_type"] == "learned_range" and info["v_bound"] != "none":
        logger.warning("the student's Eq. 12 v was trained with v_bound=%s but DDPMScheduler uses it raw: apply it "
                       "to the UNet output's variance half before scheduler.step (recorded in %s)",
                       info["v_bound"], EXPORT_INFO)
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {"export": str(out_dir), "num_inference_steps": info["num_inference_steps"],
            "timestep_spacing": info["timestep_spacing"]}


def v_bound_note(config: dict) -> str:
    """The checkpoint's bound on the Eq. 12 v; a bounded one is said once (DDPMScheduler does not bound it)."""
    from common.teachers.dkdm_teacher import checkpoint_v_bound

    v_bound = checkpoint_v_bound(config)
    if v_bound != "none" and config["diffusion"].get("var_type") == "learned_range":
        logger.warning("the student bounds its learned-range v with %r when it samples; DDPMScheduler interpolates "
                       "the log variance with the raw v, so the exported sampler's variance differs where |v| > 1 "
                       "(the UNet's outputs are the same)", v_bound)
    return v_bound


def ddpm_scheduler(section: dict):
    """A checkpoint's ``diffusion`` section -> (DDPMScheduler, facts for dkdm_export.json)."""
    from diffusers import DDPMScheduler

    from common.teachers.base import TeacherLoadError
    from common.teachers.dkdm_teacher import checkpoint_diffusion

    try:
        cfg, chain = checkpoint_diffusion(section)
    except TeacherLoadError as err:
        raise ExportError(str(err)) from None
    if cfg.var_type not in _VARIANCE_TYPES:
        raise ExportError(f"var_type {cfg.var_type!r} has no DDPMScheduler variance_type (diffusers' 'learned' "
                          "expects a variance, this network outputs a log variance)")
    if cfg.prediction != "eps":
        raise ExportError(f"prediction {cfg.prediction!r}: students predict eps")
    full = full_chain(chain, cfg.schedule)
    kept = [int(t) for t in chain.timestep_map]
    common = dict(num_train_timesteps=len(full), trained_betas=[float(b) for b in full],
                  variance_type=_VARIANCE_TYPES[cfg.var_type], clip_sample=cfg.clip_denoised,
                  clip_sample_range=1.0, prediction_type="epsilon", steps_offset=0)
    for spacing in ("leading", "linspace"):
        scheduler = DDPMScheduler(**common, timestep_spacing=spacing)
        scheduler.set_timesteps(len(kept))
        if sorted(int(t) for t in scheduler.timesteps) == kept:
            break
    else:
        scheduler = DDPMScheduler(**common, timestep_spacing="leading")
        spacing = None
        logger.warning("the student's %d-step chain is no diffusers timestep_spacing of the %d-step chain: "
                       "sample it exactly with scheduler.set_timesteps(timesteps=...) from %s",
                       len(kept), len(full), EXPORT_INFO)
    return scheduler, {"num_inference_steps": len(kept), "timestep_spacing": spacing,
                       "trained_timesteps": kept[::-1], "var_type": cfg.var_type}


def full_chain(chain: Diffusion, schedule: str) -> np.ndarray:
    """The betas of the full chain ``chain`` was respaced from (``chain``'s own when not respaced).

    A respaced checkpoint stores the kept steps' betas and their original timesteps, not the
    original length T: T is the smallest length whose named schedule has the checkpoint's
    alphas_cumprod at those timesteps.
    """
    kept = np.asarray(chain.timestep_map)
    if np.array_equal(kept, np.arange(chain.num_timesteps)):
        return np.asarray(chain.betas)
    first = int(kept[-1]) + 1
    for length in range(first, 2 * first + 1):
        betas = get_named_beta_schedule(schedule, length)
        if np.allclose(np.cumprod(1.0 - betas)[kept], chain.alphas_cumprod, rtol=1e-9, atol=0):
            return betas
    raise ExportError(f"the student's chain is a respacing of no {schedule!r} chain of {first} to {2 * first} "
                      "steps: cannot rebuild the full chain DDPMScheduler needs")
