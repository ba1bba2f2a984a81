"""Issue 8 on Ray: two ``python -m student_trainer.run`` jobs share one named pool made by ``dkdm pool create``.

A head node of our own (``ray start --head --block`` in its own process group, stopped by
signalling that group, never ``ray stop``) holds the pool in detached actors. Two jobs with
different ``run.name`` and ``pool.group`` and the same ``pool.name`` attach to it warm, train
concurrently, each writes its checkpoint; ``dkdm pool status`` polled meanwhile shows both
groups with their lag; the pool's refills are fewer than two separate runs would need; then
``dkdm pool drop`` removes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_ray_run import _env, _free_port, _result   # pytest puts this folder on sys.path (rootdir-less import mode)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

STEPS, B, T, RHO = 60, 16, 20, 0.5
TINY = textwrap.dedent(f"""\
    run: {{name: unset, out_dir: "{{out_dir}}", device: cpu, progress: false, log_every: 10, seed: 0}}
    teacher:
      kind: analytic
      device: cpu
      diffusion: {{num_timesteps: {T}, schedule: cosine, var_type: learned_range}}
      analytic: {{num_components: 4, channels: 1, image_size: 4}}
    student: {{arch: mlp}}
    pool: {{backend: ray, rho: {RHO}, shards: 2, name: "{{pool}}", block_timeout_s: 200, lease_timeout_s: 120}}
    distill: {{batch_size: {B}, steps: {STEPS}, lr: 0.001, bf16: false, teacher_microbatch: 64}}
    sample: {{num_samples: 16, batch_size: 16, steps: "10"}}
    ray: {{num_teachers: 1, num_workers: 1, teacher_num_cpus: 0.5, worker_num_cpus: 1.0}}
    metrics: {{enabled: false, port: 0}}
""")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node (4 logical CPUs, no dashboard) on free ports -> its GCS address."""
    import os
    import signal

    tmp = tmp_path_factory.mktemp("head")
    port = _free_port()
    log = tmp / "head.log"
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                             "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}"],
                            cwd=tmp, env=_env(tmp), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the Ray head node did not come up: " + log.read_text()[-2000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _pool_cmd(env: dict, cfg: Path, action: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "student_trainer.cli", "pool", action, "--config", str(cfg), *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return _result(out.stdout)


def test_two_jobs_share_one_named_pool(head, tmp_path):
    cfg = tmp_path / "shared.yaml"
    cfg.write_text(TINY.replace("{out_dir}", str(tmp_path / "runs")).replace("{pool}", "shared"))
    env = _env(tmp_path, RAY_ADDRESS=head)
    num_slots = round(RHO * T) * B

    created = _pool_cmd(env, cfg, "create")
    assert created["created"] and created["warm"] and created["counts"]["READY"] == num_slots
    produced0 = created["produced_total"]

    # Two jobs at once, each its own student (seed) and consumer group, the same named pool.
    jobs = {name: subprocess.Popen([sys.executable, "-m", "student_trainer.run", "--config", str(cfg),
                                    "--set", f"run.name={name}", "--set", f"pool.group={name}",
                                    "--set", f"run.seed={seed}"],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed, name in enumerate(("s_a", "s_b"))}
    t0 = time.time()
    # `dkdm pool status --watch` meanwhile: one client of the pool, a JSON line every 2 s
    watcher = subprocess.Popen([sys.executable, "-m", "student_trainer.cli", "pool", "status", "--config", str(cfg),
                                "--watch", "--interval", "2"], cwd=ROOT, env=env,
                               stdout=open(tmp_path / "watch.jsonl", "w"), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while any(p.poll() is None for p in jobs.values()):
            assert time.time() < deadline, "the jobs did not finish"
            time.sleep(1)
        outs = {name: p.communicate() for name, p in jobs.items()}
    finally:
        for p in [*jobs.values(), watcher]:
            if p.poll() is None:
                p.kill()
                p.wait()
    t_jobs = time.time() - t0
    rows = [json.loads(ln) for ln in (tmp_path / "watch.jsonl").read_text().splitlines() if ln.startswith("{")]
    seen: dict[str, dict] = {}          # group -> its latest row in the status lines while both jobs ran
    for st in rows:
        seen.update(st["groups"])
    both = any(set(st["groups"]) == {"s_a", "s_b"} for st in rows)
    for name, (stdout, stderr) in outs.items():
        assert jobs[name].returncode == 0, name + stdout[-2000:] + stderr[-3000:]
    results = {name: _result(stdout) for name, (stdout, _) in outs.items()}

    # Each job trained its own student to the end and wrote its checkpoint and samples.
    for name, res in results.items():
        run = tmp_path / "runs" / name
        assert res["steps"] == STEPS and res["resumed_from"] is None
        assert (run / "train" / f"checkpoint_{STEPS:07d}" / "model.safetensors").is_file()
        assert (run / "samples" / "final.png").is_file()
        assert res["warmup_s"] is not None and res["warmup_s"] < 10      # attached warm: no warm-up of its own
        t = res["teachers"][0]
        # Refills only, one forward each: the pool's teachers keep running after a job ends, so its health may
        # be read with one claim (at most teacher_microbatch = 64 slots) forwarded but not yet filled.
        said = [ln for ln in outs[name][1].splitlines() if "teacher" in ln or "claim" in ln][-10:]
        assert 0 <= t["forwards"] - t["records"] <= 64, json.dumps(t) + "\n" + "\n".join(said)
    # The students differ (seeds 0, 1): two runs, not one run reported twice.
    a, b = (tmp_path / "runs" / n / "train" / f"checkpoint_{STEPS:07d}" / "model.safetensors" for n in ("s_a", "s_b"))
    assert a.read_bytes() != b.read_bytes()

    # Both groups were attached at the same time, each with its lag in the status. (On 2 cores a job spends
    # most of its ~80 s starting Ray Train; its 60 steps take seconds, so a poll rarely lands inside them.)
    assert both, seen
    assert set(seen) == {"s_a", "s_b"} and all("lag" in g and g["lag"] >= 0 for g in seen.values()), seen

    # Shared forwards: two separate runs would each warm up (num_slots records) and refill every record
    # they consume (STEPS * B); here one warm-up served both and a record went to REFILL once both groups
    # had trained on it, so the pool produced clearly fewer records than the two runs' sum.
    final = _pool_cmd(env, cfg, "status", "--interval", "0")
    assert final["groups"] == {}                                         # both jobs detached their groups
    refills = final["produced_total"] - produced0
    print(json.dumps({"refills": refills, "separate_refills": 2 * STEPS * B, "num_slots": num_slots, "groups_seen": seen,
                      "fit_s": {n: r["fit_s"] for n, r in results.items()}, "jobs_s": round(t_jobs, 1)}))
    separate = 2 * (num_slots + STEPS * B)
    assert final["produced_total"] < separate, (final["produced_total"], separate)
    assert refills >= sum(r["teachers"][0]["records"] for r in results.values())   # health is read before the stop
    assert refills < 0.8 * 2 * STEPS * B, (refills, 2 * STEPS * B)

    dropped = _pool_cmd(env, cfg, "drop")
    assert dropped["dropped"] == "shared"
    gone = subprocess.run([sys.executable, "-m", "student_trainer.cli", "pool", "status", "--config", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert gone.returncode == 2 and "shared" in gone.stderr, gone.stderr
