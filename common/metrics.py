"""Metric names, defined once (STYLE: names with units; components record through a thin call).

Components call ``metrics.inc/set/observe(NAME, value, **labels)``; nothing is
exported until a process calls ``serve_and_register(role, index, base_port)``
(the edge). Every process that records metrics (pool shard actors, teacher
actors, trainer workers, the driver) serves its own prometheus-client endpoint
and announces it to Prometheus with a file_sd file (common/metrics_discovery.py;
scrape targets are documented in docs/local_cluster.md).

Counters are exported with ``_total``, histograms as ``_bucket/_sum/_count``.
"""

from __future__ import annotations

# --- pool -----------------------------------------------------------------
POOL_SLOTS = "dkdm_pool_slots"                                   # gauge{shard,state}
POOL_RECORDS_PRODUCED_TOTAL = "dkdm_pool_records_produced_total"  # counter{shard}
POOL_RECORDS_CONSUMED_TOTAL = "dkdm_pool_records_consumed_total"  # counter{shard}
POOL_BYTES_TOTAL = "dkdm_pool_bytes_total"                       # counter{shard,direction}
POOL_DRAW_SECONDS = "dkdm_pool_draw_seconds"                     # histogram
POOL_FILL_SECONDS = "dkdm_pool_fill_seconds"                     # histogram
POOL_BLOCKED_SECONDS_TOTAL = "dkdm_pool_blocked_seconds_total"   # counter{side=draw|fill}
POOL_RECORD_AGE_STEPS = "dkdm_pool_record_age_steps"             # histogram
POOL_READY_T = "dkdm_pool_ready_t"                               # gauge{shard,bucket}
POOL_CORRUPT_TOTAL = "dkdm_pool_corrupt_records_total"           # counter{shard}
POOL_EXPIRED_TOTAL = "dkdm_pool_expired_total"                   # counter{kind=lease|claim}
POOL_GROUP_LAG = "dkdm_pool_group_lag_records"                   # gauge{shard,group}: records waiting for that group alone
POOL_SHARD_RESTARTS_TOTAL = "dkdm_pool_shard_restarts_total"     # counter{shard}: ray shard actors restarted empty
# --- teachers -------------------------------------------------------------
TEACHER_RECORDS_TOTAL = "dkdm_teacher_records_total"             # counter{worker}
TEACHER_FORWARDS_TOTAL = "dkdm_teacher_forwards_total"           # counter{worker}
TEACHER_BUSY_SECONDS_TOTAL = "dkdm_teacher_busy_seconds_total"   # counter{worker}
TEACHER_RESTARTS_TOTAL = "dkdm_teacher_restarts_total"           # counter{worker}
TEACHER_ERRORS_TOTAL = "dkdm_teacher_errors_total"               # counter{worker}: loop errors that ended an incarnation
# --- trainer --------------------------------------------------------------
TRAINER_STEP_SECONDS = "dkdm_trainer_step_seconds"               # histogram{worker}
TRAINER_POOL_WAIT_SECONDS_TOTAL = "dkdm_trainer_pool_wait_seconds_total"  # counter{worker}
TRAINER_LOSS = "dkdm_trainer_loss"                               # gauge{worker,term}
TRAINER_SAMPLES_TOTAL = "dkdm_trainer_samples_total"             # counter{worker}
TRAINER_STEPS_TOTAL = "dkdm_trainer_steps_total"                 # counter{worker}

import atexit
import os
import threading
import time
from pathlib import Path

from common import metrics_discovery as sd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_AGE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# name -> (kind, help, label names, histogram buckets)
SPECS: dict[str, tuple[str, str, tuple[str, ...], tuple | None]] = {
    POOL_SLOTS: ("gauge", "Pool slots per state", ("shard", "state"), None),
    POOL_RECORDS_PRODUCED_TOTAL: ("counter", "Records filled into the pool", ("shard",), None),
    POOL_RECORDS_CONSUMED_TOTAL: ("counter", "Records drawn from the pool", ("shard",), None),
    POOL_BYTES_TOTAL: ("counter", "Record bytes moved", ("shard", "direction"), None),
    POOL_DRAW_SECONDS: ("histogram", "Latency of a pool draw", (), _LATENCY_BUCKETS),
    POOL_FILL_SECONDS: ("histogram", "Latency of a pool fill", (), _LATENCY_BUCKETS),
    POOL_BLOCKED_SECONDS_TOTAL: ("counter", "Time blocked by the rate limiter", ("side",), None),
    POOL_RECORD_AGE_STEPS: ("histogram", "Record age at draw (pool operations since its teacher forward)", (), _AGE_BUCKETS),
    POOL_READY_T: ("gauge", "READY slots per chain-index bucket", ("shard", "bucket"), None),
    POOL_CORRUPT_TOTAL: ("counter", "Records that failed to decode", ("shard",), None),
    POOL_EXPIRED_TOTAL: ("counter", "Expired leases and claims", ("kind",), None),
    POOL_GROUP_LAG: ("gauge", "Records every other consumer group is done with, waiting for this group", ("shard", "group"), None),
    POOL_SHARD_RESTARTS_TOTAL: ("counter", "Ray pool shard actors restarted (empty) after their process died", ("shard",), None),
    TEACHER_RECORDS_TOTAL: ("counter", "Records produced by a teacher", ("worker",), None),
    TEACHER_FORWARDS_TOTAL: ("counter", "Teacher forward passes (samples)", ("worker",), None),
    TEACHER_BUSY_SECONDS_TOTAL: ("counter", "Time a teacher spent computing", ("worker",), None),
    TEACHER_RESTARTS_TOTAL: ("counter", "Teacher actor restarts", ("worker",), None),
    TEACHER_ERRORS_TOTAL: ("counter", "Teacher errors that ended an actor process (Ray restarts it)", ("worker",), None),
    TRAINER_STEP_SECONDS: ("histogram", "Student training step time", ("worker",), _LATENCY_BUCKETS),
    TRAINER_POOL_WAIT_SECONDS_TOTAL: ("counter", "Time the trainer waited for the pool", ("worker",), None),
    TRAINER_LOSS: ("gauge", "Loss terms", ("worker", "term"), None),
    TRAINER_SAMPLES_TOTAL: ("counter", "Records trained on", ("worker",), None),
    TRAINER_STEPS_TOTAL: ("counter", "Optimizer steps", ("worker",), None),
}

REGISTRY = CollectorRegistry()
_metrics: dict[str, object] = {}
_lock = threading.Lock()


def _get(name: str):
    m = _metrics.get(name)
    if m is None:
        with _lock:
            m = _metrics.get(name)
            if m is None:
                kind, doc, labels, buckets = SPECS[name]
                if kind == "counter":
                    # prometheus-client appends _total itself
                    m = Counter(name.removesuffix("_total"), doc, labels, registry=REGISTRY)
                elif kind == "gauge":
                    m = Gauge(name, doc, labels, registry=REGISTRY)
                else:
                    m = Histogram(name, doc, labels, registry=REGISTRY, buckets=buckets)
                _metrics[name] = m
    return m


_children: dict[tuple, object] = {}   # (name, *label items) -> the labelled child (labels() takes a lock)


def _labelled(name: str, labels: dict):
    if not labels:
        return _get(name)
    key = (name, *labels.items())
    child = _children.get(key)
    if child is None:
        child = _children[key] = _get(name).labels(**{k: str(v) for k, v in labels.items()})
    return child


def labelled(name: str, **labels):
    """The metric child of these labels, to keep and call ``.inc``/``.observe`` on directly (a hot path:
    a shard's per-draw counters skip the lookup that inc/observe make)."""
    return _labelled(name, labels)


def inc(name: str, value: float = 1.0, **labels) -> None:
    _labelled(name, labels).inc(value)


def set(name: str, value: float, **labels) -> None:  # noqa: A001 - the metric verb
    _labelled(name, labels).set(value)


def observe(name: str, value: float, **labels) -> None:
    _labelled(name, labels).observe(value)


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Expose this process's metrics on ``port`` (0: any free port). Returns the port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server.server_address[1]


_served: dict[str, object] = {}     # this process's endpoint: {"port": int, "file": Path}


def serve_and_register(role: str, index: int = 0, base_port: int = 0) -> int:
    """Serve this process's metrics and announce the endpoint to Prometheus. Returns the port.

    ``role`` is driver | trainer | teacher | pool (any other name gets a free
    port); ``base_port`` is ``MetricsConfig.port`` (0: always a free port). The
    port tried first is ``base_port + ROLE_OFFSETS[role] + index``; if it is
    taken, any free port. Idempotent: a process serves one endpoint, the first
    call's (role, index) names it. The target file is removed at exit, after
    ``DKDM_METRICS_LINGER_S`` seconds.
    """
    with _lock:
        if _served:
            return int(_served["port"])
        addr = sd.bind_address()
        preferred = sd.preferred_port(base_port, role, index)
        try:
            port = serve(preferred, addr)
        except OSError:                   # taken (another run, another process): any free port
            port = serve(0, addr)
        path = sd.write_target(sd.sd_dir(), role, index, sd.advertised_host(), port)
        _served.update(port=port, file=path, pid=os.getpid())
        atexit.register(_unregister)
        return port


def _unregister() -> None:
    if not _served or _served.get("pid") != os.getpid():     # a forked child inherits atexit
        return
    linger = sd.linger_seconds()
    if linger:
        time.sleep(linger)
    sd.remove_target(Path(_served["file"]))
