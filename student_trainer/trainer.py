"""The student side: one optimizer step on a batch, EMA, and exact save/resume of the training state.

Plain class (STYLE): the single-process loop and the Ray Train workers both use it.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import metrics
from common.config import DistillConfig
from common.diffusion import Diffusion
from common.records import RecordBatch
from student_trainer.losses import DKDM_V_BOUND, dkdm_loss, hybrid_loss


def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * params (IDDPM's update_ema); buffers are copied."""
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point:
                ema[name].mul_(rate).add_(p.detach(), alpha=1 - rate)
            else:
                ema[name].copy_(p)


def ema_rate_at(step: int, rate: float) -> float:
    """EMA warm-up: min(rate, (1 + step) / (10 + step)), so a short run's EMA is not stuck at its initial
    weights (at rate 0.9999 the EMA needs ~10^4 steps to forget them); the paper's rate applies after that."""
    return min(rate, (1.0 + step) / (10.0 + step))


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast where the device supports it (CUDA with bf16); a no-op elsewhere."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class StudentTrainer:
    """Student network + AdamW + EMA over a fixed diffusion chain ``d``.

    ``timestep_map``: the student is always called with the chain's original timesteps.
    ``v_bound``: the bound on the student's Eq. 12 v (``bound_v``) under either objective; checkpoints
    record it so that sampling applies the same one.
    """

    def __init__(self, model: torch.nn.Module, d: Diffusion, *, var_type: str, lr: float, weight_decay: float,
                 ema_rate: float, grad_clip: float | None, lambda_vlb: float, bf16: bool, device: torch.device,
                 v_bound: str = DKDM_V_BOUND):
        self.model, self.d, self.var_type, self.device = model.to(device), d, var_type, device
        self.v_bound = v_bound
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ema_rate, self.grad_clip, self.lambda_vlb, self.bf16 = ema_rate, grad_clip, lambda_vlb, bf16
        self.step = 0
        self._tmap = d.map_timesteps(torch.arange(d.num_timesteps, device=device))

    @classmethod
    def from_config(cls, model: torch.nn.Module, d: Diffusion, cfg: DistillConfig, var_type: str,
                    device: torch.device) -> "StudentTrainer":
        """The trainer a ``distill:`` config section describes."""
        return cls(model, d, var_type=var_type, lr=cfg.lr, weight_decay=cfg.weight_decay, ema_rate=cfg.ema_rate,
                   grad_clip=cfg.grad_clip, lambda_vlb=cfg.lambda_vlb, bf16=cfg.bf16, device=device)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with autocast_for(self.device, self.bf16):
            out = self.model(x_t, self._tmap[t], y) if y is not None else self.model(x_t, self._tmap[t])
        return out.float()

    def _optimize(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = None          # measured only where it is used, by clipping (a NaN in the logs read as a failure)
        if self.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        self.opt.step()
        update_ema(self.ema, self.model, ema_rate_at(self.step, self.ema_rate))
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    def distill_step(self, rec: RecordBatch, teacher_clip: bool = True) -> dict[str, float]:
        """One step of L*_DKDM (Eq. 19) on pool records."""
        rec = rec.to(self.device, dtype=torch.float32)
        self.model.train()
        out = self._forward(rec.x_t, rec.t, rec.y)
        losses = dkdm_loss(self.d, out, rec, student_var_type=self.var_type, teacher_clip=teacher_clip,
                           lambda_vlb=self.lambda_vlb, v_bound=self.v_bound)
        return self._optimize(losses)

    def data_step(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  y: torch.Tensor | None = None) -> dict[str, float]:
        """One step of IDDPM's hybrid objective (Eq. 13) on data (the baselines)."""
        self.model.train()
        out = self._forward(x_t.to(self.device), t.to(self.device), None if y is None else y.to(self.device))
        losses = hybrid_loss(self.d, out, x0.to(self.device), x_t.to(self.device), t.to(self.device),
                             noise.to(self.device), var_type=self.var_type, lambda_vlb=self.lambda_vlb,
                             v_bound=self.v_bound)
        return self._optimize(losses)

    def ema_model(self) -> torch.nn.Module:
        """A copy of the network carrying the EMA weights (for sampling)."""
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema)
        return m.eval()

    # --- exact resume: optimizer state as safetensors + JSON (no pickle) ----------
    def save_state(self, folder: Path) -> None:
        opt = self.opt.state_dict()
        tensors, meta = {}, {"step": self.step, "param_groups": opt["param_groups"], "state_keys": {}}
        for pid, st in opt["state"].items():
            meta["state_keys"][str(pid)] = sorted(st)
            for k, v in st.items():
                tensors[f"{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        save_file(tensors, str(folder / "optimizer.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps(meta))

    def load_state(self, folder: Path) -> None:
        meta = json.loads((folder / "trainer_state.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"), device=str(self.device))
        state = {int(pid): {k: tensors[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state_keys"].items()}
        for st in state.values():
            if "step" in st:
                st["step"] = st["step"].cpu()
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step = int(meta["step"])


def record_step_metrics(out: dict, rank: int, b: int) -> None:
    """The trainer's Prometheus metrics for one step (out: train_s, pool_wait_s and the loss terms)."""
    metrics.observe(metrics.TRAINER_STEP_SECONDS, out["train_s"], worker=rank)
    metrics.inc(metrics.TRAINER_POOL_WAIT_SECONDS_TOTAL, out["pool_wait_s"], worker=rank)
    metrics.inc(metrics.TRAINER_SAMPLES_TOTAL, b, worker=rank)
    metrics.inc(metrics.TRAINER_STEPS_TOTAL, 1, worker=rank)
    for term in ("loss", "l_simple", "l_vlb"):
        if term in out:
            metrics.set(metrics.TRAINER_LOSS, out[term], worker=rank, term=term)
