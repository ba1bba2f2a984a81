"""The Compose file, the Prometheus and Grafana provisioning, and the code's defaults agree; the file is safe by default.

No Docker engine runs here: these tests validate the files (with Debian's
``docker-compose`` and ``promtool``) and compare them with the code, they do not
build or run images.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from ray._private import ray_constants

from common import metrics, metrics_discovery
from common.config import MetricsConfig, PoolConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROM = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOCS = ROOT / "docs" / "local_cluster.md"
RAY_NODES = ("ray-head", "ray-teacher", "ray-trainer", "ray-teacher-gpu", "ray-trainer-gpu")
# The secrets the user must set: the file is refused without any of them.
SECRETS = {"RAY_AUTH_TOKEN_FILE": "/run/user/token-file", "GRAFANA_ADMIN_PASSWORD": "g-secret",
           "REDIS_PASSWORD": "r-secret"}


def _run_compose(*options: str, profile: str | None = "gpu", **env: str | None) -> subprocess.CompletedProcess:
    profiles = ["--profile", profile] if profile else []
    environ = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "DKDM_PUBLISH_HOST"}
    environ.update({k: v for k, v in {**SECRETS, **env}.items() if v is not None})
    return subprocess.run(["docker-compose", "-f", str(COMPOSE), *profiles, "config", *options], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=environ)


def _compose_config(*options: str, profile: str | None = "gpu", **env: str | None) -> str:
    proc = _run_compose(*options, profile=profile, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def compose() -> dict:
    """The file as docker-compose resolves it (anchors merged, the user's secrets set)."""
    return yaml.safe_load(_compose_config())


def _ports(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, published, target) of each published port, in either of docker-compose's output forms."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", "0.0.0.0"), int(p["published"]), int(p["target"])))
        else:
            parts = p.split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((host, int(parts[-2]), int(parts[-1])))
    return out


def _flags(command: list[str]) -> dict[str, str]:
    out = {}
    for arg in command:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            out[key] = value
    return out


def _mounts(service: dict) -> dict[str, str]:
    """volume source -> container path (named volumes and bind mounts, as resolved)."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        out[src] = dst
    return out


def test_docker_compose_accepts_the_file():
    services = set(_compose_config("--services").split())
    assert services == {"ray-head", "ray-teacher", "ray-trainer", "ray-teacher-gpu", "ray-trainer-gpu",
                        "redis", "prometheus", "grafana"}


def test_no_credentials_and_no_default_passwords_in_the_compose_file(compose):
    text = COMPOSE.read_text()
    # a secret substituted with a default (${X:-admin}) would be a default password
    assert not re.findall(r"\$\{\w*(?:PASSWORD|TOKEN|SECRET)\w*:?-", text)
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|_AUTH$", key) and not key.endswith(("_PATH", "_MODE")):
                assert value in SECRETS.values(), f"{name}: {key} is not one of the user's secrets"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing):
    proc = _run_compose(**{missing: None})
    assert proc.returncode != 0 and missing in proc.stderr, proc.stderr


def test_every_published_port_is_on_loopback_unless_opened_deliberately(compose):
    published = [(name, *p) for name, svc in compose["services"].items() for p in _ports(svc)]
    assert {name for name, *_ in published} == {"ray-head", "prometheus", "grafana"}
    assert all(host == "127.0.0.1" for _, host, _, _ in published), published
    assert "ports" not in compose["services"]["redis"]            # Redis stays inside the Compose network
    opened = yaml.safe_load(_compose_config(DKDM_PUBLISH_HOST="0.0.0.0"))
    assert {h for svc in opened["services"].values() for h, _, _ in _ports(svc)} == {"0.0.0.0"}


def test_every_ray_node_runs_with_token_authentication(compose):
    secret = compose["secrets"]["ray_auth_token"]
    assert secret["file"] == SECRETS["RAY_AUTH_TOKEN_FILE"]       # the user's file, mounted as a Compose secret
    for name in RAY_NODES:
        svc = compose["services"][name]
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        mounted = {(s["source"] if isinstance(s, dict) else s) for s in svc["secrets"]}
        assert "ray_auth_token" in mounted and env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token", name
        assert "RAY_AUTH_TOKEN" not in env, name                  # the token is a file, not an inspectable variable


def test_redis_and_grafana_take_the_users_passwords(compose):
    s = compose["services"]
    redis_cmd = " ".join(s["redis"]["command"]).replace("$$", "$")     # Compose escapes a literal $ as $$
    assert '--requirepass "$REDIS_PASSWORD"' in redis_cmd and SECRETS["REDIS_PASSWORD"] not in redis_cmd
    assert s["redis"]["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert s["redis"]["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]    # the health check authenticates
    for name in RAY_NODES:
        assert s[name]["environment"]["DKDM_REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"], name
    assert s["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]


def test_redis_matches_the_pool_default(compose):
    default = urlparse(PoolConfig().redis_url)
    redis = compose["services"]["redis"]
    cmd = shlex.split(redis["command"][-1])
    assert cmd[0] == "exec" and cmd[1] == "redis-server"
    assert cmd[cmd.index("--port") + 1] == str(default.port)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert "/data" in _mounts(redis).values() and "redis-data" in _mounts(redis)


def test_ray_ports_match_ray_defaults(compose):
    s = compose["services"]
    head = _flags(s["ray-head"]["command"])
    assert int(head["port"]) == ray_constants.DEFAULT_PORT
    assert int(head["dashboard-port"]) == ray_constants.DEFAULT_DASHBOARD_PORT
    assert head["dashboard-host"] == "0.0.0.0"
    published = {(p, t) for _, p, t in _ports(s["ray-head"])}
    assert (ray_constants.DEFAULT_DASHBOARD_PORT, ray_constants.DEFAULT_DASHBOARD_PORT) in published
    for name in RAY_NODES[1:]:
        flags = _flags(s[name]["command"])
        assert flags["address"] == f"ray-head:{ray_constants.DEFAULT_PORT}", name
        assert flags["metrics-export-port"] == head["metrics-export-port"], name
        resources = json.loads(flags["resources"])
        assert set(resources) == {name.split("-")[1]}, name       # teacher | trainer
    for name in RAY_NODES[3:]:
        devices = s[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and s[name]["profiles"] == ["gpu"]
        assert s[name]["image"] != s["ray-teacher"]["image"]      # the CUDA build, not the CPU one


def test_metrics_ports_and_discovery_folders_agree(compose):
    s = compose["services"]
    # the driver's endpoint (role driver, index 0) is published at MetricsConfig.port
    base = MetricsConfig().port
    assert metrics_discovery.preferred_port(base, "driver", 0) == base
    assert {(p, t) for _, p, t in _ports(s["ray-head"])} >= {(base, base)}
    prom_cfg = yaml.safe_load(PROM.read_text())
    jobs = {j["job_name"]: j for j in prom_cfg["scrape_configs"]}
    prom_mounts = _mounts(s["prometheus"])
    for name in RAY_NODES:
        sd = s[name]["environment"][metrics_discovery.SD_DIR_ENV]
        assert _mounts(s[name])["metrics-sd"] == sd, name
    # Prometheus reads the same volume where prometheus.yml looks for the project's targets ...
    assert jobs["dkdm"]["file_sd_configs"][0]["files"] == [prom_mounts["metrics-sd"] + "/*.json"]
    # ... and Ray's own service-discovery file from the head node's /tmp/ray.
    # Ray links /tmp/ray/<file> to its session folder by absolute path: same mount point on both sides.
    assert _mounts(s["ray-head"])["ray-tmp"] == prom_mounts["ray-tmp"] == "/tmp/ray"
    ray_sd = jobs["ray"]["file_sd_configs"][0]["files"][0]
    assert ray_sd == "/tmp/ray/" + ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    assert "--config.file=/etc/prometheus/prometheus.yml" in s["prometheus"]["command"]
    assert prom_mounts[str(PROM)] == "/etc/prometheus/prometheus.yml"
    assert "prometheus-data" in prom_mounts


def test_grafana_provisioning_points_at_the_services(compose):
    s = compose["services"]
    g_mounts = _mounts(s["grafana"])
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    prom_listen = _flags(s["prometheus"]["command"])["web.listen-address"].rsplit(":", 1)[1]
    assert ds["url"] == f"http://prometheus:{prom_listen}"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dkdm.yml").read_text())["providers"][0]
    assert g_mounts[str(ROOT / "deploy/grafana/dashboards")] == provider["options"]["path"]
    assert g_mounts[str(ROOT / "deploy/grafana/provisioning")] == "/etc/grafana/provisioning"
    dash = json.loads((ROOT / "deploy/grafana/dashboards/dkdm.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {ds["uid"]}


def test_promtool_accepts_the_prometheus_config():
    proc = subprocess.run(["promtool", "check", "config", "--syntax-only", str(PROM)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_json_is_generated_and_uses_only_defined_metrics():
    proc = subprocess.run([sys.executable, str(ROOT / "deploy/grafana/make_dashboard.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dash = json.loads((ROOT / "deploy/grafana/dashboards/dkdm.json").read_text())
    exported = set()
    for name, (kind, *_rest) in metrics.SPECS.items():
        exported |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    used = {n for e in exprs for n in re.findall(r"\bdkdm_[a-z_]+", e)}
    assert used and used <= exported, sorted(used - exported)
    assert {v["name"] for v in dash["templating"]["list"]} == {"shard", "worker"}


def test_lock_pins_every_dependency():
    import tomllib

    from packaging.requirements import Requirement

    lock = {}
    for line in (ROOT / "deploy/requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, line
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{name} missing from deploy/requirements.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} violates {req.specifier}"


def test_documented_submit_command_targets_the_compose_services(compose):
    """The one documented command: right container, job port, working dir, redis host and port."""
    text = DOCS.read_text()
    block = re.search(r"docker compose exec ray-head ray job submit .*?(?=\n\S|\n```)", text, re.S)
    assert block, "docs/local_cluster.md lacks the ray job submit command"
    args = shlex.split(block.group(0).replace("\\\n", " "))
    assert "ray-head" in compose["services"]
    assert args[args.index("--address") + 1] == f"http://127.0.0.1:{ray_constants.DEFAULT_DASHBOARD_PORT}"
    assert args[args.index("--working-dir") + 1] == "/app"
    assert args[args.index("--") + 1:args.index("--") + 4] == ["python", "-m", "student_trainer.run"]
    sets = dict(a.split("=", 1) for a in args[args.index("--") + 1:] if "=" in a and "." in a.split("=", 1)[0])
    assert sets["pool.backend"] == "redis"
    url = urlparse(sets["pool.redis_url"])
    assert url.hostname in compose["services"] and url.port == urlparse(PoolConfig().redis_url).port
    for name in RAY_NODES:                        # the run folder is the volume every node shares
        assert _mounts(compose["services"][name])["runs"] == sets["run.out_dir"], name
