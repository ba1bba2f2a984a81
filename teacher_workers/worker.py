"""The teacher side of dynamic iterative distillation (paper Sec. 3.3, Algorithm 1).

``TeacherWorker`` is a plain class (STYLE: Ray at the edge): it owns one
teacher and talks to a ``Pool``. Each record it writes costs exactly one
teacher forward: the stored ``eps``/``logvar`` of a returned slot give the
denoising step x_t -> x_{t-1} without another forward, and the forward at the
new state is both the next step's means and the student's target.

Empty slots (``t = EMPTY_T``) are filled by the shuffle-denoise warm-up: every
empty slot a teacher claims gets its own chain from fresh noise at T-1 with a
uniformly drawn end index, denoised in micro-batches that mix timesteps until it
reaches that end (the reference's B+: t is exactly uniform over the chain when
the pool is READY, and the dynamic loop keeps it so). Chains start only for
claimed slots, so any number of teachers sharing a pool start exactly one chain
per empty slot.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from common import metrics
from common.diffusion import (
    Diffusion,
    model_log_variance,
    p_mean_variance,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
)
from common.pool.base import STORAGE_DTYPES, Claim, Pool, PoolTimeout
from common.records import EMPTY_T, RecordBatch
from common.teachers.base import Teacher

logger = logging.getLogger(__name__)


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


class InjectedFault(RuntimeError):
    """The failure ``teacher.fault`` asks for (tests of the service's recovery, docs/faults.md)."""


class ClaimTimeoutTooShort(RuntimeError):
    """Warm-up claims keep expiring before their chains end: the warm-up cannot finish (a config error)."""


# Warm-up claims that may expire in a row (no warm-up claim filled between them) before the teacher stops:
# one can be bad luck on a loaded machine, several mean pool.claim_timeout_s is shorter than a chain.
MAX_EXPIRED_IN_A_ROW = 3


@dataclass
class _Chains:
    """The warm-up's working set: one chain per claimed empty slot, each denoised from T-1 to its own end.

    ``claim`` [n] and ``pos`` [n] (CPU) say which open claim the chain's slot belongs to and where in it.
    """

    x: torch.Tensor
    t: torch.Tensor
    end: torch.Tensor
    y: torch.Tensor | None
    claim: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def index(self, keep: torch.Tensor) -> _Chains:
        k = keep.cpu()
        return _Chains(self.x[keep], self.t[keep], self.end[keep], None if self.y is None else self.y[keep],
                       self.claim[k], self.pos[k])

    @staticmethod
    def cat(a: _Chains | None, b: _Chains) -> _Chains:
        if a is None or len(a) == 0:
            return b
        return _Chains(torch.cat([a.x, b.x]), torch.cat([a.t, b.t]), torch.cat([a.end, b.end]),
                       None if a.y is None else torch.cat([a.y, b.y]), torch.cat([a.claim, b.claim]),
                       torch.cat([a.pos, b.pos]))


@dataclass
class _OpenClaim:
    """A claim with empty slots whose chains still run; its finished records wait here for the fill."""

    claim: Claim
    parts: list[tuple[torch.Tensor, RecordBatch]] = field(default_factory=list)   # (positions in the claim, records)
    left: int = 0                                                                    # chains still running


class TeacherWorker:
    """Fills and refills pool slots with one teacher. ``warmup`` = "shuffle" (uniform end t) or "noise" (all at T-1).

    The warm-up gives every empty slot it claims its own chain with a uniformly drawn end index and
    denoises every chain to its end (the reference's B+, exactly uniform in t). Chains start only for
    claimed slots, so however many teachers share the pool, no chain is started for a slot that is
    not owed; the working set holds at most ``microbatch`` chains, topped up by claiming more empty
    slots as chains end, and the last forwards of the warm-up run part-empty. A claim is filled
    when its last chain ends, so it must outlive T teacher forwards: ``pool.claim_timeout_s``.
    """

    def __init__(self, teacher: Teacher, pool: Pool, *, microbatch: int = 256, seed: int = 0,
                 worker_index: int = 0, warmup: str = "shuffle", claim_timeout_s: float = 60.0,
                 fail_after_forwards: int | None = None):
        if warmup not in ("shuffle", "noise"):
            raise ValueError(f"warmup must be 'shuffle' or 'noise', got {warmup!r}")
        self.teacher, self.pool, self.microbatch = teacher, pool, microbatch
        self.warmup_mode, self.claim_timeout_s = warmup, claim_timeout_s
        self.fail_after_forwards = fail_after_forwards
        self.index = worker_index
        self.worker = str(worker_index)
        self.device = teacher.device
        self.x_dtype = STORAGE_DTYPES[pool.storage_dtype]
        # STYLE: seeds are base seed plus worker index, so no two teachers draw the same noise.
        self.gen = torch.Generator(device="cpu").manual_seed(seed + worker_index)
        self._chains: _Chains | None = None
        self._open: dict[int, _OpenClaim] = {}
        self._seq = itertools.count()
        # Top the working set up once this many chains have ended: a claim (and later a fill) per
        # forward for one or two slots would cost more pool calls than the part-empty forwards save.
        self._min_top_up = max(1, microbatch // 16)
        self._warned_expiry = False
        self._expired_in_a_row = 0
        self.forwards = 0
        self.records = 0
        self._counting = threading.Lock()     # totals() is read from another thread (the actor's health)
        self.busy_s = 0.0
        metrics.inc(metrics.TEACHER_RESTARTS_TOTAL, 0, worker=self.worker)   # the series exists from the start

    # --- random numbers (drawn on the CPU generator, moved to the device: reproducible anywhere)
    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)

    def _labels(self, n: int) -> torch.Tensor | None:
        k = self.teacher.num_classes
        return None if k is None else torch.randint(0, k, (n,), generator=self.gen).to(self.device)

    def _forward(self, x, t, y) -> RecordBatch:
        if self.fail_after_forwards is not None and self.forwards >= self.fail_after_forwards:
            raise InjectedFault(f"teacher.fault: injected after {self.fail_after_forwards} forwards")
        # The pool keeps x_t in its storage dtype: round it first, so the stored eps/logvar are the teacher's at
        # the stored x_t and the student's input is exactly the teacher's (fp32 storage: a no-op).
        rec = teacher_record(self.teacher, x.to(self.x_dtype).to(x.dtype), t, y)
        with self._counting:
            self.forwards += len(t)
        metrics.inc(metrics.TEACHER_FORWARDS_TOTAL, len(t), worker=self.worker)
        return rec

    def totals(self) -> tuple[int, int]:
        """(records, forwards) at one instant: read one at a time, the loop could fill a claim and forward
        the next in between, and the pair would count a claim more in flight than there ever was."""
        with self._counting:
            return self.records, self.forwards

    @property
    def chains_running(self) -> int:
        return 0 if self._chains is None else len(self._chains)

    @property
    def slots_held(self) -> int:
        """Slots of this worker's open warm-up claims (claimed, not yet filled)."""
        return sum(len(o.claim) for o in self._open.values())

    # --- claims ---------------------------------------------------------------
    def _claim(self, n: int, timeout_s: float | None) -> int:
        """Claim up to n REFILL slots: returned ones are advanced now, empty ones start their chains.
        A claim with no empty slot is filled at once. Returns the records filled."""
        claim = self.pool.claim_refill(n, timeout_s=timeout_s)
        if len(claim) == 0:     # nothing to refill after all (seen under heavy load): no chain, no fill
            return 0
        start = time.perf_counter()
        prev = claim.batch.to(self.device, dtype=torch.float32)
        empty = prev.t == EMPTY_T
        open_claim = _OpenClaim(claim, left=int(empty.sum()))
        if (~empty).any():
            for chunk in (~empty).nonzero().flatten().split(self.microbatch):
                open_claim.parts.append((chunk.cpu(), self._advance(prev.index(chunk))))
        filled = 0
        if open_claim.left:
            seq = next(self._seq)
            self._open[seq] = open_claim
            self._start_chains(seq, empty.nonzero().flatten().cpu())
        else:
            filled = self._fill(open_claim)
        self._busy(start)
        return filled

    def _start_chains(self, seq: int, pos: torch.Tensor) -> None:
        """One fresh chain at t = T-1 per claimed empty slot, ending at a uniform index (or at T-1: "noise")."""
        n, T = len(pos), self.teacher.diffusion.num_timesteps
        if self.warmup_mode == "shuffle":
            end = torch.randint(0, T, (n,), generator=self.gen).to(self.device)
        else:
            end = torch.full((n,), T - 1, dtype=torch.long, device=self.device)
        fresh = _Chains(self._randn((n, *self.teacher.image_shape)), torch.full((n,), T - 1, dtype=torch.long, device=self.device),
                        end, self._labels(n), torch.full((n,), seq, dtype=torch.long), pos)
        self._chains = _Chains.cat(self._chains, fresh)

    def _fill(self, open_claim: _OpenClaim) -> int:
        """All records of a claim, in its slot order, into the pool. Returns the records accepted."""
        order = torch.cat([p for p, _ in open_claim.parts])
        new = RecordBatch.cat([b for _, b in open_claim.parts]).index(torch.argsort(order).to(self.device))
        if self.pool.fill(open_claim.claim.claim_id, new.to("cpu")) is False:
            # The claim expired (we were too slow or were presumed dead): its slots went back to REFILL and
            # another claim will refill them; these records are dropped.
            return 0
        with self._counting:
            self.records += len(order)
        self._expired_in_a_row = 0
        metrics.inc(metrics.TEACHER_RECORDS_TOTAL, len(order), worker=self.worker)
        return len(order)

    # --- shuffle-denoise warm-up ------------------------------------------
    def _warm_step(self) -> int:
        """One forward of every running chain (in micro-batches); ended chains become their slots' records,
        claims whose chains have all ended are filled, claims past their deadline are given up.
        Returns the records filled."""
        start = time.perf_counter()
        c = self._chains
        rec = self._forward_chains(c)
        done = c.t == c.end
        filled = 0
        if done.any():
            ended, seqs = rec.index(done), c.claim[done.cpu()]
            pos = c.pos[done.cpu()]
            for seq in seqs.unique().tolist():
                mine = seqs == seq
                o = self._open[seq]
                o.parts.append((pos[mine], ended.index(mine.to(self.device))))
                o.left -= int(mine.sum())
                if o.left == 0:
                    filled += self._fill(self._open.pop(seq))
        keep = ~done
        step = rec.index(keep)
        x_next = denoise_step(self.teacher.diffusion, step, self.teacher.var_type, self.teacher.clip_denoised,
                              self._randn(step.x_t.shape))
        kept = c.index(keep)
        self._chains = _Chains(x_next, step.t - 1, kept.end, kept.y, kept.claim, kept.pos)
        self._give_up_expired()
        self._busy(start)
        return filled

    def _forward_chains(self, c: _Chains) -> RecordBatch:
        """The teacher's records at every chain's current state, ``microbatch`` chains per forward."""
        m = self.microbatch
        if len(c) <= m:
            return self._forward(c.x, c.t, c.y)
        return RecordBatch.cat([self._forward(c.x[i:i + m], c.t[i:i + m], None if c.y is None else c.y[i:i + m])
                                for i in range(0, len(c), m)])

    def _busy(self, start: float) -> None:
        dt = time.perf_counter() - start
        self.busy_s += dt
        metrics.inc(metrics.TEACHER_BUSY_SECONDS_TOTAL, dt, worker=self.worker)

    def _give_up_expired(self) -> None:
        """Stop the chains of claims past their deadline: the pool has sent those slots back to REFILL."""
        now = time.time()
        late = [seq for seq, o in self._open.items() if o.claim.deadline < now]
        if not late:
            return
        slots = sum(len(self._open.pop(seq).claim) for seq in late)
        self._chains = self._chains.index(~torch.isin(self._chains.claim, torch.tensor(late)).to(self.device))
        self._expired_in_a_row += len(late)
        T = self.teacher.diffusion.num_timesteps
        if self._expired_in_a_row >= MAX_EXPIRED_IN_A_ROW:
            # Every chain would be cut short again: stop (the actor dies, and with its restarts spent the
            # driver ends the run with this line) rather than warm up forever.
            per_forward = self.busy_s / max(1, self.forwards / self.microbatch)
            raise ClaimTimeoutTooShort(
                f"pool.claim_timeout_s={self.claim_timeout_s:g} s is shorter than a warm-up claim takes (its chains "
                f"run up to T={T} teacher forwards, about {T * per_forward:.0f} s here): {self._expired_in_a_row} "
                f"warm-up claims expired in a row; set pool.claim_timeout_s to at least {max(2 * T * per_forward, 2 * self.claim_timeout_s):.0f}")
        log = logger.debug if self._warned_expiry else logger.warning
        self._warned_expiry = True
        log("teacher %s: %d claimed slot(s) expired before their warm-up chains ended (pool.claim_timeout_s=%g s "
            "is shorter than %d teacher forwards); they go back to REFILL and are warmed up again: raise "
            "pool.claim_timeout_s", self.worker, slots, self.claim_timeout_s, self.teacher.diffusion.num_timesteps)

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

    def step(self, timeout_s: float | None = None, max_claim: int | None = None) -> int:
        """One unit of the teacher's loop: claim what the working set has room for, then one warm-up forward.

        With chains running the claim does not wait (timeout 0); with none it waits up to ``timeout_s``
        and its PoolTimeout reaches the caller (nothing to do). ``max_claim`` caps the slots claimed.
        Returns the records filled.
        """
        running = self.chains_running
        room = self.microbatch - running
        if max_claim is not None:
            room = min(room, max_claim)
        filled = 0
        if room > 0 and (room >= self._min_top_up or running == 0):
            try:
                filled += self._claim(room, timeout_s=0.0 if running else timeout_s)
            except PoolTimeout:
                if not running:
                    raise
        if self.chains_running:
            filled += self._warm_step()
        return filled

    def refill_once(self, n: int | None = None, timeout_s: float | None = None) -> int:
        """Claim up to n REFILL slots and fill them (empty ones denoised to their ends first). Returns the number filled."""
        filled = self._claim(n or self.microbatch, timeout_s=timeout_s)
        while self.chains_running:
            filled += self._warm_step()
        return filled

    def fill_all(self, num_slots: int, progress: bool = False, timeout_s: float = 1.0) -> None:
        """Warm-up: fill until ``num_slots`` records were written or no REFILL slot is left to claim."""
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=num_slots, desc="shuffle-denoise warm-up", unit="slot", dynamic_ncols=True)
        done, t0, f0 = 0, time.perf_counter(), self.forwards
        while done < num_slots:
            owed = num_slots - done - self.slots_held
            if owed <= 0 and not self.chains_running:
                break
            try:
                k = self.step(timeout_s=timeout_s, max_claim=max(owed, 0))
            except PoolTimeout:
                break
            done += k
            if bar is not None:
                bar.update(k)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(fwd_per_s=f"{(self.forwards - f0) / dt:.0f}")
        if bar is not None:
            bar.close()
