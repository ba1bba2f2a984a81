"""Teachers in openai/guided-diffusion's format: a ``create_model`` UNet plus a ``.pt`` state dict.

guided-diffusion keeps the network flags (``create_model``) apart from the diffusion flags
(``create_gaussian_diffusion``). Here the network flags are ``teacher.flags`` and the
diffusion is ``teacher.diffusion`` (a ``DiffusionConfig``):

    noise_schedule   -> schedule            diffusion_steps    -> num_timesteps
    learn_sigma      -> var_type learned_range (else fixed_large, or fixed_small with sigma_small)
    predict_xstart   -> prediction x0       timestep_respacing -> respacing
    rescale_timesteps: must be false (the network sees the original integer timesteps)

Diffusion flags copied into ``teacher.flags`` from a guided-diffusion command line are
accepted when they agree with ``teacher.diffusion`` and rejected (one line) when they do not,
so a pasted flag set cannot silently disagree with the config.
"""

from __future__ import annotations

import torch

from common.config import DiffusionConfig
from common.diffusion import eps_from_prediction, make_diffusion
from common.teachers.base import Teacher, TeacherLoadError

# guided-diffusion's diffusion flags (script_util.diffusion_defaults) that create_model does not take.
DIFFUSION_FLAGS = ("noise_schedule", "diffusion_steps", "sigma_small", "predict_xstart", "rescale_timesteps",
                   "timestep_respacing", "use_kl", "rescale_learned_sigmas")


def _expected_diffusion_flags(cfg: DiffusionConfig) -> dict:
    """The guided-diffusion flag values that ``cfg`` corresponds to (those that have an equivalent)."""
    learned = cfg.var_type in ("learned", "learned_range")
    expected = {"noise_schedule": cfg.schedule, "diffusion_steps": cfg.num_timesteps,
                "predict_xstart": cfg.prediction == "x0", "rescale_timesteps": False,
                "timestep_respacing": cfg.respacing, "learn_sigma": learned}
    if not learned:
        expected["sigma_small"] = cfg.var_type == "fixed_small"
    return expected


def split_guided_flags(flags: dict, diffusion_cfg: DiffusionConfig) -> dict:
    """guided-diffusion flags -> the ``create_model`` flags, checked against ``diffusion_cfg``.

    Diffusion flags must agree with the config (TeacherLoadError names the first that does not);
    ``learn_sigma`` is filled in from the config's var_type when absent. ``learned`` (a raw log
    variance head) is not a guided-diffusion variance type and is accepted as learn_sigma too.
    """
    expected = _expected_diffusion_flags(diffusion_cfg)
    if diffusion_cfg.prediction == "v":
        raise TeacherLoadError("teacher.diffusion.prediction='v' does not exist in guided-diffusion (eps or x0)")
    for name, want in expected.items():
        if name in flags and name != "timestep_respacing" and _norm(flags[name]) != _norm(want):
            field = {"noise_schedule": "schedule", "diffusion_steps": "num_timesteps", "predict_xstart": "prediction",
                     "learn_sigma": "var_type", "sigma_small": "var_type"}.get(name)
            if field is None:
                raise TeacherLoadError(f"teacher.flags.{name}={flags[name]!r} is not supported (must be {want!r})")
            raise TeacherLoadError(f"teacher.flags.{name}={flags[name]!r} disagrees with "
                                   f"teacher.diffusion.{field}={getattr(diffusion_cfg, field)!r}")
    # The chain to distil on is teacher.diffusion.respacing; a pasted sampling respacing is ignored.
    model_flags = {k: v for k, v in flags.items() if k not in DIFFUSION_FLAGS}
    model_flags.setdefault("learn_sigma", expected["learn_sigma"])
    return model_flags


def _norm(value):
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


class GuidedDiffusionTeacher(Teacher):
    """A guided-diffusion ``UNetModel`` (``common.models.create_model``) on a ``DiffusionConfig`` chain.

    ``predict`` maps chain indices to the network's original timesteps (rescale_timesteps is
    false), splits a learn_sigma output [N, 2C, H, W] into eps and the raw variance values, and
    converts an x0 prediction to eps.
    """

    def __init__(self, model: torch.nn.Module, diffusion_cfg: DiffusionConfig, device: torch.device | str = "cpu",
                 source: str = ""):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.diffusion_cfg = diffusion_cfg
        self.diffusion = make_diffusion(diffusion_cfg.schedule, diffusion_cfg.num_timesteps, diffusion_cfg.respacing)
        self.var_type = diffusion_cfg.var_type
        self.prediction = diffusion_cfg.prediction
        self.clip_denoised = diffusion_cfg.clip_denoised
        self.source = source
        c = int(model.in_channels)
        self.image_shape = (c, int(model.image_size), int(model.image_size))
        label_emb = getattr(model, "label_emb", None)
        self.num_classes = int(label_emb.num_embeddings) if label_emb is not None else None
        expected_out = c * (2 if self.learned_variance else 1)
        if int(model.out_channels) != expected_out:
            raise TeacherLoadError(f"guided-diffusion model has out_channels={model.out_channels} but "
                                   f"teacher.diffusion.var_type={self.var_type!r} with {c} channels needs {expected_out} "
                                   f"(learn_sigma={'true' if self.learned_variance else 'false'})")

    @classmethod
    def from_checkpoint(cls, path: str, flags: dict, diffusion_cfg: DiffusionConfig,
                        device: torch.device | str = "cpu") -> "GuidedDiffusionTeacher":
        """``create_model(**flags)`` with the ``.pt`` state dict at ``path`` loaded strictly."""
        from common.models import load_guided_diffusion  # networks only when this teacher is used

        model = load_guided_diffusion(str(path), split_guided_flags(flags, diffusion_cfg))
        return cls(model, diffusion_cfg, device=device, source=str(path))

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t [N, C, H, W], t [N] chain indices, y [N] labels -> (eps, var_values or None), in x_t's dtype."""
        t = torch.as_tensor(t, device=self.device).long()
        x = x_t.to(device=self.device, dtype=torch.float32)
        if self.num_classes is None:
            y = None
        elif y is None:
            raise ValueError(f"this guided-diffusion teacher is class-conditional ({self.num_classes} classes): "
                             f"predict needs labels y [N]")
        else:
            y = torch.as_tensor(y, device=self.device).long()
        out = self.model(x, self.diffusion.map_timesteps(t), y).float()
        c = self.image_shape[0]
        out, var_values = (out[:, :c], out[:, c:]) if self.learned_variance else (out, None)
        eps = eps_from_prediction(self.diffusion, x, t, out, self.prediction)
        return _cast(eps, x_t), (None if var_values is None else _cast(var_values, x_t))

    def identity(self) -> dict:
        from common.teachers.diffusers_teacher import state_dict_sha256

        d = self.diffusion
        return {
            "kind": "guided_diffusion",
            "weights_sha256": state_dict_sha256(self.model),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "diffusion": self.diffusion_cfg.model_dump(),
            "chain_fingerprint": d.fingerprint(),
            "chain_length": int(d.num_timesteps),
            "timestep_map": [int(i) for i in d.timestep_map],
        }


def _cast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype)
