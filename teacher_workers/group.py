"""The teacher fleet on Ray: one actor per teacher device, all feeding one shared pool.

``TeacherActor`` is a plain class (STYLE: Ray at the edge, as RLlib's EnvRunner):
it builds its teacher with ``make_teacher``, wraps a ``TeacherWorker`` (seed =
base seed + worker index, so no two teachers draw the same noise) around the
shared pool client, and runs the worker's refill loop in a background thread:
claim up to one micro-batch of REFILL slots, one denoising step + one teacher
forward per slot (or, for empty slots, its share of the shuffle-denoise
warm-up), fill. ``TeacherGroup`` applies ``ray.remote`` with the configured
resources and restart policy, and reports health.

Fault tolerance: a killed actor's claims are not filled; the pool returns them
to REFILL at their deadline (``pool.claim_timeout_s``). Ray restarts the actor
(``ray.max_restarts``), whose constructor starts the loop again, so filling
continues without the driver's help. Restarts are counted in a tiny ledger
actor (a restarted process has lost its memory) and exported as
``dkdm_teacher_restarts_total{worker}``.

Each actor serves its own Prometheus endpoint (``metrics.serve_and_register``,
role ``teacher``, port ``metrics.port + 200 + index`` when free).
"""

from __future__ import annotations

import os
import threading
import time

import ray
import torch

from common import metrics
from common.config import Config
from common.pool.base import Pool, PoolError, PoolTimeout
from common.seeds import teacher_seed
from common.teachers import make_teacher
from teacher_workers.worker import TeacherWorker

# A claim that finds no REFILL slot waits this long before the loop looks at its stop flag again.
IDLE_POLL_S = 0.5
# A restarted actor draws fresh noise: seed = teacher_seed(run.seed) + worker index + RESTART_SEED_STRIDE * restarts.
RESTART_SEED_STRIDE = 100_003


class RestartLedger:
    """Counts actor restarts per worker index (it outlives the teacher processes it counts)."""

    def __init__(self):
        self.restarts: dict[int, int] = {}

    def restarted(self, index: int) -> int:
        self.restarts[index] = self.restarts.get(index, 0) + 1
        return self.restarts[index]

    def get(self, index: int) -> int:
        return self.restarts.get(index, 0)


class TeacherActor:
    """One teacher on one device, refilling ``pool`` in a background thread from construction on."""

    def __init__(self, cfg: Config, pool: Pool, index: int, ledger=None, start: bool = True):
        self.cfg, self.pool, self.index = cfg, pool, index
        self.restarts = 0
        if ledger is not None:
            reconstructed = _was_reconstructed()
            self.restarts = ray.get(ledger.restarted.remote(index)) if reconstructed else ray.get(ledger.get.remote(index))
        torch.set_num_threads(max(1, int(cfg.ray.teacher_num_cpus)))
        self.metrics_port = None
        if cfg.metrics.enabled:
            self.metrics_port = metrics.serve_and_register("teacher", index, cfg.metrics.port)
        if self.restarts:
            metrics.inc(metrics.TEACHER_RESTARTS_TOTAL, self.restarts, worker=index)
        teacher = make_teacher(cfg.teacher)
        self.worker = TeacherWorker(teacher, pool, microbatch=cfg.distill.teacher_microbatch,
                                    seed=teacher_seed(cfg.run.seed) + RESTART_SEED_STRIDE * self.restarts,
                                    worker_index=index,
                                    warmup="noise" if cfg.distill.variant == "iterative" else "shuffle",
                                    claim_timeout_s=cfg.pool.claim_timeout_s)
        self.started = time.time()
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"teacher-{self.index}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """refill_once until stopped; an empty REFILL queue is waiting, a pool error is retried with backoff."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.worker.refill_once(self.worker.microbatch, timeout_s=IDLE_POLL_S)
                backoff = 0.1
            except PoolTimeout:
                continue
            except PoolError as err:       # a shard restarting or gone: keep trying until stopped
                self.last_error = str(err)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def health(self) -> dict:
        """Per-worker record: records, forwards, busy fraction (of wall time since start), restarts."""
        w = self.worker
        alive = self._thread is not None and self._thread.is_alive()
        up = max(time.time() - self.started, 1e-9)
        return {"worker": self.index, "pid": os.getpid(), "running": alive, "records": w.records,
                "forwards": w.forwards, "busy_s": w.busy_s, "busy_fraction": w.busy_s / up, "uptime_s": up,
                "restarts": self.restarts, "metrics_port": self.metrics_port, "last_error": self.last_error}

    def noise_probe(self, n: int = 4) -> list[float]:
        """The next n standard normals of this worker's generator (the seeds test: teachers differ)."""
        return torch.randn(n, generator=_copy_generator(self.worker.gen)).tolist()

    def ping(self) -> int:
        return os.getpid()


def _copy_generator(gen: torch.Generator) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.set_state(gen.get_state())
    return g


def _was_reconstructed() -> bool:
    import warnings
    try:
        with warnings.catch_warnings():        # Ray 2.60 warns about its own use of a deprecated field here
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor
        return False


class TeacherGroup:
    """``cfg.ray.num_teachers`` TeacherActors on Ray, feeding ``pool``; worker i is named ``dkdm_teacher.<pool>.<i>``."""

    def __init__(self, cfg: Config, pool: Pool, num_teachers: int | None = None):
        self.cfg, self.pool = cfg, pool
        n = cfg.ray.num_teachers if num_teachers is None else num_teachers
        r = cfg.ray
        self.ledger = ray.remote(RestartLedger).options(num_cpus=0).remote()
        actor_cls = ray.remote(TeacherActor)
        self.actors = [
            actor_cls.options(num_gpus=r.teacher_num_gpus, num_cpus=r.teacher_num_cpus, max_restarts=r.max_restarts,
                              max_task_retries=r.max_restarts, name=f"dkdm_teacher.{cfg.pool.name}.{i}").remote(
                cfg, pool, i, self.ledger)
            for i in range(n)
        ]
        ray.get([a.ping.remote() for a in self.actors])    # fail here (teacher file, device), not later

    def __len__(self) -> int:
        return len(self.actors)

    def health(self) -> list[dict]:
        """One record per worker; a worker that cannot answer (dead, restarting) reports ``running: False``."""
        out = []
        for i, a in enumerate(self.actors):
            try:
                out.append(ray.get(a.health.remote(), timeout=30))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as err:
                out.append({"worker": i, "running": False, "error": type(err).__name__,
                            "restarts": ray.get(self.ledger.get.remote(i))})
        return out

    def wait_until(self, predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Poll pool stats until ``predicate(stats)``; False on timeout."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate(self.pool.stats()):
                return True
            time.sleep(poll_s)
        return False

    def stop(self) -> None:
        """Stop every loop (finishing its current micro-batch), then end the actors."""
        refs = [a.stop.remote() for a in self.actors]
        try:
            ray.get(refs, timeout=120)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to stop
            pass
        for a in self.actors + [self.ledger]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
