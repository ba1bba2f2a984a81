"""The driver's console under Ray: what Ray prints on its own and no setting silences is dropped here.

Ray forwards every worker's stdout/stderr to the driver through one dispatcher
(``ray._private.ray_logging.global_worker_stdstream_dispatcher``, handler ``"ray_print_logs"``,
installed by ``ray.init(log_to_driver=True)``). ``install_log_filter`` wraps that handler and drops
the lines matching ``RAY_NOISE`` (and the tracebacks under ``RAY_NOISE_WITH_TRACEBACK``), each
something Ray logs about its own machinery when nothing is wrong; every other line is printed as Ray
prints it.
"""

from __future__ import annotations

import re

# Ray Train's TrainController starts its PreemptionWatcher (max_restarts=-1) with actor handles as
# constructor arguments, and the core worker (core_worker.cc) logs that as an error on every run.
# The project's own restartable actors are started without such arguments instead.
RAY_NOISE = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*constructor arguments "
               r"in the object store"),
)

# Ray Train's controller asks its autoscaling coordinator for resources with a fixed 5 s timeout
# (AUTOSCALING_REQUESTS_GET_TIMEOUT_S in autoscaling_coordinator_client.py, no setting) and, when the
# CPU is too busy to answer in time, logs a warning "safe to ignore" with the GetTimeoutError's
# traceback. The warning line and the traceback under it are dropped; the request is retried.
# Ray Train's PlacementGroupCleaner builds a new GCS client on every poll (State API, no setting); when
# the GCS is slow to answer (a busy CPU, or the cluster going down) that poll raises RpcError outside
# the one exception its monitor thread catches, and the thread dies with a traceback. The controller
# stops the cleaner at the end of every run, so it only ever guards a crashed controller.
RAY_NOISE_WITH_TRACEBACK = (
    re.compile(r"Failed to send resource request for train-\S+\. If this only happens transiently"),
    re.compile(r"Exception in thread PlacementGroupCleanerMonitor:"),
)
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s|ray\.exceptions\.(GetTimeoutError|RpcError)\b)")

_HANDLER = "ray_print_logs"


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in RAY_NOISE)


def drop_noise(lines: list[str]) -> list[str]:
    """``lines`` without the ``RAY_NOISE`` lines and the ``RAY_NOISE_WITH_TRACEBACK`` blocks."""
    kept, in_block = [], False
    for line in lines:
        if any(p.search(line) for p in RAY_NOISE_WITH_TRACEBACK):
            in_block = True
            continue
        if in_block and _TRACEBACK_LINE.match(line):
            continue
        in_block = False
        if not is_noise(line):
            kept.append(line)
    return kept


def install_log_filter() -> bool:
    """Wrap Ray's worker-log printer with the ``RAY_NOISE`` filter; False when Ray prints no worker logs."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == _HANDLER and not getattr(handler, "filters_ray_noise", False):
                dispatcher.handlers[i] = (name, _filtered(handler))
                return True
    return False


def _filtered(handler):
    def handle(data: dict) -> None:
        lines = drop_noise(data.get("lines", []))
        if lines or not data.get("lines"):
            handler(dict(data, lines=lines))

    handle.filters_ray_noise = True
    return handle


def wait_for_train_cleanup(timeout_s: float = 15.0, poll_s: float = 0.5) -> bool:
    """Wait until Ray Train's placement-group cleaner has exited; True when it has (or none ran).

    ``TrainController`` stops its detached ``PlacementGroupCleaner`` as the run ends, but the cleaner's
    monitor thread may still be inside a State API call (up to 10 s) and the actor exits only after it.
    Shutting Ray down before then leaves that thread polling a GCS that is gone, and it dies with a
    traceback; so the driver calls this between ``trainer.fit()`` and ``ray.shutdown()``.
    """
    import time

    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            alive = list_actors(filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")],
                                timeout=5, raise_on_missing_output=False)
        except Exception:  # noqa: BLE001 - no State API (no dashboard on this cluster): nothing to wait for
            return True
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
