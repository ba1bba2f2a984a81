"""The main job in a terminal (issue 23): one line per stage, bars drawn by the driver, no traceback and
no error-level line from Ray's start-up or shutdown when nothing is wrong.

The job runs under a pseudo-terminal (``pty``), as a user would see it. Ray Train's placement-group
cleaner finds its cluster by scanning the machine's processes, so with several Ray clusters on one
machine (other test sessions) it fails with a traceback that a machine running one cluster never
shows; where ``unshare`` can give the job its own process namespace (root), the job runs in one.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_in_pty(argv: list[str], cwd: Path, env: dict, timeout_s: float) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr -> (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    # A terminal 120 columns wide (a fresh pty has none, and progress bars draw to its width).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout_s), b"".join(chunks).decode(errors="replace")


def own_namespace() -> list[str]:
    if os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
            ["unshare", "-pf", "--mount-proc", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-pf", "--mount-proc"]
    return []


@pytest.mark.slow
def test_main_job_console_is_clean(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    argv = own_namespace() + [sys.executable, "-m", "student_trainer.run", "--set", f"run.out_dir={tmp_path}",
                              "--set", "distill.steps=300", "--set", "metrics.enabled=false"]
    status, out = run_in_pty(argv, tmp_path, env, timeout_s=900)
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in out.replace("\r", "\n").splitlines()]
    assert status == 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert not [line for line in lines if " E " in line], [line for line in lines if " E " in line]
    # The stages and what the run did.
    assert any("pool warm:" in line for line in lines)
    assert any(line.startswith("distill:") for line in lines)          # the driver's training bar
    assert not [line for line in lines if re.match(r"\(RayTrainWorker pid=\d+\)\s*$", line)]   # no empty bar lines
    for key in ("checkpoint", "comparison", "loss_curve"):
        assert any(line.strip().startswith(f"{key}:") for line in lines), key
    run = tmp_path / "ray-mixture"
    assert (run / "loss_curve.png").is_file() and (run / "samples" / "teacher_vs_student.png").is_file()


def test_only_rays_own_noise_is_filtered():
    from student_trainer.ray_console import _filtered, is_noise

    noise = ("[2026-12-07 00:23:13,269 E 391 426] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: 'c9f1' has constructor arguments in the object store and max_restarts > 0. If the arguments")
    ours = noise.replace("'PreemptionWatcher'", "'TeacherActor'")
    assert is_noise(noise) and not is_noise(ours) and not is_noise("Traceback (most recent call last):")
    printed = []
    handle = _filtered(printed.append)
    handle({"lines": [noise, ours, "pool warm"], "pid": 1})
    handle({"lines": [noise], "pid": 1})
    assert [d["lines"] for d in printed] == [[ours, "pool warm"]]


def test_rays_safe_to_ignore_resource_request_traceback_is_dropped_whole():
    from student_trainer.ray_console import drop_noise

    block = ["Failed to send resource request for train-ce2f. If this only happens transiently during network "
             "partition or CPU being overloaded, it's safe to ignore this error.",
             "Traceback (most recent call last):",
             '  File "autoscaling_coordinator_client.py", line 58, in send_resource_request',
             "    ray.get(",
             "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."]
    after = "Attempting to start training worker group of size 1"
    assert drop_noise(["before", *block, after]) == ["before", after]
    other = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: real"]
    assert drop_noise(other) == other


def test_the_cleaners_gcs_timeout_traceback_is_dropped_whole():
    from student_trainer.ray_console import drop_noise

    block = ["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
             '  File "threading.py", line 1045, in _bootstrap_inner', "    self.run()",
             "ray.exceptions.RpcError: Timed out while waiting for GCS to become available."]
    assert drop_noise([*block, "next"]) == ["next"]
