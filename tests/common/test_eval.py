"""Metrics (FID, sFID, IS, precision/recall) and the feature networks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from common.data import load_digits
from common.eval.features import (DIGITS_ASSET_DIR, INCEPTION_FILE, DigitsFeatureNet, InceptionFeatureNet,
                                  get_feature_net, sha256_file)
from common.eval.fid import (FeatureNet, compute_features, evaluate, fid, frechet_distance, gaussian_stats,
                             inception_score, precision_recall)


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine has 2 shared cores: spinning BLAS / OpenMP pools slow these tests ~10x under load."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


# --- Frechet distance ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_diagonal_closed_form(method):
    """For diagonal Gaussians, d^2 = ||mu1 - mu2||^2 + sum_i (s1_i - s2_i)^2 with s the standard deviations."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2.0, size=5), rng.uniform(0.1, 2.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2), method=method)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu1, np.diag(s1 ** 2), method=method) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_methods_agree_on_full_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    stats = (*gaussian_stats(a), *gaussian_stats(b))
    assert frechet_distance(*stats, method="eigh") == pytest.approx(frechet_distance(*stats, method="sqrtm"),
                                                                    rel=1e-8)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_singular_covariances(method):
    """Rank-deficient covariances (fewer samples than dimensions) still give a finite, ~0 self-distance."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 20))
    mu, sigma = gaussian_stats(f)
    d = frechet_distance(mu, sigma, mu, sigma, method=method)
    assert np.isfinite(d) and abs(d) < 1e-3
    g = rng.normal(size=(6, 20)) + 1.0
    stats = (mu, sigma, *gaussian_stats(g))
    assert frechet_distance(*stats, method="eigh") == pytest.approx(frechet_distance(*stats, method="sqrtm"),
                                                                    rel=1e-3)


def test_frechet_distance_shape_error():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fid_self_zero_and_shift_positive():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2000, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = fid(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-6)       # ||shift||^2, covariances equal
    b = rng.normal(size=(2000, 8))
    assert fid(a, b) < 0.1 < fid(a, b * 2.0)


# --- Inception score ----------------------------------------------------------------------------

def test_inception_score_uniform_is_one():
    assert inception_score(torch.zeros(100, 10), splits=10) == pytest.approx(1.0, abs=1e-9)
    assert inception_score(torch.randn(1, 10).repeat(100, 1), splits=5) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [2, 10])
def test_inception_score_confident_diverse_is_k(k):
    labels = torch.arange(10 * k * 3) % k            # every split holds each class equally often
    logits = 50.0 * torch.nn.functional.one_hot(labels, k).double()
    assert inception_score(logits, splits=10) == pytest.approx(k, rel=1e-6)


def test_inception_score_mode_collapse_between():
    labels = torch.arange(200) % 5                   # confident but only 5 of 10 classes
    score = inception_score(30.0 * torch.nn.functional.one_hot(labels, 10).double(), splits=4)
    assert score == pytest.approx(5.0, rel=1e-6)


# --- precision / recall -------------------------------------------------------------------------

def test_precision_recall_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g)
    assert precision_recall(a, a, k=3, batch_size=64) == (1.0, 1.0)
    far = torch.randn(300, 6, generator=g) + 100.0
    assert precision_recall(a, far, k=3, batch_size=64) == (0.0, 0.0)


def test_precision_recall_collapse_lowers_recall_only():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=g)
    fake = 0.1 * torch.randn(400, 2, generator=g)     # inside the real support, covering little of it
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.85 and recall < 0.3


# --- digits feature network ---------------------------------------------------------------------

def test_digits_classifier_accuracy_committed_weights():
    net = get_feature_net("digits")
    assert isinstance(net, DigitsFeatureNet) and isinstance(net, FeatureNet)
    assert net.config["sha256"] == sha256_file(DIGITS_ASSET_DIR / "model.safetensors")
    assert (DIGITS_ASSET_DIR / "model.safetensors").stat().st_size < 200_000
    x, y = load_digits(split="test")
    acc = float((net.predict(x) == y).float().mean())
    assert acc > 0.95
    assert net.config["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    x16, y16 = load_digits(16, split="test")
    assert float((net.predict(x16) == y16).float().mean()) > 0.93
    pool, spatial, logits = net.features(x[:7])
    assert pool.shape == (7, 64) and spatial.shape == (7, 512) and logits.shape == (7, 10)


def test_digits_checksum_checked(tmp_path):
    shutil.copytree(DIGITS_ASSET_DIR, tmp_path / "dc")
    DigitsFeatureNet.from_pretrained(tmp_path / "dc")
    cfg = json.loads((tmp_path / "dc" / "config.json").read_text())
    cfg["sha256"] = "0" * 64
    (tmp_path / "dc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sha256") as e:
        DigitsFeatureNet.from_pretrained(tmp_path / "dc")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="train_digits_classifier"):
        DigitsFeatureNet.from_pretrained(tmp_path / "missing")


def test_evaluate_digits_real_vs_noise():
    net = get_feature_net("digits")
    x_train, _ = load_digits(split="train")
    x_test, _ = load_digits(split="test")
    ref = compute_features(x_train, net, batch_size=500)
    good = evaluate(x_test, ref, net, batch_size=128)
    assert set(good) == {"fid", "sfid", "is", "precision", "recall"}
    g = torch.Generator().manual_seed(0)
    noise = evaluate(torch.rand(450, 1, 8, 8, generator=g) * 2 - 1, ref, net)
    assert good["fid"] < 5 < 50 < noise["fid"]
    assert good["sfid"] < noise["sfid"]
    assert good["is"] > 7 > noise["is"]
    assert good["precision"] > 0.8 > 0.3 > noise["precision"]
    assert good["recall"] > 0.8 > 0.3 > noise["recall"]
    same = evaluate(x_test, x_test, net)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4) and same["precision"] == same["recall"] == 1.0
    # uint8 NHWC samples (as read from an .npz) give the same scores as float ones on the same grid
    from common.images import from_uint8, to_uint8
    u = to_uint8(x_test)
    assert evaluate(u, ref, net)["fid"] == pytest.approx(evaluate(from_uint8(u), ref, net)["fid"], rel=1e-9)


# --- Inception (no real weights here) -----------------------------------------------------------

def test_inception_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE) as e:
        get_feature_net(str(tmp_path / "nothing.pt"))
    assert "\n" not in str(e.value) and "http" in str(e.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="not a TorchScript Inception") as e:
        InceptionFeatureNet.from_file(bad)
    assert "\n" not in str(e.value)


class _FakeLayers(torch.nn.Module):
    """Stands in for the TorchScript file's ``layers``: named stages, one of them ``mixed_6`` with a ``conv``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 17, stride=17)                  # 299 -> 17
        self.mixed_6 = torch.nn.Module()
        self.mixed_6.conv = torch.nn.Conv2d(4, 8, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.mixed_6.conv(self.conv(x)))


class _FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False):
        x = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        f = self.layers((x - 128.0) / 128.0).flatten(1)
        return f if return_features else torch.softmax(self.fc(f), dim=1)


def test_inception_torchscript_code_path(tmp_path):
    """The loader and feature taps on a tiny scripted stand-in (not the real Inception weights)."""
    torch.manual_seed(0)
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(_FakeInception()).save(str(path))
    net = get_feature_net(str(path))
    pool, spatial, logits = net.features(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert pool.shape == (3, 8) and spatial.shape == (3, 7 * 17 * 17) and logits.shape == (3, 5)
    assert torch.allclose(logits.exp().sum(1), torch.ones(3), atol=1e-5)


def test_digits_classifier_rebuild_is_deterministic(tmp_path):
    """The rebuild command's training is seeded: two short runs give byte-identical weights that load back."""
    from common.eval import train_digits_classifier as tdc

    assert tdc.main(["--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    model, summary = tdc.train(seed=0, epochs=1)
    tdc.save(model, summary, tmp_path / "b")
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(tmp_path / "b" / "model.safetensors")
    net = DigitsFeatureNet.from_pretrained(tmp_path / "a")
    assert net.config["epochs"] == 1 and net.config["rebuild"].endswith("--out common/assets/digits_classifier")
    x, y = load_digits(split="test")
    assert float((net.predict(x) == y).float().mean()) == pytest.approx(net.config["test_accuracy"], abs=1e-6)
