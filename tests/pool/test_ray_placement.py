"""Shard placement on a real three-node Ray cluster (ray.cluster_utils.Cluster on this machine): shards go
where pool.shard_resources / pool.shard_strategy ask, a client on their node maps them, and a client on a
node that holds no shard draws through the RPC path."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from common.config import PoolConfig
from common.pool import make_pool
from pool_conftest import check_records, fill_claim

SHAPE = (1, 4, 4)
ROOT = str(Path(__file__).resolve().parents[2])
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    pool_node = c.add_node(num_cpus=1, resources={"pool": 2})
    other = c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c.wait_for_nodes()
    yield ray, {"head": c.head_node.node_id, "pool": pool_node.node_id, "other": other.node_id}
    ray.shutdown()
    c.shutdown()


def _pool(**kw):
    cfg = PoolConfig(backend="ray", name=f"place-{uuid.uuid4().hex[:6]}", num_slots=12, min_ready_fraction=0.5,
                     block_timeout_s=30, **kw)
    pool = make_pool(cfg, 12, SHAPE, has_logvar=False, has_label=False, num_timesteps=100)
    return pool


def _client(pool) -> tuple[list[str], int]:
    """On some node: draw (records checked) and say how each shard was reached."""
    d = pool.draw(6, timeout_s=30)
    check_records(d.slots, d.batch)
    pool.release(d.lease_id)
    return pool.transports(), len(d.slots)


def _on(ray, node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0.1, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))(_client)


def test_pinned_shards_and_the_rpc_path_from_a_node_without_shards(cluster):
    ray, nodes = cluster
    pool = _pool(shards=2, shard_resources={"pool": 1})
    try:
        while pool.stats().counts["REFILL"]:
            assert fill_claim(pool, pool.claim_refill(12, timeout_s=10), SHAPE)
        assert pool.stats().extra["shard_nodes"] == [nodes["pool"]] * 2, "both shards on the node offering 'pool'"
        far = ray.get(_on(ray, nodes["other"]).remote(pool), timeout=120)
        near = ray.get(_on(ray, nodes["pool"]).remote(pool), timeout=120)
        assert far == (["rpc", "rpc"], 6), "a client on a node without shards draws through the RPC path"
        assert near == (["shared_memory", "shared_memory"], 6), "a client on the shards' node maps them"
        st = pool.stats()
        st.check_invariant()
        assert st.consumed_total == 12 and st.counts["LEASED"] == 0
    finally:
        pool.close()


def test_spread_shards_land_on_different_nodes(cluster):
    ray, nodes = cluster
    pool = _pool(shards=3, shard_strategy="spread")
    try:
        assert sorted(pool.stats().extra["shard_nodes"]) == sorted(nodes.values())
    finally:
        pool.close()
