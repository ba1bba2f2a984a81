"""The teacher side of dynamic iterative distillation (paper Sec. 3.3, Algorithm 1).

``TeacherWorker`` is a plain class (STYLE: Ray at the edge): it owns one
teacher and talks to a ``Pool``. Each record it writes costs exactly one
teacher forward: the stored ``eps``/``logvar`` of a returned slot give the
denoising step x_t -> x_{t-1} without another forward, and the forward at the
new state is both the next step's means and the student's target.

Empty slots (``t = EMPTY_T``) are filled by the shuffle-denoise warm-up: a
working set of states, each with its own uniformly drawn end index, is
denoised in micro-batches that mix timesteps, so every forward is a full
micro-batch and the finished records' t is uniform over the chain.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from common import metrics
from common.diffusion import Diffusion, model_log_variance, p_mean_variance, predict_xstart_from_eps, q_posterior_mean_variance
from common.pool.base import Pool, PoolTimeout
from common.records import EMPTY_T, RecordBatch
from common.teachers.base import Teacher


def teacher_record(teacher: Teacher, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> RecordBatch:
    """One teacher forward at (x_t, t) -> record (x_t, t, eps_T, logvar_T[, y])."""
    eps, var_values = teacher.predict(x_t, t, y)
    logvar = None
    if teacher.learned_variance:
        out = p_mean_variance(teacher.diffusion, x_t, t, eps, teacher.var_type, var_values, clip_denoised=teacher.clip_denoised)
        logvar = out["log_variance"].expand_as(x_t).contiguous()
    return RecordBatch(x_t=x_t, t=t, eps=eps, logvar=logvar, y=y)


def denoise_step(d: Diffusion, rec: RecordBatch, var_type: str, clip_denoised: bool, noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} = mu_T(x_t, t) + sigma_T z from a stored record (Eqs. 7, 10, 12); no noise at t = 0. [N, C, H, W]."""
    x0 = predict_xstart_from_eps(d, rec.x_t, rec.t, rec.eps)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean, _, _ = q_posterior_mean_variance(d, x0, rec.x_t, rec.t)
    logvar = rec.logvar if rec.logvar is not None else model_log_variance(d, rec.t, var_type, shape=rec.x_t.shape)
    nonzero = (rec.t != 0).to(mean.dtype).view(-1, *([1] * (mean.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * logvar) * noise


@dataclass
class _Warm:
    """Working set of the shuffle-denoise warm-up: states at mixed t with their end indices."""

    x: torch.Tensor
    t: torch.Tensor
    end: torch.Tensor
    y: torch.Tensor | None


class TeacherWorker:
    """Fills and refills pool slots with one teacher. ``warmup`` = "shuffle" (uniform end t) or "noise" (all at T-1)."""

    def __init__(self, teacher: Teacher, pool: Pool, *, microbatch: int = 256, seed: int = 0,
                 worker_index: int = 0, warmup: str = "shuffle", claim_timeout_s: float = 60.0):
        if warmup not in ("shuffle", "noise"):
            raise ValueError(f"warmup must be 'shuffle' or 'noise', got {warmup!r}")
        self.teacher, self.pool, self.microbatch = teacher, pool, microbatch
        self.warmup_mode, self.claim_timeout_s = warmup, claim_timeout_s
        self.worker = str(worker_index)
        self.device = teacher.device
        # STYLE: seeds are base seed plus worker index, so no two teachers draw the same noise.
        self.gen = torch.Generator(device="cpu").manual_seed(seed + worker_index)
        self._warm: _Warm | None = None
        self._finished: deque[RecordBatch] = deque()
        self.forwards = 0
        self.records = 0
        self.busy_s = 0.0
        metrics.inc(metrics.TEACHER_RESTARTS_TOTAL, 0, worker=self.worker)   # the series exists from the start

    # --- random numbers (drawn on the CPU generator, moved to the device: reproducible anywhere)
    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)

    def _labels(self, n: int) -> torch.Tensor | None:
        k = self.teacher.num_classes
        return None if k is None else torch.randint(0, k, (n,), generator=self.gen).to(self.device)

    def _forward(self, x, t, y) -> RecordBatch:
        rec = teacher_record(self.teacher, x, t, y)
        self.forwards += len(t)
        metrics.inc(metrics.TEACHER_FORWARDS_TOTAL, len(t), worker=self.worker)
        return rec

    # --- shuffle-denoise warm-up ------------------------------------------
    def _top_up_working_set(self) -> None:
        T = self.teacher.diffusion.num_timesteps
        have = 0 if self._warm is None else len(self._warm.t)
        n = self.microbatch - have
        if n <= 0:
            return
        shape = (n, *self.teacher.image_shape)
        if self.warmup_mode == "shuffle":
            end = torch.randint(0, T, (n,), generator=self.gen).to(self.device)
        else:
            end = torch.full((n,), T - 1, dtype=torch.long, device=self.device)
        fresh = _Warm(self._randn(shape), torch.full((n,), T - 1, dtype=torch.long, device=self.device), end, self._labels(n))
        if self._warm is None:
            self._warm = fresh
        else:
            w = self._warm
            self._warm = _Warm(torch.cat([w.x, fresh.x]), torch.cat([w.t, fresh.t]), torch.cat([w.end, fresh.end]),
                               None if w.y is None else torch.cat([w.y, fresh.y]))

    def _warm_forward(self) -> int:
        """One micro-batch forward of the working set; finished states become records. Returns records finished."""
        self._top_up_working_set()
        w = self._warm
        rec = self._forward(w.x, w.t, w.y)
        done = w.t == w.end
        if done.any():
            self._finished.append(rec.index(done))
        keep = ~done
        step = rec.index(keep)
        x_next = denoise_step(self.teacher.diffusion, step, self.teacher.var_type, self.teacher.clip_denoised,
                              self._randn(step.x_t.shape))
        self._warm = _Warm(x_next, step.t - 1, w.end[keep], None if w.y is None else w.y[keep])
        return int(done.sum())

    def _take_warm(self, n: int) -> RecordBatch:
        """n finished warm-up records, running the warm-up until there are enough."""
        while sum(len(b) for b in self._finished) < n:
            self._warm_forward()
        out, got = [], 0
        while got < n:
            b = self._finished.popleft()
            if got + len(b) > n:
                self._finished.appendleft(b.index(slice(n - got, None)))
                b = b.index(slice(0, n - got))
            out.append(b)
            got += len(b)
        return RecordBatch.cat(out)

    # --- refill ---------------------------------------------------------------
    def _advance(self, prev: RecordBatch) -> RecordBatch:
        """Returned slots: one denoising step from the stored record, then one forward at the new state."""
        d, T = self.teacher.diffusion, self.teacher.diffusion.num_timesteps
        x_next = denoise_step(d, prev, self.teacher.var_type, self.teacher.clip_denoised, self._randn(prev.x_t.shape))
        t_next = prev.t - 1
        # A slot that has passed t = 0 restarts from fresh noise at t = T-1 (its x_0 is thrown away).
        restart = t_next < 0
        if restart.any():
            k = int(restart.sum())
            x_next[restart] = self._randn((k, *self.teacher.image_shape))
            t_next = torch.where(restart, torch.full_like(t_next, T - 1), t_next)
        y = prev.y
        if y is not None and restart.any():
            y = y.clone()
            y[restart] = self._labels(int(restart.sum()))
        return self._forward(x_next, t_next, y)

    def refill_once(self, n: int | None = None, timeout_s: float | None = None) -> int:
        """Claim up to n REFILL slots, compute their new records, fill. Returns the number filled."""
        n = n or self.microbatch
        claim = self.pool.claim_refill(n, timeout_s=timeout_s)
        start = time.perf_counter()
        prev = claim.batch.to(self.device, dtype=torch.float32)
        empty = prev.t == EMPTY_T
        parts: list[tuple[torch.Tensor, RecordBatch]] = []
        if (~empty).any():
            idx = (~empty).nonzero().flatten()
            for chunk in idx.split(self.microbatch):
                parts.append((chunk, self._advance(prev.index(chunk))))
        if empty.any():
            idx = empty.nonzero().flatten()
            parts.append((idx, self._take_warm(len(idx))))
        order = torch.cat([i for i, _ in parts])
        new = RecordBatch.cat([b for _, b in parts]).index(torch.argsort(order))
        accepted = self.pool.fill(claim.claim_id, new.to("cpu"))
        self.busy_s += time.perf_counter() - start
        if accepted is False:
            # The claim expired (we were too slow or were presumed dead): its slots went back to REFILL and
            # another claim will refill them; these records are dropped.
            return 0
        self.records += len(order)
        metrics.inc(metrics.TEACHER_RECORDS_TOTAL, len(order), worker=self.worker)
        metrics.inc(metrics.TEACHER_BUSY_SECONDS_TOTAL, time.perf_counter() - start, worker=self.worker)
        return len(order)

    def fill_all(self, num_slots: int, progress: bool = False, timeout_s: float = 1.0) -> None:
        """Warm-up: refill until ``num_slots`` records were written or no REFILL slot is left."""
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=num_slots, desc="shuffle-denoise warm-up", unit="slot", dynamic_ncols=True)
        done, t0, f0 = 0, time.perf_counter(), self.forwards
        while done < num_slots:
            try:
                k = self.refill_once(min(self.microbatch, num_slots - done), timeout_s=timeout_s)
            except PoolTimeout:
                break
            done += k
            if bar is not None:
                bar.update(k)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(fwd_per_s=f"{(self.forwards - f0) / dt:.0f}")
        if bar is not None:
            bar.close()
