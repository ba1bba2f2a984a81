"""Record codec: a versioned msgpack envelope with per-tensor checksums.

One envelope holds N records of one layout (the Redis backend stores N = 1 per
slot key; the Ray backend moves whole batches as numpy arrays and only uses the
envelope for snapshots):

    {"magic": b"DKDMREC", "v": 1, "dtype": "fp16", "n": N, "shape": [C, H, W],
     "t": <int64 bytes [N]>, "x_t": <bytes [N,C,H,W]>, "eps": <bytes>,
     "logvar": <bytes> | None, "y": <int64 bytes [N]> | None,
     "crc": {field: zlib.crc32(field bytes)}}

bf16 tensors travel as their int16 bit pattern (numpy has no bf16). Anything
that is not such an envelope, or whose sizes or checksums do not match, raises
RecordCorrupt with a message saying which check failed.

Snapshots (``write_snapshot``/``read_snapshot``) are one file: a magic line, a
length-prefixed msgpack header, then one length-prefixed frame per shard.
A frame holds the shard's slot arrays and one crc32 per record (over that
record's state, t, uses, tensors and label), so a damaged record is dropped on
its own while a damaged frame structure fails the whole file.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from common.pool.base import STORAGE_DTYPES, RecordCorrupt
from common.records import RecordBatch

MAGIC = b"DKDMREC"
VERSION = 1
SNAPSHOT_MAGIC = b"DKDMPOOL\n"
SNAPSHOT_VERSION = 1

_WIRE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}   # numpy dtype of the bytes
_WIRE_SIZE = {k: np.dtype(v).itemsize for k, v in _WIRE.items()}
_FLOAT_FIELDS = ("x_t", "eps", "logvar")


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {sorted(STORAGE_DTYPES)}")
        return dtype
    for k, v in STORAGE_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported storage dtype {dtype}; expected fp32, fp16 or bf16")


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


def _crc(b: bytes | memoryview) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def encode_records(batch: RecordBatch, storage_dtype: torch.dtype | str = "fp32") -> bytes:
    """N records -> one envelope (float tensors cast to the storage dtype)."""
    storage = dtype_name(storage_dtype)
    n = len(batch)
    if batch.x_t.shape[0] != n or batch.eps.shape != batch.x_t.shape:
        raise ValueError(f"record batch shapes disagree: x_t {tuple(batch.x_t.shape)}, eps {tuple(batch.eps.shape)}, t [{n}]")
    env = {"magic": MAGIC, "v": VERSION, "dtype": storage, "n": n, "shape": list(batch.x_t.shape[1:])}
    env["t"] = batch.t.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    for name in _FLOAT_FIELDS:
        v = getattr(batch, name)
        env[name] = None if v is None else to_numpy(v, storage).tobytes()
    env["y"] = None if batch.y is None else batch.y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    env["crc"] = {k: _crc(env[k]) for k in ("t", "x_t", "eps", "logvar", "y") if env[k] is not None}
    return msgpack.packb(env, use_bin_type=True)


def _unpack_envelope(data: bytes) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordCorrupt(f"record is {type(data).__name__}, not bytes")
    if len(data) == 0:
        raise RecordCorrupt("record is empty (0 bytes)")
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except msgpack.ExtraData as err:
        if isinstance(err.unpacked, dict) and err.unpacked.get("magic") == MAGIC:
            raise RecordCorrupt("record has trailing bytes after the envelope") from None
        raise RecordCorrupt("foreign record: missing DKDMREC magic") from None
    except (ValueError, msgpack.UnpackException, TypeError) as err:
        raise RecordCorrupt(f"record is not a msgpack envelope (truncated or foreign): {type(err).__name__}") from None
    if not isinstance(env, dict) or env.get("magic") != MAGIC:
        raise RecordCorrupt("foreign record: missing DKDMREC magic")
    if env.get("v") != VERSION:
        raise RecordCorrupt(f"record envelope version {env.get('v')!r} is not supported (this build reads {VERSION})")
    return env


def _checked_fields(data: bytes) -> tuple[str, int, tuple[int, ...], dict[str, bytes | None]]:
    """One envelope -> (storage, n, shape, {field: bytes or None}) with every size and checksum verified."""
    env = _unpack_envelope(data)
    try:
        storage, n, shape = env["dtype"], int(env["n"]), tuple(int(s) for s in env["shape"])
        crcs = env["crc"]
    except (KeyError, TypeError, ValueError):
        raise RecordCorrupt("record envelope lacks dtype, n, shape or crc") from None
    if storage not in _WIRE:
        raise RecordCorrupt(f"record has unknown storage dtype {storage!r}")
    elems = n * math.prod(shape)
    fsize = _WIRE_SIZE[storage]
    out: dict[str, bytes | None] = {}
    for name, want in (("t", 8 * n), ("x_t", elems * fsize), ("eps", elems * fsize), ("logvar", elems * fsize), ("y", 8 * n)):
        blob = env.get(name)
        if blob is None:
            if name in ("t", "x_t", "eps"):
                raise RecordCorrupt(f"record lacks required field {name!r}")
            out[name] = None
            continue
        if not isinstance(blob, bytes):
            raise RecordCorrupt(f"record field {name!r} is not bytes")
        if len(blob) != want:
            raise RecordCorrupt(f"record field {name!r} has {len(blob)} bytes, expected {want} (truncated)")
        if crcs.get(name) != _crc(blob):
            raise RecordCorrupt(f"record field {name!r} fails its checksum")
        out[name] = blob
    return storage, n, shape, out


def decode_records(data: bytes) -> RecordBatch:
    """One envelope -> RecordBatch with float tensors in the stored dtype; RecordCorrupt on any mismatch."""
    storage, n, shape, blobs = _checked_fields(data)
    out: dict[str, torch.Tensor | None] = {}
    for name, np_dtype, tshape in (
        ("t", np.int64, (n,)), ("x_t", _WIRE[storage], (n, *shape)), ("eps", _WIRE[storage], (n, *shape)),
        ("logvar", _WIRE[storage], (n, *shape)), ("y", np.int64, (n,)),
    ):
        blob = blobs[name]
        if blob is None:
            out[name] = None
            continue
        a = np.frombuffer(blob, dtype=np_dtype).reshape(tshape).copy()
        out[name] = from_numpy(a, storage) if name in _FLOAT_FIELDS else torch.from_numpy(a)
    return RecordBatch(x_t=out["x_t"], t=out["t"], eps=out["eps"], logvar=out["logvar"], y=out["y"])


class RecordRows:
    """Preallocated storage for n records of one layout, written row by row from one-record envelopes.

    The batch path of the Redis backend: a draw or claim of n records decodes each envelope
    (checksums per record, so a damaged record is isolated) straight into row i of
    x_t, eps, logvar [n, C, H, W] (wire dtype), t, y [n] int64, with no per-record tensors.
    Rows never written hold an empty slot (zeros, t = EMPTY_T); with ``every_row=True`` the caller
    promises to write every row and the storage is left uninitialised.
    """

    def __init__(self, n: int, record_shape, storage: str, has_logvar: bool, has_label: bool, every_row: bool = False):
        self.n, self.shape, self.storage = int(n), tuple(int(s) for s in record_shape), dtype_name(storage)
        self.has_logvar, self.has_label = bool(has_logvar), bool(has_label)
        wire, alloc = _WIRE[self.storage], (np.empty if every_row else np.zeros)
        self.x_t = alloc((self.n, *self.shape), dtype=wire)
        self.eps = alloc((self.n, *self.shape), dtype=wire)
        self.logvar = alloc((self.n, *self.shape), dtype=wire) if has_logvar else None
        self.y = alloc(self.n, dtype=np.int64) if has_label else None
        self.t = np.full(self.n, -1, dtype=np.int64)        # EMPTY_T (common.records)

    def put(self, i: int, data: bytes) -> None:
        """Decode one record into row i; RecordCorrupt (row untouched) if damaged, foreign or of another layout."""
        if data is None:
            raise RecordCorrupt("READY slot holds no record")
        storage, n, shape, blobs = _checked_fields(data)
        if n != 1:
            raise RecordCorrupt(f"expected one record, the envelope holds {n}")
        if shape != self.shape or storage != self.storage:
            raise RecordCorrupt(f"record of shape {shape} {storage}, pool stores {self.shape} {self.storage}")
        if (blobs["logvar"] is not None) != self.has_logvar or (blobs["y"] is not None) != self.has_label:
            raise RecordCorrupt("record fields (logvar, y) do not match the pool's layout")
        wire = _WIRE[storage]
        self.x_t[i] = np.frombuffer(blobs["x_t"], dtype=wire).reshape(shape)
        self.eps[i] = np.frombuffer(blobs["eps"], dtype=wire).reshape(shape)
        if self.logvar is not None:
            self.logvar[i] = np.frombuffer(blobs["logvar"], dtype=wire).reshape(shape)
        if self.y is not None:
            self.y[i] = np.frombuffer(blobs["y"], dtype=np.int64)[0]
        self.t[i] = np.frombuffer(blobs["t"], dtype=np.int64)[0]

    def batch(self, rows: np.ndarray | None = None) -> RecordBatch:
        """The rows (all, or ``rows`` in that order) as a RecordBatch in the storage dtype (shares memory when all)."""
        def take(a):
            return None if a is None else (a if rows is None else a[rows])

        return RecordBatch(
            x_t=from_numpy(take(self.x_t), self.storage), t=torch.from_numpy(take(self.t)),
            eps=from_numpy(take(self.eps), self.storage),
            logvar=None if self.logvar is None else from_numpy(take(self.logvar), self.storage),
            y=None if self.y is None else torch.from_numpy(take(self.y)),
        )


def encode_each(batch: RecordBatch, storage_dtype: torch.dtype | str = "fp32") -> list[bytes]:
    """N records -> N one-record envelopes, byte for byte ``encode_record(batch.index(slice(i, i + 1)))``.

    Each field is cast and converted once for the whole batch; only the envelope is per record.
    """
    storage = dtype_name(storage_dtype)
    n = len(batch)
    if batch.x_t.shape[0] != n or batch.eps.shape != batch.x_t.shape:
        raise ValueError(f"record batch shapes disagree: x_t {tuple(batch.x_t.shape)}, eps {tuple(batch.eps.shape)}, t [{n}]")
    shape = list(batch.x_t.shape[1:])
    t = batch.t.detach().cpu().to(torch.int64).contiguous().numpy()
    fl = {k: (None if getattr(batch, k) is None else to_numpy(getattr(batch, k), storage)) for k in _FLOAT_FIELDS}
    y = None if batch.y is None else batch.y.detach().cpu().to(torch.int64).contiguous().numpy()
    pack = msgpack.Packer(use_bin_type=True).pack
    out = []
    for i in range(n):
        env = {"magic": MAGIC, "v": VERSION, "dtype": storage, "n": 1, "shape": shape, "t": t[i:i + 1].tobytes()}
        for name in _FLOAT_FIELDS:
            env[name] = None if fl[name] is None else fl[name][i].tobytes()
        env["y"] = None if y is None else y[i:i + 1].tobytes()
        env["crc"] = {k: _crc(env[k]) for k in ("t", "x_t", "eps", "logvar", "y") if env[k] is not None}
        out.append(pack(env))
    return out


def encode_record(batch: RecordBatch, storage_dtype: torch.dtype | str = "fp32") -> bytes:
    """One record (a RecordBatch of length 1) -> envelope."""
    if len(batch) != 1:
        raise ValueError(f"encode_record takes a batch of one record, got {len(batch)}")
    return encode_records(batch, storage_dtype)


def decode_record(data: bytes) -> RecordBatch:
    """Envelope of one record -> RecordBatch of length 1."""
    batch = decode_records(data)
    if len(batch) != 1:
        raise RecordCorrupt(f"expected one record, the envelope holds {len(batch)}")
    return batch


# --- snapshots --------------------------------------------------------------------------


@dataclass
class SlotArrays:
    """The contents of global slots [lo, lo + n) as numpy arrays (bf16 tensors as int16 bits).

    state uint8 [n]; t int64 [n]; uses int32 [n] (uses left); produced_at int64 [n];
    x_t, eps, logvar [n, C, H, W] in the wire dtype (logvar may be None); y int64 [n] or None.
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


_FRAME_FIELDS = ("state", "t", "uses", "produced_at", "x_t", "eps", "logvar", "y")


def encode_frame(arrays: SlotArrays) -> bytes:
    meta = {"lo": arrays.lo, "n": len(arrays), "crc": arrays.record_crcs().tobytes()}
    for name in _FRAME_FIELDS:
        a = getattr(arrays, name)
        meta[name] = None if a is None else {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    return msgpack.packb(meta, use_bin_type=True)


def decode_frame(data: bytes, where: str) -> tuple[SlotArrays, np.ndarray]:
    """A shard frame -> (arrays, bad [n] bool: records whose checksum failed). RecordCorrupt if unreadable."""
    try:
        meta = msgpack.unpackb(data, raw=False, strict_map_key=False)
        lo, n = int(meta["lo"]), int(meta["n"])
        arrs = {}
        for name in _FRAME_FIELDS:
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
    except RecordCorrupt:
        raise
    except Exception as err:  # noqa: BLE001 - any structural failure is one error
        raise RecordCorrupt(f"{where}: unreadable shard frame ({type(err).__name__}: {err})") from None
    arrays = SlotArrays(lo=lo, **arrs)
    return arrays, arrays.record_crcs() != crc


def write_snapshot(path: str, header: dict, frames) -> None:
    """Write ``header`` then each frame (an iterable of SlotArrays, produced lazily) to ``path`` atomically."""
    import os

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
        raise RecordCorrupt(f"snapshot {path}: version {header.get('v')!r} is not supported")
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
