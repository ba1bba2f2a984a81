"""The Compose cluster's Ray settings, for real: a head node started as the Ray nodes of
``docker-compose.yml`` are (``RAY_AUTH_MODE=token``, the token in the file ``RAY_AUTH_TOKEN_PATH``)
refuses the job API to anyone without the token, and the head's health check passes with it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import healthcheck  # noqa: E402  (deploy/ is not a package: the container runs the file directly)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-authenticated head node: (dashboard url, token file, environment with the token)."""
    tmp = tmp_path_factory.mktemp("auth")
    token_file = tmp / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    dash = _free_port()
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--ray-client-server-port={_free_port()}", "--disable-usage-stats",
                             # the job agent on a free port, not Ray's fixed default (52365) another node may hold
                             f"--dashboard-agent-listen-port={_free_port()}"],
                            cwd=tmp, env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while _status_or_none(url + "/api/version") is None:
            assert proc.poll() is None and time.time() < deadline, (tmp / "head.log").read_text()[-2000:]
            time.sleep(1)
        yield url, token_file, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)     # `ray start --block` takes long to stop on SIGTERM: then SIGKILL
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _status_or_none(url: str) -> int | None:
    try:
        return _status(url)
    except OSError:
        return None


def test_job_api_refuses_callers_without_the_token(head):
    url, token_file, _ = head
    assert _status(url + "/api/jobs/") == 401
    assert _status(url + "/api/jobs/", token="not-the-token") == 403
    assert _status(url + "/api/jobs/", token=token_file.read_text().strip()) == 200


def test_head_health_check_passes_with_the_token_only(head, monkeypatch):
    url, token_file, _ = head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert healthcheck.head_ok(url + "/api/jobs/") is None
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")         # RAY_AUTH_TOKEN wins over the file, as in Ray
    assert "403" in healthcheck.head_ok(url + "/api/jobs/")


def test_documented_job_submit_works_with_the_token_and_fails_without(head, tmp_path):
    url, _, env = head
    cmd = ["ray", "job", "submit", "--address", url, "--", "python", "-c", "print('token accepted')"]
    deadline = time.time() + 300
    while True:          # the dashboard answers before its job agent has registered (slow on a loaded machine)
        job = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0 and "token accepted" in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(cmd, cwd=tmp_path, env=anonymous, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "token accepted" not in refused.stdout
