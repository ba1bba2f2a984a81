"""Strict state-dict loading with one-line errors that name the offending keys.

The reference loads its teacher with ``strict=False``, so a wrong flag silently
gives a broken teacher; here every mismatch is an error.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

MAX_NAMED_KEYS = 5


class TeacherLoadError(RuntimeError):
    """A teacher could not be loaded (missing file, hub id, mismatched keys...): one line, names what is wrong."""


class StateDictMismatch(ValueError):
    """A state dict does not fit a model: missing, unexpected or mis-shaped keys (one line)."""


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED_KEYS])
    return f" ({shown}{', ...' if len(items) > MAX_NAMED_KEYS else ''})" if items else ""


def describe_mismatch(model_state: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``state`` has exactly the keys and shapes of ``model_state``, else one line:

    "missing 2 keys (a, b), unexpected 0, mis-shaped 1 (out.2.weight: checkpoint [6,128,3,3] vs model [3,128,3,3])"
    """
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    misshaped = [f"{k}: checkpoint {_shape(state[k])} vs model {_shape(v)}"
                 for k, v in model_state.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or misshaped):
        return None
    return (f"missing {len(missing)} keys{_named(missing)}, "
            f"unexpected {len(unexpected)}{_named(unexpected)}, "
            f"mis-shaped {len(misshaped)}{_named(misshaped)}")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` (dtype converted) or raise ``StateDictMismatch``."""
    problem = describe_mismatch(model.state_dict(), state)
    if problem is not None:
        raise StateDictMismatch(f"checkpoint does not match the flags: {problem}")
    model.load_state_dict(state, strict=True)
