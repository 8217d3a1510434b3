"""Data utilities for memory losses: dataset indices with every item, and batches of several views per sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._validation import check_positive_int


class WithIndex(Dataset):
    r"""Wraps a map-style dataset so that each item carries its dataset index.

    An item ``x`` becomes ``(index, x)`` and an item ``(x, y)`` becomes ``(index, x, y)``; a one-element
    tuple ``(x,)`` (``TensorDataset`` with one tensor) becomes ``(index, x)``. Any other item that is not
    a tuple is taken whole as ``x``. The index is what a memory bank is addressed by.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).

    Shape:
        - item: ``(index, x)`` or ``(index, x, y)`` with ``index`` an ``int``

    Example::

        >>> data = WithIndex(torchvision.datasets.CIFAR10(root, train=True))
        >>> index, image, label = data[7]
        >>> index
        7
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be map-style (define __getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        index = int(index)
        if isinstance(item, tuple):
            if len(item) == 1:
                return (index, item[0])
            if len(item) == 2:
                return (index, item[0], item[1])
            raise ValueError(f"WithIndex expects items x, (x,) or (x, y); item {index} is a tuple of {len(item)}")
        return (index, item)


class MultiAugCollate:
    r"""A ``DataLoader`` collate function that turns each sample into ``views`` augmented views.

    For a batch of B items ``(index, x)`` or ``(index, x, y)`` (from :class:`WithIndex`), it applies
    ``transform`` to each ``x`` ``views`` times (V) and returns a dict, view-major (row ``v * B + b``
    is view ``v`` of sample ``b``):

    - ``"views"``: the stacked transformed samples, (V*B, ...)
    - ``"indices"``: each sample's dataset index once per view, (V*B,)
    - ``"labels"``: each sample's label once per view, (V*B,), only when the items carry labels

    ``transform`` may take and return tensors or numpy arrays (arrays are converted, copied when
    their strides are negative); its randomness should come from torch (or numpy seeded per
    worker). The object is picklable whenever ``transform`` is, so it works with
    ``num_workers > 0``.

    Args:
        transform: the random augmentation applied to each view.
        views: V, the number of views per sample.

    Shape:
        - output ``"views"``: (V*B, ...) with ... the transform's output shape
        - output ``"indices"``, ``"labels"``: (V*B,)

    Example::

        >>> loader = DataLoader(WithIndex(dataset), batch_size=256, shuffle=True, num_workers=4,
        ...                     collate_fn=MultiAugCollate(augment, views=4))
        >>> batch = next(iter(loader))
        >>> loss = criterion(model(batch["views"]), batch["indices"])
    """

    def __init__(self, transform: Callable[[Any], Any], views: int = 2) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        check_positive_int("views", views)
        self.transform = transform
        self.views = views

    def __call__(self, batch: Sequence[tuple]) -> dict[str, torch.Tensor]:
        if len(batch) == 0:
            raise ValueError("MultiAugCollate got an empty batch")
        width = _item_width(batch[0])
        for item in batch:
            if _item_width(item) != width:
                raise ValueError("items of one batch must all have labels or all have none")
        samples = [item[1] for item in batch]
        views = [_as_tensor(self.transform(x)) for _ in range(self.views) for x in samples]
        shapes = {tuple(v.shape) for v in views}
        if len(shapes) > 1:
            raise ValueError(f"transform must return one shape for every sample and view, got {sorted(shapes)}")
        indices = torch.tensor([item[0] for item in batch], dtype=torch.long)
        out = {"views": torch.stack(views), "indices": indices.repeat(self.views)}
        if width == 3:
            labels = torch.stack([torch.as_tensor(item[2]) for item in batch])
            out["labels"] = torch.cat([labels] * self.views)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(transform={self.transform!r}, views={self.views})"


def _item_width(item: Any) -> int:
    ok = (
        isinstance(item, (tuple, list))
        and len(item) in (2, 3)
        and isinstance(item[0], (int, np.integer, torch.Tensor))
        and not isinstance(item[0], bool)
        and (not isinstance(item[0], torch.Tensor) or (item[0].dim() == 0 and not item[0].is_floating_point()))
    )
    if not ok:
        raise TypeError(
            "MultiAugCollate expects items (index, x) or (index, x, y) with an integer index; "
            f"wrap the dataset in WithIndex (got an item of type {type(item).__name__})"
        )
    return len(item)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"transform must return a tensor or a numpy array, got {type(value).__name__}") from error
