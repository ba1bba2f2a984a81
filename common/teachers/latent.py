"""The first stage of a latent (LDM) teacher: its autoencoder, shared with the students it teaches.

A diffusers LDM folder holds ``vqvae/`` (``VQModel``) or ``vae/`` (``AutoencoderKL``) beside ``unet/``;
the teacher's diffusion runs on latents ``z = scaling_factor * E(x)``. Everything that turns latents
into images (``dkdm sample`` / ``eval``, ``dkdm synth``, sample grids) decodes them here, and the
latent baselines (the paper's, and latent-diffusion's ``encode_first_stage``) encode images here.

A student of a latent teacher records ``{"path", "sha256"}`` of the autoencoder folder in its
``config.json`` (``autoencoder_record``); a checkpoint loaded as a ``dkdm`` teacher reloads it from
there and refuses an autoencoder whose weights changed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.teachers.base import TeacherLoadError

AUTOENCODER_FOLDERS = ("vqvae", "vae")
AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")


def find_autoencoder(root: str | Path) -> Path | None:
    """The ``vqvae/`` or ``vae/`` folder of a diffusers LDM folder, or None (a pixel-space teacher)."""
    return next((Path(root) / n for n in AUTOENCODER_FOLDERS if (Path(root) / n).is_dir()), None)


def load_autoencoder(folder: str | Path, sha256: str | None = None) -> torch.nn.Module:
    """A diffusers ``VQModel`` / ``AutoencoderKL`` from a local folder (eval, no grad); ``sha256`` checked."""
    from common.teachers.diffusers_teacher import _load_model, state_dict_sha256

    folder = Path(folder)
    if not folder.is_dir():
        raise TeacherLoadError(f"autoencoder folder not found: {folder}")
    ae = _load_model(folder, allowed=AUTOENCODER_CLASSES).eval().requires_grad_(False)
    if sha256 is not None and state_dict_sha256(ae) != sha256:
        raise TeacherLoadError(f"autoencoder {folder} has other weights than the ones the checkpoint was trained with")
    return ae


def autoencoder_record(folder: str | Path, ae: torch.nn.Module) -> dict:
    """What a student's config.json keeps of its teacher's autoencoder: absolute folder and weights sha256."""
    from common.teachers.diffusers_teacher import state_dict_sha256

    return {"path": str(Path(folder).resolve()), "sha256": state_dict_sha256(ae)}


def _scale(ae: torch.nn.Module) -> float:
    return float(ae.config.get("scaling_factor", 1.0) or 1.0)


@torch.no_grad()
def decode_latents(ae: torch.nn.Module, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Latents [N, c, h, w] -> images [N, C, H, W] in [-1, 1] on the CPU: D(z / scaling_factor) (LDMPipeline)."""
    device, dtype = next(ae.parameters()).device, next(ae.parameters()).dtype
    out = [ae.decode(z[i:i + batch_size].to(device, dtype) / _scale(ae)).sample.float().clamp(-1, 1).cpu()
           for i in range(0, len(z), batch_size)]
    return torch.cat(out) if out else z.new_zeros((0,))


@torch.no_grad()
def encode_images(ae: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> latents [N, c, h, w] on the CPU: scaling_factor * E(x).

    ``VQModel``: the encoder's output before quantisation (``decode`` quantises), as latent-diffusion's
    ``VQModelInterface.encode``; ``AutoencoderKL``: the posterior's mode (a deterministic training set).
    """
    device, dtype = next(ae.parameters()).device, next(ae.parameters()).dtype
    out = []
    for i in range(0, len(x), batch_size):
        enc = ae.encode(x[i:i + batch_size].to(device, dtype))
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        out.append((z.float() * _scale(ae)).cpu())
    return torch.cat(out)


def teacher_autoencoder(teacher) -> torch.nn.Module | None:
    """A teacher's autoencoder (diffusers LDM folders, checkpoints of their students), None in pixel space."""
    return getattr(teacher, "autoencoder", None)


def teacher_autoencoder_record(teacher) -> dict | None:
    """``autoencoder_record`` of a latent teacher, None for a pixel-space one (a student's config.json field)."""
    ae = teacher_autoencoder(teacher)
    return None if ae is None else autoencoder_record(teacher.autoencoder_path, ae)


def latent_decoder(teacher):
    """``decode(z) -> images`` for a latent teacher's samples, None in pixel space."""
    ae = teacher_autoencoder(teacher)
    return None if ae is None else (lambda z: decode_latents(ae, z))


def config_autoencoder(cfg) -> tuple[torch.nn.Module, dict] | None:
    """The autoencoder of the teacher a ``TeacherConfig`` names, without loading its UNet, with its record:
    a diffusers LDM folder's ``vqvae/`` or ``vae/``, or a latent student's recorded one; None in pixel space."""
    import json

    from common.teachers import check_local_path

    if cfg.kind == "diffusers":
        folder = find_autoencoder(check_local_path(cfg.path, cfg.kind))
        if folder is None:
            return None
        ae = load_autoencoder(folder)
        return ae, autoencoder_record(folder, ae)
    if cfg.kind == "dkdm":
        config_file = check_local_path(cfg.path, cfg.kind) / "config.json"
        record = json.loads(config_file.read_text()).get("autoencoder") if config_file.is_file() else None
        if not record:
            return None
        return load_autoencoder(record["path"], record.get("sha256")), record
    return None
