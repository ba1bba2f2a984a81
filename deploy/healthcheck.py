"""Container health checks (docker-compose.yml), standard library only.

    python deploy/healthcheck.py head [URL]   # the Ray dashboard/job server answers
    python deploy/healthcheck.py node         # this container runs a raylet

Exit status 0 when healthy, 1 otherwise (with one line on stderr saying why).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_HEAD_URL = "http://127.0.0.1:8265/api/version"


def ray_token() -> str | None:
    """The cluster's token as Ray reads it (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).read_text().strip() if path else None


def head_ok(url: str = DEFAULT_HEAD_URL) -> str | None:
    """None when the job server answers ``url`` (with the cluster's token, when token auth is on), else the reason."""
    request = urllib.request.Request(url)
    token = ray_token() if os.environ.get("RAY_AUTH_MODE") == "token" else None
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=3) as resp:
            return None if resp.status == 200 else f"{url} answered {resp.status}"
    except OSError as err:
        return f"{url}: {err}"


def running_commands(proc: Path = Path("/proc")) -> list[str]:
    names = []
    for comm in proc.glob("[0-9]*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:                     # the process exited while we looked
            continue
    return names


def node_ok() -> str | None:
    """None when a raylet runs in this container, else the reason."""
    return None if "raylet" in running_commands() else "no raylet process"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("head", "node"):
        print("usage: healthcheck.py head [URL] | node", file=sys.stderr)
        return 2
    problem = head_ok(*argv[1:2]) if argv[0] == "head" else node_ok()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
