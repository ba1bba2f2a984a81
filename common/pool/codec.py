"""Records as numpy arrays, and the snapshot file.

A batch of n records is a dict of numpy arrays: x_t, eps [n, C, H, W] in the storage dtype (bf16 as
its int16 bits: numpy has no bf16), logvar (optional) [n, C, H, W] in fp32 (``field_storage``), y
(optional) and t [n] int64; ``batch_over`` views them as a RecordBatch without a copy.

A snapshot is one file: a magic line, a length-prefixed msgpack header, then one length-prefixed frame
per shard with one crc32 per record, so a damaged record is dropped on its own while a damaged frame
structure fails the whole file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from common.pool.errors import RecordCorrupt
from common.records import RecordBatch

STORAGE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

SNAPSHOT_MAGIC = b"DKDMPOOL\n"
SNAPSHOT_VERSION = 2      # 2: logvar stored in fp32 whatever the storage dtype (issue 22)

WIRE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}   # storage dtype -> numpy (bf16 as its bits)
RECORD_FIELDS = ("x_t", "eps", "logvar", "y")      # the per-record arrays besides t
_FLOATS = ("x_t", "eps", "logvar")


def field_storage(name: str, storage: str) -> str:
    """The dtype a float field is stored in: x_t and eps in the pool's, logvar always fp32. In fp16 (bf16) a
    logvar's rounding (~1e-3, 1e-2) is the size of the whole interval Eq. 12 interpolates over at large t."""
    return "fp32" if name == "logvar" else storage


def to_numpy(x: torch.Tensor, storage: str) -> np.ndarray:
    """A float tensor cast to the storage dtype, as a contiguous numpy array (bf16 as int16 bits)."""
    x = x.detach().to("cpu", STORAGE_DTYPES[storage]).contiguous()
    return (x.view(torch.int16) if storage == "bf16" else x).numpy()


def from_numpy(a: np.ndarray, storage: str) -> torch.Tensor:
    """Inverse of ``to_numpy`` (shares memory where it can)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:      # e.g. a zero-copy Ray buffer: torch must not alias read-only memory
        a = a.copy()
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if storage == "bf16" else t


def new_arrays(n: int, record_shape, storage: str, has_logvar: bool, has_label: bool, zeros: bool = False) -> dict[str, np.ndarray]:
    """Storage for n records: uninitialized, or zeros (numpy's calloc maps the pages lazily)."""
    new, shape = (np.zeros if zeros else np.empty), (n, *record_shape)
    out = {name: new(shape, dtype=WIRE_DTYPES[field_storage(name, storage)]) for name in _FLOATS[:2 + has_logvar]}
    if has_label:
        out["y"] = new(n, dtype=np.int64)
    out["t"] = new(n, dtype=np.int64)
    return out


def to_arrays(batch: RecordBatch, storage: str) -> dict[str, np.ndarray]:
    """A batch's fields as arrays in the storage layout (no copy when they already are)."""
    out = {name: to_numpy(getattr(batch, name), field_storage(name, storage))
           for name in _FLOATS if getattr(batch, name) is not None}
    for name in ("y", "t"):
        if getattr(batch, name) is not None:
            out[name] = getattr(batch, name).detach().to("cpu", torch.int64).contiguous().numpy()
    return out


def batch_over(arrays: dict[str, np.ndarray], storage: str) -> RecordBatch:
    """A RecordBatch of tensors over ``arrays`` (new_arrays' layout; writable arrays: no copy)."""
    def tensor(name):
        if name not in arrays:
            return None
        if name in _FLOATS:
            return from_numpy(arrays[name], field_storage(name, storage))
        return torch.from_numpy(np.ascontiguousarray(arrays[name]))

    return RecordBatch(x_t=tensor("x_t"), t=tensor("t"), eps=tensor("eps"), logvar=tensor("logvar"), y=tensor("y"))


def _crc(b: bytes | memoryview) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


# --- snapshots --------------------------------------------------------------------------


@dataclass
class SlotArrays:
    """The contents of global slots [lo, lo + n) as numpy arrays (bf16 tensors as int16 bits).

    state uint8 [n]; t int64 [n]; uses int32 [n] (uses left); produced_at int64 [n];
    x_t, eps [n, C, H, W] in the wire dtype, logvar fp32 or None; y int64 [n] or None.
    """

    lo: int
    state: np.ndarray
    t: np.ndarray
    uses: np.ndarray
    produced_at: np.ndarray
    x_t: np.ndarray
    eps: np.ndarray
    logvar: np.ndarray | None
    y: np.ndarray | None

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def record_crcs(self) -> np.ndarray:
        """crc32 per record [n] uint32, over every field of that record."""
        fields = [self.state, self.t, self.uses, self.x_t, self.eps, self.logvar, self.y]
        rows = [np.ascontiguousarray(f).reshape(len(self), -1).view(np.uint8) for f in fields if f is not None]
        out = np.empty(len(self), dtype=np.uint32)
        for i in range(len(self)):
            c = 0
            for r in rows:
                c = zlib.crc32(r[i].data, c)
            out[i] = c & 0xFFFFFFFF
        return out


FRAME_FIELDS = ("state", "t", "uses", "produced_at", "x_t", "eps", "logvar", "y")


def encode_frame(arrays: SlotArrays) -> bytes:
    meta = {"lo": arrays.lo, "n": len(arrays), "crc": arrays.record_crcs().tobytes()}
    for name in FRAME_FIELDS:
        a = getattr(arrays, name)
        meta[name] = None if a is None else {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    return msgpack.packb(meta, use_bin_type=True)


def decode_frame(data: bytes, where: str) -> tuple[SlotArrays, np.ndarray]:
    """A shard frame -> (arrays, bad [n] bool: records whose checksum failed). RecordCorrupt if unreadable."""
    try:
        meta = msgpack.unpackb(data, raw=False, strict_map_key=False)
        lo, n = int(meta["lo"]), int(meta["n"])
        arrs = {}
        for name in FRAME_FIELDS:
            m = meta[name]
            if m is None:
                arrs[name] = None
                continue
            a = np.frombuffer(m["data"], dtype=np.dtype(m["dtype"]))
            arrs[name] = a.reshape(m["shape"]).copy()
            if arrs[name].shape[0] != n:
                raise ValueError(f"field {name} has {arrs[name].shape[0]} rows, expected {n}")
        crc = np.frombuffer(meta["crc"], dtype=np.uint32)
        if crc.shape[0] != n:
            raise ValueError("checksum table has the wrong length")
    except Exception as err:  # noqa: BLE001 - any structural failure is one error
        raise RecordCorrupt(f"{where}: unreadable shard frame ({type(err).__name__}: {err})") from None
    arrays = SlotArrays(lo=lo, **arrs)
    return arrays, arrays.record_crcs() != crc


def write_snapshot(path: str, header: dict, frames) -> None:
    """Write ``header`` then each frame (an iterable of SlotArrays, produced lazily) to ``path`` atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        head = msgpack.packb({"v": SNAPSHOT_VERSION, **header}, use_bin_type=True)
        f.write(SNAPSHOT_MAGIC)
        f.write(struct.pack("<QI", len(head), _crc(head)))
        f.write(head)
        for arrays in frames:
            blob = encode_frame(arrays)
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
    os.replace(tmp, path)


def read_snapshot(path: str):
    """-> (header dict, iterator of (SlotArrays, bad mask)). RecordCorrupt naming the file if damaged."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise RecordCorrupt(f"snapshot {path}: cannot open ({err.strerror})") from None
    with f:
        data = f.read()
    if not data.startswith(SNAPSHOT_MAGIC):
        raise RecordCorrupt(f"snapshot {path}: not a DKDM pool snapshot (bad magic)")
    pos = len(SNAPSHOT_MAGIC)
    try:
        hlen, hcrc = struct.unpack_from("<QI", data, pos)
        pos += 12
        head = data[pos:pos + hlen]
        if len(head) != hlen or _crc(head) != hcrc:
            raise ValueError("header checksum mismatch")
        header = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except Exception as err:  # noqa: BLE001
        raise RecordCorrupt(f"snapshot {path}: damaged header ({err})") from None
    if header.get("v") != SNAPSHOT_VERSION:
        raise RecordCorrupt(f"snapshot {path}: version {header.get('v')!r} is not supported (this build reads version "
                            f"{SNAPSHOT_VERSION}: logvar in fp32 since 2)")
    pos += hlen

    def frames():
        p, k = pos, 0
        while p < len(data):
            if p + 8 > len(data):
                raise RecordCorrupt(f"snapshot {path}: truncated after frame {k}")
            (flen,) = struct.unpack_from("<Q", data, p)
            p += 8
            if p + flen > len(data):
                raise RecordCorrupt(f"snapshot {path}: frame {k} truncated ({len(data) - p} of {flen} bytes)")
            yield decode_frame(data[p:p + flen], f"snapshot {path} frame {k}")
            p += flen
            k += 1

    return header, frames()
