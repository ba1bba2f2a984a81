"""The project's own checkpoints as teachers (a distilled student can teach the next one).

A checkpoint folder (``common.models.checkpoint``) holds ``config.json`` + ``model.safetensors``
(+ ``ema.safetensors``). Besides the network's ``arch``/``size``/``flags`` its config.json holds
- ``diffusion``: the ``DiffusionConfig`` fields of the chain the network was trained on, and
  optionally that chain's exact ``betas`` and ``timestep_map`` (student_trainer/checkpoints.py
  writes them, so a student trained on a respaced chain is rebuilt on exactly that chain);
- ``image_shape`` [C, H, W] and ``num_classes`` (null when unconditional);
- ``autoencoder`` (students of a latent teacher): ``{"path", "sha256"}`` of the teacher's autoencoder,
  which decodes the samples (``common/teachers/latent.py``);
- ``v_bound``: the bound on the Eq. 12 v the network was trained with (``bound_v``), applied to its
  output here as in training; ``none`` where absent (checkpoints written before it was recorded).
The network follows the student contract (common/models/__init__.py): ``forward(x, t, y=None)``
on original timesteps returns eps [N, C, H, W] or eps and the variance values [N, 2C, H, W].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from common.config import DiffusionConfig
from common.diffusion import V_BOUNDS, Diffusion, bound_v, eps_from_prediction, make_diffusion, respace
from common.teachers.base import Teacher, TeacherLoadError


def checkpoint_diffusion(section: dict, source: str = "config.json") -> tuple[DiffusionConfig, Diffusion]:
    """A checkpoint's ``diffusion`` section -> (its DiffusionConfig, the chain it was trained on)."""
    if not isinstance(section, dict):
        raise TeacherLoadError(f"{source}: 'diffusion' must be a mapping of DiffusionConfig fields")
    fields = {k: v for k, v in section.items() if k not in ("betas", "timestep_map")}
    try:
        cfg = DiffusionConfig(**fields)
    except ValidationError as err:
        e = err.errors()[0]
        raise TeacherLoadError(f"{source}: diffusion.{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    if "betas" not in section:
        return cfg, make_diffusion(cfg.schedule, cfg.num_timesteps, cfg.respacing)
    betas = np.asarray(section["betas"], dtype=np.float64)
    if betas.shape != (cfg.num_timesteps,):
        raise TeacherLoadError(f"{source}: diffusion.betas has {betas.size} values but num_timesteps is {cfg.num_timesteps}")
    timestep_map = section.get("timestep_map")
    try:
        d = Diffusion.from_betas(betas, None if timestep_map is None else np.asarray(timestep_map, dtype=np.int64))
    except ValueError as err:
        raise TeacherLoadError(f"{source}: diffusion.betas: {err}") from None
    return cfg, d


def checkpoint_v_bound(config: dict, source: str = "config.json") -> str:
    """A checkpoint config's ``v_bound`` (``none`` when absent), checked against ``V_BOUNDS``."""
    v_bound = config.get("v_bound", "none")
    if v_bound not in V_BOUNDS:
        raise TeacherLoadError(f"{source}: v_bound must be one of {', '.join(V_BOUNDS)}, got {v_bound!r}")
    return v_bound


class DKDMTeacher(Teacher):
    """A network saved by this project, on the chain of its checkpoint (optionally respaced further)."""

    def __init__(self, model: torch.nn.Module, config: dict, device: torch.device | str = "cpu",
                 respacing: str = "", source: str = ""):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = config
        self.source = source
        for key in ("diffusion", "image_shape"):
            if key not in config:
                raise TeacherLoadError(f"{source or 'checkpoint'}/config.json lacks {key!r}: not a DKDM checkpoint")
        self.diffusion_cfg, network_chain = checkpoint_diffusion(config["diffusion"], f"{source}/config.json")
        self.respacing = respacing
        try:
            self.diffusion = respace(network_chain, respacing)
        except ValueError as err:
            raise TeacherLoadError(f"teacher.diffusion.respacing={respacing!r} on the checkpoint's "
                                   f"{network_chain.num_timesteps}-step chain: {err}") from None
        self.var_type = self.diffusion_cfg.var_type
        self.prediction = self.diffusion_cfg.prediction
        self.clip_denoised = self.diffusion_cfg.clip_denoised
        shape = config["image_shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
            raise TeacherLoadError(f"{source}/config.json: image_shape must be [C, H, W], got {shape!r}")
        self.image_shape = tuple(int(s) for s in shape)
        k = config.get("num_classes")
        self.num_classes = int(k) if k is not None else None
        self.v_bound = checkpoint_v_bound(config, f"{source}/config.json")
        # A student of a latent teacher works on latents; its teacher's autoencoder decodes them.
        self.autoencoder, self.autoencoder_path = None, None
        record = config.get("autoencoder")
        if record:
            from common.teachers.latent import load_autoencoder
            self.autoencoder_path = record["path"]
            self.autoencoder = load_autoencoder(record["path"], record.get("sha256")).to(self.device)

    @classmethod
    def from_folder(cls, path: str, device: torch.device | str = "cpu", use_ema: bool = True,
                    respacing: str = "") -> "DKDMTeacher":
        """``from_pretrained(path, use_ema)`` (strict weights) wrapped as a teacher."""
        from common.models.checkpoint import CheckpointError, from_pretrained

        if not Path(path).is_dir():
            raise TeacherLoadError(f"DKDM checkpoint folder not found: {path}")
        try:
            model, config = from_pretrained(path, use_ema=use_ema)
        except CheckpointError as err:
            raise TeacherLoadError(str(err)) from None
        return cls(model, config, device=device, respacing=respacing, source=str(path))

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t [N, C, H, W], t [N] chain indices, y [N] labels -> (eps, var_values or None), in x_t's dtype."""
        t = torch.as_tensor(t, device=self.device).long()
        x = x_t.to(device=self.device, dtype=torch.float32)
        ts = self.diffusion.map_timesteps(t)
        if self.num_classes is None:
            out = self.model(x, ts)
        elif y is None:
            raise ValueError(f"this teacher is class-conditional ({self.num_classes} classes): predict needs labels y [N]")
        else:
            out = self.model(x, ts, torch.as_tensor(y, device=self.device).long())
        out = out.float()
        c = self.image_shape[0]
        want = c * (2 if self.learned_variance else 1)
        if out.shape[1] != want:
            raise ValueError(f"checkpoint {self.source!r}: the network returns {out.shape[1]} channels but "
                             f"var_type {self.var_type!r} with {c} image channels needs {want}")
        out, var_values = (out[:, :c], bound_v(out[:, c:], self.v_bound)) if self.learned_variance else (out, None)
        eps = eps_from_prediction(self.diffusion, x, t, out, self.prediction)
        cast = lambda v: None if v is None else v.to(device=x_t.device, dtype=x_t.dtype)  # noqa: E731
        return cast(eps), cast(var_values)

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    def identity(self) -> dict:
        from common.teachers.diffusers_teacher import state_dict_sha256

        d = self.diffusion
        return {
            "kind": "dkdm",
            "weights_sha256": state_dict_sha256(self.model),
            "loaded_weights": self.config.get("loaded_weights"),
            "arch": self.config.get("arch"),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "diffusion": self.diffusion_cfg.model_dump(),
            "respacing": self.respacing,
            "chain_fingerprint": d.fingerprint(),
            "chain_length": int(d.num_timesteps),
            "timestep_map": [int(i) for i in d.timestep_map],
        }
