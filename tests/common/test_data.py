"""Data loaders, the resumable synthetic shard writer, the data-limited mix, and image I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import (SyntheticShardWriter, digits_split_indices, load_dataset, load_digits,
                         load_image_folder, load_npz, load_shards, load_shards_uint8, mix_datasets)
from common.images import from_uint8, save_grid, save_npz, to_uint8


# --- digits -------------------------------------------------------------------------------------

def test_digits_shape_range_labels():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0      # 0 -> -1, 16 -> +1
    assert set(y.tolist()) == set(range(10))
    from sklearn.datasets import load_digits as sk
    raw = sk().images[5]
    assert torch.allclose(x[5, 0], torch.from_numpy(raw).float() / 8 - 1)


def test_digits16_and_splits():
    x16, y16 = load_dataset("digits16")
    assert x16.shape == (1797, 1, 16, 16) and x16.min() >= -1 and x16.max() <= 1
    xtr, ytr = load_digits(split="train")
    xte, yte = load_digits(split="test")
    assert len(xtr) + len(xte) == 1797
    train_idx, test_idx = digits_split_indices(load_digits()[1].numpy())
    assert not set(train_idx) & set(test_idx)
    assert torch.equal(xte, load_digits()[0][torch.from_numpy(test_idx)])
    assert set(yte.tolist()) == set(range(10))       # stratified


# --- npz / folder -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("key", ["arr_0", "images"])
def test_npz_round_trip(tmp_path, layout, key):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)       # NHWC
    labels = rng.integers(0, 10, size=6)
    stored = images if layout == "nhwc" else images.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "d.npz", **{key: stored, "labels": labels})
    x, y = load_npz(tmp_path / "d.npz")
    assert x.shape == (6, 3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), images)
    assert y.tolist() == labels.tolist()


def test_save_npz_load_npz_round_trip(tmp_path):
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    save_npz(x, tmp_path / "s.npz", labels=torch.tensor([3, 1, 4, 1]))
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].shape == (4, 8, 8, 1) and d["arr_0"].dtype == np.uint8
    x2, y2 = load_dataset(f"npz:{tmp_path / 's.npz'}")
    assert torch.allclose(x2, x, atol=1 / 127.5 + 1e-6)
    assert y2.tolist() == [3, 1, 4, 1]
    assert load_npz(save_npz(x, tmp_path / "n.npz"))[1] is None


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", other=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_npz(tmp_path / "k.npz")


def test_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    originals = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            arr = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            originals[(cls, i)] = arr
    x, y = load_image_folder(tmp_path, image_size=6)
    assert x.shape == (4, 3, 6, 6)
    assert y.tolist() == [0, 0, 1, 1]
    expected = np.stack([originals[(c, i)] for c in ("cat", "dog") for i in range(2)])
    assert np.array_equal(to_uint8(x), expected)      # lossless PNG, no resize at the native size
    x3, _ = load_dataset(f"folder:{tmp_path}", image_size=3)
    assert x3.shape == (4, 3, 3, 3)


def test_folder_grayscale_unlabelled_crop(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((4, 8), 40 * i, np.uint8), mode="L").save(tmp_path / f"{i}.png")
    x, y = load_image_folder(tmp_path, image_size=4)
    assert x.shape == (3, 1, 4, 4) and y is None
    assert to_uint8(x)[2].max() == 80


@pytest.mark.parametrize("spec, match", [
    ("mnist", "unknown data set spec"),
    ("npz:", "unknown data set spec"),
    ("npz:/nonexistent/file.npz", "not found"),
    ("folder:/nonexistent/dir", "not found"),
    ("shards:/nonexistent/dir", "not found"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(spec, image_size=8)
    assert "\n" not in str(e.value)


def test_folder_needs_size_and_images(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path, 8)


# --- synthetic shards ---------------------------------------------------------------------------

def _batch(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels encode their global index, so order can be checked."""
    idx = np.arange(start, start + n)
    images = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (n, 4, 4, 1)).copy()
    return images, idx.astype(np.int64)


def test_shard_writer_resume_after_crash(tmp_path):
    shard_size, target = 4, 17
    w = SyntheticShardWriter(tmp_path, shard_size)
    for start in (0, 3, 6):            # 10 images = 2.5 shards
        w.add(*_batch(start, 3 if start < 6 else 4))
        w.flush()
    assert w.count == 10
    w.add(*_batch(10, 1))              # buffered, never flushed: lost in the "crash"
    del w
    (tmp_path / "shard_000002.npz.tmp.npz").write_bytes(b"half-written")   # a crash mid-write
    assert sorted(p.name for p in tmp_path.glob("shard_??????.npz")) == ["shard_000000.npz", "shard_000001.npz",
                                                                     "shard_000002.npz"]

    w = SyntheticShardWriter(tmp_path, shard_size)
    assert w.count == 10
    assert not list(tmp_path.glob("*.tmp.npz"))
    while w.count < target:
        n = min(3, target - w.count)
        w.add(*_batch(w.count, n))
    w.close()

    images, labels = load_shards_uint8(tmp_path)
    assert len(images) == target
    assert labels.tolist() == list(range(target))
    assert images[:, 0, 0, 0].tolist() == list(range(target))
    sizes = [len(np.load(p)["images"]) for p in sorted(tmp_path.glob("shard_??????.npz"))]
    assert sizes == [4, 4, 4, 4, 1]
    x, y = load_shards(tmp_path)
    assert x.shape == (target, 1, 4, 4) and y.tolist() == list(range(target))
    assert SyntheticShardWriter(tmp_path, shard_size).count == target


def test_shard_writer_float_input_and_errors(tmp_path):
    with SyntheticShardWriter(tmp_path / "a", 8) as w:
        x = torch.rand(5, 3, 4, 4) * 2 - 1
        w.add(x)
    x2, y2 = load_dataset(f"shards:{tmp_path / 'a'}")
    assert y2 is None and torch.allclose(x2, x, atol=1 / 127.5 + 1e-6)
    with pytest.raises(ValueError, match="labels"):
        SyntheticShardWriter(tmp_path / "a", 8).add(torch.zeros(2, 3, 4, 4), labels=np.zeros(2))
    with pytest.raises(ValueError, match="differs"):
        SyntheticShardWriter(tmp_path / "a", 8).add(torch.zeros(2, 1, 4, 4))
    w = SyntheticShardWriter(tmp_path / "b", 2)
    w.add(*_batch(0, 4))
    with pytest.raises(ValueError, match="differs"):       # checked against the shards on disk too
        SyntheticShardWriter(tmp_path / "b", 2).add(np.zeros((1, 5, 5, 1), np.uint8), np.zeros(1))
    with pytest.raises(ValueError, match="shard_size"):
        SyntheticShardWriter(tmp_path / "b", 3)
    (tmp_path / "b" / "shard_000000.npz").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_shards(tmp_path / "b")


# --- data-limited mix ---------------------------------------------------------------------------

@pytest.mark.parametrize("percent", [0, 5, 10, 15, 20, 100])
def test_mix_keeps_n_images_with_real_share(percent):
    """As the reference's mix.py: N images, round(P N) real and N - round(P N) synthetic, no duplicates."""
    n = 200
    real = (torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4), torch.arange(n))
    synthetic = (-1 - torch.arange(300, dtype=torch.float32).view(300, 1, 1, 1).expand(300, 1, 4, 4),
                 -1 - torch.arange(300))
    x, y = mix_datasets(real, synthetic, percent, torch.Generator().manual_seed(0))
    n_real = round(percent / 100 * n)
    assert x.shape == (n, 1, 4, 4) and y.shape == (n,)
    ids = y.tolist()
    assert len(set(ids)) == n                                  # without replacement, in both sets
    assert sum(i >= 0 for i in ids) == n_real                  # the real share is P
    assert torch.equal(x[:, 0, 0, 0], y.float())               # images stay with their labels
    x2, y2 = mix_datasets(real, synthetic, percent, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = mix_datasets(real, synthetic, percent, torch.Generator().manual_seed(1))
    assert not torch.equal(y, y3)                             # the draw depends on the generator


def test_mix_drops_labels_and_checks():
    x, y = mix_datasets((torch.zeros(10, 1, 2, 2), None), (torch.zeros(5, 1, 2, 2), torch.zeros(5)), 50)
    assert len(x) == 10 and y is None
    with pytest.raises(ValueError, match="percent"):
        mix_datasets((torch.zeros(10, 1, 2, 2), None), (torch.zeros(5, 1, 2, 2), None), 150)
    with pytest.raises(ValueError, match="shape"):
        mix_datasets((torch.zeros(10, 1, 2, 2), None), (torch.zeros(5, 3, 2, 2), None), 5)
    with pytest.raises(ValueError, match="needs 9 synthetic images, but the synthetic set has 5") as e:
        mix_datasets((torch.zeros(10, 1, 2, 2), None), (torch.zeros(5, 1, 2, 2), None), 10)
    assert "\n" not in str(e.value)


# --- images -------------------------------------------------------------------------------------

def test_to_uint8_from_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = to_uint8(x)
    assert u.shape == (1, 2, 2, 1) and u.dtype == np.uint8
    assert u.ravel().tolist() == [0, 128, 255, 255]
    assert torch.allclose(from_uint8(u), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0, 1.0]).view(1, 1, 2, 2), atol=1e-6)


@pytest.mark.parametrize("n, c, nrow, cols, rows", [(16, 1, None, 4, 4), (10, 3, 5, 5, 2), (3, 1, None, 2, 2)])
def test_save_grid_size(tmp_path, n, c, nrow, cols, rows):
    x = torch.rand(n, c, 8, 8) * 2 - 1
    path = save_grid(x, tmp_path / "sub" / "g.png", nrow=nrow)
    with Image.open(path) as im:
        cell, pad = 32, 4          # 8 px upscaled x4 to 32 px, padding scaled with it
        assert im.size == (cols * (cell + pad) + pad, rows * (cell + pad) + pad)
        assert im.mode == ("L" if c == 1 else "RGB")
        arr = np.asarray(im)
    first = to_uint8(x[:1])[0, :, :, 0] if c == 1 else to_uint8(x[:1])[0]
    assert np.array_equal(arr[pad:pad + cell:4, pad:pad + cell:4], first)   # nearest-neighbour upscale
