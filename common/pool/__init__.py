"""The record pool B+: ``make_pool`` picks a backend; callers only see ``common.pool.base.Pool``.

Backends are imported lazily so that nobody pays for ray or redis unless they use it.
"""

from __future__ import annotations

from common.config import PoolConfig
from common.pool.base import (  # noqa: F401 - the public contract
    Claim,
    Draw,
    Pool,
    PoolError,
    PoolStats,
    PoolTimeout,
    RecordCorrupt,
    SlotState,
)


def pool_size(cfg: PoolConfig, T: int, b: int) -> int:
    """Slots of B+: ``cfg.num_slots`` if given, else round(rho * T) * b (reference implementation)."""
    if cfg.num_slots is not None:
        return int(cfg.num_slots)
    n = round(cfg.rho * T) * b
    if n < 1:
        raise PoolError(f"pool.rho={cfg.rho} with T={T} and b={b} gives an empty pool; raise pool.rho or set pool.num_slots")
    return n


def make_pool(
    cfg: PoolConfig,
    num_slots: int,
    record_shape: tuple[int, int, int],
    has_logvar: bool,
    has_label: bool,
    num_timesteps: int = 1000,
    seed: int = 0,
    t_buckets: int = 10,
    **backend_kw,
) -> Pool:
    """Build the pool ``cfg.backend`` names; ``backend_kw`` go to that backend only (e.g. ray's ``detached``)."""
    kw = dict(num_slots=num_slots, record_shape=tuple(record_shape), has_logvar=has_logvar, has_label=has_label,
              num_timesteps=num_timesteps, seed=seed, t_buckets=t_buckets, **backend_kw)
    if cfg.backend == "local":
        from common.pool.local import LocalPool

        return LocalPool(cfg, **kw)
    if cfg.backend == "ray":
        from common.pool.ray_backend import RayPool

        return RayPool(cfg, **kw)
    if cfg.backend == "redis":
        from common.pool.redis_backend import RedisPool

        return RedisPool(cfg, **kw)
    raise PoolError(f"pool.backend={cfg.backend!r} is not one of local, ray, redis")
