"""A scaled-down replication of the paper's results (issue 7): Tables 2 and 5, Fig. 4a/4b, and beyond.

    python benchmarks/replicate.py                      # the full replication (3 seeds), report in docs/
    python benchmarks/replicate.py --quick --out /tmp/r # a few minutes, 1 seed, tiny budgets (the test)
    python benchmarks/replicate.py --only fig4b_rho     # one experiment; others keep their saved results
    python benchmarks/replicate.py --report-only        # rewrite the report from docs/replication/results.json
    python benchmarks/replicate.py --curves --jobs 2    # learning curves of Tables 2 and 5 (hours; replicate_curves.py)

Experiments (each seeded, ``--seeds`` seeds, mean and standard deviation):
    table2_mixture   teacher / data-based / data-limited 5-20 % / data-free / DKDM on the analytic mixture (exact)
    table2_digits    the same on sklearn's digits (FID in the project's digits feature space)
    table5_cross     CNN (ADM) <-> ViT (DiT) teacher/student pairs on digits, DKDM vs data-free
    fig4a_variants   quality vs steps: iterative, shuffled iterative, dynamic iterative (mixture)
    fig4b_rho        rho in 0.01 .. 0.4 (mixture)
    beyond_spi       the pool's samples-per-insert bound 1 / 2 / 4 (mixture)
    beyond_chain     distillation chain: 25 / 100 of 1000 steps vs the full 1000-step chain (mixture)

Results are written after every experiment to ``<out>/replication/results.json``, so a run that is
stopped keeps what finished; the report (``<out>/replication.md``) is rewritten each time.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from common.config import Config, load_config
from common.data import load_dataset, mix_datasets
from common.diffusion import respaced_timesteps
from common.images import save_grid
from common.models.checkpoint import read_config
from common.teachers import make_teacher
from student_trainer import experiments as ex

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("benchmarks.replicate")     # not __name__: run as a script it is __main__
DIGITS_TEACHER = ROOT / "common" / "assets" / "digits_teacher"
# Ordered cheap (exact mixture) first, so a run stopped early keeps the most experiments.
EXPERIMENTS = ("table2_mixture", "fig4a_variants", "fig4b_rho", "beyond_spi", "beyond_chain", "table2_digits",
               "table5_cross")
LIMITED = (5, 10, 15, 20)


@dataclass
class Budget:
    """Every size that sets the cost of the replication."""

    seeds: int = 3
    mix_steps: int = 400            # student steps on the mixture (all methods)
    mix_batch: int = 32
    mix_eval: int = 512             # samples scored per run (exact metrics)
    mix_chain: str = "100"          # the mixture's distillation chain (respacing of T = 1000)
    digits_steps: int = 200
    digits_batch: int = 32
    digits_eval: int = 256          # samples scored per run (digits FID)
    digits_chain: str = "50"        # the digits distillation chain (respacing of the teacher's T = 1000)
    digits_real: int = 1797         # real digits used (all of sklearn's); data-free sets match it
    num_real: int = 1797            # mixture "real" set = sklearn digits' size; data-free sets match it
    sample_steps: str = "50"        # respaced ancestral steps when scoring any model (the paper's 50)
    synth_steps: str = "25"         # synthetic-set sampler steps (the paper: IDDPM-100 / -1000, Table 4)
    vit_teacher_steps: int = 30000  # DiT-tiny/2 teacher for Table 5: the CNN teacher's recipe, 3x its steps
    fallback_teacher_steps: int = 1500   # digits ADM teacher, only if common/assets/digits_teacher is missing
    curve_points: int = 5
    rhos: tuple = (0.01, 0.05, 0.1, 0.2, 0.4)
    spis: tuple = (1, 2, 4)
    chains: tuple = ("25", "100", "")    # "" = the full 1000-step chain
    chain_slots_rho: float = 0.4        # B+ size of the chain experiment: round(rho * 100) * b for every chain
    ema_rate: float = 0.99
    mix_lr: float = 1e-3
    digits_lr: float = 1e-3


QUICK = Budget(seeds=1, mix_steps=30, mix_batch=16, mix_eval=64, mix_chain="25", digits_steps=10, digits_batch=16,
               digits_eval=32, digits_chain="10", digits_real=64, num_real=64, sample_steps="10", synth_steps="5", vit_teacher_steps=10,
               fallback_teacher_steps=10, curve_points=2, rhos=(0.1, 0.4), spis=(1, 2), chains=("10", "25"),
               ema_rate=0.9)


@dataclass
class Context:
    budget: Budget
    work: Path                      # run folders (checkpoints of the baselines, cached teachers)
    out: Path                       # <out>/replication.md and <out>/replication/*
    quick: bool
    seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def assets(self) -> Path:
        return self.out / "replication"


# --- configs ----------------------------------------------------------------------------------------

def mixture_cfg(ctx: Context, name: str, seed: int, *overrides: str) -> Config:
    b = ctx.budget
    cfg = load_config(str(ROOT / "configs" / "mixture.yaml"), [
        f"run.name={name}-s{seed}", f"run.out_dir={ctx.work}", f"run.seed={seed}", "run.progress=false",
        "run.device=cpu", f"distill.steps={b.mix_steps}", f"distill.batch_size={b.mix_batch}",
        f"distill.lr={b.mix_lr}", f"distill.ema_rate={b.ema_rate}", "distill.bf16=false",
        f"teacher.diffusion.respacing='{b.mix_chain}'", "pool.claim_timeout_s=3600",
        f"sample.num_samples={b.mix_eval}", f"sample.steps='{b.sample_steps}'", "metrics.enabled=false", *overrides])
    return equal_chains(cfg, list(range(cfg.teacher.diffusion.num_timesteps)))


def digits_cfg(ctx: Context, name: str, seed: int, teacher: str, *overrides: str) -> Config:
    """configs/digits.yaml (its 0.18M ADM student unless overridden) distilled from the dkdm checkpoint ``teacher``."""
    b = ctx.budget
    cfg = load_config(str(ROOT / "configs" / "digits.yaml"), [
        f"run.name={name}-s{seed}", f"run.out_dir={ctx.work}", f"run.seed={seed}", "run.progress=false",
        "run.device=cpu", f"teacher.path={teacher}", "teacher.device=cpu",
        f"teacher.diffusion.respacing='{b.digits_chain}'", "pool.claim_timeout_s=3600",
        f"distill.steps={b.digits_steps}", f"distill.batch_size={b.digits_batch}", f"distill.lr={b.digits_lr}",
        f"distill.ema_rate={b.ema_rate}", "distill.teacher_microbatch=256", f"sample.num_samples={b.digits_eval}",
        f"sample.steps='{b.sample_steps}'", "data.dataset=digits", "metrics.enabled=false", *overrides])
    d = read_config(teacher)["diffusion"]
    return equal_chains(cfg, d.get("timestep_map") or list(range(d["num_timesteps"])))


def equal_chains(cfg: Config, network_timesteps: list[int]) -> Config:
    """Every method of a table samples on the same original timesteps (issue 22): those a DKDM student on
    the distillation chain (``teacher.diffusion.respacing`` of the teacher network's ``network_timesteps``)
    visits with ``sample.steps`` of it; the baselines, trained on the full chain, follow them too."""
    kept = respaced_timesteps(len(network_timesteps), cfg.teacher.diffusion.respacing, cfg.sample.steps)
    cfg.sample.timesteps = [int(network_timesteps[i]) for i in kept]
    return cfg


def digits_teacher_path(ctx: Context) -> str:
    """The committed digits teacher, or (when it is missing) one trained here with the digits-teacher config."""
    if (DIGITS_TEACHER / "config.json").is_file():
        return str(DIGITS_TEACHER)
    folder = ctx.work / "digits_teacher_fallback" / "checkpoint"
    if not (folder / "config.json").is_file():
        from student_trainer.baselines import train_on_data
        cfg = load_config(str(ROOT / "configs" / "digits_teacher.yaml"), [
            f"run.out_dir={ctx.work}", "run.name=digits_teacher_fallback", "run.progress=false", "run.device=cpu",
            f"distill.steps={ctx.budget.fallback_teacher_steps}", "run.ckpt_every=0", "metrics.enabled=false"])
        train_on_data(cfg)
    ctx.notes.append(f"common/assets/digits_teacher was missing: the digits ADM teacher was trained here for "
                     f"{ctx.budget.fallback_teacher_steps} steps with configs/digits_teacher.yaml.")
    return str(folder)


def vit_teacher_path(ctx: Context) -> str:
    """A DiT-tiny/2 teacher trained on the digits with the CNN teacher's recipe (configs/digits_teacher.yaml:
    data-based, hybrid objective, batch 128, EMA 0.999), cached under the work folder. The DiT learns more
    slowly than the UNet, hence more steps (``Budget.vit_teacher_steps``) for a teacher worth distilling."""
    folder = ctx.work / "digits_vit_teacher" / "checkpoint"
    if not (folder / "config.json").is_file():
        from student_trainer.baselines import train_on_data
        cfg = load_config(str(ROOT / "configs" / "digits_teacher.yaml"), [
            f"run.out_dir={ctx.work}", "run.name=digits_vit_teacher", "run.progress=false", "run.device=cpu",
            "student.arch=dit", "student.size=DiT-tiny/2", f"distill.steps={ctx.budget.vit_teacher_steps}",
            "run.ckpt_every=0", "metrics.enabled=false"])
        train_on_data(cfg)
    return str(folder)


# --- one row of a table ---------------------------------------------------------------------------

def baselines_row(cfg: Config, teacher, real: torch.Tensor, score, synth_steps: str, seed: int,
                  methods: list[str]) -> dict[str, dict]:
    """The data-based / data-limited / data-free students of one seed (one shared synthetic set)."""
    out: dict[str, dict] = {}
    need_synth = any(m.startswith(("data_free", "data_limited")) for m in methods)
    t0 = time.perf_counter()
    synth = ex.teacher_samples(teacher, cfg, num=len(real), steps=synth_steps, seed=10_000 + seed) if need_synth else None
    synth_s = time.perf_counter() - t0
    for m in methods:
        t0 = time.perf_counter()
        run = cfg.model_copy(deep=True)
        run.run.name = f"{cfg.run.name}-{m}"
        if m == "data_based":
            x = real
        elif m == "data_free":
            x = synth
        else:
            pct = float(m.split("_")[-1])
            x, _ = mix_datasets((real, None), (synth, None), pct, torch.Generator().manual_seed(seed))
        res = ex.train_on_set(run, x, score)
        res["wall_s"] = time.perf_counter() - t0 + (synth_s if m != "data_based" else 0.0)
        out[m] = res
    return out


def dkdm_row(cfg: Config, score, eval_at=()) -> dict:
    t0 = time.perf_counter()
    res = ex.distill_with_curve(cfg, score, eval_at)
    res["wall_s"] = time.perf_counter() - t0
    return res


def teacher_row(teacher, cfg: Config, score) -> dict:
    t0 = time.perf_counter()
    x = ex.teacher_samples(teacher, cfg)
    return {"metrics": score(x), "samples": x, "wall_s": time.perf_counter() - t0}


def save_samples(ctx: Context, exp: str, method: str, seed: int, res: dict) -> None:
    """The first seed's samples of each method as a PNG grid (docs/replication/<exp>__<method>.png)."""
    x = res.pop("samples", None)
    if x is not None and seed == ctx.seeds[0]:
        from benchmarks.replicate_report import grid_name
        save_grid(x[:64], ctx.assets / grid_name(exp, method))


def record(ctx: Context, exp: str, store: dict, method: str, seed: int, res: dict) -> None:
    save_samples(ctx, exp, method, seed, res)
    res.pop("checkpoint", None)
    store.setdefault(method, []).append({"seed": seed, **res})


# --- the experiments --------------------------------------------------------------------------------

TABLE2_METHODS = ["data_based"] + [f"data_limited_{p}" for p in reversed(LIMITED)] + ["data_free"]


def table2_mixture(ctx: Context) -> dict:
    store: dict = {}
    for seed in ctx.seeds:
        cfg = mixture_cfg(ctx, "t2mix", seed)
        teacher = make_teacher(cfg.teacher, "cpu")
        score = ex.mixture_scorer(cfg.teacher.analytic)
        record(ctx, "table2_mixture", store, "teacher", seed, teacher_row(teacher, cfg, score))
        real = ex.mixture_of(cfg.teacher.analytic).sample(ctx.budget.num_real,
                                                          generator=torch.Generator().manual_seed(20_000 + seed))[0]
        for m, res in baselines_row(cfg, teacher, real.float(), score, ctx.budget.synth_steps, seed,
                                    TABLE2_METHODS).items():
            record(ctx, "table2_mixture", store, m, seed, res)
        record(ctx, "table2_mixture", store, "dkdm", seed, dkdm_row(cfg, score))
        record(ctx, "table2_mixture", store, "untrained", seed,
               {"metrics": score(ex.untrained_samples(cfg, teacher)), "wall_s": 0.0})
    return {"methods": store}


def table2_digits(ctx: Context) -> dict:
    store: dict = {}
    path = digits_teacher_path(ctx)
    score = ex.digits_scorer()
    real = load_dataset("digits")[0][:ctx.budget.digits_real]
    for seed in ctx.seeds:
        cfg = digits_cfg(ctx, "t2dig", seed, path)
        teacher = make_teacher(cfg.teacher, "cpu")
        record(ctx, "table2_digits", store, "teacher", seed, teacher_row(teacher, cfg, score))
        for m, res in baselines_row(cfg, teacher, real, score, ctx.budget.synth_steps, seed, TABLE2_METHODS).items():
            record(ctx, "table2_digits", store, m, seed, res)
        record(ctx, "table2_digits", store, "dkdm", seed, dkdm_row(cfg, score))
    record(ctx, "table2_digits", store, "real_data", 0, {"metrics": score(real[torch.randperm(
        len(real), generator=torch.Generator().manual_seed(0))[:ctx.budget.digits_eval]]), "samples": real[:64],
        "wall_s": 0.0})
    return {"methods": store, "teacher_path": os.path.relpath(path, ROOT)}


ARCHS = {"CNN": ("adm", "tiny-8", '{channel_mult: "1", attention_resolutions: ""}'), "ViT": ("dit", "DiT-tiny/2", "{}")}


def table5_cross(ctx: Context) -> dict:
    """Rows ``<student>_S/<method>``, columns teachers; cells keyed ``<S>S_<T>T_<method>``."""
    store: dict = {}
    teachers = {"CNN": digits_teacher_path(ctx), "ViT": vit_teacher_path(ctx)}
    score = ex.digits_scorer()
    for seed in ctx.seeds:
        for tname, tpath in teachers.items():
            base = digits_cfg(ctx, f"t5-{tname}T", seed, tpath)
            teacher = make_teacher(base.teacher, "cpu")
            record(ctx, "table5_cross", store, f"teacher_{tname}", seed, teacher_row(teacher, base, score))
            t0 = time.perf_counter()
            synth = ex.teacher_samples(teacher, base, num=ctx.budget.digits_real, steps=ctx.budget.synth_steps,
                                       seed=10_000 + seed)
            synth_s = time.perf_counter() - t0
            for sname, (arch, size, flags) in ARCHS.items():
                cfg = digits_cfg(ctx, f"t5-{tname}T-{sname}S", seed, tpath, f"student.arch={arch}",
                                 f"student.size={size}", f"student.flags={flags}")
                t0 = time.perf_counter()
                free = cfg.model_copy(deep=True)
                free.run.name = cfg.run.name + "-free"
                res = ex.train_on_set(free, synth, score)
                res["wall_s"] = time.perf_counter() - t0 + synth_s
                record(ctx, "table5_cross", store, f"{sname}S_{tname}T_data_free", seed, res)
                record(ctx, "table5_cross", store, f"{sname}S_{tname}T_dkdm", seed, dkdm_row(cfg, score))
    return {"methods": store, "vit_teacher_steps": ctx.budget.vit_teacher_steps}


def _curve_at(steps: int, points: int) -> list[int]:
    return [round(steps * (i + 1) / points) for i in range(points - 1)]


def fig4a_variants(ctx: Context) -> dict:
    store: dict = {}
    at = _curve_at(ctx.budget.mix_steps, ctx.budget.curve_points)
    for seed in ctx.seeds:
        for variant in ("iterative", "shuffled", "dynamic"):
            cfg = mixture_cfg(ctx, f"f4a-{variant}", seed, f"distill.variant={variant}")
            record(ctx, "fig4a_variants", store, variant, seed, dkdm_row(cfg, ex.mixture_scorer(cfg.teacher.analytic), at))
    return {"methods": store}


def fig4b_rho(ctx: Context) -> dict:
    store: dict = {}
    for seed in ctx.seeds:
        for rho in ctx.budget.rhos:
            cfg = mixture_cfg(ctx, f"f4b-rho{rho}", seed, f"pool.rho={rho}")
            res = dkdm_row(cfg, ex.mixture_scorer(cfg.teacher.analytic))
            res.pop("curve")
            record(ctx, "fig4b_rho", store, f"rho={rho}", seed, res)
    return {"methods": store}


def beyond_spi(ctx: Context) -> dict:
    store: dict = {}
    for seed in ctx.seeds:
        for spi in ctx.budget.spis:
            cfg = mixture_cfg(ctx, f"spi{spi}", seed, f"pool.samples_per_insert={spi}")
            res = dkdm_row(cfg, ex.mixture_scorer(cfg.teacher.analytic))
            res.pop("curve")
            record(ctx, "beyond_spi", store, f"spi={spi}", seed, res)
    return {"methods": store}


def beyond_chain(ctx: Context) -> dict:
    """Equal |B+| (round(rho * 100) * b slots) on chains of 25, 100 and 1000 (full) steps of the T = 1000 schedule."""
    store: dict = {}
    b = ctx.budget
    slots = round(b.chain_slots_rho * 100) * b.mix_batch
    for seed in ctx.seeds:
        for chain in b.chains:
            # a chain shorter than the sampler's respacing is sampled on all of its steps
            steps = b.sample_steps if not chain or int(chain) >= int(b.sample_steps) else chain
            cfg = mixture_cfg(ctx, f"chain{chain or 'full'}", seed, f"teacher.diffusion.respacing={chain!r}",
                              f"pool.num_slots={slots}", f"sample.steps='{steps}'")
            res = dkdm_row(cfg, ex.mixture_scorer(cfg.teacher.analytic))
            res.pop("curve")
            record(ctx, "beyond_chain", store, f"chain={chain or '1000 (full)'}", seed, res)
    return {"methods": store, "pool_slots": slots}


RUNNERS = {name: globals()[name] for name in EXPERIMENTS}


# --- driver -------------------------------------------------------------------------------------------

def command_line(args) -> str:
    parts = ["python benchmarks/replicate.py"]
    if args.quick:
        parts.append("--quick")
    if args.seeds is not None:
        parts.append(f"--seeds {args.seeds}")
    if args.out != "docs":
        parts.append(f"--out {args.out}")
    if args.only:
        parts.append("--only " + " ".join(args.only))
    if args.curves:
        parts.append(f"--curves --tables {' '.join(args.tables)} --steps {args.steps} --max-steps {args.max_steps} "
                     f"--eval-every {args.eval_every} --jobs {args.jobs}")
    return " ".join(parts)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"experiments": {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed (a few minutes)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    p.add_argument("--out", default="docs", help="report folder: <out>/replication.md, <out>/replication/*")
    p.add_argument("--work", default=None, help="run folders (default runs/replicate[-quick])")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run only these experiments")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from saved results")
    c = p.add_argument_group("learning curves (issue 22; benchmarks/replicate_curves.py)")
    c.add_argument("--curves", action="store_true", help="FID against steps for Tables 2 (digits) and 5")
    c.add_argument("--tables", nargs="+", default=["table2_digits", "table5_cross"],
                   choices=["table2_digits", "table5_cross"])
    c.add_argument("--steps", type=int, default=5000, help="every student trains at least this far")
    c.add_argument("--max-steps", type=int, default=10000, help="and on to here unless data-based is within 2x")
    c.add_argument("--eval-every", type=int, default=1000, help="FID every this many steps")
    c.add_argument("--jobs", type=int, default=2, help="runs side by side, one process each")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)      # the experiments' progress; the libraries stay quiet
    if args.curves and (args.eval_every < 1 or args.steps % args.eval_every or args.max_steps < args.steps):
        p.error("--curves: --steps must be a multiple of --eval-every and no more than --max-steps")
    torch.set_num_threads(1)
    budget = QUICK if args.quick else Budget()
    if args.seeds is not None:
        budget.seeds = args.seeds
    out = Path(args.out)
    work = Path(args.work or (ROOT / "runs" / ("replicate-quick" if args.quick else "replicate")))
    ctx = Context(budget, work, out, args.quick, seeds=list(range(budget.seeds)))
    ctx.assets.mkdir(parents=True, exist_ok=True)
    if args.curves:
        return curves_main(ctx, args)
    results_path = ctx.assets / "results.json"
    results = load_results(results_path)

    from benchmarks.replicate_report import write_report
    if not args.report_only:
        results.update(budget=asdict(budget), command=command_line(args), quick=args.quick, equal_chains=True,
                       torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        t_all = time.perf_counter()
        for name in args.only or EXPERIMENTS:
            t0 = time.perf_counter()
            logger.info("%s ...", name)
            res = RUNNERS[name](ctx)
            res["wall_s"] = time.perf_counter() - t0
            res["seeds"], res["command"] = ctx.seeds, command_line(args)
            results["experiments"][name] = res
            results["notes"] = sorted(set(results.get("notes", []) + ctx.notes))
            results_path.write_text(json.dumps(results, indent=1, default=float))
            write_report(results, out)
            logger.info("%s done in %.0f s", name, res["wall_s"])
        results["total_wall_s"] = time.perf_counter() - t_all
        results_path.write_text(json.dumps(results, indent=1, default=float))
    write_report(results, out)
    print(f"[replicate] report: {out / 'replication.md'}")
    return 0


def curves_main(ctx: Context, args) -> int:
    from benchmarks.replicate_curves import run_curves
    from benchmarks.replicate_report import write_curves_report

    if args.report_only:
        path = write_curves_report(load_results(ctx.assets / "curves.json"), ctx.out)
    else:
        run_curves(ctx, args.tables, args.steps, args.max_steps, args.eval_every, args.jobs, command_line(args))
        path = ctx.out / "replication_curves.md"
    print(f"[curves] report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
