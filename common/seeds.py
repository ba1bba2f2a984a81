"""One run seed, independent random streams (issue 22, item 5).

``run.seed`` used to seed the teachers' noise (worker 0), the student's initialisation and the
evaluation noise directly, so the three drew the same numbers (torch's global generator and a
``torch.Generator`` with one seed give one sequence). Each stream now gets its own seed, derived
by numpy's ``SeedSequence`` from ``(run.seed, the stream's name)``: reproducible from the run
seed alone, and unrelated to every other stream's.

Teacher workers keep STYLE's rule inside their stream: worker ``i`` seeds its generator with
``teacher_seed(run.seed) + i`` (``TeacherWorker``), so no two teachers draw the same noise.
"""

from __future__ import annotations

import zlib

import numpy as np

STREAMS = ("teacher", "student_init", "eval", "data", "data_mix")


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` of the run seeded ``seed``: ``SeedSequence(seed, spawn_key=(crc32(stream),))``.

    The same (seed, stream) always gives the same value; streams and seeds give unrelated values.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {', '.join(STREAMS)}")
    entropy = int(seed) % 2**64            # SeedSequence wants a non-negative int; a negative seed wraps
    ss = np.random.SeedSequence(entropy, spawn_key=(zlib.crc32(stream.encode()),))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def teacher_seed(seed: int) -> int:
    """Base seed of the teachers' noise; worker ``i`` adds ``i`` (and a restart stride when restarted)."""
    return stream_seed(seed, "teacher")


def student_init_seed(seed: int) -> int:
    """Seed of the student's initial weights (the same on every Ray Train rank)."""
    return stream_seed(seed, "student_init")


def eval_seed(seed: int) -> int:
    """Seed of the sampling noise (x_T, each step's z, class labels) of a run's sample grids."""
    return stream_seed(seed, "eval")


def data_seed(seed: int) -> int:
    """Seed of the baselines' training draws: batch indices, t and noise (``data_batch``)."""
    return stream_seed(seed, "data")


def data_mix_seed(seed: int) -> int:
    """Seed of the data-limited mix's draws of real and synthetic images (``mix_datasets``)."""
    return stream_seed(seed, "data_mix")
