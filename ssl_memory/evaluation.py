"""Evaluation of embeddings on seen classes: the weighted kNN classifier of NPID.

:func:`knn_predict` / :func:`knn_accuracy`: the weighted k-nearest-neighbour classifier of NPID
(Wu et al., 2018), the standard way to score self-supervised embeddings on *seen* classes. The
gallery may be a :class:`~ssl_memory.MemoryBank`, whose entries are the training set's embeddings
for free, which makes a cheap accuracy monitor during training. ``k=1`` is plain 1-NN accuracy.
Retrieval metrics on unseen classes are in :mod:`ssl_memory.retrieval`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._validation import check_positive_int
from .bank import MemoryBank

__all__ = ["knn_accuracy", "knn_predict"]


def _embeddings(name: str, x: torch.Tensor | MemoryBank) -> torch.Tensor:
    if isinstance(x, MemoryBank):
        x = x.features
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a MemoryBank, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() != 2:
        raise ValueError(
            f"{name} must be a floating-point (N, D) tensor, got dtype {x.dtype} and shape {tuple(x.shape)}"
        )
    # one NaN row would silently take part in every vote (its similarity compares false with all)
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten()
        raise ValueError(f"{name} must be finite, got {rows.numel()} row(s) with NaN or inf, first row {int(rows[0])}")
    return x


def _nonempty(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row, got shape {tuple(x.shape)}")


def _labels(name: str, labels: torch.Tensor, length: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class ids, got a minimum of {int(labels.min())}")
    # uint8/int8/int16 ids index a vote table and PML's label comparisons: widen them to int64
    return labels.long()


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    gallery: torch.Tensor | MemoryBank,
    gallery_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""Class scores of weighted kNN classification by cosine similarity, as in NPID.

    For a query :math:`q`, with :math:`s_j = \hat q \cdot \hat g_j` its cosine similarity to gallery
    entry :math:`j` and :math:`\mathcal{N}_k(q)` the :math:`k` most similar entries, the score of class
    :math:`c` is

    .. math::
        w_c(q) = \sum_{j \in \mathcal{N}_k(q),\ y_j = c} \exp(s_j / T).

    NPID uses :math:`k = 200` and the training temperature (:math:`T = 0.07`); Ye et al. (2019) use
    :math:`T = 0.1`. Queries are processed ``chunk_size`` at a time, so only a (chunk_size, N)
    similarity block is ever held, whatever the gallery size.

    Args:
        query: query embeddings (normalised here).
        gallery: gallery embeddings (normalised here), or a :class:`~ssl_memory.MemoryBank` whose
            ``features`` are used (e.g. the bank of the training set, for a monitor during training).
        gallery_labels: class id of each gallery entry.
        k: neighbours that vote (clipped to the gallery size); ``k=1`` is the 1-NN classifier.
        temperature: :math:`T` of the vote weights.
        num_classes: number of classes; defaults to ``gallery_labels.max() + 1``. The output has a
            column per class id, so remap sparse or huge ids first (:func:`knn_accuracy` does).
        chunk_size: queries per similarity block.

    Returns:
        (Q, num_classes) float32 class scores :math:`w_c(q) / \exp(s_{\max}(q) / T)`, with
        :math:`s_{\max}(q)` the query's highest similarity: finite at any temperature, in the same
        order as :math:`w_c`; ``scores.argmax(1)`` is the prediction.

    Shape:
        - query: (Q, D); gallery: (N, D); gallery_labels: (N,)
        - output: (Q, num_classes)

    Example::

        >>> gallery, labels = torch.randn(100, 16), torch.randint(0, 5, (100,))
        >>> knn_predict(torch.randn(8, 16), gallery, labels, k=10).argmax(1).shape
        torch.Size([8])
    """
    query = _embeddings("query", query)
    gallery = _embeddings("gallery", gallery)
    gallery_labels = _labels("gallery_labels", gallery_labels, gallery.shape[0])
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query has {query.shape[1]} dims but gallery has {gallery.shape[1]}")
    check_positive_int("k", k)
    check_positive_int("chunk_size", chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    _nonempty("gallery", gallery)
    if num_classes is None:
        num_classes = int(gallery_labels.max()) + 1
    elif int(gallery_labels.max()) >= num_classes:
        raise ValueError(f"gallery_labels must lie in [0, {num_classes}), got a maximum of {int(gallery_labels.max())}")
    k = min(k, gallery.shape[0])
    gallery_labels = gallery_labels.to(gallery.device)
    gallery = F.normalize(gallery.float(), dim=1)
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        block = F.normalize(query[start : start + chunk_size].float().to(gallery.device), dim=1)
        with torch.autocast(gallery.device.type, enabled=False):  # float32 votes inside a bf16-mixed validation step
            sims, nearest = (block @ gallery.T).topk(k, dim=1)  # sorted: column 0 holds each row's largest
        # exp((s - s_max) / T) keeps every weight in (0, 1] at any temperature (exp(s / T) overflows
        # below T ~ 0.011); dividing a query's votes by one constant leaves its ranking unchanged
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(block.shape[0], num_classes, device=gallery.device)
        scores.append(votes.scatter_add_(1, gallery_labels[nearest], weights))
    if not scores:
        return torch.zeros(0, num_classes, device=gallery.device)
    return torch.cat(scores)


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | MemoryBank,
    gallery_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Accuracy of :func:`knn_predict` on labelled queries (ties go to the smallest class id).

    Args:
        query, gallery, gallery_labels, k, temperature, chunk_size: as in :func:`knn_predict`.
        query_labels: true class of each query.

    Shape:
        - query: (Q, D); query_labels: (Q,); gallery: (N, D); gallery_labels: (N,)

    Example::

        >>> bank = MemoryBank(100, 16)   # e.g. the training set's bank, during training
        >>> acc = knn_accuracy(torch.randn(8, 16), torch.randint(0, 5, (8,)), bank, torch.randint(0, 5, (100,)))
    """
    query = _embeddings("query", query)
    query_labels = _labels("query_labels", query_labels, query.shape[0])
    _nonempty("query", query)
    gallery_tensor = _embeddings("gallery", gallery)
    _nonempty("gallery", gallery_tensor)
    gallery_labels = _labels("gallery_labels", gallery_labels, gallery_tensor.shape[0])
    # vote over the distinct ids only (sorted, so ties still go to the smallest id): a class id of
    # 3e9 would otherwise ask for a (Q, 3e9) vote table
    ids, compact = torch.unique(torch.cat([query_labels.cpu(), gallery_labels.cpu()]), return_inverse=True)
    query_compact, gallery_compact = compact[: query.shape[0]], compact[query.shape[0] :]
    scores = knn_predict(query, gallery, gallery_compact, k, temperature, ids.numel(), chunk_size)
    return (scores.argmax(1).cpu() == query_compact).float().mean().item()


def __getattr__(name: str):
    # moved to ssl_memory.retrieval (d436351) so that importing the package does not import PML; the old path warns
    if name in ("RetrievalCalculator", "retrieval_metrics"):
        warnings.warn(
            f"ssl_memory.evaluation.{name} moved to ssl_memory.retrieval (also exported by ssl_memory)",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
