"""Sample-quality metrics with a pluggable feature network: FID, sFID, IS, precision and recall.

The measures of the ADM evaluation suite (guided-diffusion ``evaluations/evaluator.py``),
which the paper reports (Tables 2, 3, 5):

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to pool features.
- sFID (Nash et al. 2021): the same on spatial features of an earlier layer.
- IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.
- Precision / recall (Kynkaanniemi et al. 2019): k-NN manifold estimates on pool features.

A feature network maps images ``[N, C, H, W]`` in [-1, 1] to
``(pool [N, D], spatial [N, D2] or None, logits [N, K] or None)``; see :class:`FeatureNet`.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import torch


@runtime_checkable
class FeatureNet(Protocol):
    """What the metrics need from a feature network."""

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x [N, C, H, W]`` in [-1, 1] -> ``(pool [N, D], spatial [N, D2] or None, logits [N, K] or None)``."""
        ...


# --- Frechet distance ---------------------------------------------------------------------------

def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, D]`` -> mean ``[D]`` and unbiased covariance ``[D, D]`` (float64)."""
    f = _np64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "eigh") -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    Shapes ``[D]`` and ``[D, D]``. Two ways to get Tr (S1 S2)^(1/2):

    - ``"eigh"`` (default): S1 S2 has the same non-zero eigenvalues as the symmetric PSD
      matrix S1^(1/2) S2 S1^(1/2) (AB and BA share them), so the trace is the sum of the
      square roots of the latter's eigenvalues (negative round-off clipped to 0). Exact for
      singular covariances too, and ~50x faster than ``sqrtm`` at D = 512 on a CPU.
    - ``"sqrtm"``: ``scipy.linalg.sqrtm(S1 S2)`` as pytorch-fid and the ADM evaluator do; when
      the product of nearly singular covariances has no finite (or a clearly complex) square
      root, ``eps * I`` is added to both covariances; the tiny imaginary part left by
      round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian shapes: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm_product(sigma1, sigma2, eps)
    else:
        raise ValueError(f"frechet_distance method must be 'eigh' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))) for symmetric PSD S1, S2."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt1 @ sigma2 @ sqrt1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)   # singular: handled just below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not _usable_sqrt(covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.trace(np.real(covmean)))


def _usable_sqrt(m: np.ndarray) -> bool:
    if not np.isfinite(m).all():
        return False
    if np.iscomplexobj(m):
        scale = max(1.0, float(np.abs(np.diagonal(m)).max()))
        return float(np.abs(np.diagonal(m).imag).max()) <= 1e-3 * scale
    return True


def fid(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets ``[Na, D]`` and ``[Nb, D]``."""
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def sfid(spatial_a: np.ndarray | torch.Tensor, spatial_b: np.ndarray | torch.Tensor) -> float:
    """sFID: the Frechet distance of spatial features ``[Na, D2]`` and ``[Nb, D2]``."""
    return fid(spatial_a, spatial_b)


# --- Inception score ----------------------------------------------------------------------------

def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))) from classifier logits ``[N, K]``, averaged over ``splits`` chunks.

    Ranges from 1 (every prediction equals the marginal) to K (confident and
    uniformly diverse). Chunks are consecutive, as in the ADM evaluator.
    """
    logits = torch.as_tensor(_np64(logits))
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"need logits [N >= splits={splits}, K], got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


# --- precision / recall -------------------------------------------------------------------------

def knn_radii(feats: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance of each point ``[N, D]`` to its k-th nearest other point -> ``[N]`` (the manifold's ball radii)."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {feats.shape[0]}")
    radii = []
    for chunk in feats.split(batch_size):
        d = torch.cdist(chunk, feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)   # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor,
                      batch_size: int = 1024) -> float:
    """Fraction of ``queries [M, D]`` inside the union of balls ``B(manifold_i [N, D], radii_i [N])``."""
    inside = 0
    for chunk in queries.split(batch_size):
        d = torch.cdist(chunk, manifold)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats: np.ndarray | torch.Tensor, fake_feats: np.ndarray | torch.Tensor,
                     k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on features ``[N, D]``.

    precision = fraction of fake samples inside the real k-NN manifold;
    recall = fraction of real samples inside the fake k-NN manifold.
    """
    real = torch.as_tensor(_np64(real_feats))
    fake = torch.as_tensor(_np64(fake_feats))
    precision = manifold_coverage(real, knn_radii(real, k, batch_size), fake, batch_size)
    recall = manifold_coverage(fake, knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


# --- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def compute_features(images: torch.Tensor | np.ndarray, feature_net: FeatureNet,
                     batch_size: int = 256) -> dict[str, np.ndarray | None]:
    """Run the feature net over images in batches -> ``{"pool": [N, D], "spatial": [N, D2], "logits": [N, K]}``.

    ``images``: float ``[N, C, H, W]`` in [-1, 1], or uint8 ``[N, H, W, C]`` (an ``.npz`` sample file).
    """
    x = _as_float_images(images)
    outs: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for chunk in x.split(batch_size):
        pool, spatial, logits = feature_net.features(chunk)
        for name, t in (("pool", pool), ("spatial", spatial), ("logits", logits)):
            outs[name].append(None if t is None else t.detach().to("cpu", torch.float64).numpy())
    return {name: (None if any(v is None for v in vs) else np.concatenate(vs)) for name, vs in outs.items()}


def evaluate(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray | dict,
             feature_net: FeatureNet, batch_size: int = 256, k: int = 3, splits: int = 10) -> dict[str, float]:
    """All metrics of ``samples`` against ``reference`` images -> ``{fid, sfid, is, precision, recall}``.

    ``reference`` may also be the output of :func:`compute_features` (cache it when
    scoring many sample sets against one data set). A metric the feature net cannot
    give (no spatial features, no logits) is ``nan``. IS uses ``min(splits, N)`` chunks.
    """
    fake = compute_features(samples, feature_net, batch_size)
    real = reference if isinstance(reference, dict) else compute_features(reference, feature_net, batch_size)
    precision, recall = precision_recall(real["pool"], fake["pool"], k=k, batch_size=batch_size)
    has_spatial = fake["spatial"] is not None and real["spatial"] is not None
    return {
        "fid": fid(real["pool"], fake["pool"]),
        "sfid": sfid(real["spatial"], fake["spatial"]) if has_spatial else float("nan"),
        "is": (inception_score(fake["logits"], splits=min(splits, len(fake["logits"])))
               if fake["logits"] is not None else float("nan")),
        "precision": precision,
        "recall": recall,
    }


def _as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        from common.images import from_uint8

        return from_uint8(images if images.ndim == 4 else images[..., None])
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def _np64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)
