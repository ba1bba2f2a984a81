"""Prometheus file-based service discovery for the project's metrics endpoints.

Every process that records metrics (the driver, pool shard actors, teacher
actors, trainer workers) serves its own prometheus-client endpoint and
announces it by writing one ``file_sd_configs`` file:

    <sd_dir>/<role>-<index>-<host>-<pid>.json
    [{"targets": ["<advertised host>:<port>"], "labels": {"role": "...", "index": "..."}}]

Prometheus watches ``<sd_dir>/*.json`` (deploy/prometheus/prometheus.yml). One
file per process means no locking: each file is written once, atomically
(temporary dot-file in the same folder, then ``os.replace``), and removed when
the process exits. Files left behind by processes of this host that died
without cleaning up (SIGKILL, OOM) are removed by the next registration on the
same host; until then Prometheus reports them as ``up == 0``.

Environment (all optional):

- ``DKDM_METRICS_SD_DIR``: the folder (default ``/tmp/dkdm/prom_sd``). On a
  multi-node cluster it is a volume shared with Prometheus (docker-compose.yml).
- ``DKDM_METRICS_HOST``: the host name or IP Prometheus should scrape. Default:
  the Ray node IP when Ray is initialized in this process, else the address
  ``socket.gethostname()`` resolves to, else 127.0.0.1.
- ``DKDM_METRICS_BIND``: the address the endpoint binds (default 0.0.0.0).
- ``DKDM_METRICS_LINGER_S``: seconds to keep serving at exit before the file is
  removed (default 0), so the last values of a short run get scraped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

SD_DIR_ENV = "DKDM_METRICS_SD_DIR"
HOST_ENV = "DKDM_METRICS_HOST"
BIND_ENV = "DKDM_METRICS_BIND"
LINGER_ENV = "DKDM_METRICS_LINGER_S"
DEFAULT_SD_DIR = "/tmp/dkdm/prom_sd"

# Port = MetricsConfig.port + ROLE_OFFSETS[role] + index, when that port is free:
# predictable ports for `curl host:9400/metrics` on a single machine. Any clash
# (a second run, an unknown role, index beyond the block) falls back to a free port:
# Prometheus finds the endpoint through the file either way.
ROLE_OFFSETS = {"driver": 0, "trainer": 100, "teacher": 200, "pool": 300}
ROLE_BLOCK = 100

_NAME_OK = re.compile(r"[^A-Za-z0-9_.]+")


class MetricsDiscoveryError(RuntimeError):
    """A registration could not be written (the message names the path)."""


def sd_dir() -> Path:
    return Path(os.environ.get(SD_DIR_ENV) or DEFAULT_SD_DIR)


def preferred_port(base_port: int, role: str, index: int) -> int:
    """The predictable port for (role, index), or 0 (any free port) when there is none."""
    if base_port <= 0 or role not in ROLE_OFFSETS or not 0 <= index < ROLE_BLOCK:
        return 0
    port = base_port + ROLE_OFFSETS[role] + index
    return port if port <= 65535 else 0


def advertised_host() -> str:
    """The address Prometheus should scrape this process at (see module docstring)."""
    host = os.environ.get(HOST_ENV)
    if host:
        return host
    ray = sys.modules.get("ray")          # never import Ray just to find an address
    if ray is not None and ray.is_initialized():
        try:
            return ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - fall through to the host name
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def bind_address() -> str:
    return os.environ.get(BIND_ENV) or "0.0.0.0"


def linger_seconds() -> float:
    raw = os.environ.get(LINGER_ENV, "0") or "0"
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise MetricsDiscoveryError(f"{LINGER_ENV}={raw!r} is not a number of seconds") from None


def target_file(directory: Path, role: str, index: int, host: str, pid: int) -> Path:
    safe = [_NAME_OK.sub("_", str(p)) for p in (role, index, host, pid)]
    return directory / ("-".join(safe) + ".json")


def write_target(directory: Path, role: str, index: int, host: str, port: int, pid: int | None = None) -> Path:
    """Atomically write this process's file_sd entry; returns its path."""
    pid = os.getpid() if pid is None else pid
    path = target_file(directory, role, index, socket.gethostname(), pid)
    entry = [{"targets": [f"{host}:{port}"], "labels": {"role": role, "index": str(index)}}]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)  # not matched by *.json
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.chmod(tmp, 0o644)              # Prometheus runs as another user
        os.replace(tmp, path)
    except OSError as err:
        raise MetricsDiscoveryError(f"cannot write metrics target file in {directory}: {err}") from None
    _remove_dead_targets(directory)
    return path


def remove_target(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """The process exists on this machine and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _remove_dead_targets(directory: Path) -> None:
    """Remove files of this host whose process is gone (only this host's pids can be checked)."""
    host = _NAME_OK.sub("_", socket.gethostname())
    for path in directory.glob("*.json"):
        parts = path.stem.rsplit("-", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        if not pid_alive(int(parts[2])):
            remove_target(path)
