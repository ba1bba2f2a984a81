"""Backends of the pool conformance suite (tests/pool/test_conformance.py).

Every conformance test takes the ``harness`` fixture, parametrized over
``BACKENDS``: a dict backend name -> name of a fixture that returns a Harness.
Adding a backend is one entry. The Redis backend's fixtures live in
tests/pool/redis_fixtures.py; when that file exists it is loaded here, its
fixtures become visible to the suite, and it registers itself with

    BACKENDS["redis"] = "redis_harness"     # at import time of redis_fixtures.py

This module is importable there as ``pool_conftest`` (``from pool_conftest import Harness,
WorkerHandle, pool_worker, make_records, fill_claim, check_records``); a ``BACKENDS`` dict
defined in redis_fixtures.py is merged into this one.

A Harness builds pools (``make``), injects corruption into stored records
(``corrupt``) and runs ``pool_worker`` in another process (or, for the local
backend, a thread) that can be killed (``start_worker``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch

from common.config import PoolConfig
from common.pool import make_pool
from common.pool.base import Pool, PoolTimeout
from common.records import RecordBatch

HERE = Path(__file__).parent
# Test modules import helpers from here as ``pool_conftest``: the bare name ``conftest`` is shared by
# every test folder's conftest.py and pytest rebinds it as it goes.
sys.modules["pool_conftest"] = sys.modules[__name__]
BACKENDS: dict[str, str] = {"local": "local_harness", "ray": "ray_harness"}

POOL_FIELDS = set(PoolConfig.model_fields)


def make_records(slots: torch.Tensor, t: torch.Tensor, shape=(1, 4, 4), has_logvar=False, has_label=False) -> RecordBatch:
    """Records whose content names their slot: x_t = slot, eps = -slot, logvar = t / 1000, y = slot % 10.

    Exact in fp16 and bf16 for slot ids below 256, so every draw can check that records did not move.
    """
    n = len(slots)
    s = slots.to(torch.float32).view(n, 1, 1, 1).expand(n, *shape)
    return RecordBatch(
        x_t=s.clone(), t=t.to(torch.int64), eps=-s.clone(),
        logvar=(t.to(torch.float32).view(n, 1, 1, 1).expand(n, *shape) / 1000).clone() if has_logvar else None,
        y=(slots % 10).to(torch.int64) if has_label else None,
    )


def check_records(draw_slots: torch.Tensor, batch: RecordBatch) -> None:
    """Each drawn record holds the content written for its slot (see make_records)."""
    assert len(batch) == len(draw_slots)
    want = draw_slots.to(torch.float32).view(-1, *([1] * (batch.x_t.dim() - 1)))
    assert torch.equal(batch.x_t.float(), want.expand_as(batch.x_t)), "a drawn record does not belong to its slot"
    assert torch.equal(batch.eps.float(), -want.expand_as(batch.eps))
    assert (batch.t >= 0).all()
    if batch.y is not None:
        assert torch.equal(batch.y, draw_slots % 10)


def fill_claim(pool: Pool, claim, shape, has_logvar=False, has_label=False, T: int = 100) -> bool:
    """Fill a claim with slot-named records; t advances one step down the chain (restart at T-1)."""
    prev = claim.batch.t
    t = torch.where(prev <= 0, torch.full_like(prev, T - 1), prev - 1)
    return pool.fill(claim.claim_id, make_records(claim.slots, t, shape, has_logvar, has_label))


def pool_worker(pool: Pool, role: str, n_ops: int, seed: int, b: int = 4, hold_s: float = 0.0,
                shape=(1, 4, 4), signal_path: str | None = None, timeout_s: float = 20.0,
                stop_path: str | None = None) -> dict:
    """A trainer (draw, check, release) or teacher (claim, fill) loop; ``victim`` draws and claims, then hangs.

    Runs in another process or thread; stops after n_ops operations or once ``stop_path`` exists and it
    did at least one (a teacher outlives its trainers: give it a large n_ops, a short timeout and a stop file).
    Returns counts of what it did.
    """
    done = {"draws": 0, "fills": 0, "timeouts": 0}
    for _ in range(n_ops):
        if stop_path and Path(stop_path).exists() and any(done.values()):    # a late starter does one op first
            break
        try:
            if role == "trainer":
                d = pool.draw(b, timeout_s=timeout_s)
                check_records(d.slots, d.batch)
                time.sleep(hold_s)
                pool.release(d.lease_id)
                done["draws"] += 1
            elif role == "teacher":
                c = pool.claim_refill(b, timeout_s=timeout_s)
                time.sleep(hold_s)
                fill_claim(pool, c, shape)
                done["fills"] += 1
            elif role == "victim":
                pool.draw(b, timeout_s=timeout_s)
                pool.claim_refill(b, timeout_s=timeout_s)
                if signal_path:
                    Path(signal_path).write_text("holding")
                time.sleep(3600)      # killed here, holding a lease and a claim
        except PoolTimeout:
            done["timeouts"] += 1
    return done


class WorkerHandle:
    def result(self, timeout: float) -> dict: ...
    def kill(self) -> None: ...


class Harness:
    """One backend for the suite: ``make(**kw)`` with PoolConfig fields and make_pool arguments."""

    name = "?"
    defaults = dict(num_slots=24, shards=2, record_shape=(1, 4, 4), has_logvar=False, has_label=False,
                    num_timesteps=100, seed=0, lease_timeout_s=30.0, claim_timeout_s=30.0,
                    min_ready_fraction=0.0, block_timeout_s=10.0)

    def __init__(self):
        self.pools: list[Pool] = []

    def config(self, **kw) -> tuple[PoolConfig, dict]:
        kw = {**self.defaults, **kw}
        cfg = PoolConfig(backend=self.name, **{k: v for k, v in kw.items() if k in POOL_FIELDS})
        rest = {k: v for k, v in kw.items() if k not in POOL_FIELDS}
        return cfg, rest

    def make(self, **kw) -> Pool:
        cfg, rest = self.config(**kw)
        pool = make_pool(cfg, cfg.num_slots, **rest)
        self.pools.append(pool)
        return pool

    def corrupt(self, pool: Pool, slots: list[int], tmp_path: Path) -> None:
        """Damage the stored records of ``slots`` (in-memory backends: through a snapshot file)."""
        path = str(tmp_path / "to_corrupt.snap")
        pool.snapshot(path)
        corrupt_snapshot(path, slots)
        pool.restore(path)

    def start_worker(self, pool: Pool, **kw) -> WorkerHandle:
        raise NotImplementedError

    def close(self) -> None:
        for p in self.pools:
            p.close()
        self.pools.clear()


def corrupt_snapshot(path: str, slots: list[int]) -> None:
    """Flip bytes in the x_t rows of ``slots`` inside a snapshot file, keeping its checksum table (see codec)."""
    from common.pool.codec import SNAPSHOT_MAGIC
    import struct

    data = open(path, "rb").read()
    pos = len(SNAPSHOT_MAGIC)
    hlen, _ = struct.unpack_from("<QI", data, pos)
    out = [data[: pos + 12 + hlen]]
    pos += 12 + hlen
    while pos < len(data):
        (flen,) = struct.unpack_from("<Q", data, pos)
        frame = msgpack.unpackb(data[pos + 8: pos + 8 + flen], raw=False)
        x = frame["x_t"]
        row = len(x["data"]) // frame["n"]
        buf = bytearray(x["data"])
        for s in slots:
            if frame["lo"] <= s < frame["lo"] + frame["n"]:
                i = (s - frame["lo"]) * row
                buf[i] ^= 0xFF
        x["data"] = bytes(buf)
        blob = msgpack.packb(frame, use_bin_type=True)
        out.append(struct.pack("<Q", len(blob)) + blob)
        pos += 8 + flen
    open(path, "wb").write(b"".join(out))


# --- local ------------------------------------------------------------------------------------


class _ThreadWorker(WorkerHandle):
    """A worker thread; kill() abandons it (it holds whatever it leased, as a killed process would)."""

    def __init__(self, pool, kw):
        self.out = {}
        self.thread = threading.Thread(target=lambda: self.out.update(pool_worker(pool, **kw)), daemon=True)
        self.thread.start()

    def result(self, timeout: float) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker thread did not finish"
        return self.out

    def kill(self) -> None:
        pass      # a thread cannot be killed; the victim sleeps forever holding its lease and claim


class LocalHarness(Harness):
    name = "local"
    processes = False       # workers are threads: the in-process pool is not shared between processes

    def start_worker(self, pool, **kw) -> WorkerHandle:
        return _ThreadWorker(pool, kw)


@pytest.fixture
def local_harness():
    h = LocalHarness()
    yield h
    h.close()


# --- ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (other test folders start clusters with their own settings)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # Workers inherit the environment of the local cluster: let them import the project uninstalled.
        root = str(HERE.parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # A local test cluster needs no token; Ray 2.60 would otherwise write ~/.ray/auth_token for every later cluster.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)   # never a stray cluster
    # Worker processes import this module by value (tests/pool is not a package).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray

    for handles in _RAY_CREATORS if ray.is_initialized() else ():
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already gone
                pass
    _RAY_CREATORS.clear()
    if started:
        ray.shutdown()


class _RayWorker(WorkerHandle):
    def __init__(self, ray, pool, kw):
        self.ray = ray
        self.ref = ray.remote(num_cpus=0.3, max_retries=0)(pool_worker).remote(pool, **kw)

    def result(self, timeout: float) -> dict:
        return self.ray.get(self.ref, timeout=timeout)

    def kill(self) -> None:
        self.ray.cancel(self.ref, force=True)       # kills the worker process


_RAY_CREATORS: list = []    # the pools that created the reused actors: their handles keep the actors alive


class RayHarness(Harness):
    name = "ray"
    processes = True

    def __init__(self, ray):
        super().__init__()
        self.ray = ray

    def make(self, **kw) -> Pool:
        # Shard actors are reused between tests (reset to empty shards): starting a process per pool is slow.
        kw.setdefault("name", "conformance")
        kw.setdefault("reuse_actors", kw["name"] == "conformance")
        pool = super().make(**kw)
        if kw["reuse_actors"]:
            _RAY_CREATORS.append(pool.handles)
        return pool

    def close(self) -> None:
        for p in self.pools:
            if p.meta["cfg"]["name"] != "conformance":
                p.close()
        self.pools.clear()

    def start_worker(self, pool, **kw) -> WorkerHandle:
        return _RayWorker(self.ray, pool, kw)


@pytest.fixture
def ray_harness(ray_cluster):
    h = RayHarness(ray_cluster)
    yield h
    h.close()


# --- more backends -------------------------------------------------------------------------------

_extra = HERE / "redis_fixtures.py"
if _extra.exists():
    _spec = importlib.util.spec_from_file_location("redis_fixtures", _extra)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["redis_fixtures"] = _mod
    _spec.loader.exec_module(_mod)
    BACKENDS.update(getattr(_mod, "BACKENDS", {}))
    globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("_") and k not in globals()})


@pytest.fixture(params=list(BACKENDS))
def harness(request) -> Harness:
    """The conformance suite's backend (one test instance per entry of BACKENDS)."""
    return request.getfixturevalue(BACKENDS[request.param])
