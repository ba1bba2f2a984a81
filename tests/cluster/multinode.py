"""A real multi-node Ray cluster on this machine, for the tests of tests/cluster/ (one cluster per module).

``ray.cluster_utils.Cluster`` starts each node as its own raylet (the head also runs the GCS) on
127.0.0.1 with free ports, in processes this test process owns; ``remove`` kills one node's
processes with SIGKILL, as a machine that drops out. The layout matches the Compose cluster's
custom resources (docker-compose.yml):

    head       CPU 2                 the driver, the pool's shard actors, Ray Train's controller
    teacher-a  CPU 1, teacher 1
    teacher-b  CPU 2, teacher 2      room for a teacher restarted from a removed node
    trainer    CPU 2, trainer 2

Processes are found by their Ray process title (``ray::TeacherActor``, ``ray::RayTrainWorker``,
``ray::ShardServer``) among the descendants of a node's raylet, so only this cluster's processes
are ever signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
# Ray resolves a driver's 127.0.0.1 to the machine's outward address unless this is off (it then keeps
# every address on loopback, as on a laptop): set for the nodes, their workers and every driver.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A raylet waits for its node's agents; on a loaded 2-core machine they take longer than its default allows.
# The GCS declares a node dead after 5 failed health checks 1 s apart (Ray's default: 3 s apart), so a removed
# node's actors are restarted elsewhere within a run of a few hundred steps.
NODE_ENV = {**LOOPBACK_ENV, "RAY_agent_register_timeout_ms": "120000", "OMP_NUM_THREADS": "1",
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
OBJECT_STORE_BYTES = 80 * 2**20
NODES = {"teacher-a": {"num_cpus": 1, "resources": {"teacher": 1}},
         "teacher-b": {"num_cpus": 2, "resources": {"teacher": 2}},
         "trainer": {"num_cpus": 2, "resources": {"trainer": 2}}}

# The analytic mixture at a size where a run of a few hundred steps takes tens of seconds on 2 cores.
SERVICE = textwrap.dedent("""\
    run: {name: NAME, out_dir: "OUT", device: cpu, progress: false, log_every: 10, seed: 0, ckpt_every_s: 4}
    teacher:
      kind: analytic
      device: cpu
      analytic: {num_components: 4, channels: 1, image_size: 4, component_std: 0.1, mean_scale: 0.7, seed: 0}
      diffusion: {schedule: cosine, num_timesteps: 1000, var_type: learned_range, respacing: "40"}
    student: {arch: mlp}
    pool: {rho: 0.5, shards: 2, name: POOL, lease_timeout_s: 10, claim_timeout_s: 10}
    distill: {batch_size: 16, steps: 400, lr: 0.001, ema_rate: 0.99, bf16: false, teacher_microbatch: 64}
    sample: {num_samples: 16, batch_size: 16, steps: "10"}
    ray: {num_teachers: 2, num_workers: 1, max_restarts: 5, max_failures: 3,
          teacher_resources: {teacher: 1}, worker_resources: {trainer: 1}}
    metrics: {enabled: false, port: 0}
""")


@dataclass
class MultiNode:
    cluster: object                     # ray.cluster_utils.Cluster
    nodes: dict = field(default_factory=dict)   # name -> ray._private.node.Node (the head under "head")

    @property
    def address(self) -> str:
        return self.cluster.address

    def raylet_pid(self, name: str) -> int:
        return self.nodes[name].all_processes["raylet"][0].process.pid

    def processes(self, title: str) -> dict[str, list[int]]:
        """node name -> pids of this cluster's processes whose Ray title starts with ``ray::<title>``."""
        children = _children()
        return {name: [pid for pid in _descendants(self.raylet_pid(name), children)
                       if _cmdline(pid).startswith(f"ray::{title}")] for name in self.nodes}

    def where(self, title: str) -> dict[str, int]:
        """node name -> number of ``ray::<title>`` processes on it (nodes with none left out)."""
        return {name: len(pids) for name, pids in self.processes(title).items() if pids}

    def kill(self, title: str, node: str | None = None, rng=None) -> tuple[str, int] | None:
        """SIGKILL one ``ray::<title>`` process (on ``node``, or any; random with ``rng``) -> (node, pid)."""
        found = [(name, pid) for name, pids in self.processes(title).items() if node in (None, name) for pid in pids]
        if not found:
            return None
        name, pid = found[rng.integers(len(found))] if rng is not None else found[0]
        os.kill(pid, signal.SIGKILL)
        return name, pid

    def remove(self, name: str) -> None:
        """The node drops out: every process of its raylet killed with SIGKILL."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)


def start_cluster() -> MultiNode:
    from ray.cluster_utils import Cluster

    # Node processes (and the workers they start) inherit this environment: the project on the path.
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", *NODE_ENV)}
    os.environ.update(NODE_ENV, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p))
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": LOOPBACK, "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES})
        mn = MultiNode(c, {"head": c.head_node})
        for name, args in NODES.items():
            mn.nodes[name] = c.add_node(node_ip_address=LOOPBACK, object_store_memory=OBJECT_STORE_BYTES, **args)
        c.wait_for_nodes()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return mn


def running_cluster():
    """The body of a module-scoped fixture: a started cluster, shut down afterwards."""
    mn = start_cluster()
    try:
        yield mn
    finally:
        mn.cluster.shutdown()


def service_config(tmp: Path, name: str, text: str = SERVICE) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text.replace("NAME", name).replace("OUT", str(tmp / "runs")).replace("POOL", f"p_{name}"))
    return path


def env(address: str) -> dict:
    e = dict(os.environ, **LOOPBACK_ENV, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_ADDRESS=address,
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    e.pop("RAY_AUTH_MODE", None)
    return e


def start_service(mn: MultiNode, config: Path, log: Path, *sets: str) -> subprocess.Popen:
    """``python -m student_trainer.run`` against the cluster, output to ``log``."""
    args = [sys.executable, "-m", "student_trainer.run", "--config", str(config)]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=ROOT, env=env(mn.address), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> tuple[dict, str]:
    """Wait for the run -> (its result line, its whole output); the run must exit 0."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the run did not finish in time:\n" + log.read_text()[-4000:]) from None
    out = log.read_text()
    assert rc == 0, out[-6000:]
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]), out


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n" + (log.read_text()[-4000:] if log else ""))
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}" + ("\n" + log.read_text()[-3000:] if log else ""))


def logged_steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
