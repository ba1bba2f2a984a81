"""Checkpoints are config plus weights (diffusers' ConfigMixin idea), no pickle.

A folder holds
- ``config.json``: ``arch``, ``size``, ``flags`` (what ``build_network`` needs)
  and whatever else the caller passes (diffusion settings, step, ...), plus the
  JSON-able part of ``extra`` under ``"extra"``;
- ``model.safetensors``: the network's state dict;
- ``ema.safetensors`` (optional): the EMA weights, same keys;
- ``extra.safetensors`` (optional): the tensor part of ``extra``;
- ``manifest.json`` (training checkpoints): every file's size and SHA-256, written
  last, so a resume can tell a damaged checkpoint from an intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.models.registry import build_network
from common.models.state import describe_mismatch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
EXTRA_NAME = "extra.safetensors"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be read or does not fit its config (one line naming what is wrong)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, non-shared CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_pretrained(folder: str | os.PathLike, model: nn.Module, config: dict,
                    ema_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``, ``extra.safetensors``).

    ``config`` must hold ``arch`` and ``flags`` (``size`` may be None) and be
    JSON-serializable. ``extra`` values that are tensors go to
    ``extra.safetensors``, the rest into ``config.json`` under ``"extra"``.
    Files are written to temporary names and renamed, so a crash leaves the
    previous checkpoint readable.
    """
    for key in ("arch", "flags"):
        if key not in config:
            raise ValueError(f"save_pretrained: config needs {key!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    extra_tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
    extra_json = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    full = dict(config, size=config.get("size"), format_version=FORMAT_VERSION)
    if extra_json:
        full["extra"] = extra_json
    try:
        text = json.dumps(full, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"save_pretrained: config is not JSON-serializable: {e}") from None

    files = {WEIGHTS_NAME: _tensors(unwrap(model).state_dict())}
    if ema_state is not None:
        problem = describe_mismatch(files[WEIGHTS_NAME], ema_state)
        if problem is not None:
            raise ValueError(f"save_pretrained: ema_state does not match the model: {problem}")
        files[EMA_NAME] = _tensors(ema_state)
    if extra_tensors:
        files[EXTRA_NAME] = _tensors(extra_tensors)
    for name, tensors in files.items():
        tmp = folder / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    for name in (EMA_NAME, EXTRA_NAME):   # no stale files from an earlier save
        if name not in files and (folder / name).exists():
            (folder / name).unlink()
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in checkpoint folder {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def from_pretrained(folder: str | os.PathLike, use_ema: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the network from ``config.json`` and load its weights strictly -> (model, config).

    ``use_ema`` loads ``ema.safetensors`` when the folder has one (else the raw
    weights); ``config["loaded_weights"]`` says which ("ema" or "model").
    The model is returned in eval mode on the CPU.
    """
    folder = Path(folder)
    config = read_config(folder)
    for key in ("arch", "flags"):
        if key not in config:
            raise CheckpointError(f"{folder / CONFIG_NAME} lacks {key!r}")
    try:
        model = build_network(config["arch"], config.get("size"), config["flags"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: cannot build the network: {e}") from None
    which = "ema" if use_ema and (folder / EMA_NAME).is_file() else "model"
    path = folder / (EMA_NAME if which == "ema" else WEIGHTS_NAME)
    state = _read_tensors(path)
    problem = describe_mismatch(model.state_dict(), state)
    if problem is not None:
        raise CheckpointError(f"{path} does not match {CONFIG_NAME}: {problem}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, dict(config, loaded_weights=which)


def load_extra(folder: str | os.PathLike) -> dict:
    """The ``extra`` saved with a checkpoint: its JSON part merged with its tensors ({} if none)."""
    folder = Path(folder)
    out = dict(read_config(folder).get("extra", {}))
    if (folder / EXTRA_NAME).is_file():
        out.update(_read_tensors(folder / EXTRA_NAME))
    return out


def load_ema_state(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The EMA state dict of a checkpoint (for resuming training), or None when it has none."""
    path = Path(folder) / EMA_NAME
    return _read_tensors(path) if path.is_file() else None


# --- integrity: a manifest written last, checked before a resume ----------------
MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """``manifest.json``: size and SHA-256 of every file in ``folder``, written last (the commit mark)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def checkpoint_problem(folder: str | os.PathLike, required: tuple[str, ...] = ()) -> str | None:
    """None if ``folder`` is intact, else what is wrong in a few words (the first problem found).

    With a manifest every listed file must have its size and SHA-256 (a truncated or overwritten
    file is caught); without one (written before manifests) the JSON files must parse and the
    safetensors files must open with a header that fits their size.
    """
    folder = Path(folder)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return f"{MANIFEST_NAME} is not readable"
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != want["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
            if _sha256(path) != want["sha256"]:
                return f"{name} does not match its checksum"
        return None
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"{path.name} is not valid JSON"
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            except (SafetensorError, OSError, ValueError) as e:
                return f"{path.name} is not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None
