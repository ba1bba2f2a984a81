"""Real and synthetic image datasets for the paper's baselines (Sec. 5.1: data-based, data-free, data-limited).

Every loader returns ``(x, y)``: ``x`` float32 ``[N, C, H, W]`` in [-1, 1] and
``y`` int64 ``[N]`` class labels, or ``None`` where the source has none.

Sources (``load_dataset(spec)``):
- ``digits`` / ``digits16``: scikit-learn's bundled 8x8 digits (offline), optionally upsampled to 16x16.
- ``npz:PATH``: uint8 images, NHWC or NCHW, under ``arr_0`` or ``images`` (labels under ``labels`` or ``arr_1``).
- ``folder:PATH``: an image folder (PIL), labelled by sub-folder when there are sub-folders.
- ``shards:PATH``: a synthetic data set written by :class:`SyntheticShardWriter`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.images import from_uint8, to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The fixed digits split used by the digits feature network and its accuracy test.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


Dataset = tuple[torch.Tensor, torch.Tensor | None]


# --- real data ----------------------------------------------------------------------------------

def load_digits(image_size: int = 8, split: str = "all") -> Dataset:
    """scikit-learn's 1797 8x8 digits -> ``x [N, 1, S, S]`` in [-1, 1], ``y [N]`` in 0..9.

    Pixel values 0..16 map linearly to [-1, 1]; ``image_size != 8`` resizes bilinearly.
    ``split``: ``all``, or ``train`` / ``test`` (a fixed stratified split, test fraction
    ``DIGITS_TEST_FRACTION``, seed ``DIGITS_SPLIT_SEED``).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"digits split must be 'all', 'train' or 'test', got {split!r}")
    if image_size < 1:
        raise ValueError(f"digits image_size must be >= 1, got {image_size}")
    digits = sk_load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.from_numpy(digits.target).to(torch.int64)
    if split != "all":
        train_idx, test_idx = digits_split_indices(y.numpy())
        idx = torch.from_numpy(train_idx if split == "train" else test_idx)
        x, y = x[idx], y[idx]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x.clamp(-1.0, 1.0)
    return x.contiguous(), y


def digits_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split of the digits: sorted index arrays ``(train, test)``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                   stratify=labels)
    return np.sort(train), np.sort(test)


def _to_nhwc(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C in 1, 3, 4) -> ``[N, H, W, C]``."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{source}: expected images [N, H, W, C] or [N, C, H, W], got shape {images.shape}")
    if images.shape[-1] in (1, 3, 4):       # NHWC (the ADM layout) wins when both could fit
        return images
    if images.shape[1] in (1, 3, 4):
        return images.transpose(0, 2, 3, 1)
    raise ValueError(f"{source}: cannot tell the channel axis of shape {images.shape} (want 1, 3 or 4 channels)")


def load_npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` of uint8 images -> ``(x [N, C, H, W] in [-1, 1], y [N] or None)``.

    Images under ``arr_0`` or ``images`` (NHWC or NCHW; an alpha channel is dropped),
    labels under ``labels`` or ``arr_1`` when present.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"npz dataset not found: {path}")
    with np.load(path) as data:
        key = next((k for k in ("arr_0", "images") if k in data.files), None)
        if key is None:
            raise ValueError(f"{path}: no 'arr_0' or 'images' array (found {sorted(data.files)})")
        images = data[key]
        label_key = next((k for k in ("labels", "arr_1") if k in data.files), None)
        labels = data[label_key] if label_key else None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8, got {images.dtype}")
    images = _to_nhwc(images, str(path))[..., :3]
    y = None
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{path}: labels shape {labels.shape} does not match {images.shape[0]} images")
        y = torch.from_numpy(labels.astype(np.int64))
    return from_uint8(images), y


def load_image_folder(path: str | os.PathLike, image_size: int) -> Dataset:
    """A folder of images (searched recursively, sorted) -> ``(x [N, C, S, S] in [-1, 1], y or None)``.

    Each image is center-cropped to a square and resized to ``image_size`` (bicubic,
    as ADM's ``image_datasets.py``). C = 1 when every image is grayscale, else 3.
    Labels: when images sit in sub-folders, the index of the sorted first-level
    sub-folder name (ImageFolder convention); ``None`` when all are at the top level.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    images, modes = [], set()
    for f in files:
        with Image.open(f) as im:
            im.load()
            gray = im.mode in ("L", "1", "I", "I;16", "F")
            modes.add("L" if gray else "RGB")
            images.append(_center_crop_resize(im.convert("L" if gray else "RGB"), image_size))
    mode = "L" if modes == {"L"} else "RGB"
    arr = np.stack([np.asarray(im.convert(mode)) for im in images])
    parents = [f.relative_to(root).parts for f in files]
    y = None
    if all(len(p) > 1 for p in parents):
        classes = sorted({p[0] for p in parents})
        y = torch.tensor([classes.index(p[0]) for p in parents], dtype=torch.int64)
    return from_uint8(_to_nhwc(arr, str(root))), y


def _center_crop_resize(im, size: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im if s == size else im.resize((size, size), Image.BICUBIC)


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """Parse a data-set spec: ``digits``, ``digits16``, ``npz:PATH``, ``folder:PATH``, ``shards:PATH``.

    ``image_size`` is required for ``folder:`` and ignored elsewhere (``digits`` uses it when given).
    """
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind in ("digits", "digits16") and not arg:
        return load_digits(16 if kind == "digits16" else (image_size or 8))
    if kind == "npz" and arg:
        return load_npz(arg)
    if kind == "shards" and arg:
        return load_shards(arg)
    if kind == "folder" and arg:
        if image_size is None:
            raise ValueError(f"data set {spec!r} needs an image_size")
        return load_image_folder(arg, image_size)
    raise ValueError(f"unknown data set spec {spec!r}; expected digits, digits16, npz:PATH, folder:PATH or shards:PATH")


# --- synthetic data set (data-free baseline) ----------------------------------------------------

_SHARD_RE = re.compile(r"^shard_(\d{6})\.npz$")


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard_{index:06d}.npz"


def _list_shards(folder: Path) -> list[Path]:
    """Shard files sorted by index; a gap in the numbering is a user error."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name)))
    for expect, (index, p) in enumerate(found):
        if index != expect:
            raise ValueError(f"{folder}: shard {expect:06d} is missing (found {p.name})")
    return [p for _, p in found]


def _write_atomic(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write one shard to a temporary name, then rename: a shard file is either complete or absent."""
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class SyntheticShardWriter:
    """Append-only ``.npz`` shards of uint8 images ``[n, H, W, C]`` (+ int64 labels), resumable.

    ``shard_XXXXXX.npz`` holds ``shard_size`` images; only the last one may hold fewer.
    Every file is written atomically (temporary file + rename). Full shards are written
    as soon as they fill; a partial last shard only on :meth:`flush` / :meth:`close`.
    Reopening a folder counts what is on disk (:attr:`count`), loads a partial last shard
    back into the buffer, and continues appending after it; images that were added but
    not flushed before a crash are lost and must be generated again.

    Typical use (the data-free baseline)::

        with SyntheticShardWriter(folder, 1000) as w:
            while w.count < target:
                w.add(generate(min(batch, target - w.count)))
                w.flush()
    """

    def __init__(self, folder: str | os.PathLike, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        for stale in self.folder.glob("shard_*.npz.tmp.npz"):
            stale.unlink()                         # left by a crash mid-write
        shards = _list_shards(self.folder)
        self._on_disk = 0                          # images in the complete shards before _index
        self._buffer: list[np.ndarray] = []
        self._labels: list[np.ndarray] | None = None
        self._has_labels: bool | None = None
        self._index = len(shards)                  # index of the shard the buffer will become
        self._shape: tuple | None = None           # [H, W, C] of the data set's images
        for i, p in enumerate(shards):
            images, labels = _read_shard(p)
            last = i == len(shards) - 1
            if len(images) > shard_size or (len(images) < shard_size and not last):
                raise ValueError(f"{p}: holds {len(images)} images, but shard_size is {shard_size}")
            self._check_labels(labels, p)
            self._shape = self._shape or images.shape[1:]
            if len(images) < shard_size:           # a partial last shard: keep filling it
                self._index = i
                self._buffer = [images]
                self._labels = [labels] if labels is not None else None
            else:
                self._on_disk += len(images)

    @property
    def count(self) -> int:
        """Images written so far, including the buffered ones."""
        return self._on_disk + sum(len(b) for b in self._buffer)

    def _check_labels(self, labels, where) -> None:
        has = labels is not None
        if self._has_labels is None:
            self._has_labels = has
            self._labels = [] if has else None
        elif has != self._has_labels:
            raise ValueError(f"{where}: labels given for some images but not others")

    def add(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> None:
        """Append images: uint8 ``[n, H, W, C]`` or float ``[n, C, H, W]`` in [-1, 1] (+ labels ``[n]``)."""
        arr = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8(images)
        if arr.ndim != 4:
            raise ValueError(f"shard images must be [n, H, W, C], got shape {arr.shape}")
        if self._shape is not None and arr.shape[1:] != self._shape:
            raise ValueError(f"image shape {arr.shape[1:]} differs from the data set's {self._shape}")
        lab = None
        if labels is not None:
            lab = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
            if len(lab) != len(arr):
                raise ValueError(f"{len(lab)} labels for {len(arr)} images")
        self._check_labels(lab, "add()")
        self._shape = arr.shape[1:]
        self._buffer.append(arr)
        if lab is not None:
            self._labels.append(lab)
        self._write_full_shards()

    def _write_full_shards(self) -> None:
        images = np.concatenate(self._buffer) if self._buffer else None
        labels = np.concatenate(self._labels) if self._labels else None
        while images is not None and len(images) >= self.shard_size:
            n = self.shard_size
            _write_atomic(_shard_path(self.folder, self._index), images[:n],
                          None if labels is None else labels[:n])
            images = images[n:]
            labels = None if labels is None else labels[n:]
            self._on_disk += n
            self._index += 1
        self._buffer = [images] if images is not None and len(images) else []
        if self._labels is not None:
            self._labels = [labels] if labels is not None and len(labels) else []

    def flush(self) -> None:
        """Write the buffered partial shard (atomically) so that a restart keeps it."""
        if self._buffer:
            images = np.concatenate(self._buffer)
            labels = np.concatenate(self._labels) if self._labels else None
            _write_atomic(_shard_path(self.folder, self._index), images, labels)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "SyntheticShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as data:
        if "images" not in data.files:
            raise ValueError(f"{path}: not a shard (no 'images' array)")
        return data["images"], (data["labels"] if "labels" in data.files else None)


def load_shards_uint8(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """All shards of a folder, in order: uint8 ``[N, H, W, C]`` and int64 labels ``[N]`` or ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"shard folder not found: {folder}")
    shards = _list_shards(folder)
    if not shards:
        raise ValueError(f"no shard_*.npz files in {folder}")
    parts = [_read_shard(p) for p in shards]
    images = np.concatenate([im for im, _ in parts])
    has = {lab is not None for _, lab in parts}
    if len(has) > 1:
        raise ValueError(f"{folder}: some shards have labels and some do not")
    labels = np.concatenate([lab for _, lab in parts]) if has == {True} else None
    return images, labels


def load_shards(folder: str | os.PathLike) -> Dataset:
    """A synthetic data set folder -> ``(x [N, C, H, W] in [-1, 1], y [N] or None)``."""
    images, labels = load_shards_uint8(folder)
    return from_uint8(images), (None if labels is None else torch.from_numpy(labels))


# --- data-limited baseline ----------------------------------------------------------------------

def mix_datasets(real: Dataset, synthetic: Dataset, percent: float,
                 generator: torch.Generator | None = None) -> Dataset:
    """The data-limited training set of N = len(real) images, P = ``percent`` % of them real (paper Sec. 5.1).

    As the reference's ``datasets/mix.py``: ``n = round(P / 100 * N)`` real images and ``N - n``
    synthetic ones, each drawn uniformly without replacement (with ``generator``, real first), so
    the set keeps the real set's size and its real share is P. Labels are kept only when both sets
    have them. Returns ``(x [N, C, H, W], y [N] or None)``, the real images first.
    """
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    (xr, yr), (xs, ys) = real, synthetic
    if xr.shape[1:] != xs.shape[1:]:
        raise ValueError(f"real images {tuple(xr.shape[1:])} and synthetic images {tuple(xs.shape[1:])} differ in shape")
    n = len(xr)
    n_real = round(percent / 100.0 * n)
    n_syn = n - n_real
    if n_syn > len(xs):
        raise ValueError(f"the {percent:g}% data-limited set of {n} images needs {n_syn} synthetic images, "
                         f"but the synthetic set has {len(xs)}")
    idx_real = torch.randperm(n, generator=generator)[:n_real]
    idx_syn = torch.randperm(len(xs), generator=generator)[:n_syn]
    x = torch.cat([xr[idx_real].to(xs.dtype), xs[idx_syn]])
    y = torch.cat([yr[idx_real], ys[idx_syn]]) if yr is not None and ys is not None else None
    return x, y
