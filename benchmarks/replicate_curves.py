"""Learning curves of Table 2 (digits) and Table 5 at a long budget (issue 22): the digits FID of every
method every ``--eval-every`` steps, 3 seeds, all methods sampled on the same original timesteps.

    python benchmarks/replicate.py --curves --jobs 2           # the long run (hours), report in docs/
    python benchmarks/replicate.py --curves --quick --steps 40 --eval-every 20 --out /tmp/c   # smoke test

Every method trains to ``--steps`` (default 5,000); then all go on together, ``--eval-every`` steps at a
time, up to ``--max-steps`` (default 10,000) or until the data-based student's mean FID is within 2x of
the teacher's. A *unit* is one (experiment, method, seed) run folder under ``--work``; a *segment* trains
a unit from its checkpoint to the next evaluation step and scores it there. Each scored point is added
to ``<out>/replication/curves.json`` as soon as it exists, so a stopped run resumes where it stopped:
points already there are skipped and each unit goes on from its checkpoint. ``--jobs`` segments of
different units run side by side, one process each; only this process writes the results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from benchmarks import replicate as rp
from common.data import load_dataset, mix_datasets
from common.teachers import make_teacher
from common.teachers.dkdm_teacher import DKDMTeacher
from student_trainer import experiments as ex

logger = logging.getLogger(__name__)

TABLES = ("table2_digits", "table5_cross")
CONVERGED_RATIO = 2.0       # data-based FID within this factor of the teacher's: the curves stop there
# Table 5's CNN student on the CNN teacher is Table 2's student (configs/digits.yaml's ADM, same teacher,
# seeds and steps): with both tables run, its points are copied from Table 2 instead of trained twice.
SAME_AS = {("table5_cross", "teacher_CNN"): ("table2_digits", "teacher"),
           ("table5_cross", "CNNS_CNNT_data_free"): ("table2_digits", "data_free"),
           ("table5_cross", "CNNS_CNNT_dkdm"): ("table2_digits", "dkdm")}


def methods_of(exp: str) -> list[str]:
    if exp == "table2_digits":
        return ["teacher", *rp.TABLE2_METHODS, "dkdm"]
    return [f"teacher_{t}" for t in rp.ARCHS] + [f"{s}S_{t}T_{m}" for t in rp.ARCHS for s in rp.ARCHS
                                                  for m in ("data_free", "dkdm")]


def split_method(exp: str, method: str) -> tuple[str, str | None, str]:
    """-> (teacher arch, student arch or None for the teacher itself, kind: teacher / dkdm / data_* )."""
    if method.startswith("teacher"):
        return ("CNN" if exp == "table2_digits" else method.split("_")[1]), None, "teacher"
    if exp == "table2_digits":
        return "CNN", "CNN", method
    student, teacher, kind = method.split("_", 2)
    return teacher[:-1], student[:-1], kind


def unit_cfg(ctx: rp.Context, exp: str, method: str, seed: int):
    tname, sname, _ = split_method(exp, method)
    path = rp.digits_teacher_path(ctx) if tname == "CNN" else rp.vit_teacher_path(ctx)
    arch = () if exp == "table2_digits" or sname is None else (
        f"student.arch={rp.ARCHS[sname][0]}", f"student.size={rp.ARCHS[sname][1]}", f"student.flags={rp.ARCHS[sname][2]}")
    return rp.digits_cfg(ctx, f"curves-{exp}-{method}", seed, path, *arch)


# --- one segment (runs in a worker process) -----------------------------------------------------

_SCORER: list = []


def _score(x: torch.Tensor) -> dict:
    if not _SCORER:             # the digits reference features, once per process
        _SCORER.append(ex.digits_scorer())
    return _SCORER[0](x)


def synthetic_set(ctx: rp.Context, cfg, tname: str, seed: int) -> torch.Tensor:
    """The teacher's synthetic set of one seed (as replicate.py's), cached in the work folder."""
    path = ctx.work / f"curves-synth-{tname}-s{seed}.pt"
    if path.is_file():
        return torch.load(path)
    x = ex.teacher_samples(make_teacher(cfg.teacher, "cpu"), cfg, num=ctx.budget.digits_real,
                           steps=ctx.budget.synth_steps, seed=10_000 + seed)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(x, tmp)
    os.replace(tmp, path)       # two processes may make the same set: the same bytes, one file
    return x


def training_set(ctx: rp.Context, cfg, kind: str, tname: str, seed: int) -> torch.Tensor:
    real = load_dataset("digits")[0][:ctx.budget.digits_real]
    if kind == "data_based":
        return real
    synth = synthetic_set(ctx, cfg, tname, seed)
    if kind == "data_free":
        return synth
    x, _ = mix_datasets((real, None), (synth, None), float(kind.split("_")[-1]), torch.Generator().manual_seed(seed))
    return x


def _worker_init(driver: int) -> None:
    torch.set_num_threads(1)

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(2)
        os._exit(1)     # the driver was killed: stop too, before a rerun trains the same unit beside us

    threading.Thread(target=watch, daemon=True).start()


def run_segment(ctx: rp.Context, exp: str, method: str, seed: int, step: int) -> dict:
    """Train the unit from its checkpoint to ``step`` and score its EMA samples there (the teacher: step 0)."""
    from student_trainer.baselines import train_on_data
    from student_trainer.distill import distill

    cfg = unit_cfg(ctx, exp, method, seed)
    tname, _, kind = split_method(exp, method)
    t0 = time.perf_counter()
    if kind == "teacher":
        model = make_teacher(cfg.teacher, "cpu")
    else:
        run = cfg.model_copy(deep=True)
        run.distill.steps, run.run.ckpt_every = step, 0
        run.sample.num_samples = min(16, cfg.sample.num_samples)     # the trainers' own grid only
        if kind == "dkdm":
            out = distill(run)
        else:
            run.teacher.diffusion.respacing = ""     # standard training samples t from the full chain
            out = train_on_data(run, data=(training_set(ctx, cfg, kind, tname, seed).clamp(-1, 1), None))
        if out["steps"] != step:
            raise RuntimeError(f"{out['run_dir']} holds a checkpoint at step {out['steps']}, not {step}: its points "
                               f"are missing from curves.json; delete the folder to train it again")
        model = DKDMTeacher.from_folder(out["checkpoint"])
    t1 = time.perf_counter()
    x = ex.teacher_samples(model, cfg)          # cfg.sample: the table's common timesteps, EMA weights
    point = {"exp": exp, "method": method, "seed": seed, "step": step, "metrics": _score(x),
             "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    if seed == ctx.seeds[0]:       # the latest samples of the first seed
        from benchmarks.replicate_report import grid_name
        from common.images import save_grid
        save_grid(x[:64], ctx.assets / grid_name(f"curves_{exp}", method))
    return point


# --- the driver ------------------------------------------------------------------------------------

def key(p: dict) -> tuple:
    return p["exp"], p["method"], p["seed"], p["step"]


def save(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    os.replace(tmp, path)


def mean_fid(results: dict, exp: str, method: str, step: int) -> float:
    v = [p["metrics"]["fid"] for p in results["points"] if key(p)[:2] == (exp, method) and p["step"] == step]
    return float(np.mean(v)) if v else math.nan


def converged(results: dict, step: int) -> bool:
    """The data-based student within CONVERGED_RATIO of the teacher (Table 2; no Table 2: stop at --steps)."""
    based, teacher = mean_fid(results, "table2_digits", "data_based", step), mean_fid(results, "table2_digits",
                                                                                      "teacher", 0)
    return not (math.isfinite(based) and math.isfinite(teacher)) or based <= CONVERGED_RATIO * teacher


def add_copy(results: dict, point: dict, copies: dict, done: set = frozenset()) -> None:
    dst = copies.get((point["exp"], point["method"]))
    if dst and (*dst, point["seed"], point["step"]) not in done:
        results["points"].append({**point, "exp": dst[0], "method": dst[1], "copy_of": f"{point['exp']}/{point['method']}"})


def run_stage(ctx: rp.Context, results: dict, path: Path, exps: list[str], target: int, eval_every: int,
              jobs: int, on_point) -> None:
    """Every unit of ``exps`` to ``target``: its missing segments in order, units round-robin, ``jobs`` at a time."""
    done = {key(p) for p in results["points"]}
    copies = {src: dst for dst, src in SAME_AS.items() if src[0] in exps and dst[0] in exps}
    for p in list(results["points"]):       # points of an earlier run of Table 2 alone
        add_copy(results, p, copies, done)
    done = {key(p) for p in results["points"]}
    todo = {}
    for exp in exps:
        for method in methods_of(exp):
            if (exp, method) in copies.values():
                continue
            for seed in ctx.seeds:
                steps = [0] if method.startswith("teacher") else range(eval_every, target + 1, eval_every)
                todo[exp, method, seed] = deque(s for s in steps if (exp, method, seed, s) not in done)
    queue = deque(u for u, steps in todo.items() if steps)
    with ProcessPoolExecutor(jobs, get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        running = {}
        while queue or running:
            while queue and len(running) < jobs:
                unit = queue.popleft()
                running[pool.submit(run_segment, ctx, *unit, todo[unit].popleft())] = unit
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                unit = running.pop(fut)
                point = fut.result()
                results["points"].append(point)
                add_copy(results, point, copies)
                save(results, path)
                on_point(point)
                if todo[unit]:
                    queue.append(unit)


def run_curves(ctx: rp.Context, exps: list[str], steps: int, max_steps: int, eval_every: int, jobs: int,
               command: str) -> dict:
    from benchmarks.replicate_report import write_curves_report

    path = ctx.assets / "curves.json"
    results = json.loads(path.read_text()) if path.is_file() else {"points": []}
    same = {k: v for k, v in rp.asdict(ctx.budget).items() if k != "seeds"}
    old = {k: v for k, v in results.get("budget", same).items() if k != "seeds"}
    if results["points"] and (json.loads(json.dumps(same)) != old or results.get("eval_every") != eval_every):
        raise SystemExit(f"{path} holds points of another budget or --eval-every: give this run another --out "
                         f"(and --work), or move that file away")
    results.update(budget=rp.asdict(ctx.budget), command=command, steps=steps, max_steps=max_steps,
                   eval_every=eval_every, jobs=jobs, quick=ctx.quick, cpu_count=os.cpu_count())
    rp.digits_teacher_path(ctx)             # teachers once, before the workers need them
    if "table5_cross" in exps:
        rp.vit_teacher_path(ctx)
    t0 = time.perf_counter()

    def on_point(p: dict) -> None:
        logger.info("%s %s seed %s step %s: FID %.2f (train %.0f s, eval %.0f s)", p["exp"], p["method"], p["seed"],
                    p["step"], p["metrics"]["fid"], p["train_s"], p["eval_s"])
        write_curves_report(results, ctx.out)

    target = steps
    while True:
        run_stage(ctx, results, path, exps, target, eval_every, jobs, on_point)
        if target >= max_steps or converged(results, target):
            break
        target = min(max_steps, target + eval_every)
    results["notes"] = sorted(set(results.get("notes", []) + ctx.notes))
    results["last_wall_s"] = time.perf_counter() - t0
    save(results, path)
    write_curves_report(results, ctx.out)
    return results
