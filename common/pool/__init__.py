"""The record pool B+: ``make_pool`` builds a backend, ``open_named_pool`` and ``attach_pool`` find a running
one; callers only see ``common.pool.base.Pool``.

Backends are imported when asked for, so that nobody pays for ray or redis unless they use it.
"""

from __future__ import annotations

from common.config import PoolConfig
from common.pool.base import (  # noqa: F401 - the public contract
    Claim, Draw, Pool, PoolError, PoolStats, PoolTimeout, RecordCorrupt, SlotState)


def pool_size(cfg: PoolConfig, T: int, b: int) -> int:
    """Slots of B+: ``cfg.num_slots`` if given, else round(rho * T) * b (reference implementation)."""
    if cfg.num_slots is not None:
        return int(cfg.num_slots)
    n = round(cfg.rho * T) * b
    if n < 1:
        raise PoolError(f"pool.rho={cfg.rho} with T={T} and b={b} gives an empty pool; raise pool.rho or set pool.num_slots")
    return n


def _backend(name: str) -> type[Pool]:
    # imported on demand, not to break a cycle: a local pool should not start importing Ray or redis-py
    if name == "local":
        from common.pool.local import LocalPool
        return LocalPool
    if name == "ray":
        from common.pool.ray_backend import RayPool
        return RayPool
    if name == "redis":
        from common.pool.redis_backend import RedisPool
        return RedisPool
    raise PoolError(f"pool.backend={name!r} is not one of local, ray, redis")


def make_pool(cfg: PoolConfig, num_slots: int, record_shape: tuple[int, int, int], has_logvar: bool, has_label: bool,
              num_timesteps: int = 1000, seed: int = 0, t_buckets: int = 10, **backend_kw) -> Pool:
    """Build the pool ``cfg.backend`` names; ``backend_kw`` go to that backend only (e.g. ray's ``detached``)."""
    return _backend(cfg.backend)(cfg, num_slots=num_slots, record_shape=tuple(record_shape), has_logvar=has_logvar,
                                 has_label=has_label, num_timesteps=num_timesteps, seed=seed, t_buckets=t_buckets,
                                 **backend_kw)


def attach_pool(cfg: PoolConfig) -> Pool:
    """A client of the running pool ``cfg.name`` (ray: its shard actors; redis: its keys). PoolError if there is none."""
    if cfg.backend == "local":
        raise PoolError("pool.backend=local lives inside one process: there is no running pool to attach to")
    if cfg.backend == "ray":
        return _backend("ray").attach(cfg.name)
    return _backend(cfg.backend).attach(cfg)


def open_named_pool(cfg: PoolConfig, identity: dict, num_slots: int, record_shape, has_logvar: bool, has_label: bool,
                    num_timesteps: int, seed: int = 0, detached: bool = False) -> tuple[Pool, bool]:
    """Attach to the pool ``cfg.name`` if one is running (it must have this identity), else create it.

    -> (pool, created). ``detached``: a new Ray pool outlives this driver. A redis pool existed if its
    keys already hold an identity; a local pool is always new. Another identity: PoolError (one line).
    """
    if cfg.backend == "ray":
        try:
            pool = attach_pool(cfg)
        except PoolError as err:
            if "no Ray pool named" not in str(err):
                raise
        else:
            pool.bind_identity(identity)
            return pool, False
    kw = {"detached": detached} if cfg.backend == "ray" else {}
    pool = make_pool(cfg, num_slots=num_slots, record_shape=record_shape, has_logvar=has_logvar, has_label=has_label,
                     num_timesteps=num_timesteps, seed=seed, **kw)
    existed = cfg.backend == "redis" and pool.identity() is not None
    try:
        pool.bind_identity(identity)
    except PoolError:
        if cfg.backend != "redis":
            pool.close()
        raise
    return pool, not existed
