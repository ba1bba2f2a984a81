"""The ``dkdm`` command: distill, train (data-based), synth (synthetic data set), sample, eval.

    dkdm distill --config configs/mixture.yaml --set distill.steps=500
    dkdm train   --config configs/digits_teacher.yaml          # the data-based baseline / digits teacher
    dkdm synth   --config configs/digits.yaml --set data.synthetic_dir=runs/synth
    dkdm sample  --checkpoint runs/dkdm/checkpoint --num 64 --out samples.npz
    dkdm eval    --samples samples.npz --reference digits
    dkdm pool    create|status|drop --config configs/mixture.yaml --set pool.backend=redis --set pool.name=mix

A user error (unknown key, wrong type, missing file) exits with status 2 and one line; set
DKDM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common.config import Config, ConfigError, load_config


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from common.pool.base import PoolError
    from common.teachers.base import TeacherLoadError
    return (UserError, ConfigError, TeacherLoadError, PoolError, FileNotFoundError, ValueError)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set distill.steps=100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def resolve(args) -> Config | None:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return None
    return cfg


def report(result: dict) -> None:
    for key in ("run_dir", "checkpoint", "samples", "metrics"):
        if key in result:
            print(f"{key:>10}: {result[key]}")
    extra = {k: v for k, v in result.items() if k not in ("run_dir", "checkpoint", "samples", "metrics")}
    if extra:
        print(json.dumps(extra))


def cmd_distill(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.distill import distill
        report(distill(cfg))


def cmd_train(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.baselines import train_on_data
        report(train_on_data(cfg))


def cmd_synth(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.baselines import synthesize
        report(synthesize(cfg))


def cmd_sample(args) -> None:
    from student_trainer.evaluate import sample_checkpoint
    report(sample_checkpoint(args.checkpoint, args.num, args.out, steps=args.steps, sampler=args.sampler,
                             eta=args.eta, seed=args.seed, use_ema=not args.no_ema))


def cmd_eval(args) -> None:
    from student_trainer.evaluate import evaluate_samples
    print(json.dumps(evaluate_samples(args.samples, args.reference, features=args.features)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkdm", description="Data-free knowledge distillation of diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("distill", cmd_distill, "dynamic iterative distillation (single process)"),
                            ("train", cmd_train, "data-based training (baseline; trains the digits teacher)"),
                            ("synth", cmd_synth, "generate a synthetic data set with the teacher")):
        p = sub.add_parser(name, help=help_)
        add_config_args(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("sample", help="sample a checkpoint to .npz and a PNG grid")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")
    p.add_argument("--steps", default="50", help="respacing: '50' (ancestral) or e.g. 'ddim200'")
    p.add_argument("--sampler", choices=["ancestral", "ddim"], default="ancestral")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("eval", help="FID, sFID, IS, precision/recall of samples against a reference")
    p.add_argument("--samples", required=True, help=".npz of samples")
    p.add_argument("--reference", required=True, help="digits | npz:PATH | folder:PATH | shards:PATH")
    p.add_argument("--features", default="digits", help="'digits' or a local Inception weights file")
    p.set_defaults(fn=cmd_eval)
    from student_trainer.pool_cli import add_pool_parser
    add_pool_parser(sub)
    return parser


def run_cli(fn, args) -> int:
    """Run ``fn(args)``; user errors become one line on stderr and exit status 2."""
    try:
        fn(args)
    except _user_errors() as err:
        if os.environ.get("DKDM_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"dkdm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dkdm: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
