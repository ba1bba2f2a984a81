"""Every dashboard expression returns data from a real Prometheus scraping a real run.

A real ``prometheus`` (Debian's package; scrape interval 1 s) discovers the
project's endpoints through the file_sd folder that ``metrics.serve_and_register``
writes, while ``_run_workload`` runs a short distillation on the CPU in a
separate process. Afterwards every PromQL expression of
deploy/grafana/dashboards/dkdm.json is evaluated over the run's time range
through the HTTP API (``/api/v1/query_range``, what a Grafana panel sends),
with ``$shard``/``$worker`` set to ``.*``, and each must return at least one
finite value: no panel may point at a metric that nobody records.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from common import metrics_discovery as sd

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dkdm.json"
SCRAPE_S = 1
RATE_INTERVAL = "10s"          # stands in for Grafana's $__rate_interval (>= 4 scrapes)
LINGER_S = 4                   # the workload keeps its endpoint up this long after it finishes

pytestmark = pytest.mark.slow

# The tiny run: analytic mixture teacher, MLP student, a short chain (a few seconds on one CPU thread; long
# enough that the histograms see two scrapes while it trains: 120 steps once ended before the first scrape).
WORKLOAD_CONFIG = textwrap.dedent("""\
    run: {name: metrics-smoke, out_dir: "{out_dir}", device: cpu, progress: false, log_every: 50, seed: 0}
    teacher:
      kind: analytic
      diffusion: {num_timesteps: 40, schedule: cosine, var_type: learned_range}
      analytic: {num_components: 4, channels: 1, image_size: 4}
    student: {arch: mlp}
    pool: {backend: local, rho: 0.5}
    distill: {batch_size: 16, steps: 600, lr: 0.001, bf16: false, teacher_microbatch: 64}
    sample: {num_samples: 4, batch_size: 4, steps: "10"}
    metrics: {enabled: true, port: 0}
""")

# Until student_trainer.run exists: the single-process loop with the driver's endpoint registered.
# Later: ["-m", "student_trainer.run", "--config", str(config)].
WORKLOAD_SCRIPT = textwrap.dedent("""\
    import sys
    import torch
    torch.set_num_threads(1)
    from common import metrics
    from common.config import load_config
    from student_trainer.distill import distill
    cfg = load_config(sys.argv[1])
    metrics.serve_and_register("driver", 0, cfg.metrics.port)
    print(distill(cfg))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _run_workload(tmp_path: Path) -> subprocess.CompletedProcess:
    """A short real run whose processes register their endpoints in ``tmp_path/sd`` (watched by the fixture)."""
    sd_dir = tmp_path / "sd"
    config = tmp_path / "tiny.yaml"
    config.write_text(WORKLOAD_CONFIG.replace("{out_dir}", str(tmp_path / "runs")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update({sd.SD_DIR_ENV: str(sd_dir), sd.HOST_ENV: "127.0.0.1", sd.BIND_ENV: "127.0.0.1",
                sd.LINGER_ENV: str(LINGER_S)})
    return subprocess.run([sys.executable, "-c", WORKLOAD_SCRIPT, str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


class Prometheus:
    """A real Prometheus on a free port, scraping every second; stopped by ``close``."""

    def __init__(self, folder: Path, scrape_configs: list[dict]):
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / "prometheus.yml"
        cfg.write_text(json.dumps({"global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
                                   "scrape_configs": scrape_configs}))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self._log_path = folder / "prometheus.log"
        self._log = open(self._log_path, "w")
        self._proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'tsdb'}",
                                       f"--web.listen-address={self.url.removeprefix('http://')}"],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            assert self._proc.poll() is None, self._log_path.read_text()[-2000:]
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=1)
                return
            except OSError:
                assert time.time() < deadline, "prometheus did not become ready"
                time.sleep(0.2)

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


@pytest.fixture
def prometheus(tmp_path):
    """Prometheus watching ``tmp_path/sd/*.json`` (job dkdm); yields (base URL, sd folder)."""
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    prom = Prometheus(tmp_path / "prometheus", [
        {"job_name": "dkdm", "file_sd_configs": [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}]}])
    try:
        yield prom.url, sd_dir
    finally:
        prom.close()


def _expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$shard", ".*").replace("$worker", ".*"))
            out.append((f"{panel['title']} / {target['legendFormat']}", expr))
    return out


def _query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1s"})
    body = _get(f"{url}/api/v1/query_range?{q}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series["values"])


def test_every_dashboard_expression_returns_data(prometheus, tmp_path):
    url, sd_dir = prometheus
    start = time.time()
    run = _run_workload(tmp_path)
    end = time.time()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    time.sleep(2 * SCRAPE_S)                       # let the last scrape land

    # the endpoints were discovered through the files and scraped; the files are gone again
    up = _query_range(url, 'up{job="dkdm"}', start, end)
    assert {s["metric"]["role"] for s in up} >= {"driver"}, up
    assert _has_finite_value(up) and any(float(v) == 1 for s in up for _, v in s["values"])
    assert list(sd_dir.glob("*.json")) == [], "a finished process left its target file behind"

    empty = [name for name, expr in _expressions() if not _has_finite_value(_query_range(url, expr, start, end))]
    assert not empty, f"dashboard expressions without data: {empty}"

    # the dashboard variables' label queries find values
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        selector, label = var["definition"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        q = urllib.parse.urlencode({"match[]": selector, "start": f"{start:.3f}", "end": f"{end:.3f}"})
        values = _get(f"{url}/api/v1/label/{label}/values?{q}")["data"]
        assert values, f"variable ${var['name']} ({var['definition']}) has no values"


RAY_SCRIPT = textwrap.dedent("""\
    import sys, ray
    ray.init(num_cpus=1, include_dashboard=True, dashboard_port=int(sys.argv[2]),
             _metrics_export_port=int(sys.argv[3]), _temp_dir=sys.argv[1])
    print("up", flush=True)
    sys.stdin.readline()
    ray.shutdown()
""")


def test_ray_node_metrics_are_scraped_through_rays_discovery_file(tmp_path):
    """The ``ray`` job of deploy/prometheus/prometheus.yml: Ray's SD file under its temp dir finds the node."""
    import tempfile

    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    temp_dir = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))     # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_proc = subprocess.Popen([sys.executable, "-c", RAY_SCRIPT, str(temp_dir), str(_free_port()), str(_free_port())],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    prom = None
    try:
        assert ray_proc.stdout.readline().strip() == "up", "ray.init failed"
        prom = Prometheus(tmp_path / "prometheus", [{"job_name": "ray", "file_sd_configs": [
            {"files": [str(temp_dir / PROMETHEUS_SERVICE_DISCOVERY_FILE)], "refresh_interval": "1s"}]}])
        deadline = time.time() + 120
        while True:
            q = urllib.parse.urlencode({"query": 'count({job="ray", __name__=~"ray_.+"})'})
            result = _get(f"{prom.url}/api/v1/query?{q}")["data"]["result"]
            if result and float(result[0]["value"][1]) > 0:
                break
            assert time.time() < deadline, f"no ray_ metrics scraped via {temp_dir / PROMETHEUS_SERVICE_DISCOVERY_FILE}"
            time.sleep(1)
    finally:
        if prom is not None:
            prom.close()
        ray_proc.stdin.close()
        try:
            ray_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ray_proc.kill()
            ray_proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
