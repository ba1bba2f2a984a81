"""A real ``redis-server`` for the pool tests (never a stand-in).

``RedisServer`` runs ``redis-server`` on a free port in a temporary folder and
can stop it cleanly, kill it with SIGKILL and restart it on the same port and
folder (so persisted data, if any, is reloaded). Two persistence modes:

- ``persist=False``: ``--save "" --appendonly no`` (a restart starts empty);
- ``persist=True``: ``--appendonly yes --appendfsync always`` (every write is
  on disk before the reply, so even ``kill -9`` loses nothing).

Fixtures (loaded by ``tests/pool/conftest.py``, which makes them visible to
every test under tests/pool): ``redis_server`` (no persistence),
``redis_server_aof`` (AOF always), ``redis_pool_factory`` which builds a
``RedisPool`` on ``redis_server``, and ``redis_harness``, the Redis backend of
the conformance suite (registered below in ``BACKENDS``). Its workers are
separate Python processes (the pool travels pickled and reconnects), so
``kill`` is a real SIGKILL of a process holding a lease and a claim.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

try:  # the conformance conftest loads this module after defining these (as ``pool_conftest``)
    from pool_conftest import Harness, WorkerHandle
except ImportError:  # pragma: no cover - imported on its own
    Harness = WorkerHandle = None

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
BACKENDS = {"redis": "redis_harness"}

REDIS_SERVER = shutil.which("redis-server")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(cluster: bool = False) -> int:
    """A free TCP port; ``cluster``: one <= 55535 whose bus port (+10000) is free too (Redis Cluster needs both)."""
    if not cluster:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (p, p + 10000) for a Redis Cluster node")


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` with its data in ``dir``."""

    def __init__(self, dir: str, persist: bool = False, port: int | None = None, extra_args: tuple[str, ...] = (),
                 password: str | None = None):
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH (Debian package redis-server; .ci/run installs it)")
        self.dir = str(dir)
        self.persist = persist
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.password = password           # requirepass: the default user needs it
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.dir, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--daemonize", "no", "--protected-mode", "no", "--logfile", "redis.log",
                "--dbfilename", "dump.rdb"]
        if self.persist:
            args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.proc = subprocess.Popen(self._args(), cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self.ping():
                pid = self._server_pid()
                if pid == self.proc.pid:
                    return self
                if pid is not None:     # another server answers on this port
                    self.kill()
                    raise RuntimeError(f"port {self.port} is taken by another redis-server (pid {pid})")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")

    def ping(self) -> bool:
        """True once the server answers PING with PONG (not while it is loading its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                s.sendall(auth + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < 1 + bool(auth):
                    reply += s.recv(64) or b"\r\n\r\n"
                return reply.split(b"\r\n")[bool(auth)].startswith(b"+PONG")
        except OSError:
            return False

    def _server_pid(self) -> int | None:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1.0) as c:
                return int(c.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError):
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown (SIGTERM: the server saves/flushes as configured, then exits)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: nothing is flushed beyond what the persistence mode already wrote."""
        if self.running:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, kill: bool = False) -> RedisServer:
        (self.kill if kill else self.stop)()
        return self.start()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def make_redis_pool(server_or_url, num_slots: int, **kwargs):
    """A RedisPool with a unique name on ``server_or_url`` (a RedisServer, one URL or a list)."""
    from common.config import PoolConfig
    from common.pool.redis_backend import RedisPool

    url = server_or_url.url if isinstance(server_or_url, RedisServer) else server_or_url
    if isinstance(url, (list, tuple)):
        url = ",".join(u.url if isinstance(u, RedisServer) else u for u in url)
    kwargs.setdefault("name", f"test-{uuid.uuid4().hex[:8]}")
    layout = {k: kwargs.pop(k) for k in ("record_shape", "has_logvar", "has_label", "num_timesteps", "seed") if k in kwargs}
    cfg = PoolConfig(backend="redis", redis_url=url, num_slots=num_slots, **kwargs)
    return RedisPool(cfg, num_slots, **{"record_shape": (3, 8, 8), "has_logvar": False, "has_label": False, **layout})


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server without persistence; stopped (or killed) after the test."""
    server = RedisServer(tmp_path / "redis", persist=False).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server_aof(tmp_path):
    """A fresh redis-server with ``--appendonly yes --appendfsync always``."""
    server = RedisServer(tmp_path / "redis-aof", persist=True).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_pool_factory(redis_server):
    """``factory(num_slots, **options) -> RedisPool`` on ``redis_server``; pools are closed after the test."""
    pools = []

    def factory(num_slots: int, **kwargs):
        pool = make_redis_pool(redis_server, num_slots, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for p in pools:
        p.close()


# --- the conformance suite's Redis backend ---------------------------------------------------------

_WORKER_MAIN = r"""
import importlib.util, json, os, pickle, sys
root, conftest, pool_file, kw, out = sys.argv[1:]
sys.path.insert(0, root)
import torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("pool_conftest", conftest)
mod = importlib.util.module_from_spec(spec)
sys.modules["pool_conftest"] = mod
spec.loader.exec_module(mod)
with open(pool_file, "rb") as f:
    pool = pickle.load(f)
res = mod.pool_worker(pool, **json.loads(kw))
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.replace(out + ".tmp", out)
"""


class _ProcessWorker:
    """``pool_worker`` in a fresh Python process; ``kill`` is SIGKILL."""

    def __init__(self, pool, kw: dict, tmp_dir: Path):
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        pool_file, self.out = tmp_dir / f"pool-{tag}.pkl", tmp_dir / f"result-{tag}.json"
        pool_file.write_bytes(pickle.dumps(pool))
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(ROOT), str(HERE / "conftest.py"), str(pool_file), json.dumps(kw), str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def result(self, timeout: float) -> dict:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"worker process did not finish within {timeout}s") from None
        assert self.proc.returncode == 0, f"worker process failed ({self.proc.returncode}): {err.decode()[-2000:]}"
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def corrupt_redis_records(pool, slots: list[int]) -> None:
    """Damage stored records in Redis itself: a flipped byte (checksum), a truncation, foreign bytes."""
    for j, slot in enumerate(slots):
        shard = next(i for i, (lo, hi) in enumerate(pool.ranges) if lo <= slot < hi)
        key = pool.redis.key(shard, f"r:{slot}")
        c = pool.redis.clients[pool.redis.server(shard)]
        blob = bytearray(c.get(key))
        if j % 3 == 0:
            blob[len(blob) - 5] ^= 0xFF
        elif j % 3 == 1:
            blob = blob[: len(blob) // 2]
        else:
            blob = bytearray(b"\x93\x01\x02\x03 a foreign value")
        c.set(key, bytes(blob))


if Harness is not None:

    class RedisHarness(Harness):
        name = "redis"
        processes = True

        def __init__(self, server: RedisServer, tmp_dir: Path):
            super().__init__()
            self.server, self.tmp_dir = server, tmp_dir

        def config(self, **kw):
            kw.setdefault("redis_url", self.server.url)
            kw.setdefault("name", f"conf-{uuid.uuid4().hex[:8]}")
            kw.setdefault("redis_retry_timeout_s", 5.0)
            return super().config(**kw)

        def corrupt(self, pool, slots, tmp_path) -> None:
            corrupt_redis_records(pool, slots)

        def start_worker(self, pool, **kw):
            return _ProcessWorker(pool, kw, self.tmp_dir)

    @pytest.fixture
    def redis_harness(redis_server, tmp_path):
        h = RedisHarness(redis_server, tmp_path / "workers")
        yield h
        h.close()
