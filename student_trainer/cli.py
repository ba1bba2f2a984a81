"""The ``dkdm`` command: distill, train (data-based), synth (synthetic data set), sample, eval, export.

    dkdm distill --config mixture --set distill.steps=500
    dkdm train   --config digits_teacher                        # the data-based baseline / digits teacher
    dkdm synth   --config digits --set data.synthetic_dir=runs/synth
    dkdm sample  --checkpoint runs/dkdm/checkpoint --num 64 --out samples.npz --device cpu
    dkdm eval    --samples samples.npz --reference digits --device cpu
    dkdm export  --checkpoint runs/digits/checkpoint --format diffusers --out digits-diffusers
    dkdm pool    create|status|drop --config mixture --set pool.backend=redis --set pool.name=mix

``--config`` takes a YAML file or the name of a shipped config (``dkdm configs`` lists them).

A user error (unknown key, wrong type, missing file) exits with status 2 and one line; set
DKDM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from common.config import Config, ConfigError, load_config, public_dump

CONFIG_PACKAGE_DIR = "configs"    # student_trainer/configs -> the repository's configs/ (shipped as package data)


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from common.pool.base import PoolError
    from common.teachers.base import TeacherLoadError
    return (UserError, ConfigError, TeacherLoadError, PoolError, FileNotFoundError, ValueError)


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package: "digits", "paper/cifar10_32", ..."""
    root = resources.files("student_trainer") / CONFIG_PACKAGE_DIR
    names = [entry.name[:-5] for entry in root.iterdir() if entry.name.endswith(".yaml")]
    if root.joinpath("paper").is_dir():
        names += [f"paper/{entry.name[:-5]}" for entry in root.joinpath("paper").iterdir()
                  if entry.name.endswith(".yaml")]
    return sorted(names)


def config_path(value: str | None) -> str | None:
    """``--config``: an existing YAML file, else a shipped config's name ("digits", "configs/digits.yaml")."""
    if value is None or Path(value).is_file():
        return value
    name = value.removeprefix("configs/").removesuffix(".yaml")
    if name in shipped_configs():
        return str(resources.files("student_trainer") / CONFIG_PACKAGE_DIR / f"{name}.yaml")
    raise ConfigError(f"config {value!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level of the library (default INFO)")


def setup_logging(level: str = "INFO") -> None:
    """The library logs through ``logging``; the CLI shows it on stderr, one line per record.

    Ray's worker processes keep their own handlers (their lines reach the driver prefixed by Ray).
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or shipped config name (digits, mixture, digits_teacher, paper/...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set distill.steps=100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def resolve(args, load=None) -> Config | None:
    """The config of ``--config``/``--set`` (``load(args)``, by default load_config); printed instead with --dry-run."""
    cfg = load(args) if load is not None else load_config(config_path(args.config), args.overrides)
    if args.dry_run:
        print(json.dumps(public_dump(cfg), indent=2))
        return None
    return cfg


REPORTED_PATHS = ("run_dir", "checkpoint", "samples", "comparison", "loss_curve", "metrics", "export")


def report(result: dict) -> None:
    """The CLI's final report: where the results are, then the rest as one JSON line."""
    for key in REPORTED_PATHS:
        if key in result:
            print(f"{key:>10}: {result[key]}")
    extra = {k: v for k, v in result.items() if k not in REPORTED_PATHS}
    if extra:
        print(json.dumps(extra))


def cmd_distill(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.distill import distill
        from student_trainer.report import finish
        result = distill(cfg)
        report(finish(cfg, result, result["run_dir"]))


def cmd_train(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.baselines import train_on_data
        from student_trainer.report import finish
        result = train_on_data(cfg)
        report(finish(cfg, result, result["run_dir"], distilled=False))


def cmd_synth(args) -> None:
    cfg = resolve(args)
    if cfg is not None:
        from student_trainer.baselines import synthesize
        report(synthesize(cfg))


def cmd_sample(args) -> None:
    from student_trainer.evaluate import sample_checkpoint
    report(sample_checkpoint(args.checkpoint, args.num, args.out, steps=args.steps, sampler=args.sampler,
                             eta=args.eta, seed=args.seed, use_ema=not args.no_ema, device=device_of(args)))


def cmd_eval(args) -> None:
    from student_trainer.evaluate import evaluate_samples
    print(json.dumps(evaluate_samples(args.samples, args.reference, features=args.features,
                                      device=device_of(args))))


def cmd_export(args) -> None:
    from student_trainer.export import export_diffusers
    report(export_diffusers(args.checkpoint, args.out, use_ema=not args.no_ema))


def cmd_configs(args) -> None:
    print("\n".join(shipped_configs()))


def device_of(args) -> str:
    """``--device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    return str(device)


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
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("eval", help="FID, sFID, IS, precision/recall of samples against a reference")
    p.add_argument("--samples", required=True, help=".npz of samples")
    p.add_argument("--reference", required=True, help="digits | npz:PATH | folder:PATH | shards:PATH")
    p.add_argument("--features", default="digits", help="'digits' or a local Inception weights file")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a student checkpoint as a diffusers DDPMPipeline folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--format", choices=["diffusers"], default="diffusers")
    p.add_argument("--out", required=True, help="output folder (DDPMPipeline.from_pretrained(OUT) loads it)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("configs", help="list the shipped configs (--config NAME)")
    p.set_defaults(fn=cmd_configs)
    from student_trainer.pool_cli import add_pool_parser
    add_pool_parser(sub)
    for p in sub.choices.values():
        add_log_level(p)
    return parser


def run_cli(fn, args, fatal: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``fn(args)``; user errors become one line on stderr and exit status 2, ``fatal`` errors (the
    service cannot go on: their whole message) one line and exit status 1."""
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        fn(args)
    except fatal as err:
        if os.environ.get("DKDM_DEBUG"):
            raise
        print(f"dkdm: error: {err}", file=sys.stderr)
        return 1
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
