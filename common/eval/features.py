"""Feature networks for the metrics in :mod:`common.eval.fid`.

- :class:`DigitsFeatureNet`: a small CNN the project trains itself on scikit-learn's
  8x8 digits (the offline scale); weights committed under ``common/assets/digits_classifier``
  (``config.json`` + ``model.safetensors``, checksum checked at load), rebuilt by
  ``python -m common.eval.train_digits_classifier --out common/assets/digits_classifier``.
- :class:`InceptionFeatureNet`: Inception-V3 (the 2015-12-05 graph used for FID) from a
  LOCAL TorchScript file; nothing is downloaded at run time.
- :func:`get_feature_net`: ``"digits"`` -> digits net, a path -> Inception.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier"
DIGITS_REBUILD_COMMAND = "python -m common.eval.train_digits_classifier --out common/assets/digits_classifier"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- digits ---------------------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """8x8 grayscale digit classifier: conv-conv-pool, conv-pool, fc, fc.

    Input ``[N, 1, 8, 8]`` in [-1, 1]. Feature taps: ``spatial`` = the 4x4 map after the
    second conv block, flattened ``[N, c2 * 16]`` (the analogue of Inception's mixed_6/conv
    used by sFID); ``pool`` = the penultimate activations ``[N, hidden]`` (the analogue of
    pool_3 used by FID); ``logits`` ``[N, num_classes]`` (for IS).
    """

    def __init__(self, c1: int = 16, c2: int = 32, c3: int = 32, hidden: int = 64, num_classes: int = 10,
                 dropout: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, 1, 8, 8]`` -> ``(pool [N, hidden], spatial [N, c2 * 16], logits [N, K])``."""
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)     # [N, c2, 4, 4]
        spatial = h.flatten(1)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)                           # [N, c3, 2, 2]
        pool = F.relu(self.fc1(h.flatten(1)))
        return pool, spatial, self.fc2(self.dropout(pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[2]


def to_digits_input(x: torch.Tensor) -> torch.Tensor:
    """Any ``[N, C, H, W]`` in [-1, 1] -> ``[N, 1, 8, 8]``: channel mean, then area (or antialiased) resize."""
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) == (8, 8):
        return x
    if h % 8 == 0 and w % 8 == 0:
        return F.interpolate(x, size=(8, 8), mode="area")       # 16x16 -> 8x8 = 2x2 block means
    return F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)


class DigitsFeatureNet:
    """The project's own feature network for digits (8x8, and 16x16 resized to 8x8 internally)."""

    def __init__(self, model: DigitsCNN, config: dict, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DIGITS_ASSET_DIR,
                        device: str | torch.device = "cpu") -> "DigitsFeatureNet":
        """Load ``config.json`` + ``model.safetensors``; the file's sha256 must match the config's."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"digits classifier not found in {path} (expected {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}); rebuild it with: {DIGITS_REBUILD_COMMAND}")
        config = json.loads(cfg_path.read_text())
        digest = sha256_file(weights_path)
        if digest != config.get("sha256"):
            raise ValueError(f"{weights_path}: sha256 {digest[:12]}... does not match config.json's "
                             f"{str(config.get('sha256'))[:12]}...; rebuild it with: {DIGITS_REBUILD_COMMAND}")
        model = DigitsCNN(**config["arch"])
        model.load_state_dict(load_file(str(weights_path)))
        return cls(model, config, device)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, C, H, W]`` in [-1, 1] -> ``(pool [N, 64], spatial [N, 512], logits [N, 10])``."""
        return self.model.forward_features(to_digits_input(x).to(self.device))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class predictions ``[N]``."""
        return self.features(x)[2].argmax(dim=1)


# --- Inception-V3 (TorchScript) ---------------------------------------------------------------

class InceptionFeatureNet:
    """Inception-V3 FID features from the TorchScript ``inception-2015-12-05.pt`` (StyleGAN2-ADA / clean-fid).

    That module takes float images in [0, 255] of any size (it resizes to 299 inside):
    ``module(img, return_features=True)`` gives pool_3 ``[N, 2048]`` and ``module(img)``
    the softmax over 1008 classes (its log serves as logits for IS). When the module
    exposes its ``layers`` (as that file does), the spatial features of sFID are taken
    as in the ADM evaluator: the first 7 channels of ``mixed_6/conv`` ``[N, 7 * 17 * 17]``;
    otherwise sFID is unavailable (``spatial = None``). Not verified against real weights
    here (no download in this project's tests).
    """

    def __init__(self, module: torch.jit.ScriptModule, device: str | torch.device = "cpu"):
        self.module = module.eval()
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "InceptionFeatureNet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path} (expected the TorchScript file "
                                    f"{INCEPTION_FILE}, download it from {INCEPTION_URL})")
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as e:   # noqa: BLE001 - any load failure is the same user error
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not a TorchScript Inception-V3 ({INCEPTION_FILE} from "
                             f"{INCEPTION_URL}): {reason}") from None
        return cls(module, device)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``x [N, C, H, W]`` in [-1, 1] -> ``(pool [N, 2048], spatial [N, 2023] or None, logits [N, 1008])``."""
        img = ((x.to(self.device, torch.float32) + 1.0) * 127.5).clamp(0, 255)
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        pool = self.module(img, return_features=True).reshape(img.shape[0], -1)
        probs = self.module(img).reshape(img.shape[0], -1)
        return pool, self._spatial(img), probs.clamp_min(1e-30).log()

    def _spatial(self, img: torch.Tensor) -> torch.Tensor | None:
        layers = getattr(self.module, "layers", None)
        if layers is None or not hasattr(layers, "mixed_6"):
            return None
        # The module's own preprocessing: bilinear resize to 299, then (x - 128) / 128.
        h = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        h = (h - 128.0) / 128.0
        for name, child in layers.named_children():
            if name == "mixed_6":
                return child.conv(h)[:, :7].flatten(1)
            h = child(h)
        return None


def get_feature_net(name_or_path: str, device: str | torch.device = "cpu"):
    """``"digits"`` -> :class:`DigitsFeatureNet` (committed weights); anything else is a path to Inception weights."""
    if name_or_path == "digits":
        return DigitsFeatureNet.from_pretrained(device=device)
    return InceptionFeatureNet.from_file(name_or_path, device=device)
