"""metrics.serve_and_register and its file_sd files (common/metrics_discovery.py), in real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from common import metrics_discovery as sd

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""\
    import sys, time
    from common import metrics
    role, index, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    port = metrics.serve_and_register(role, index, base)
    assert metrics.serve_and_register("other", 5, base) == port     # one endpoint per process
    metrics.inc(metrics.TEACHER_RECORDS_TOTAL, 3, worker=index)
    metrics.observe(metrics.POOL_DRAW_SECONDS, 0.02)
    print(port, flush=True)
    sys.stdin.readline()                                             # wait until the test is done
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(sd_dir: Path, role: str, index: int, base: int, linger: float = 0.0) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update({sd.SD_DIR_ENV: str(sd_dir), sd.HOST_ENV: "127.0.0.1", sd.BIND_ENV: "127.0.0.1",
                sd.LINGER_ENV: str(linger)})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, role, str(index), str(base)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"child failed: {proc.communicate()}"
    return proc, int(line)


def _finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_preferred_ports_per_role():
    assert sd.preferred_port(9400, "driver", 0) == 9400
    assert sd.preferred_port(9400, "trainer", 3) == 9503
    assert sd.preferred_port(9400, "teacher", 1) == 9601
    assert sd.preferred_port(9400, "pool", 0) == 9700
    assert sd.preferred_port(0, "driver", 0) == 0                 # 0: always a free port
    assert sd.preferred_port(9400, "teacher", 100) == 0           # beyond the role's block
    assert sd.preferred_port(9400, "evaluator", 0) == 0           # unknown role
    assert sd.preferred_port(65500, "pool", 99) == 0              # past 65535


def test_two_processes_register_serve_and_clean_up(tmp_path):
    base = _free_port()
    a, port_a = _spawn(tmp_path, "teacher", 0, base - 200)        # preferred port = base (free)
    b, port_b = _spawn(tmp_path, "teacher", 0, base - 200)        # same preferred port: taken -> a free one
    try:
        assert port_a == base and port_b not in (0, port_a)
        files = sorted(tmp_path.glob("*.json"))
        assert len(files) == 2
        entries = [json.loads(f.read_text())[0] for f in files]
        assert sorted(e["targets"][0] for e in entries) == sorted(f"127.0.0.1:{p}" for p in (port_a, port_b))
        assert all(e["labels"] == {"role": "teacher", "index": "0"} for e in entries)
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)
        assert not list(tmp_path.glob(".*"))                      # no temporary files left
        body = urllib.request.urlopen(f"http://127.0.0.1:{port_a}/metrics", timeout=5).read().decode()
        assert 'dkdm_teacher_records_total{worker="0"} 3.0' in body
        assert "dkdm_pool_draw_seconds_bucket" in body and "dkdm_pool_draw_seconds_count 1.0" in body
    finally:
        _finish(a)
        _finish(b)
    assert list(tmp_path.glob("*.json")) == []


def test_linger_keeps_the_endpoint_up_after_exit(tmp_path):
    proc, port = _spawn(tmp_path, "driver", 0, 0, linger=1.5)
    proc.stdin.close()
    time.sleep(0.5)
    assert proc.poll() is None                                    # still serving its last values
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert proc.wait(timeout=30) == 0
    assert list(tmp_path.glob("*.json")) == []


def test_files_of_dead_processes_of_this_host_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = sd.target_file(tmp_path, "teacher", 1, socket.gethostname(), dead.pid)   # as if SIGKILLed
    stale.write_text("[]")
    foreign = tmp_path / "teacher-2-otherhost-1.json"              # another node's: cannot be checked, kept
    foreign.write_text("[]")
    assert stale.exists()
    live = sd.write_target(tmp_path, "driver", 0, "127.0.0.1", 2)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_bad_linger_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(sd.LINGER_ENV, "soon")
    with pytest.raises(sd.MetricsDiscoveryError, match="DKDM_METRICS_LINGER_S='soon'"):
        sd.linger_seconds()
