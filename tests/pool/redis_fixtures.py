"""A real ``redis-server`` for the pool tests (no mocks of Redis).

``RedisServer`` runs ``redis-server`` on a free port in a temporary folder and
can stop it cleanly, kill it with SIGKILL and restart it on the same port and
folder (so persisted data, if any, is reloaded). Two persistence modes:

- ``persist=False``: ``--save "" --appendonly no`` (a restart starts empty);
- ``persist=True``: ``--appendonly yes --appendfsync always`` (every write is
  on disk before the reply, so even ``kill -9`` loses nothing).

Fixtures (imported by ``tests/pool/conftest.py`` when present, and by the Redis
tests directly): ``redis_server`` (no persistence), ``redis_server_aof``
(AOF always), and ``redis_pool_factory`` which builds a ``RedisPool`` on
``redis_server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` with its data in ``dir``."""

    def __init__(self, dir: str, persist: bool = False, port: int | None = None, extra_args: tuple[str, ...] = ()):
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH (Debian package redis-server; .ci/run installs it)")
        self.dir = str(dir)
        self.persist = persist
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.dir, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--daemonize", "no", "--protected-mode", "no", "--logfile", "redis.log",
                "--dbfilename", "dump.rdb"]
        if self.persist:
            args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.running:
            return self
        self.proc = subprocess.Popen(self._args(), cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")

    def ping(self) -> bool:
        """True once the server answers PING with PONG (not while it is loading its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

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

    def restart(self, kill: bool = False) -> "RedisServer":
        (self.kill if kill else self.stop)()
        return self.start()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def make_redis_pool(server_or_url, num_slots: int, **kwargs):
    """A RedisPool with a unique name on ``server_or_url`` (a RedisServer, one URL or a list)."""
    from common.pool.redis_backend import RedisPool

    url = server_or_url.url if isinstance(server_or_url, RedisServer) else server_or_url
    if isinstance(url, (list, tuple)):
        url = ",".join(u.url if isinstance(u, RedisServer) else u for u in url)
    kwargs.setdefault("name", f"test-{uuid.uuid4().hex[:8]}")
    return RedisPool.from_options(url, num_slots=num_slots, **kwargs)


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
