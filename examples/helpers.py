"""What the examples share: a toy data set, a small encoder and augmentation, threads, checkpoints, options.

Replace :func:`toy_signals`, :func:`signal_encoder` and :func:`random_view` with your data, model and
augmentation; the rest of each example stays as it is. This file needs only torch and ssl_memory.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch
from torch import nn

from ssl_memory.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint

LENGTH, CLASSES = 40, 10


def toy_signals(num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small MNIST-1D-like data set: ten smooth 40-sample templates, shifted, scaled and noisy.

    Returns ``(train_x, train_y, test_x, test_y)``, 80% / 20% of ``num_samples`` signals of shape (40,).
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(LENGTH) * (2 * math.pi / LENGTH)
    frequencies = torch.arange(1, 5).view(1, 4, 1)
    amplitudes, phases = torch.randn(CLASSES, 4, 1, generator=g), 2 * math.pi * torch.rand(CLASSES, 4, 1, generator=g)
    templates = (amplitudes * torch.sin(frequencies * t + phases)).sum(1)
    y = torch.randint(CLASSES, (num_samples,), generator=g)
    shifts = torch.randint(LENGTH, (num_samples, 1), generator=g)
    x = templates[y].gather(1, (torch.arange(LENGTH) + shifts) % LENGTH)
    x = x * (0.8 + 0.4 * torch.rand(num_samples, 1, generator=g)) + torch.randn(num_samples, LENGTH, generator=g)
    split = int(0.8 * num_samples)
    return x[:split], y[:split], x[split:], y[split:]


def random_view(x: torch.Tensor) -> torch.Tensor:
    """One random view of one signal: a circular shift, an amplitude scale and noise (torch's global generator)."""
    shift = int(torch.randint(-4, 5, ()))
    return torch.roll(x, shift) * (0.8 + 0.4 * torch.rand(())) + 0.2 * torch.randn_like(x)


def signal_encoder(dim: int = 64, width: int = 32) -> nn.Sequential:
    """A small 1D CNN: ``encoder[0]`` gives (B, 4 * width) pooled features, ``encoder[1]`` projects them to ``dim``.

    Shape:
        - input: (B, 40); output: (B, dim)
    """

    def block(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
        conv = nn.Conv1d(cin, cout, kernel, stride, kernel // 2, padding_mode="circular", bias=False)
        return [conv, nn.BatchNorm1d(cout), nn.ReLU()]

    features = nn.Sequential(
        nn.Unflatten(1, (1, -1)),
        *block(1, width, 5, 1),
        *block(width, 2 * width, 5, 2),
        *block(2 * width, 4 * width, 3, 2),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(4 * width, dim))


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model``'s outputs for ``x`` in eval mode (BatchNorm's running statistics), in batches."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int, loader_workers: int = 0, processes: int = 1) -> int:
    """Set torch's threads: ``threads``, or when 0 this process's share of the cores left to it.

    DataLoader workers take a core each, and so does each process of a distributed run; more threads
    than cores make every thread wait for the others (a smoke run measured 26 s instead of 10 s).
    """
    if threads <= 0:
        threads = max(1, (cpu_count() - loader_workers) // processes)
    torch.set_num_threads(threads)
    return threads


def parser(description: str, checkpoint: str | None = None, **defaults: Any) -> argparse.ArgumentParser:
    """The options every example has (``defaults`` sets theirs), and the checkpoint options when it writes one."""
    out = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--epochs", type=int, default=30, help="total epochs (a resumed run counts the saved ones)")
    out.add_argument("--batch-size", type=int, default=128, help="samples a step (each gives one row per view)")
    out.add_argument("--dim", type=int, default=64, help="embedding width")
    out.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    out.add_argument("--num-samples", type=int, default=10_000, help="toy signals generated (80%% for training)")
    out.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the augmentations")
    out.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    out.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores the workers leave)")
    out.add_argument("--smoke", action="store_true", help="tiny data and model, 2 epochs, 1 thread: a few seconds")
    if checkpoint is not None:
        out.add_argument("--checkpoint", default=checkpoint, help="written atomically after every epoch")
        out.add_argument("--resume", action="store_true", help="continue exactly from --checkpoint")
        out.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint (.epochN.pt)")
    out.set_defaults(**defaults)
    return out


def smoke(args: argparse.Namespace, **overrides: Any) -> argparse.Namespace:
    """With ``--smoke``: 500 samples, batches of 32, 16-d embeddings, at most 2 epochs, 1 thread, then ``overrides``."""
    if args.smoke:
        args.num_samples, args.batch_size, args.dim, args.threads = 500, 32, 16, 1
        args.epochs = min(args.epochs, 2)
        vars(args).update(overrides)
    return args


def save(path: str, epoch: int, history: list, keep_epochs: bool = False, rng: Any = None, **states: Any) -> None:
    """Write a checkpoint atomically: the ``state_dict()`` of each of ``states``, the epoch, history and random states.

    ``rng`` defaults to this process's :func:`~ssl_memory.checkpoint.capture_rng_state`. With
    ``keep_epochs`` the epoch's checkpoint is also kept as ``<stem>.epoch<N><suffix>``.
    """
    state = {"epoch": epoch, "history": history, "rng": capture_rng_state() if rng is None else rng}
    state.update({name: module.state_dict() for name, module in states.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(state, path)
    if keep_epochs:
        stem, suffix = os.path.splitext(path)
        save_checkpoint(state, f"{stem}.epoch{epoch}{suffix}")


def load(path: str, **states: Any) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into each of ``states``; return it (epoch, history, rng)."""
    state = load_checkpoint(path)
    for name, module in states.items():
        module.load_state_dict(state[name])
    return state
