"""What the examples share: MNIST-1D, its encoder and augmentation (from ``benchmarks/``), seeding and embedding.

The examples run as scripts from the repository root (``python examples/plain_pytorch.py``); the
repository root is put on ``sys.path`` here so that ``benchmarks/`` imports without installing it.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.augment import SignalAugment  # noqa: E402
from benchmarks.datasets import DataSet, load_mnist1d  # noqa: E402
from benchmarks.encoders import SignalCNN  # noqa: E402

__all__ = ["DataSet", "OneSignalAugment", "SignalCNN", "checkpoint_paths", "embed", "load_mnist1d", "seed_everything"]


class OneSignalAugment:
    """:class:`benchmarks.augment.SignalAugment` for one signal, as ``MultiAugCollate`` calls it per sample.

    It draws from torch's global generator, so restoring the random state replays the same views;
    it is picklable, so ``num_workers > 0`` works.
    """

    def __init__(self, **kwargs) -> None:
        self.augment = SignalAugment(**kwargs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x.unsqueeze(0)).squeeze(0)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model``'s embeddings of ``x`` in eval mode (BatchNorm running statistics), in batches."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def checkpoint_paths(path: str, epoch: int, keep_epochs: bool) -> list[str]:
    """Where an epoch's checkpoint goes: ``path`` and, with ``keep_epochs``, ``<path stem>.epoch<N><suffix>`` too.

    The folder is created if needed.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stem, suffix = os.path.splitext(path)
    return [path, f"{stem}.epoch{epoch}{suffix}"] if keep_epochs else [path]
