"""``dkdm pool create|status|drop`` against a real redis-server (the cheapest persistent backend)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from student_trainer.cli import main

MIX = ["--set", "teacher.kind=analytic", "--set", "teacher.analytic.channels=1", "--set", "teacher.analytic.image_size=4",
       "--set", "teacher.analytic.num_components=2", "--set", "teacher.diffusion.respacing=10",
       "--set", "teacher.diffusion.var_type=learned_range", "--set", "distill.batch_size=4", "--set", "pool.rho=0.4",
       "--set", "teacher.device=cpu", "--set", "pool.shards=2"]


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), err


def test_create_status_drop(redis_url, capsys):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    opts = [*MIX, "--set", "pool.backend=redis", "--set", f"pool.redis_url={redis_url}", "--set", f"pool.name={name}"]
    code, out, err = run(capsys, "pool", "create", *opts)
    assert code == 0, err
    n = round(0.4 * 10) * 4
    assert out["created"] and out["warm"] and out["counts"]["READY"] == n and out["fill"] == 1.0
    assert out["identity"]["teacher_kind"] == "analytic" and len(out["identity"]["digest"]) == 64

    code, again, err = run(capsys, "pool", "create", *opts)          # same identity: found, not rebuilt
    assert code == 0 and not again["created"] and again["produced_total"] == out["produced_total"]

    code, st, err = run(capsys, "pool", "status", *opts, "--interval", "0.1")
    assert code == 0 and st["counts"]["READY"] == n and st["produced_per_s"] == 0 and st["groups"] == {}

    # --watch: one client, a line per interval (here three, then it stops)
    assert main(["pool", "status", *opts, "--watch", "--interval", "0.05", "--count", "3"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(ln["counts"]["READY"] == n and ln["consumed_per_s"] == 0 for ln in lines)
    code, _, err = run(capsys, "pool", "status", *opts, "--watch", "--interval", "0")
    assert code == 2 and "--interval > 0" in err and err.count("\n") == 1

    # another teacher (mixture seed) under the same name: refused, one line, saying what differs
    code, _, err = run(capsys, "pool", "create", *opts, "--set", "teacher.analytic.seed=5")
    assert code == 2 and "different teacher: weights_sha256" in err and err.count("\n") == 1

    code, dropped, err = run(capsys, "pool", "drop", *opts)
    assert code == 0 and dropped["dropped"] == name
    code, _, err = run(capsys, "pool", "status", *opts)
    assert code == 2 and f"no redis pool named '{name}'" in err


def test_user_errors(capsys):
    code, _, err = run(capsys, "pool", "status", *MIX, "--set", "pool.backend=local")
    assert code == 2 and "pool.backend=local" in err and err.count("\n") == 1
