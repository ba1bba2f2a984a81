"""What the Redis backend stores per slot, and its URLs: the record format, ``parse_urls`` and ``mask_url``.

A slot's record is one Redis string, little-endian:

    offset  size  field
    0       8     t (int64)
    8       8     y (int64, 0 without a label)
    16      ...   x_t, eps raw in the storage dtype (bf16 as its int16 bits)[, logvar raw fp32]
    ...           zeros up to a multiple of 8 bytes
    L - 8   8     checksum: the sum mod 2**64 of every uint64 word before it, plus a salt

The checksum is one vectorised numpy reduction per batch: it catches damage confined to a word (a
flipped byte, a torn write) and, with the exact length, truncation and foreign values; the salt
makes an all-zero string fail. It is a storage-damage check, not a cryptographic one.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import mask_url
from common.pool.base import PoolError
from common.pool.codec import field_storage, from_numpy, to_numpy
from common.records import RecordBatch

CLUSTER_SCHEME = "redis+cluster://"
_WIRE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<i2")}
_SALT = np.uint64(0x4C4F4F504D444B44)      # b"DKDMPOOL" as a little-endian word
_HEADER = 16


class RecordCodec:
    """Encode a batch into slot records and check and decode stored ones, for one pool layout."""

    def __init__(self, record_shape, storage: str, has_logvar: bool, has_label: bool):
        self.shape, self.storage, self.has_label = tuple(record_shape), storage, has_label
        self.fields = ("x_t", "eps") + (("logvar",) if has_logvar else ())
        self.wire = {name: _WIRE[field_storage(name, storage)] for name in self.fields}
        self.span, off = {}, _HEADER                  # field -> its bytes [start, end) in a record
        for name in self.fields:
            self.span[name] = (off, off + int(np.prod(self.shape)) * self.wire[name].itemsize)
            off = self.span[name][1]
        self.body = off
        self.record_bytes = -(-self.body // 8) * 8 + 8

    def _sums(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, :-8].view("<u8").sum(axis=1, dtype=np.uint64) + _SALT

    def _field(self, rows: np.ndarray, name: str) -> np.ndarray:
        return rows[:, slice(*self.span[name])]

    def encode(self, batch: RecordBatch) -> np.ndarray:
        """A batch -> its records [n, L] uint8, one row per record."""
        n = len(batch)
        rows = np.empty((n, self.record_bytes), dtype=np.uint8)
        rows[:, 0:8].view("<i8")[:, 0] = batch.t.cpu().numpy()
        rows[:, 8:16].view("<i8")[:, 0] = 0 if batch.y is None else batch.y.cpu().numpy()
        for name in self.fields:
            a = to_numpy(getattr(batch, name), field_storage(name, self.storage))
            self._field(rows, name)[:] = a.reshape(n, -1).view(np.uint8)
        rows[:, self.body:-8] = 0
        rows[:, -8:].view("<u8")[:, 0] = self._sums(rows)
        return rows

    def decode(self, payloads: list) -> tuple[RecordBatch, np.ndarray]:
        """Stored records (bytes or None) -> (the intact ones as a batch, ok [n] bool: which were intact)."""
        L = self.record_bytes
        ok = np.array([p is not None and len(p) == L for p in payloads], dtype=bool)
        rows = np.frombuffer(b"".join(p for p, good in zip(payloads, ok) if good), dtype=np.uint8).reshape(-1, L)
        intact = self._sums(rows) == rows[:, -8:].view("<u8")[:, 0]
        if not intact.all():
            ok[np.flatnonzero(ok)[~intact]] = False
            rows = rows[intact]
        m = len(rows)
        fields = {name: from_numpy(np.ascontiguousarray(self._field(rows, name).view(self.wire[name])).reshape(m, *self.shape),
                                   field_storage(name, self.storage)) for name in self.fields}
        t = rows[:, 0:8].copy().view("<i8")[:, 0]
        y = rows[:, 8:16].copy().view("<i8")[:, 0] if self.has_label else None
        return RecordBatch(x_t=fields["x_t"], t=torch.from_numpy(t), eps=fields["eps"], logvar=fields.get("logvar"),
                           y=None if y is None else torch.from_numpy(y)), ok


def parse_urls(url: str) -> tuple[list[str], bool]:
    """``redis_url`` -> (server URLs, cluster?). Comma-separated URLs: shard i on server i mod n.

    ``redis+cluster://host:port`` connects to a Redis Cluster (one seed node).
    """
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise PoolError("pool.redis_url is empty")
    cluster = any(u.startswith(CLUSTER_SCHEME) for u in urls)
    if cluster and len(urls) != 1:
        raise PoolError(f"pool.redis_url: a Redis Cluster takes one seed URL, got {len(urls)}")
    for u in urls:
        if not u.startswith(("redis://", "rediss://", "unix://", CLUSTER_SCHEME)):
            raise PoolError(f"pool.redis_url entry {mask_url(u)!r} is not a redis://, rediss://, unix:// or {CLUSTER_SCHEME} URL")
    return urls, cluster
