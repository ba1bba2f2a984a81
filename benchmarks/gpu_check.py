"""What only a GPU can check: CUDA paths, bf16 autocast, real speed. One JSON line per check.

    python benchmarks/gpu_check.py            # on a CUDA machine (the device tool's H100)
    python benchmarks/gpu_check.py --profile  # also: kernel time vs wall time per call, top kernels
    python benchmarks/gpu_check.py --smoke    # tiny sizes on the CPU, to test this script

Ratios are measured within one run (shared machines are noisy): bf16 vs fp32 step time of the
paper's 14M student, teacher forwards of the paper's 57M ADM teacher (random weights: speed only),
and the single-process loop's split between teacher and student time on one device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import DiffusionConfig, load_config
from common.models import build_network
from common.teachers.guided import GuidedDiffusionTeacher


def emit(**kw):
    print(json.dumps(kw), flush=True)


def guarded(name: str, fn):
    """Run one check; a failure prints its own JSON line and the remaining checks still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one device call must report every check
        emit(check=name, ok=False, error=f"{type(e).__name__}: {e}"[:500],
             where=traceback.format_exc().strip().splitlines()[-3:])
        return None


def profile_call(fn, label: str, reps: int = 3, top: int = 6) -> None:
    """Device (kernel) time per call vs wall time per call, and the kernels that take the most of it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / reps

    def self_us(e):
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    rows = sorted(prof.key_averages(), key=self_us, reverse=True)
    busy = sum(self_us(e) for e in rows) / reps / 1e6
    emit(check="profile", what=label, wall_ms=round(wall * 1e3, 2), kernel_ms=round(busy * 1e3, 2),
         top=[[e.key[:60], round(self_us(e) / reps / 1e3, 2)] for e in rows[:top]])


def timed(fn, n, sync):
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print where the device time of each forward goes")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    sync = (lambda: None) if args.smoke else torch.cuda.synchronize
    emit(check="env", torch=torch.__version__, device=str(dev),
         name=(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"),
         bf16=(dev.type == "cuda" and torch.cuda.is_bf16_supported()),
         tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    teacher_size, student_size, b, n = ("tiny-16", "tiny-16", 8, 2) if args.smoke else ("57M", "14M", 128, 10)
    img = 16 if args.smoke else 32
    tb = 8 if args.smoke else 256

    def mixture():
        """1. The single-process loop on the exact mixture teacher, on the device (analytic tables in float64)."""
        from student_trainer.distill import distill
        out_dir = tempfile.mkdtemp(prefix="gpu_check_")  # fresh: never resume an earlier run
        steps = 5 if args.smoke else 200
        cfg = load_config("configs/mixture.yaml", [f"run.device={dev}", f"teacher.device={dev}",
                                                   f"distill.steps={steps}", f"run.out_dir={out_dir}",
                                                   "run.progress=false", "sample.num_samples=64"])
        t0 = time.perf_counter()
        out = distill(cfg)
        emit(check="mixture_distill_on_device", ok=True, wall_s=round(time.perf_counter() - t0, 2), steps=out["steps"])

    def teacher_forward():
        """2. Teacher forwards of the paper's 57M ADM (CIFAR-10 flags, learned sigma), fp32 vs bf16 autocast."""
        from common.models.adm import create_model
        from common.models.registry import adm_flags
        tnet = create_model(**{**adm_flags(teacher_size), "learn_sigma": True, "image_size": img})
        teacher = GuidedDiffusionTeacher(tnet, DiffusionConfig(), device=dev)
        x = torch.randn(tb, 3, img, img, device=dev)
        t = torch.randint(0, 1000, (tb,), device=dev)
        fp32 = timed(lambda: teacher.predict(x, t), n, sync)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            bf16 = timed(lambda: teacher.predict(x, t), n, sync)
        emit(check="teacher_57M_forward", batch=tb, fp32_samples_per_s=round(tb / fp32, 1),
             bf16_samples_per_s=round(tb / bf16, 1), bf16_speedup=round(fp32 / bf16, 2))
        if args.profile:
            for use_bf16 in (False, True):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16 and dev.type == "cuda"):
                    profile_call(lambda: teacher.predict(x, t), f"teacher_57M_forward_{'bf16' if use_bf16 else 'fp32'}")
        return fp32

    def student_step():
        """3. Student (paper's 14M) DKDM step, fp32 vs bf16 autocast (StudentTrainer's own switch)."""
        from common.diffusion import make_diffusion
        from common.records import RecordBatch
        from student_trainer.trainer import StudentTrainer
        d = make_diffusion("cosine", 1000)
        rec = RecordBatch(x_t=torch.randn(b, 3, img, img), t=torch.randint(0, 1000, (b,)),
                          eps=torch.randn(b, 3, img, img), logvar=torch.full((b, 3, img, img), -3.0)).to(dev)
        res = {}
        for use_bf16 in (False, True):
            net = build_network("adm", student_size, {"learn_sigma": True, "image_size": img})
            tr = StudentTrainer(net, d, var_type="learned_range", lr=1e-4, weight_decay=0.0, ema_rate=0.9999,
                                grad_clip=None, lambda_vlb=1.0, bf16=use_bf16, device=dev)
            res[use_bf16] = timed(lambda: tr.distill_step(rec), n, sync)
            if args.profile:
                profile_call(lambda: tr.distill_step(rec), f"student_14M_dkdm_step_{'bf16' if use_bf16 else 'fp32'}")
            loss = tr.distill_step(rec)["loss"]
            assert loss == loss, "NaN loss"
        emit(check="student_14M_dkdm_step", batch=b, fp32_s=round(res[False], 4), bf16_s=round(res[True], 4),
             bf16_speedup=round(res[False] / res[True], 2))
        return res[False]

    def split(teacher_fp32_s, student_fp32_s):
        """4. Where a single-process step's time goes when teacher and student share the device."""
        teacher_s = teacher_fp32_s * b / tb  # one teacher forward over the student's batch
        emit(check="single_process_split", teacher_fraction_of_step=round(teacher_s / (teacher_s + student_fp32_s), 3),
             note="the distributed service moves this fraction to dedicated teacher devices")

    def pytest_cuda():
        """5. The CUDA unit tests."""
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/common/test_diffusion_samplers.py",
                            "-k", "cuda", "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=180)
        emit(check="pytest_cuda", rc=r.returncode,
             tail=r.stdout.strip().splitlines()[-3:] if r.stdout.strip() else r.stderr[-300:])

    guarded("mixture_distill_on_device", mixture)
    teacher_fp32 = guarded("teacher_57M_forward", teacher_forward)
    student_fp32 = guarded("student_14M_dkdm_step", student_step)
    if teacher_fp32 is not None and student_fp32 is not None:
        guarded("single_process_split", lambda: split(teacher_fp32, student_fp32))
    guarded("pytest_cuda", pytest_cuda)


if __name__ == "__main__":
    main()
