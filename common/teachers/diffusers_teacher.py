"""Teachers saved by diffusers: a ``UNet2DModel`` plus its scheduler config, read from a local folder.

Layouts accepted (all local; nothing is fetched from a hub):
- a pipeline folder as ``DDPMPipeline`` / ``DDIMPipeline`` ``save_pretrained`` write it:
  ``unet/`` and ``scheduler/scheduler_config.json``;
- a bare ``UNet2DModel`` folder (``config.json`` + weights) with ``scheduler_config.json``
  beside the weights or in a ``scheduler/`` subfolder;
- the latent (LDM) layout: ``unet/``, ``vqvae/`` (``VQModel``) or ``vae/`` (``AutoencoderKL``),
  ``scheduler/``. The teacher then works on latents and ``decode`` maps them to images.

The scheduler config becomes a float64 ``Diffusion`` (the network's full chain, then respaced
when asked). The network's prediction (epsilon, v_prediction, sample) is converted to eps at
this boundary, so the rest of the code sees one contract (``common/teachers/base.py``).

Respacing (``teacher.diffusion.respacing``) against diffusers' ``timestep_spacing`` for
``num_inference_steps = N`` of a T-step chain (docs/diffusers.md):
- ``"leading"`` (steps_offset 0) is ``"ddimN"``, but only when N divides T (else ddimN's stride differs);
- ``"linspace"`` is ``"N"`` (guided-diffusion's one-section spacing, both round i (T - 1) / (N - 1));
- ``"trailing"`` and any ``steps_offset`` > 0 have no respacing string; loading such a scheduler
  says so in one warning line, and the chain follows ``teacher.diffusion.respacing``.

``variance_type="fixed_large_log"`` (GLIDE's max_log: log beta_t) is fixed_large's variance in log
form, so it is mapped to ``fixed_large`` explicitly: both add noise of variance beta_t at every
step t >= 1, and neither adds noise at t = 0 (where this project's fixed_large keeps
posterior_variance[1] for the decoder likelihood, as improved-diffusion). ``fixed_small_log`` is
``fixed_small``'s standard deviation taken through a log: the same variance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.diffusion import Diffusion, eps_from_prediction, get_named_beta_schedule, respace
from common.teachers.base import Teacher, TeacherLoadError

logger = logging.getLogger(__name__)

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' variance types in guided-diffusion's terms; the *_log forms carry the same variance
# (see the module docstring for fixed_large_log).
_VAR_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
              "learned": "learned", "learned_range": "learned_range"}
_AUTOENCODERS = ("VQModel", "AutoencoderKL")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class SchedulerSettings:
    """What a diffusers scheduler config means for this project (guided-diffusion's terms)."""

    betas: np.ndarray        # float64 [T] of the network's full chain
    prediction: str          # eps | v | x0
    var_type: str            # fixed_small | fixed_large | learned | learned_range
    clip_denoised: bool
    learned_is_variance: bool  # diffusers' "learned" outputs a variance, guided-diffusion's a log variance
    summary: dict            # the config entries that decide the above


def scheduler_settings(config: dict) -> SchedulerSettings:
    """A diffusers scheduler config dict (DDPM/DDIM-style keys, diffusers' defaults) -> ``SchedulerSettings``."""
    T = int(config.get("num_train_timesteps", 1000))
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.shape != (T,):
            raise TeacherLoadError(f"scheduler trained_betas has {betas.size} values but num_train_timesteps is {T}")
    elif beta_schedule == "linear":
        # diffusers' linear schedule takes beta_start/beta_end as they are (no 1000 / T scaling).
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = get_named_beta_schedule("scaled_linear", T, linear_start=beta_start, linear_end=beta_end)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = get_named_beta_schedule("cosine", T)
    else:
        raise TeacherLoadError(f"unsupported scheduler beta_schedule {beta_schedule!r}; expected linear, scaled_linear, squaredcos_cap_v2 or trained_betas")
    if config.get("rescale_betas_zero_snr", False):
        raise TeacherLoadError("unsupported scheduler option rescale_betas_zero_snr=true (alpha_bar_T = 0 has no eps parameterization)")
    if config.get("thresholding", False):
        raise TeacherLoadError("unsupported scheduler option thresholding=true (only clipping x0 to [-1, 1] is supported)")

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise TeacherLoadError(f"unsupported scheduler prediction_type {prediction_type!r}; expected one of {', '.join(_PREDICTIONS)}")
    variance_type = config.get("variance_type") or "fixed_small"   # DDIMScheduler configs have none
    if variance_type not in _VAR_TYPES:
        raise TeacherLoadError(f"unsupported scheduler variance_type {variance_type!r}; expected one of {', '.join(_VAR_TYPES)}")
    clip = bool(config.get("clip_sample", True))
    clip_range = float(config.get("clip_sample_range", 1.0))
    if clip and clip_range != 1.0:
        raise TeacherLoadError(f"unsupported scheduler clip_sample_range {clip_range}; only 1.0 (x0 clipped to [-1, 1]) is supported")

    if variance_type == "fixed_large_log":
        logger.info("scheduler variance_type fixed_large_log is taken as fixed_large (variance beta_t at t >= 1)")
    spacing, offset = config.get("timestep_spacing", "leading"), int(config.get("steps_offset", 0) or 0)
    if spacing not in ("leading", "linspace") or offset:
        logger.warning("scheduler timestep_spacing=%r with steps_offset=%d has no respacing string: the chain "
                       "follows teacher.diffusion.respacing ('ddimN' = leading when N divides T, 'N' = linspace)",
                       spacing, offset)
    summary = {"_class_name": config.get("_class_name"), "num_train_timesteps": T, "beta_schedule": beta_schedule,
               "beta_start": beta_start, "beta_end": beta_end, "trained_betas": trained is not None,
               "prediction_type": prediction_type, "variance_type": variance_type, "clip_sample": clip,
               "timestep_spacing": spacing, "steps_offset": offset}
    return SchedulerSettings(betas=betas, prediction=_PREDICTIONS[prediction_type], var_type=_VAR_TYPES[variance_type],
                             clip_denoised=clip, learned_is_variance=(variance_type == "learned"), summary=summary)


class DiffusersTeacher(Teacher):
    """A diffusers ``UNet2DModel`` on the chain of its scheduler (optionally respaced).

    ``predict`` maps chain indices to the network's timesteps, calls the UNet (with
    ``class_labels`` when it has ``num_class_embeds``) and returns eps plus the raw variance
    half of a learned-variance output. diffusers' ``learned`` variance head outputs a variance
    (its scheduler takes the square root), so it is returned as a log variance here, the
    project's ``learned`` contract; ``learned_range`` v is passed through as is.
    """

    def __init__(self, unet: torch.nn.Module, settings: SchedulerSettings, device: torch.device | str = "cpu",
                 respacing: str = "", autoencoder: torch.nn.Module | None = None, source: str = ""):
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.settings = settings
        self.diffusion: Diffusion = respace(Diffusion.from_betas(settings.betas), respacing)
        self.respacing = respacing
        count = respacing[len("ddim"):] if respacing.startswith("ddim") else ""
        if count.isdigit() and len(settings.betas) % int(count):
            logger.warning("respacing %r: %d steps do not divide %d, so the chain is not diffusers' leading spacing "
                           "of num_inference_steps=%s", respacing, int(count), len(settings.betas), count)
        self.prediction = settings.prediction
        self.var_type = settings.var_type
        self.clip_denoised = settings.clip_denoised
        cfg = unet.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.image_shape = (int(cfg.in_channels), int(size[0]), int(size[1]))
        self.num_classes = int(cfg.num_class_embeds) if cfg.get("num_class_embeds") else None
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False) if autoencoder is not None else None
        self.autoencoder_path: Path | None = None     # its folder, recorded by students (common/teachers/latent.py)
        self.source = source
        expected_out = cfg.in_channels * (2 if self.learned_variance else 1)
        if cfg.out_channels != expected_out:
            raise TeacherLoadError(f"UNet has out_channels={cfg.out_channels} but variance_type {self.var_type!r} "
                                   f"with in_channels={cfg.in_channels} needs {expected_out}")

    @classmethod
    def from_folder(cls, path: str, device: torch.device | str = "cpu", respacing: str = "") -> "DiffusersTeacher":
        """Load a local diffusers folder (see the module docstring for the layouts)."""
        root = Path(path)
        if not root.exists():
            if _HUB_ID.match(str(path)):
                raise TeacherLoadError(f"teacher path {str(path)!r} is not a local folder; download the model to a "
                                       f"local folder first (no network access at run time)")
            raise TeacherLoadError(f"teacher path {str(path)!r} does not exist")
        if not root.is_dir():
            raise TeacherLoadError(f"teacher path {str(path)!r} is not a folder (expected a diffusers save_pretrained folder)")

        if (root / "unet").is_dir():
            unet_dir = root / "unet"
        elif (root / "config.json").is_file():
            unet_dir = root
        else:
            raise TeacherLoadError(f"no diffusers UNet in {str(path)!r}: expected a unet/ subfolder or a config.json")
        scheduler_file = next((f for f in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
                               if f.is_file()), None)
        if scheduler_file is None:
            raise TeacherLoadError(f"no scheduler config in {str(path)!r}: expected scheduler/scheduler_config.json or scheduler_config.json")
        settings = scheduler_settings(_read_json(scheduler_file))

        unet = _load_model(unet_dir, allowed=("UNet2DModel",))
        ae_dir = next((root / name for name in ("vqvae", "vae") if (root / name).is_dir()), None)
        autoencoder = _load_model(ae_dir, allowed=_AUTOENCODERS) if ae_dir is not None else None
        teacher = cls(unet, settings, device=device, respacing=respacing, autoencoder=autoencoder, source=str(root))
        teacher.autoencoder_path = ae_dir
        return teacher

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t [N, C, H, W], t [N] chain indices, y [N] class labels -> (eps, var_values or None), in x_t's dtype."""
        t = torch.as_tensor(t, device=self.device).long()
        x = x_t.to(self.device)
        class_labels = None
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"this diffusers teacher is class-conditional ({self.num_classes} classes): predict needs labels y [N]")
            class_labels = torch.as_tensor(y, device=self.device).long()
        out = self.unet(x.to(self.unet.dtype), self.diffusion.map_timesteps(t), class_labels=class_labels).sample.float()
        c = self.image_shape[0]
        out, var_values = (out[:, :c], out[:, c:]) if self.learned_variance else (out, None)
        eps = eps_from_prediction(self.diffusion, x.float(), t, out, self.prediction)
        if var_values is not None and self.settings.learned_is_variance:
            var_values = torch.log(var_values)
        cast = lambda v: None if v is None else v.to(device=x_t.device, dtype=x_t.dtype)  # noqa: E731
        return cast(eps), cast(var_values)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, c, h, w] -> images [N, 3, H, W] in [-1, 1] (LDMPipeline: divide by scaling_factor, decode)."""
        if self.autoencoder is None:
            raise ValueError(f"teacher {self.source!r} has no autoencoder (no vqvae/ or vae/ folder): it works on images, not latents")
        scale = float(self.autoencoder.config.get("scaling_factor", 1.0) or 1.0)
        z = latents.to(device=self.device, dtype=self.autoencoder.dtype) / scale
        return self.autoencoder.decode(z).sample.float().clamp(-1, 1)

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    def identity(self) -> dict:
        d = self.diffusion
        return {
            "kind": "diffusers",
            "weights_sha256": state_dict_sha256(self.unet),
            "autoencoder_sha256": state_dict_sha256(self.autoencoder) if self.autoencoder is not None else None,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "prediction": self.prediction,
            "var_type": self.var_type,
            "clip_denoised": self.clip_denoised,
            "scheduler": self.settings.summary,
            "respacing": self.respacing,
            "chain_fingerprint": d.fingerprint(),
            "chain_length": int(d.num_timesteps),
            "timestep_map": [int(i) for i in np.asarray(d.timestep_map)],
        }


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the sorted state dict: each key, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        v = value.detach().cpu().contiguous()
        digest.update(f"{key}:{v.dtype}:{tuple(v.shape)}".encode())
        digest.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TeacherLoadError(f"cannot read {str(path)!r}: {err}") from None


def _load_model(folder: Path, allowed: tuple[str, ...]) -> torch.nn.Module:
    import diffusers  # heavy: imported only when a diffusers teacher is loaded

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TeacherLoadError(f"no config.json in {str(folder)!r}")
    class_name = _read_json(config_file).get("_class_name")
    if class_name not in allowed:
        raise TeacherLoadError(f"{str(folder)!r} holds a {class_name!r}; expected {' or '.join(allowed)}")
    try:
        return getattr(diffusers, class_name).from_pretrained(str(folder), local_files_only=True,
                                                             low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherLoadError(f"cannot load {class_name} from {str(folder)!r}: {first_line}") from None
