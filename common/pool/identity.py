"""Pool identity: what a pool's records were built from, so a run only attaches to a pool it can train on.

A record (x_t, t, eps_T, logvar_T[, y]) is only meaningful for the teacher whose forward
produced it, on the chain it walks (respacing: ``Diffusion.fingerprint``), in the pool's
storage layout. Two runs whose identities are equal can share one pool, warm; a run
whose identity differs is refused with one line naming the first field that differs
(``pool.bind_identity(teacher_pool_identity(teacher, n, "fp32"))``).
"""

from __future__ import annotations

import hashlib
import json

from common.pool.errors import PoolError

IDENTITY_VERSION = 1

# Fields of a teacher identity worth naming first in a refusal (the rest are compared too).
_TEACHER_ORDER = ("kind", "weights_sha256", "autoencoder_sha256", "chain_fingerprint", "var_type", "image_shape")


def pool_identity(teacher_identity: dict, chain: str, num_slots: int, storage_dtype: str, record_shape,
                  has_logvar: bool, has_label: bool, num_timesteps: int, rho: float | None = None,
                  samples_per_insert: float = 1.0) -> dict:
    """The identity of a pool: teacher (weights checksum, diffusion settings), chain, layout, rho.

    ``chain``: ``Diffusion.fingerprint()`` of the distillation chain (betas and timestep map).
    """
    return {
        "version": IDENTITY_VERSION,
        "teacher": json.loads(json.dumps(teacher_identity, sort_keys=True, default=str)),
        "chain": str(chain),
        "num_timesteps": int(num_timesteps),
        "num_slots": int(num_slots),
        "rho": None if rho is None else float(rho),
        "storage_dtype": str(storage_dtype),
        "record_shape": [int(s) for s in record_shape],
        "has_logvar": bool(has_logvar),
        "has_label": bool(has_label),
        "samples_per_insert": float(samples_per_insert),
    }


def identity_digest(identity: dict) -> str:
    """sha256 of the canonical JSON of an identity (hex)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _short(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s[:12] + "…" if isinstance(v, str) and len(s) > 16 else (s[:40] + "…" if len(s) > 41 else s)


def identity_diff(held: dict, wanted: dict) -> str | None:
    """One phrase naming the first difference between two identities, or None if they are equal."""
    if identity_digest(held) == identity_digest(wanted):
        return None
    th, tw = held.get("teacher") or {}, wanted.get("teacher") or {}
    keys = [k for k in _TEACHER_ORDER if k in th or k in tw] + sorted((set(th) | set(tw)) - set(_TEACHER_ORDER))
    for k in keys:
        if th.get(k) != tw.get(k):
            what = "teacher" if k in ("weights_sha256", "kind", "autoencoder_sha256") else "teacher setting"
            return f"was built for a different {what}: {k} {_short(th.get(k))} vs {_short(tw.get(k))}"
    for k in sorted(set(held) | set(wanted)):
        if k != "teacher" and held.get(k) != wanted.get(k):
            return f"was built with {k}={_short(held.get(k))}, this run has {k}={_short(wanted.get(k))}"
    return "has another identity"   # unreachable unless digests collide on equal fields


def check_identity(name: str, held: dict, wanted: dict) -> None:
    """Raise PoolError (one line) unless the pool's identity ``held`` equals the run's ``wanted``."""
    diff = identity_diff(held, wanted)
    if diff is not None:
        raise PoolError(f"pool {name!r} {diff} (drop it with `dkdm pool drop` or set another pool.name)")


def teacher_pool_identity(teacher, num_slots: int, storage_dtype: str, rho: float | None = None,
                          samples_per_insert: float = 1.0) -> dict:
    """``pool_identity`` of a built Teacher (common.teachers.base.Teacher)."""
    return pool_identity(teacher.identity(), teacher.diffusion.fingerprint(), num_slots=num_slots,
                         storage_dtype=storage_dtype, record_shape=teacher.image_shape,
                         has_logvar=teacher.learned_variance, has_label=teacher.num_classes is not None,
                         num_timesteps=teacher.diffusion.num_timesteps, rho=rho,
                         samples_per_insert=samples_per_insert)
