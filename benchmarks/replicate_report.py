"""The replication report: ``results.json`` -> ``<out>/replication.md`` with tables, plots and sample grids.

Tables follow the paper's layout (Table 2: methods by rows, data sets as column groups; Table 5:
students by row blocks, teachers by columns). Every number is mean ± standard deviation over the
seeds. The verdicts in "Agreement with the paper" are computed from the numbers, never written
by hand, so a rerun with other budgets cannot leave a stale claim behind.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

LOWER_IS_BETTER = {"sliced_wasserstein": True, "exact_nll": True, "mode_coverage": False, "fid": True,
                   "sfid": True, "is": False, "precision": False, "recall": False}
MIX_COLS = [("sliced_wasserstein", "SW2 ↓"), ("mode_coverage", "coverage ↑"), ("exact_nll", "NLL ↓")]
DIG_COLS = [("is", "IS ↑"), ("fid", "FID ↓"), ("sfid", "sFID ↓"), ("precision", "prec. ↑"), ("recall", "rec. ↑")]
TABLE2_ROWS = [("teacher", "Teacher"), ("data_based", "Data-Based Training"),
               ("data_limited_20", "Data-Limited Training (20%)"), ("data_limited_15", "Data-Limited Training (15%)"),
               ("data_limited_10", "Data-Limited Training (10%)"), ("data_limited_5", "Data-Limited Training (5%)"),
               ("data_free", "Data-Free Training (0%)"), ("dkdm", "Dynamic Iterative Distillation (DKDM)"),
               ("untrained", "Untrained student (reference)"), ("real_data", "Real digits (reference)")]
EQUAL_CHAINS = (" of the DKDM student's distillation chain, named as original timesteps of T = 1000 so that every "
                "model of a table (the full-chain baselines and the teacher included) samples on the same steps")
QUICK_WARNING = "**This report is from `--quick`: tiny budgets, numbers are a smoke test, not results.**"
REFERENCE_ROWS = {"teacher", "data_based", "untrained", "real_data"}   # not in the comparison (as the paper)


# --- numbers ------------------------------------------------------------------------------------------

def values(runs: list[dict], key: str) -> np.ndarray:
    return np.array([r["metrics"][key] for r in runs if key in r.get("metrics", {})], dtype=float)


def mean_std(runs: list[dict] | None, key: str) -> tuple[float, float]:
    v = values(runs or [], key)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(m: float, s: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def field_mean(runs: list[dict], key: str) -> float:
    v = [r[key] for r in runs if key in r]
    return float(np.mean(v)) if v else math.nan


def best_of(methods: dict, keys: list[str], metric: str) -> str | None:
    scored = [(mean_std(methods.get(k), metric)[0], k) for k in keys if k in methods]
    scored = [(m, k) for m, k in scored if math.isfinite(m)]
    if not scored:
        return None
    best = (min if LOWER_IS_BETTER[metric] else max)(scored)
    return None if sum(m == best[0] for m, _ in scored) > 1 else best[1]   # a tie is nobody's win


# --- tables -------------------------------------------------------------------------------------------

def table2(results: dict) -> list[str]:
    exps = results["experiments"]
    groups = [(n, cols, exps[n]["methods"]) for n, cols in (("table2_mixture", MIX_COLS), ("table2_digits", DIG_COLS))
              if n in exps]
    if not groups:
        return []
    head = ["Method"] + [f"{'Mixture' if n.endswith('mixture') else 'Digits'} {c}" for n, cols, _ in groups
                         for _, c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in TABLE2_ROWS:
        if not any(key in m for _, _, m in groups):
            continue
        cells = [label]
        for _, cols, methods in groups:
            compared = [k for k, _ in TABLE2_ROWS if k not in REFERENCE_ROWS]
            for metric, _ in cols:
                m, s = mean_std(methods.get(key), metric)
                c = fmt(m, s, 2 if metric in ("fid", "sfid", "is") else 3)
                if key not in REFERENCE_ROWS and best_of(methods, compared, metric) == key:
                    c = f"**{c}**"
                cells.append(c)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table5(results: dict) -> list[str]:
    exp = results["experiments"].get("table5_cross")
    if not exp:
        return []
    m = exp["methods"]
    lines = ["| digits FID ↓ | CNN T. | ViT T. |", "|---|---|---|"]
    lines.append("| Teacher | " + " | ".join(fmt(*mean_std(m.get(f"teacher_{t}"), "fid"), 2) for t in ("CNN", "ViT")) + " |")
    for s in ("CNN", "ViT"):
        lines.append(f"| *{s} S.* | | |")
        for method, label in (("data_free", "Data-Free Training"), ("dkdm", "Dynamic Iterative Distillation")):
            cells = []
            for t in ("CNN", "ViT"):
                mm, ss = mean_std(m.get(f"{s}S_{t}T_{method}"), "fid")
                other = "dkdm" if method == "data_free" else "data_free"
                win = mm < mean_std(m.get(f"{s}S_{t}T_{other}"), "fid")[0]
                cells.append(f"**{fmt(mm, ss, 2)}**" if win else fmt(mm, ss, 2))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(exp: dict, label: str, extra: list[tuple[str, str]]) -> list[str]:
    head = [label] + [h for _, h in extra] + [c for _, c in MIX_COLS] + ["wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in exp["methods"].items():
        cells = [name.split("=", 1)[-1]]
        for key, _ in extra:
            v = field_mean(runs, key)
            cells.append(f"{v:,.0f}" if math.isfinite(v) else "–")
        cells += [fmt(*mean_std(runs, k)) for k, _ in MIX_COLS]
        cells.append(f"{field_mean(runs, 'wall_s'):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- plots --------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(exp: dict, path: Path, baseline: tuple[float, float] | None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, runs in exp["methods"].items():
        steps = [p["step"] for p in runs[0]["curve"]]
        ys = np.array([[p["sliced_wasserstein"] for p in r["curve"]] for r in runs])
        m, s = ys.mean(0), (ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1]))
        ax.plot(steps, m, marker="o", label=name)
        ax.fill_between(steps, m - s, m + s, alpha=0.2)
    if baseline is not None and math.isfinite(baseline[0]):
        ax.axhline(baseline[0], ls="--", c="k", lw=1, label="data-based (same steps)")
    ax.set_xlabel("training step")
    ax.set_ylabel("sliced W2 to exact samples (lower is better)")
    ax.set_title("Fig. 4a analogue: iterative variants (mixture)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(exp: dict, path: Path, xkey: str | None, xlabel: str, title: str, logx: bool = False) -> None:
    """Sliced W2 (mean ± std) against a swept value (the method name) or a cost field ``xkey``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs, ms, ss, names = [], [], [], []
    for name, runs in exp["methods"].items():
        x = field_mean(runs, xkey) if xkey else float(name.split("=", 1)[-1].split()[0])
        m, s = mean_std(runs, "sliced_wasserstein")
        xs.append(x), ms.append(m), ss.append(s), names.append(name.split("=", 1)[-1])
    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3)
    for x, m, n in zip(xs, ms, names):
        ax.annotate(n, (x, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sliced W2 (lower is better)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- verdicts -----------------------------------------------------------------------------------------

def _cmp(methods: dict, a: str, b: str, metric: str) -> tuple[bool, str] | None:
    """Is ``a`` better than ``b`` on ``metric``? -> (verdict, 'a ± s vs b ± s; separated or not')."""
    if a not in methods or b not in methods:
        return None
    (ma, sa), (mb, sb) = mean_std(methods[a], metric), mean_std(methods[b], metric)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return None
    better = ma < mb if LOWER_IS_BETTER[metric] else ma > mb
    if min(len(methods[a]), len(methods[b])) < 2:
        spread = "one seed: no error bar"
    else:
        spread = "outside one std of each other" if abs(ma - mb) > max(sa, sb) else "within one std (not separated)"
    return better, f"{fmt(ma, sa)} vs {fmt(mb, sb)}; {spread}"


def verdicts(results: dict) -> list[str]:
    exps, out = results["experiments"], []

    def claim(text: str, ok: bool | None, detail: str) -> None:
        mark = "–" if ok is None else ("agrees" if ok else "**disagrees**")
        out.append(f"| {text} | {mark} | {detail} |")

    for name, metric, label in (("table2_mixture", "sliced_wasserstein", "mixture SW2"),
                                ("table2_digits", "fid", "digits FID")):
        if name not in exps:
            continue
        m = exps[name]["methods"]
        for other, olabel in (("data_free", "data-free"), ("data_limited_20", "data-limited 20%"),
                              ("data_limited_5", "data-limited 5%")):
            r = _cmp(m, "dkdm", other, metric)
            if r:
                claim(f"Table 2: DKDM beats {olabel} ({label})", *r)
        r = _cmp(m, "data_limited_20", "data_free", metric)
        if r:
            claim(f"Table 2: adding real data (20%) helps the data-free baseline ({label})", *r)
    if "table5_cross" in exps:
        m = exps["table5_cross"]["methods"]
        for s in ("CNN", "ViT"):
            for t in ("CNN", "ViT"):
                r = _cmp(m, f"{s}S_{t}T_dkdm", f"{s}S_{t}T_data_free", "fid")
                if r:
                    claim(f"Table 5: {t} teacher → {s} student, DKDM beats data-free (FID)", *r)
    if "fig4a_variants" in exps:
        m = exps["fig4a_variants"]["methods"]
        for a, b in (("dynamic", "shuffled"), ("shuffled", "iterative"), ("dynamic", "iterative")):
            r = _cmp(m, a, b, "sliced_wasserstein")
            if r:
                claim(f"Fig. 4a: {a} ends better than {b} (SW2)", *r)
    if "fig4b_rho" in exps:
        m = exps["fig4b_rho"]["methods"]
        keys = list(m)
        if len(keys) >= 2:
            r = _cmp(m, keys[-1], keys[0], "sliced_wasserstein")
            claim(f"Fig. 4b: larger rho is better ({keys[-1]} vs {keys[0]}, SW2)", *r)
    return out


# --- the report ---------------------------------------------------------------------------------------

FULL_SCALE = """## Full scale (GPU): configs under `configs/paper/`

| config | teacher | student | batch | rho | notes |
|---|---|---|---|---|---|
| `cifar10_32.yaml` | guided-diffusion 57M ADM `.pt`, cosine, T = 1000, learned range | ADM 44M | 128 | 0.4 | synthetic set 50k, IDDPM-1000 |
| `imagenet_32.yaml` | guided-diffusion 57M ADM `.pt` (unconditional: the reference notes do not record class conditioning; set `teacher.flags.class_cond=true` for a conditional one) | ADM 44M | 512 | 0.4 | synthetic set 1,281,167, IDDPM-100 |
| `celeba_64.yaml` | guided-diffusion 295M ADM `.pt` | ADM `celeba-57M` | 256 | 0.4 | synthetic set 202,599, IDDPM-100 |
| `celebahq_256_ldm.yaml` | diffusers LDM pipeline folder (`unet/`, `vqvae/`, `scheduler/`); LDM linear schedule 0.0015–0.0195, fixed variance → L_simple* only | ADM, 128 channels, on 3×64×64 latents | 48 | 4.0 | lr 9e-5; sampled with DDIM 200, eta 0 |

All use AdamW (lr 1e-4 unless noted, no weight decay), EMA 0.9999, the full 1000-step teacher chain
(`teacher.diffusion.respacing: ""`), 50 respaced IDDPM sampling steps in pixel space. The student
size of the pixel-space configs is the 44M size of the reference's size table (the released configs
do not say which of 44M/32M/24M/14M Table 2 used; `--set student.size=14M` picks another).

**Pointing them at downloaded checkpoints.** Nothing is fetched at run time. Download the teacher
yourself and pass its local path: a guided-diffusion teacher is a `.pt` state dict, loaded strictly
against `teacher.flags` (a wrong flag is a one-line error, not a silently broken teacher):

    dkdm distill --config configs/paper/cifar10_32.yaml --set teacher.path=/data/ckpt/cifar10_57M.pt
    dkdm distill --config configs/paper/celebahq_256_ldm.yaml --set teacher.path=/data/ldm-celebahq-256

A diffusers teacher is the folder that `save_pretrained` writes (`unet/`, `vqvae/` or `vae/`,
`scheduler/scheduler_config.json`); a model-hub id is refused. Check a config without a GPU with
`--dry-run` (validation only; the path is opened when the teacher is loaded). For FID with the
Inception network, download the TorchScript file `inception-2015-12-05.pt` (the one StyleGAN2-ADA's
metrics use) and pass its path where the project takes a feature network:

    dkdm sample --checkpoint runs/cifar10_32/checkpoint --num 50000 --out samples.npz
    dkdm eval --samples samples.npz --reference folder:/data/cifar10/train --features /data/inception-2015-12-05.pt

(`common.eval.features.InceptionFeatureNet.from_file(path)` in Python; a missing file is a
one-line error naming the expected file.) The data-based and data-limited baselines read the real
images from `data.dataset` (`folder:PATH` or `npz:PATH`), and the data-free baseline's synthetic set
is written by `dkdm synth --config ... --set data.synthetic_dir=PATH` (resumable `.npz` shards).
"""

SCALE_CAVEATS = """### What the scale-down changes

- **The teachers are tiny and the data sets are toys.** The mixture teacher is *exact* (its eps is the
  analytic score of an 8-component Gaussian mixture in 64 dimensions), so "data-free" synthetic data
  is as good as real data there, up to sampling error of the 100-step synthetic sampler; differences
  between the baselines on the mixture come from the *size* of the fixed training set (1797 images)
  against DKDM's unbounded stream of fresh teacher trajectories, not from teacher error. On digits the
  teacher is a 0.35M-parameter ADM trained on 1797 images, so teacher error is real there.
- **Step budgets are hundreds, not 200K.** Every method gets the same number of student steps and the
  same batch; none is converged. Rankings at a small budget need not hold at convergence (the paper's
  Fig. 4a shows the variants' curves crossing early on).
- **The distillation chain is a 100-step respacing of the T = 1000 schedule** (the reference distils on
  the full 1000-step chain). `beyond_chain` measures what this changes at an equal pool size.
- **The metrics are not Inception FID.** Digits FID uses the project's own digits classifier features
  (`common/eval/features.py`), on 512 samples against the 1797 real digits; the absolute values are not
  comparable to the paper's, only the rankings are.
- **Seeds vary initialisation, pool and data draws**; the exact-metric reference samples are fixed.
  With 3 seeds, one standard deviation is a rough error bar: treat differences inside it as ties.
"""


def grid_name(exp: str, method: str) -> str:
    """The PNG file name of a method's sample grid (no spaces or brackets: markdown links stay valid)."""
    return f"{exp}__{re.sub(r'[^A-Za-z0-9_.=-]+', '-', method).strip('-')}.png"


def _grid_table(out: Path, exp: str, methods: list[str]) -> list[str]:
    cells = [(m, f"replication/{grid_name(exp, m)}") for m in methods]
    cells = [(m, p) for m, p in cells if (out / p).is_file()]
    if not cells:
        return []
    lines = ["| " + " | ".join(m for m, _ in cells) + " |", "|" + "---|" * len(cells),
             "| " + " | ".join(f"![{m}]({p})" for m, p in cells) + " |"]
    return lines


def assets_dir(out: Path) -> Path:
    """``<out>/replication``, where the results, plots and sample grids of both reports live."""
    assets = Path(out) / "replication"
    assets.mkdir(parents=True, exist_ok=True)
    return assets


def write_report(results: dict, out: Path) -> Path:
    out, assets = Path(out), assets_dir(out)
    exps = results.get("experiments", {})
    b = results.get("budget", {})
    L = _header(results, "DKDM: a scaled-down replication of the paper's results", "", "results.json")
    if b:
        L += [f"Seeds: {b.get('seeds')} (mean ± sample standard deviation over seeds). Mixture: "
              f"{b.get('mix_steps')} student steps, batch {b.get('mix_batch')}, {b.get('mix_eval')} samples scored. "
              f"Digits: {b.get('digits_steps')} steps, batch {b.get('digits_batch')}, {b.get('digits_eval')} samples "
              f"scored. EMA {b.get('ema_rate')}. Synthetic sets: {b.get('num_real')} (mixture) / {b.get('digits_real', 1797)} (digits) "
              f"images, teacher sampled with {b.get('synth_steps')} respaced steps. Samples of every model: "
              f"{b.get('sample_steps', '50')} respaced ancestral steps{EQUAL_CHAINS if results.get('equal_chains') else ''}. "
              f"Distillation chains: {b.get('mix_chain', '100')} "
              f"(mixture) / {b.get('digits_chain', '100')} (digits) respaced steps of T = 1000. One CPU thread per process (`torch.set_num_threads(1)`); machine: "
              f"{results.get('cpu_count')} cores.", ""]
    for note in results.get("notes", []):
        L += [f"> Note: {note}", ""]
    # wall time
    if exps:
        L += ["### Wall time per experiment", "", "| experiment | wall time (s) | seeds |", "|---|---|---|"]
        for name, e in exps.items():
            L.append(f"| `{name}` | {e.get('wall_s', math.nan):.0f} | {len(e.get('seeds', []))} |")
        # the sum of the rows: experiments may come from separate ``--only`` runs
        L.append(f"| **total** | {sum(e.get('wall_s', 0.0) for e in exps.values()):.0f} | |")
        L.append("")
    # Table 2
    t2 = table2(results)
    if t2:
        L += ["## Table 2 analogue: data-limited, data-free and DKDM at an equal step budget", "",
              "Mixture: sliced Wasserstein-2 to exact mixture samples, fraction of the 8 components covered, exact "
              "NLL of the samples under the mixture (nats per sample; the exact teacher's is the mixture's entropy). Digits: IS, FID and sFID in the digits "
              "feature space (precision/recall too). Bold: best among data-limited / data-free / DKDM (as the "
              "paper, teacher and data-based are references).", ""] + t2 + [""]
        for exp in ("table2_mixture", "table2_digits"):
            if exp in exps:
                L += [f"Samples ({exp.split('_')[1]}, first seed):", ""]
                L += _grid_table(out, exp, [k for k, _ in TABLE2_ROWS]) + [""]
        wall = []
        for exp in ("table2_mixture", "table2_digits"):
            for k, runs in exps.get(exp, {}).get("methods", {}).items():
                wall.append(f"{exp.split('_')[1]}/{k} {field_mean(runs, 'wall_s'):.0f} s")
        L += ["Wall time per run (mean over seeds; data-free and data-limited include generating the "
              "synthetic set): " + ", ".join(wall) + ".", ""]
    # Table 5
    t5 = table5(results)
    if t5:
        e = exps["table5_cross"]
        L += ["## Table 5 analogue: cross-architecture distillation (digits)", "",
              f"CNN = ADM `tiny-8` (the digits teacher's architecture), ViT = DiT `DiT-tiny/2`. The ViT teacher "
              f"is a DiT-tiny/2 trained on the digits for {e.get('vit_teacher_steps')} steps (hybrid objective). "
              "Students are randomly initialised; data-free students train on synthetic images of their "
              "teacher "
              f"({results.get('budget', {}).get('digits_real', 1797)} images, as many as the real digits used). "
              "Bold: the better of the two methods in a cell pair.", ""] + t5 + [""]
        L += _grid_table(out, "table5_cross", list(e["methods"])[:6]) + [""]
        L += _grid_table(out, "table5_cross", list(e["methods"])[6:]) + [""]
    # Fig 4a
    if "fig4a_variants" in exps:
        base = mean_std(exps.get("table2_mixture", {}).get("methods", {}).get("data_based"), "sliced_wasserstein") \
            if "table2_mixture" in exps else None
        plot_curves(exps["fig4a_variants"], assets / "fig4a_variants.png", base)
        L += ["## Fig. 4a analogue: iterative, shuffled iterative and dynamic iterative distillation (mixture)", "",
              "![fig4a](replication/fig4a_variants.png)", "",
              "Sliced W2 of the EMA student during training (mean ± std band over seeds); the dashed line is the "
              "data-based student at the final step budget (Table 2).", ""]
        L += sweep_table(exps["fig4a_variants"], "variant", [("pool_slots", "|B+| slots"),
                                                              ("warmup_forwards", "warm-up forwards")]) + [""]
        L += _grid_table(out, "fig4a_variants", ["iterative", "shuffled", "dynamic"]) + [""]
    # Fig 4b
    if "fig4b_rho" in exps:
        plot_sweep(exps["fig4b_rho"], assets / "fig4b_rho.png", None, "rho", "Fig. 4b analogue: effect of rho",
                   logx=True)
        L += ["## Fig. 4b analogue: the effect of rho (mixture)", "", "![fig4b](replication/fig4b_rho.png)", ""]
        L += sweep_table(exps["fig4b_rho"], "rho", [("pool_slots", "|B+| slots"),
                                                     ("warmup_forwards", "warm-up forwards")]) + [""]
        L += _grid_table(out, "fig4b_rho", list(exps["fig4b_rho"]["methods"])) + [""]
    # beyond
    if "beyond_spi" in exps:
        plot_sweep(exps["beyond_spi"], assets / "beyond_spi.png", "train_forwards",
                   "teacher forwards during training", "Samples per insert: quality vs teacher cost")
        L += ["## Beyond the paper: samples per insert (record reuse)", "",
              "`pool.samples_per_insert = k` lets a record be drawn up to k times before its slot is refilled, "
              "so the teacher does 1/k of the forwards per training step (the student sees correlated, reused "
              "records). k = 1 is the paper.", "", "![spi](replication/beyond_spi.png)", ""]
        L += sweep_table(exps["beyond_spi"], "samples per insert", [("train_forwards", "teacher forwards (training)"),
                                                                    ("train_s", "train s")]) + [""]
        L += _grid_table(out, "beyond_spi", list(exps["beyond_spi"]["methods"])) + [""]
    if "beyond_chain" in exps:
        e = exps["beyond_chain"]
        plot_sweep(e, assets / "beyond_chain.png", "warmup_forwards", "warm-up cost (teacher forwards)",
                   "Distillation chain: quality vs warm-up cost", logx=True)
        L += ["## Beyond the paper: a respaced distillation chain", "",
              f"The teacher's T = 1000 cosine schedule distilled on chains of 25 and 100 respaced steps and on the "
              f"full 1000-step chain. To keep the full chain's warm-up affordable, every chain uses the same pool "
              f"size |B+| = {e.get('pool_slots')} slots (rho = 0.4 of a 100-step chain; for the full chain that "
              "is rho = 0.04, not the paper's 0.4, whose warm-up would cost rho·b·T²/2 ≈ 12.8M teacher forwards "
              "at b = 64). Warm-up cost is |B+|·K/2 forwards for a K-step chain.", "",
              "![chain](replication/beyond_chain.png)", ""]
        L += sweep_table(e, "chain (steps)", [("warmup_forwards", "warm-up forwards"), ("warmup_s", "warm-up s")]) + [""]
        L += _grid_table(out, "beyond_chain", list(e["methods"])) + [""]
    # discussion
    v = verdicts(results)
    L += ["## Agreement with the paper", ""]
    if v:
        L += ["Computed from the tables above (mean over seeds; 'within one std' means the seeds do not "
              "separate the two).", "", "| paper's claim | here | numbers |", "|---|---|---|"] + v + [""]
    # A hand-written reading of the committed run, kept beside the results it discusses.
    discussion = assets / "discussion.md"
    if discussion.is_file():
        L += [discussion.read_text().rstrip(), ""]
    L += [SCALE_CAVEATS, FULL_SCALE]
    path = out / "replication.md"
    path.write_text("\n".join(L) + "\n")
    return path


def relpath(p: str | os.PathLike, start: Path) -> str:
    return os.path.relpath(p, start)


# --- learning curves (benchmarks/replicate_curves.py) -----------------------------------------------

CURVE_TITLES = {"table2_digits": "Table 2 (digits): FID against training steps",
                "table5_cross": "Table 5 (CNN/ViT students and teachers): FID against training steps"}


def curve_label(method: str) -> str:
    labels = dict(TABLE2_ROWS)
    if method in labels:
        return labels[method]
    if method.startswith("teacher_"):
        return f"Teacher ({method.split('_')[1]})"
    student, teacher, kind = method.split("_", 2)
    return f"{student[:-1]} student ← {teacher[:-1]} teacher, {'DKDM' if kind == 'dkdm' else 'data-free'}"


def curve_points(results: dict, exp: str) -> dict[str, dict[int, list[float]]]:
    """method -> step -> the FID of each seed there (in the order the methods were first scored)."""
    out: dict[str, dict[int, list[float]]] = {}
    for p in results.get("points", []):
        if p["exp"] == exp:
            out.setdefault(p["method"], {}).setdefault(p["step"], []).append(p["metrics"]["fid"])
    return dict(sorted(out.items(), key=lambda kv: curve_order(kv[0])))


def curve_order(method: str) -> tuple:
    """Teachers first, then Table 2's row order, or Table 5's (teacher, student, data-free before DKDM)."""
    rows = [k for k, _ in TABLE2_ROWS]
    if method in rows:
        return (0, rows.index(method))
    if method.startswith("teacher_"):
        return (0, method)
    student, teacher, kind = method.split("_", 2)
    return (1, teacher, student, kind != "data_free")


def plot_fid_curves(curves: dict, path: Path, title: str) -> None:
    """One line a method (mean over seeds), a band from the best to the worst seed; teachers as flat lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (method, by_step) in enumerate(curves.items()):
        steps = sorted(by_step)
        lo, mid, hi = (np.array([f(by_step[s]) for s in steps]) for f in (np.min, np.mean, np.max))
        color = f"C{i % 10}"
        if method.startswith("teacher"):
            ax.axhline(mid[0], ls="--", lw=1, c=color, label=f"{curve_label(method)} (reference)")
            ax.axhspan(lo[0], hi[0], color=color, alpha=0.1)
            continue
        ax.plot(steps, mid, marker="o", ms=3, c=color, label=curve_label(method),
                ls="-" if "dkdm" in method else ("-." if "data_free" in method else ":"))
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("digits FID (log scale; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crossings(curves: dict, a: str, b: str) -> str | None:
    """Where the mean curves of ``a`` and ``b`` change order, in words (None: either is missing)."""
    if a not in curves or b not in curves:
        return None
    steps = sorted(set(curves[a]) & set(curves[b]))
    if not steps:
        return None
    below = [float(np.mean(curves[a][s])) < float(np.mean(curves[b][s])) for s in steps]
    la, lb = curve_label(a), curve_label(b)
    if all(below) or not any(below):
        first, second = (la, lb) if below[0] else (lb, la)
        return f"{first} is below {second} at every step scored ({steps[0]}–{steps[-1]})."
    swaps = [f"between {steps[i]} and {steps[i + 1]} ({la if below[i + 1] else lb} below after)"
             for i in range(len(steps) - 1) if below[i] != below[i + 1]]
    return f"{la} vs {lb}: the curves cross " + "; ".join(swaps) + "."


def curve_pairs(exp: str) -> list[tuple[str, str]]:
    if exp == "table2_digits":
        return [("dkdm", "data_free"), ("dkdm", "data_based"), ("data_free", "data_based")]
    return [(f"{s}S_{t}T_dkdm", f"{s}S_{t}T_data_free") for t in ("CNN", "ViT") for s in ("CNN", "ViT")]


def final_fid_table(curves: dict) -> list[str]:
    """FID at each method's last step scored: mean ± std, best and worst seed."""
    lines = ["| method | step | FID ↓ (mean ± std) | best – worst seed | seeds |", "|---|---|---|---|---|"]
    for method, by_step in curves.items():
        step = max(by_step)
        v = np.array(by_step[step])
        sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        lines.append(f"| {curve_label(method)} | {step} | {fmt(float(v.mean()), sd, 2)} | "
                     f"{v.min():.2f} – {v.max():.2f} | {len(v)} |")
    return lines


def cost_table(results: dict) -> list[str]:
    """Measured seconds per training step (segments after the first: no warm-up) and per FID point."""
    rows: dict[str, dict[str, list[float]]] = {}
    ev = results.get("eval_every", 1)
    for p in results.get("points", []):
        if "copy_of" in p:
            continue
        kind = "teacher" if p["method"].startswith("teacher") else (
            "dkdm" if p["method"].endswith("dkdm") else "baseline")
        r = rows.setdefault(f"{p['exp']} {kind}", {"step": [], "eval": []})
        r["eval"].append(p["eval_s"])
        if kind != "teacher" and p["step"] > ev:
            r["step"].append(p["train_s"] / ev)
    lines = ["| runs | s per training step | s per FID point |", "|---|---|---|"]
    for name, r in rows.items():
        step = f"{np.mean(r['step']):.3f}" if r["step"] else "–"
        lines.append(f"| {name} | {step} | {np.mean(r['eval']):.1f} |")
    return lines


def _header(results: dict, title: str, flags: str, results_file: str, notes: str | None = None) -> list[str]:
    """A generated report's opening: title, how to regenerate it, the command that ran, the quick-run warning."""
    L = [f"# {title}", "",
         f"Generated by `benchmarks/replicate.py{flags}` (do not edit by hand: rerun it, or add `--report-only` "
         f"to re-render from `replication/{results_file}`).", "",
         "## How this was run", ""]
    # experiments run by separate invocations (--only ...) each record theirs
    commands = [e["command"] for e in results.get("experiments", {}).values() if "command" in e]
    L += ["    " + c for c in dict.fromkeys(commands or [results.get("command", f"python benchmarks/replicate.py{flags}")])] + [""]
    if notes:
        L += [notes, ""]
    if results.get("quick"):
        L += [QUICK_WARNING, ""]
    return L


def write_curves_report(results: dict, out: Path) -> Path:
    out, assets = Path(out), assets_dir(out)
    b = results.get("budget", {})
    notes = assets / "curves_notes.md"     # hand-written: the long run's command and how long it takes
    L = _header(results, "Learning curves: Table 2 (digits) and Table 5 at a long budget", " --curves", "curves.json",
                notes.read_text().rstrip() if notes.is_file() else None)
    if b:
        L += [f"Seeds: {b.get('seeds')}. Every student trains to {results.get('steps')} steps, then on to "
              f"{results.get('max_steps')} unless the data-based student's mean FID is within "
              f"2× of the teacher's; FID every {results.get('eval_every')} steps from {b.get('digits_eval')} EMA "
              f"samples against all 1797 real digits (the project's digits feature space). Batch "
              f"{b.get('digits_batch')}, lr {b.get('digits_lr')}, EMA {b.get('ema_rate')}. DKDM distils on a "
              f"{b.get('digits_chain')}-step respacing of the teacher's T = 1000 chain; every model of a table "
              f"(teacher, DKDM, and the baselines trained on the full chain) is sampled with {b.get('sample_steps')} "
              f"ancestral steps on the same original timesteps, those of the DKDM student's chain. Synthetic sets: "
              f"{b.get('digits_real')} teacher samples ({b.get('synth_steps')} steps). Bands: best to worst seed.", ""]
    if not results.get("points"):
        L += ["No results yet: start the command above.", ""]
    for exp in ("table2_digits", "table5_cross"):
        curves = curve_points(results, exp)
        if not curves:
            continue
        png = f"curves_{exp}.png"
        plot_fid_curves(curves, assets / png, CURVE_TITLES[exp])
        L += [f"## {CURVE_TITLES[exp]}", "", f"![{exp}](replication/{png})", ""]
        L += final_fid_table(curves) + [""]
        copied = sorted({f"{curve_label(p['method'])} = {p['copy_of']}" for p in results["points"]
                         if p["exp"] == exp and "copy_of" in p})
        if copied:
            L += ["Trained once for both tables (the same student, teacher, seeds and steps): " + "; ".join(copied)
                  + ".", ""]
        L += [f"- {c}" for c in (crossings(curves, a, b) for a, b in curve_pairs(exp)) if c] + [""]
        L += _grid_table(out, f"curves_{exp}", [m for m in curves]) + [""]
    if results.get("points"):
        L += ["## Measured cost", "", f"One thread per run, {results.get('jobs')} runs side by side on "
              f"{results.get('cpu_count')} cores:", ""] + cost_table(results) + [""]
    path = out / "replication_curves.md"
    path.write_text("\n".join(L) + "\n")
    return path
