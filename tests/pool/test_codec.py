"""The record codec: round trips per storage dtype and a specific RecordCorrupt for every kind of damage."""

from __future__ import annotations

import msgpack
import pytest
import torch

from common.pool.base import RecordCorrupt
from common.pool.codec import decode_record, decode_records, encode_record, encode_records
from common.records import RecordBatch


def batch(n=3, logvar=True, label=True) -> RecordBatch:
    g = torch.Generator().manual_seed(0)
    return RecordBatch(
        x_t=torch.randn(n, 3, 4, 4, generator=g), t=torch.arange(n) * 7, eps=torch.randn(n, 3, 4, 4, generator=g),
        logvar=torch.randn(n, 3, 4, 4, generator=g) if logvar else None, y=torch.arange(n) % 2 if label else None,
    )


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 2e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("logvar,label", [(True, True), (False, False)])
def test_round_trip(dtype, tol, logvar, label):
    b = batch(logvar=logvar, label=label)
    out = decode_records(encode_records(b, dtype))
    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert out.x_t.dtype == want and out.t.dtype == torch.int64
    assert torch.equal(out.t, b.t)
    assert torch.allclose(out.x_t.float(), b.x_t, atol=tol * 4, rtol=tol)
    assert torch.allclose(out.eps.float(), b.eps, atol=tol * 4, rtol=tol)
    assert (out.logvar is None) == (not logvar) and (out.y is None) == (not label)
    if label:
        assert torch.equal(out.y, b.y)
    # the stored value is exactly the value cast to the storage dtype
    assert torch.equal(out.x_t, b.x_t.to(want))


def test_half_dtypes_halve_the_envelope():
    b = batch(n=8)
    sizes = {d: len(encode_records(b, d)) for d in ("fp32", "fp16", "bf16")}
    assert sizes["fp16"] < 0.55 * sizes["fp32"] and sizes["bf16"] == sizes["fp16"]


def test_single_record():
    b = batch(n=1)
    out = decode_record(encode_record(b))
    assert len(out) == 1 and torch.equal(out.x_t, b.x_t)
    with pytest.raises(ValueError, match="one record"):
        encode_record(batch(n=2))
    with pytest.raises(RecordCorrupt, match="holds 2"):
        decode_record(encode_records(batch(n=2)))


def test_flipped_tensor_byte_fails_the_checksum():
    data = bytearray(encode_records(batch()))
    env = msgpack.unpackb(bytes(data), raw=False)
    blob = env["eps"]
    i = bytes(data).index(blob) + len(blob) // 2
    data[i] ^= 0x01
    with pytest.raises(RecordCorrupt, match="'eps' fails its checksum"):
        decode_records(bytes(data))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: d[: len(d) // 2], "truncated or foreign"),
        (lambda d: b"", "empty"),
        (lambda d: b"GET / HTTP/1.1\r\n", "not a msgpack envelope|foreign"),
        (lambda d: msgpack.packb({"hello": 1}), "foreign record"),
        (lambda d: msgpack.packb([1, 2, 3]), "foreign record"),
        (lambda d: d + b"\x00", "trailing bytes"),
    ],
)
def test_damaged_or_foreign_bytes(damage, match):
    with pytest.raises(RecordCorrupt, match=match):
        decode_records(damage(encode_records(batch())))


def test_wrong_version_and_wrong_sizes():
    env = msgpack.unpackb(encode_records(batch()), raw=False)
    with pytest.raises(RecordCorrupt, match="version 99"):
        decode_records(msgpack.packb({**env, "v": 99}, use_bin_type=True))
    short = {**env, "x_t": env["x_t"][:-4]}
    with pytest.raises(RecordCorrupt, match="'x_t' has .* bytes, expected"):
        decode_records(msgpack.packb(short, use_bin_type=True))
    with pytest.raises(RecordCorrupt, match="unknown storage dtype"):
        decode_records(msgpack.packb({**env, "dtype": "fp8"}, use_bin_type=True))
    with pytest.raises(RecordCorrupt, match="required field 'eps'"):
        decode_records(msgpack.packb({**env, "eps": None}, use_bin_type=True))
    with pytest.raises(RecordCorrupt, match="not bytes"):
        decode_records("a string")


def test_bad_batches_are_refused_when_encoding():
    b = batch()
    with pytest.raises(ValueError, match="shapes disagree"):
        encode_records(RecordBatch(x_t=b.x_t, t=b.t, eps=b.eps[:, :1]))
    with pytest.raises(ValueError, match="storage dtype"):
        encode_records(b, "fp8")
