"""Placement config (ray.teacher_resources / ray.worker_resources): validated, and the Compose cluster's
documented submit command asks only for resources its nodes offer."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load_config
from student_trainer.run import placement_resources

ROOT = Path(__file__).resolve().parents[2]


def test_resources_are_typed_and_validated():
    cfg = load_config(None, ["ray.teacher_resources={teacher: 1}", "ray.worker_resources={trainer: 0.5}",
                             "ray.num_teachers=3", "ray.num_workers=2"])
    assert cfg.ray.teacher_resources == {"teacher": 1.0} and cfg.ray.worker_resources == {"trainer": 0.5}
    assert placement_resources(cfg) == {"teacher": 3.0, "trainer": 1.0}
    with pytest.raises(ConfigError, match="ray.teacher_resources: CPU has its own field"):
        load_config(None, ["ray.teacher_resources={CPU: 2}"])
    with pytest.raises(ConfigError, match="ray.worker_resources.trainer: must be >= 0"):
        load_config(None, ["ray.worker_resources={trainer: -1}"])
    with pytest.raises(ConfigError, match="ray.teacher_resources"):
        load_config(None, ["ray.teacher_resources=teacher"])


def test_documented_submit_command_asks_for_what_the_compose_nodes_offer():
    text = (ROOT / "docs" / "local_cluster.md").read_text()
    block = re.search(r"docker compose exec ray-head ray job submit .*?(?=\n\S|\n```)", text, re.S)
    args = shlex.split(block.group(0))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(None, [s for s in sets if s.startswith("ray.")])
    offered: dict[str, float] = {}
    for name, service in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].items():
        for arg in service.get("command") or []:
            if isinstance(arg, str) and arg.startswith("--resources="):
                for k, v in json.loads(arg.split("=", 1)[1]).items():
                    offered.setdefault(k, 0.0)
                    offered[k] += v if "gpu" not in name else 0.0    # the gpu profile is optional
    assert cfg.ray.teacher_resources == {"teacher": 1.0} and cfg.ray.worker_resources == {"trainer": 1.0}
    for name, amount in placement_resources(cfg).items():
        assert offered.get(name, 0.0) >= amount, (name, amount, offered)


def test_a_resource_no_node_offers_is_one_line_before_anything_starts():
    """Against a real (one-node) Ray cluster: asking for a resource it lacks is a UserError naming it."""
    import ray

    from student_trainer.cli import UserError
    from student_trainer.run import check_placement

    cfg = load_config(None, ["ray.teacher_resources={teacher: 1}", "ray.num_teachers=2"])
    ray.init(address="local", num_cpus=1, resources={"teacher": 1}, include_dashboard=False)
    try:
        with pytest.raises(UserError, match=r"asks for 2 of resource 'teacher' .* offer 1$"):
            check_placement(cfg)
        check_placement(load_config(None, ["ray.teacher_resources={teacher: 1}"]))     # one teacher fits
    finally:
        ray.shutdown()
