"""Train the digits feature network and write it as ``config.json`` + ``model.safetensors``.

Rebuilds the committed asset (seeded, deterministic on the CPU, about half a minute)::

    python -m common.eval.train_digits_classifier --out common/assets/digits_classifier

Trains on the fixed train split of scikit-learn's digits (``common.data.load_digits(split="train")``)
with +-1 pixel shifts and light Gaussian noise as augmentation, reports accuracy on the test split,
and records the weights' sha256 in ``config.json`` (checked by ``DigitsFeatureNet.from_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits
from common.eval.features import (CONFIG_NAME, DIGITS_REBUILD_COMMAND, WEIGHTS_NAME, DigitsCNN,
                                  sha256_file)

logger = logging.getLogger(__name__)

ARCH = dict(c1=16, c2=32, c3=32, hidden=64, num_classes=10, dropout=0.25)


def augment(x: torch.Tensor, generator: torch.Generator, noise_std: float = 0.05) -> torch.Tensor:
    """Random +-1 pixel shift (background-padded) plus Gaussian noise: ``[N, 1, 8, 8]`` -> same."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return (out + noise_std * torch.randn(out.shape, generator=generator)).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def train(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 3e-3) -> tuple[DigitsCNN, dict]:
    """Train the classifier; returns the model and a summary (accuracies, sizes, hyper-parameters)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = DigitsCNN(**ARCH)
        x_train, y_train = load_digits(split="train")
        x_test, y_test = load_digits(split="test")
        fit(model, x_train, y_train, torch.Generator().manual_seed(seed), epochs, batch_size, lr)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    summary = dict(
        train_accuracy=accuracy(model, x_train, y_train), test_accuracy=accuracy(model, x_test, y_test),
        train_size=len(x_train), test_size=len(x_test), split_seed=DIGITS_SPLIT_SEED,
        test_fraction=DIGITS_TEST_FRACTION, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
    )
    return model.eval(), summary


def fit(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
        epochs: int, batch_size: int, lr: float) -> None:
    """AdamW with a cosine learning rate over ``epochs`` passes of augmented mini-batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def save(model: DigitsCNN, summary: dict, out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (with the weights' sha256) into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = dict(arch=ARCH, **summary, num_params=sum(p.numel() for p in model.parameters()),
                  sha256=sha256_file(weights), rebuild=DIGITS_REBUILD_COMMAND,
                  torch_version=torch.__version__)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model, summary = train(seed=args.seed, epochs=args.epochs)
    out = save(model, summary, args.out)
    logger.info("test accuracy %.4f (train %.4f); wrote %s", summary["test_accuracy"], summary["train_accuracy"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
