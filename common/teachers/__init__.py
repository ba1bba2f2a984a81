"""Teachers: one contract (``base.Teacher``), one adapter per foreign format, one factory.

``make_teacher(cfg, device)`` dispatches on ``cfg.kind``:
- ``analytic``: the exact Gaussian mixture (``analytic.AnalyticTeacher``), no file;
- ``guided_diffusion``: a ``.pt`` state dict plus ``create_model`` flags (``guided``);
- ``diffusers``: a local diffusers folder (``diffusers_teacher``);
- ``dkdm``: one of this project's checkpoint folders (``dkdm_teacher``).
Adapters are imported inside ``make_teacher`` so a missing optional dependency (diffusers)
only matters to the teachers that need it. Paths are local only: a missing path or a
model-hub id is a one-line ``TeacherLoadError``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from common.config import TeacherConfig
from common.teachers.base import Teacher, TeacherLoadError

__all__ = ["Teacher", "TeacherLoadError", "make_teacher", "resolve_device"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the repository root (or site-packages when installed)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``"auto"`` (or None) -> cuda when available, else cpu; anything else as torch.device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_local_path(path: str | None, kind: str) -> Path:
    """The teacher path as a local Path, or a one-line TeacherLoadError (missing, hub id, URL)."""
    if not path:
        raise TeacherLoadError(f"teacher.path is required for teacher.kind={kind!r}")
    p = Path(path).expanduser()
    if p.exists():
        return p
    # A relative path that is not under the CWD (e.g. common/assets/digits_teacher from another
    # folder, or the package installed elsewhere) is tried against the folder that holds `common/`.
    root_relative = PACKAGE_ROOT / p
    if not p.is_absolute() and root_relative.exists():
        return root_relative
    if _URL.match(str(path)) or _HUB_ID.match(str(path)):
        raise TeacherLoadError(f"teacher path {str(path)!r} looks like a URL or model-hub id, not a local path; "
                               f"download it to a local folder first (no network access at run time)")
    raise TeacherLoadError(f"teacher path not found: {path}")


def make_teacher(cfg: TeacherConfig, device: torch.device | str | None = None) -> Teacher:
    """The teacher ``cfg`` describes, on ``device`` (default ``cfg.device``; ``"auto"`` picks cuda if present).

    The distillation chain's respacing is ``cfg.diffusion.respacing`` for every kind; the rest
    of ``cfg.diffusion`` describes the network's diffusion for ``analytic`` and
    ``guided_diffusion`` (diffusers and dkdm checkpoints carry their own).
    """
    device = resolve_device(cfg.device if device is None else device)
    respacing = cfg.diffusion.respacing
    if cfg.kind == "analytic":
        from common.teachers.analytic import AnalyticTeacher

        return AnalyticTeacher.from_config(cfg.analytic, cfg.diffusion, device=device,
                                           class_conditional=cfg.analytic.class_conditional)
    path = check_local_path(cfg.path, cfg.kind)
    if cfg.kind == "guided_diffusion":
        from common.teachers.guided import GuidedDiffusionTeacher

        if not path.is_file():
            raise TeacherLoadError(f"guided-diffusion teacher path {str(path)!r} is not a file (expected a .pt state dict)")
        return GuidedDiffusionTeacher.from_checkpoint(str(path), cfg.flags, cfg.diffusion, device=device)
    if cfg.kind == "diffusers":
        from common.teachers.diffusers_teacher import DiffusersTeacher

        return DiffusersTeacher.from_folder(str(path), device=device, respacing=respacing)
    if cfg.kind == "dkdm":
        from common.teachers.dkdm_teacher import DKDMTeacher

        return DKDMTeacher.from_folder(str(path), device=device, use_ema=cfg.use_ema, respacing=respacing)
    raise TeacherLoadError(f"unknown teacher.kind {cfg.kind!r}")
