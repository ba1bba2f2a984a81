"""The paper's baselines (Sec. 5.1) with the same student and step budget as DKDM:

- data-based: IDDPM's hybrid objective on real data (``dkdm train``);
- data-free: the teacher first generates a synthetic set (``dkdm synth``), then standard training on it;
- data-limited: as many images as the real set, P% of them real and the rest synthetic (the reference's mix.py).

The digits teacher used by demos and tests is trained by ``dkdm train`` on sklearn's digits.
"""

from __future__ import annotations

import time

import torch

from common.config import Config
from common.data import SyntheticShardWriter, load_dataset, load_shards, mix_datasets
from common.diffusion import make_diffusion
from common.images import save_grid
from common.seeds import data_mix_seed, data_seed, eval_seed, student_init_seed
from common.teachers import make_teacher
from common.teachers.latent import config_autoencoder, decode_latents, encode_images
from student_trainer.checkpoints import load_checkpoint, model_config, save_checkpoint
from student_trainer.distill import resolve_device
from student_trainer.losses import HYBRID_V_BOUND, data_batch
from student_trainer.run_dir import RunDir
from student_trainer.sampling import sample_images, sample_teacher
from student_trainer.student import build_student
from student_trainer.trainer import StudentTrainer

# DistillConfig.lambda_vlb = 1 is the reference's weighting; on data it is IDDPM's lambda = 0.001 of the full bound.
HYBRID_LAMBDA_PER_UNIT = 0.001


def training_set(cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The data-based / data-free / data-limited training set named by ``cfg.data``."""
    dc = cfg.data
    if dc.real_percent > 0:
        if not dc.synthetic_dir:
            raise ValueError("data.real_percent > 0 (data-limited) needs data.synthetic_dir")
        gen = torch.Generator().manual_seed(data_mix_seed(cfg.run.seed))
        return mix_datasets(load_dataset(dc.dataset, dc.image_size), load_shards(dc.synthetic_dir), dc.real_percent, gen)
    return load_dataset(dc.dataset, dc.image_size)


def train_on_data(cfg: Config, data: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict:
    """Standard training of the student on a data set (hybrid objective, Eq. 13)."""
    torch.manual_seed(student_init_seed(cfg.run.seed))
    device = resolve_device(cfg.run.device)
    x, y = data if data is not None else training_set(cfg)
    # The paper's latent baselines: images (real, or the teacher's decoded samples) encoded by the
    # teacher's autoencoder; the student learns on latents and its samples are decoded.
    first_stage = config_autoencoder(cfg.teacher)
    decode, ae_record = None, None
    if first_stage is not None:
        ae, ae_record = first_stage[0].to(device), first_stage[1]
        x = encode_images(ae, x, cfg.sample.batch_size)
        decode = lambda z: decode_latents(ae, z, cfg.sample.batch_size)  # noqa: E731
    if not cfg.data.class_cond:
        y = None
    num_classes = None if y is None else int(y.max()) + 1
    dc = cfg.teacher.diffusion
    d = make_diffusion(dc.schedule, dc.num_timesteps)
    learn_sigma = dc.var_type in ("learned", "learned_range")
    image_shape = tuple(x.shape[1:])
    model, build = build_student(cfg.student, image_shape, learn_sigma, num_classes)
    o = cfg.distill
    trainer = StudentTrainer(model, d, var_type=dc.var_type, lr=o.lr, weight_decay=o.weight_decay, ema_rate=o.ema_rate,
                             grad_clip=o.grad_clip, lambda_vlb=o.lambda_vlb * HYBRID_LAMBDA_PER_UNIT, bf16=o.bf16,
                             device=device, v_bound=HYBRID_V_BOUND)
    run = RunDir(cfg)
    gen = torch.Generator().manual_seed(data_seed(cfg.run.seed))
    if run.has_checkpoint():
        gen.set_state(load_checkpoint(run, trainer)["data"])
    config = model_config(build, d, dc.schedule, dc.var_type, dc.clip_denoised, image_shape, num_classes,
                          v_bound=trainer.v_bound, autoencoder=ae_record)
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm
        bar = tqdm(total=o.steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)
    while trainer.step < o.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (o.batch_size,), generator=gen)
        x0 = x[idx]
        x_t, t, noise = data_batch(d, x0, gen)
        out = trainer.data_step(x0, x_t, t, noise, None if y is None else y[idx])
        out.update(step=trainer.step, step_s=time.perf_counter() - t0)
        if trainer.step % cfg.run.log_every == 0:
            run.log(out)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
        if cfg.run.ckpt_every and trainer.step % cfg.run.ckpt_every == 0:
            save_checkpoint(run, trainer, config, {"data": gen.get_state()})
    if bar is not None:
        bar.close()
    ckpt = save_checkpoint(run, trainer, config, {"data": gen.get_state()})
    samples, _ = sample_images(trainer.ema_model(), d, dc.var_type, cfg.sample, image_shape, num_classes,
                               seed=eval_seed(cfg.run.seed), device=device, clip_denoised=dc.clip_denoised,
                               v_bound=trainer.v_bound, decode=decode)
    grid = save_grid(samples, run.samples / "final.png")
    return {"run_dir": str(run.root), "checkpoint": str(ckpt), "samples": str(grid),
            "metrics": str(run.metrics_path), "steps": trainer.step}


def synthesize(cfg: Config) -> dict:
    """The data-free baseline's synthetic set: ``data.num_synthetic`` teacher samples as resumable .npz shards."""
    dc = cfg.data
    if not dc.synthetic_dir:
        raise ValueError("data.synthetic_dir is required for synth")
    device = resolve_device(cfg.run.device)
    teacher = make_teacher(cfg.teacher, device)
    scfg = cfg.sample.model_copy(update={"sampler": dc.synth_sampler, "steps": dc.synth_steps, "timesteps": None})
    bar = None
    with SyntheticShardWriter(dc.synthetic_dir, dc.shard_size) as writer:
        if cfg.run.progress:
            from tqdm import tqdm
            bar = tqdm(total=dc.num_synthetic, initial=writer.count, desc="synth", unit="img", dynamic_ncols=True)
        while writer.count < dc.num_synthetic:
            n = min(scfg.batch_size, dc.num_synthetic - writer.count)
            # Each batch's seed depends on where it starts, so a resumed run continues the same stream.
            x, y = sample_teacher(teacher, scfg, seed=cfg.run.seed * 1_000_003 + writer.count, num_samples=n)
            writer.add(x, y)
            writer.flush()
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    return {"synthetic_dir": dc.synthetic_dir, "count": dc.num_synthetic}

