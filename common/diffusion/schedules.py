"""Beta schedules and timestep respacing (improved-diffusion / guided-diffusion semantics).

Every table is a float64 numpy array of length T (the number of diffusion steps),
indexed by the 0-based chain index t (t = T-1 is the noisiest step).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULE_NAMES = ("linear", "cosine", "scaled_linear")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretize a continuous alpha_bar(s), s in [0, 1], into T betas (IDDPM Eq. 17 and the text after it).

    beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta); max_beta < 1 avoids the
    singularity at s = 1 where alpha_bar reaches 0.
    """
    _check_num_timesteps(num_timesteps)
    betas = []
    for i in range(num_timesteps):
        s1 = i / num_timesteps
        s2 = (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int, **kwargs: float) -> np.ndarray:
    """float64 betas [T] for a named schedule.

    - ``linear``: DDPM's 1e-4 .. 0.02 over 1000 steps, both ends scaled by 1000 / T (guided-diffusion).
    - ``cosine``: IDDPM Eq. 17, alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    - ``scaled_linear``: LDM's schedule, linspace(sqrt(linear_start), sqrt(linear_end), T) ** 2 with
      defaults linear_start = 0.0015, linear_end = 0.0195 (no 1000 / T scaling, as in latent-diffusion).
    """
    _check_num_timesteps(num_timesteps)
    allowed_kwargs = {"scaled_linear": {"linear_start", "linear_end"}}.get(name, set())
    extra = set(kwargs) - allowed_kwargs
    if name in SCHEDULE_NAMES and extra:
        raise ValueError(f"beta schedule {name!r} takes no argument(s) {sorted(extra)}")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if name == "scaled_linear":
        start = float(kwargs.get("linear_start", 0.0015))
        end = float(kwargs.get("linear_end", 0.0195))
        return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """The original timesteps kept by a respacing (guided-diffusion's ``space_timesteps``).

    ``section_counts`` is ``"N"`` or ``"N1,N2,..."``: the T steps are cut into equal sections
    (the first T % k sections one step longer) and each section is strided to its count, with
    the first and last step of the section kept. ``"ddimN"`` takes the integer stride that yields
    exactly N steps starting at 0 (the DDIM paper's striding).
    """
    _check_num_timesteps(num_timesteps)
    spec = section_counts.strip() if isinstance(section_counts, str) else section_counts
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"timestep respacing must be a non-empty string like '50', 'ddim50' or '10,15,20', got {section_counts!r}")
    if spec.startswith("ddim"):
        desired = _parse_count(spec[len("ddim"):], section_counts)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride (respacing {section_counts!r})")

    counts = [_parse_count(part, section_counts) for part in spec.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} (respacing {section_counts!r} of {num_timesteps} steps)")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index by repeated addition (not k * stride): the rounding
        # of the accumulated float decides which steps are kept, exactly as guided-diffusion does.
        cur_idx = 0.0
        for _ in range(count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respaced_timesteps(num_timesteps: int, *respacings: str) -> list[int]:
    """The original timesteps (increasing) left after respacing a ``num_timesteps`` chain by each of
    ``respacings`` in turn ("" keeps every step): what ``respace(respace(d, r1), r2).timestep_map`` holds."""
    _check_num_timesteps(num_timesteps)
    kept = list(range(num_timesteps))
    for r in respacings:
        if r:
            kept = [kept[i] for i in sorted(space_timesteps(len(kept), r))]
    return kept


def _parse_count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"bad timestep respacing {spec!r}: {text!r} is not an integer step count") from None
    if count < 1:
        raise ValueError(f"bad timestep respacing {spec!r}: step counts must be >= 1, got {count}")
    return count


def _check_num_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
