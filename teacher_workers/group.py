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

import logging
import os
import threading
import time

import ray
import torch

from common import metrics
from common.config import Config
from common.pool import attach_pool
from common.pool.base import Pool, PoolError, PoolTimeout
from common.seeds import teacher_seed
from common.teachers import make_teacher
from teacher_workers.worker import TeacherWorker

# A claim that finds no REFILL slot waits this long before the loop looks at its stop flag again.
IDLE_POLL_S = 0.5
# A restarted actor draws fresh noise: seed = teacher_seed(run.seed) + worker index + RESTART_SEED_STRIDE * restarts.
RESTART_SEED_STRIDE = 100_003
# How often a teacher tells the ledger its totals (what a SIGKILL loses from the final report).
LEDGER_REPORT_S = 1.0
# A loop stops after its current step (one micro-batch forward or a 0.5 s idle claim); one that has not
# by then (restarting, failing again) is killed.
STOP_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)


def on_the_drivers_node():
    """Where the run's bookkeeping actors go: a ledger is not restartable (it is what outlives restarts), so it
    shares the driver's fate and no other node's (a ledger on a removed node took the run down with it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class TeacherLedger:
    """What outlives a teacher's processes (a restarted process has lost its memory): per worker index
    the restarts, the failures with the last error, and the running totals of every incarnation."""

    def __init__(self):
        self.restarts: dict[int, int] = {}
        self.failures: dict[int, int] = {}
        self.last_error: dict[int, str] = {}
        self.totals: dict[tuple[int, int], dict] = {}      # (index, incarnation) -> records, forwards, busy_s

    def restarted(self, index: int) -> int:
        self.restarts[index] = self.restarts.get(index, 0) + 1
        return self.restarts[index]

    def get(self, index: int) -> int:
        return self.restarts.get(index, 0)

    def report(self, index: int, incarnation: int, totals: dict) -> None:
        self.totals[(index, incarnation)] = totals

    def failed(self, index: int, incarnation: int, error: str, totals: dict) -> int:
        self.totals[(index, incarnation)] = totals
        self.failures[index] = self.failures.get(index, 0) + 1
        self.last_error[index] = error
        return self.failures[index]

    def summary(self) -> dict[int, dict]:
        """index -> restarts, failures, last_error and the summed totals of every incarnation by number."""
        out: dict[int, dict] = {}
        for i in set(self.restarts) | set(self.failures) | {i for i, _ in self.totals}:
            out[i] = {"restarts": self.restarts.get(i, 0), "failures": self.failures.get(i, 0),
                      "last_error": self.last_error.get(i),
                      "incarnations": {n: t for (j, n), t in self.totals.items() if j == i}}
        return out


class TeacherActor:
    """One teacher on one device, refilling ``pool`` in a background thread from construction on.

    Any exception in that thread ends the process (after one log line, the ledger told and the
    failure counted) so that Ray restarts the actor: never a live actor with a dead loop.
    """

    def __init__(self, cfg: Config, pool: Pool | str, index: int, ledger=None, start: bool = True):
        if isinstance(pool, str):             # a Ray pool's name (TeacherGroup: no handles in restartable actors' args)
            pool = attach_pool(cfg.pool.model_copy(update={"backend": "ray", "name": pool}))
        if isinstance(ledger, str):
            ledger = ray.get_actor(ledger)
        self.cfg, self.pool, self.index, self.ledger = cfg, pool, index, ledger
        self.restarts = failures = 0
        if ledger is not None:
            reconstructed = _was_reconstructed()
            self.restarts = ray.get(ledger.restarted.remote(index)) if reconstructed else ray.get(ledger.get.remote(index))
            failures = ray.get(ledger.summary.remote()).get(index, {}).get("failures", 0)
        torch.set_num_threads(max(1, int(cfg.ray.teacher_num_cpus)))
        self.metrics_port = None
        if cfg.metrics.enabled:
            self.metrics_port = metrics.serve_and_register("teacher", index, cfg.metrics.port)
        metrics.inc(metrics.TEACHER_ERRORS_TOTAL, failures, worker=index)    # every incarnation's, from the ledger
        if self.restarts:
            metrics.inc(metrics.TEACHER_RESTARTS_TOTAL, self.restarts, worker=index)
        fault = cfg.teacher.fault
        faulty = (fault.raise_after_forwards is not None and (fault.teachers is None or index in fault.teachers)
                  and (fault.incarnations is None or self.restarts < fault.incarnations))
        teacher = make_teacher(cfg.teacher)
        self.worker = TeacherWorker(teacher, pool, microbatch=cfg.distill.teacher_microbatch,
                                    seed=teacher_seed(cfg.run.seed) + RESTART_SEED_STRIDE * self.restarts,
                                    worker_index=index,
                                    warmup="noise" if cfg.distill.variant == "iterative" else "shuffle",
                                    claim_timeout_s=cfg.pool.claim_timeout_s,
                                    fail_after_forwards=fault.raise_after_forwards if faulty else None)
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
        try:
            self._refill_until_stopped()
        except BaseException as err:  # noqa: BLE001 - whatever it is, this process must go so Ray restarts it
            self._die(err)

    def _refill_until_stopped(self) -> None:
        """step until stopped; an empty REFILL queue is waiting, a pool error is retried with backoff."""
        backoff, reported = 0.1, time.monotonic()
        while not self._stop.is_set():
            try:
                self.worker.step(timeout_s=IDLE_POLL_S)
                backoff = 0.1
            except PoolTimeout:
                pass
            except PoolError as err:       # a shard restarting or gone: keep trying until stopped
                self.last_error = str(err)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            if self.ledger is not None and time.monotonic() - reported > LEDGER_REPORT_S:
                self.ledger.report.remote(self.index, self.restarts, self.totals())
                reported = time.monotonic()

    def _die(self, err: BaseException) -> None:
        """One log line, the failure counted (here and in the ledger), then exit: Ray restarts the actor."""
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
        left = self.cfg.ray.max_restarts - self.restarts
        then = f"Ray restarts it ({left} restart(s) left)" if left > 0 else \
            f"no restarts left (ray.max_restarts={self.cfg.ray.max_restarts}): the run stops"
        logger.error("teacher %d: %s; the actor exits and %s", self.index, error, then)
        metrics.inc(metrics.TEACHER_ERRORS_TOTAL, 1, worker=self.index)
        if self.ledger is not None:
            try:
                ray.get(self.ledger.failed.remote(self.index, self.restarts, error, self.totals()), timeout=10)
            except Exception:  # noqa: BLE001 - the driver then names Ray's cause of death instead
                pass
        os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def totals(self) -> dict:
        w = self.worker
        return {"records": w.records, "forwards": w.forwards, "busy_s": w.busy_s}

    def health(self) -> dict:
        """Per-worker record of this incarnation: records, forwards, busy fraction (of wall time since start), restarts."""
        w = self.worker
        alive = self._thread is not None and self._thread.is_alive()
        up = max(time.time() - self.started, 1e-9)
        records, forwards = w.totals()
        return {"worker": self.index, "pid": os.getpid(), "running": alive, "records": records,
                "forwards": forwards, "busy_s": w.busy_s, "busy_fraction": w.busy_s / up, "uptime_s": up,
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


class TeacherFailed(RuntimeError):
    """A teacher actor is dead for good (its restarts are spent): the run cannot go on. One line."""


class TeacherGroup:
    """``cfg.ray.num_teachers`` TeacherActors on Ray, feeding ``pool``; worker i is named ``dkdm_teacher.<pool>.<i>``.

    ``watch()`` (the driver calls it every second or so) reports each failure and restart as it
    happens and raises TeacherFailed once a teacher's restarts are spent.
    """

    def __init__(self, cfg: Config, pool: Pool, num_teachers: int | None = None):
        self.cfg, self.pool = cfg, pool
        n = cfg.ray.num_teachers if num_teachers is None else num_teachers
        r = cfg.ray
        ledger_name = f"dkdm_teacher_ledger.{cfg.pool.name}"
        self.ledger = ray.remote(TeacherLedger).options(num_cpus=0, name=ledger_name,
                                                        scheduling_strategy=on_the_drivers_node()).remote()
        # Restartable actors get names, not actor handles, as constructor arguments: Ray keeps such
        # arguments in the object store and logs an error (core_worker.cc) that a restart may not find them.
        pool_cfg = getattr(pool, "cfg", None)          # a Ray pool is passed by name, any other pool as itself
        pool_arg = pool_cfg.name if getattr(pool_cfg, "backend", None) == "ray" else pool
        actor_cls = ray.remote(TeacherActor)
        self.actors = [
            actor_cls.options(num_gpus=r.teacher_num_gpus, num_cpus=r.teacher_num_cpus, resources=r.teacher_resources,
                              max_restarts=r.max_restarts,
                              max_task_retries=r.max_restarts, name=f"dkdm_teacher.{cfg.pool.name}.{i}").remote(
                cfg, pool_arg, i, ledger_name)
            for i in range(n)
        ]
        ray.get([a.ping.remote() for a in self.actors])    # fail here (teacher file, device), not later
        self._seen: dict[int, dict] = {i: {"restarts": 0, "failures": 0} for i in range(n)}
        self._pings: dict[int, ray.ObjectRef] = {}
        self._dead: dict[int, str] = {}
        self._expired_claims = 0

    def __len__(self) -> int:
        return len(self.actors)

    def health(self) -> list[dict]:
        """One record per worker: records, forwards and busy seconds summed over every incarnation, restarts,
        failures; a worker that cannot answer (dead, restarting) reports ``running: False``."""
        ledger = self._ledger()
        out = []
        for i, a in enumerate(self.actors):
            try:
                h = ray.get(a.health.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as err:
                h = {"worker": i, "running": False, "error": type(err).__name__, "records": 0, "forwards": 0,
                     "busy_s": 0.0, "restarts": ledger.get(i, {}).get("restarts", 0)}
            answered = "pid" in h          # this incarnation's totals are its own, the ledger's may lag
            earlier = [t for n, t in ledger.get(i, {}).get("incarnations", {}).items()
                       if not answered or n != h["restarts"]]
            for key in ("records", "forwards", "busy_s"):
                h[key] = h.get(key, 0) + sum(t[key] for t in earlier)
            h["failures"] = ledger.get(i, {}).get("failures", 0)
            h["last_error"] = h.get("last_error") or ledger.get(i, {}).get("last_error")
            out.append(h)
        return out

    def _ledger(self) -> dict[int, dict]:
        try:
            return ray.get(self.ledger.summary.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the ledger went with a node: report what the actors say
            return {}

    def watch(self) -> None:
        """One look at the fleet: log each failure, restart and expired claim since the last look, and
        raise TeacherFailed when a teacher is dead for good (Ray's ActorDiedError: its restarts are spent)."""
        ledger = self._ledger()
        for i, seen in self._seen.items():
            now = ledger.get(i, {})
            if now.get("failures", 0) > seen["failures"]:
                seen["cause"] = now.get("last_error")
                logger.warning("teacher %d failed (%s); Ray restarts it unless its restarts are spent (ray.max_restarts=%d)",
                               i, seen["cause"], self.cfg.ray.max_restarts)
            if now.get("restarts", 0) > seen["restarts"]:
                logger.warning("teacher %d restarted by Ray (restart %d of %d) after: %s; the slots it had claimed "
                               "return to REFILL when their claims expire (pool.claim_timeout_s=%g s)",
                               i, now["restarts"], self.cfg.ray.max_restarts, seen.pop("cause", None) or "its process died",
                               self.cfg.pool.claim_timeout_s)
            seen.update(restarts=now.get("restarts", 0), failures=now.get("failures", 0))
        self._watch_claims()
        self._ping_all(ledger)
        if self._dead:
            i, why = next(iter(self._dead.items()))
            raise TeacherFailed(f"teacher {i} is dead and has no restarts left (ray.max_restarts={self.cfg.ray.max_restarts}): {why}")

    def _watch_claims(self) -> None:
        try:
            expired = self.pool.stats().expired_claims_total
        except Exception:  # noqa: BLE001 - a pool error is the trainers' to report
            return
        if expired > self._expired_claims:
            logger.warning("pool: %d claimed slot(s) expired back to REFILL (their teacher died or was slower than "
                           "pool.claim_timeout_s); the live teachers fill them again", expired - self._expired_claims)
            self._expired_claims = expired

    def _ping_all(self, ledger: dict[int, dict]) -> None:
        """A ping per actor, never two in flight: a restarting actor's ping waits (max_task_retries), a dead
        one's raises ActorDiedError with Ray's cause of death."""
        for i, a in enumerate(self.actors):
            ref = self._pings.get(i)
            if ref is None:
                self._pings[i] = a.ping.remote()
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self._pings[i]
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError as err:
                self._dead[i] = ledger.get(i, {}).get("last_error") or _death_cause(err)
            except ray.exceptions.RayActorError:
                pass                      # unavailable for now (a node lost, restarting): the next look tells

    def alive(self) -> str:
        """``"1 of 2 teachers alive (teacher 1: ZeroDivisionError: ...)"``, for messages about an empty pool:
        the cause for each teacher not answering, the restarts and last error of each that failed before."""
        ledger = self._ledger()
        alive, notes = 0, []
        for i, a in enumerate(self.actors):
            past = ledger.get(i, {})
            try:
                ray.get(a.ping.remote(), timeout=5)
                alive += 1
                if past.get("restarts") or past.get("failures"):
                    notes.append(f"teacher {i}: restarted {past.get('restarts', 0)} time(s), last cause: "
                                 f"{past.get('last_error') or 'its process died'}")
            except Exception as err:  # noqa: BLE001 - dead, restarting, or not answering
                notes.append(f"teacher {i}: {past.get('last_error') or _death_cause(err)}")
        return f"{alive} of {len(self.actors)} teachers alive" + (f" ({'; '.join(notes)})" if notes else "")

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
            ray.get(refs, timeout=STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to stop
            pass
        for a in self.actors + [self.ledger]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []


def _death_cause(err: BaseException) -> str:
    """The first line of Ray's account of an actor's death that says why (its error message is long)."""
    text = str(err).strip()
    for line in text.splitlines():
        if "exit" in line.lower() or "killed" in line.lower() or "died" in line.lower():
            return line.strip()[:200]
    return type(err).__name__
