"""Retrieval metrics on unseen classes: Recall@K, MAP@R and precision@1, through pytorch-metric-learning.

:func:`retrieval_metrics` computes them with PML's ``AccuracyCalculator`` (:class:`RetrievalCalculator`
adds Recall@K to it), with its exact torch kNN in chunks, so faiss is not needed. A module of its own so
that ``import ssl_memory`` does not import PML (and scipy, scikit-learn) until these are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels
from pytorch_metric_learning.utils.inference import CustomKNN

from ._validation import check_positive_int
from .evaluation import _embeddings, _labels, _nonempty

__all__ = ["RetrievalCalculator", "retrieval_metrics"]


class RetrievalCalculator(AccuracyCalculator):
    """PML's ``AccuracyCalculator`` with Recall@K added as the metric ``"recall_at_k"``.

    Recall@K is the share of queries with at least one same-class item among their K nearest
    references (queries whose class has no other reference are left out, as PML does for its
    metrics). ``calculate_recall_at_k`` returns ``{K: recall}`` for every K in ``recall_ks``; the kNN
    search is widened to the largest K when PML's own ``k`` would stop earlier.

    Args:
        recall_ks: the K of Recall@K.
        **kwargs: passed to ``AccuracyCalculator`` (``include``, ``k``, ``knn_func``, ``device``, ...).

    Example::

        >>> calc = RetrievalCalculator(recall_ks=(1, 2), include=("recall_at_k",), k="max_bin_count",
        ...                            knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
        >>> calc.get_accuracy(torch.randn(20, 8), torch.arange(20) % 4)["recall_at_k"].keys()
        dict_keys([1, 2])
    """

    def __init__(self, recall_ks: Sequence[int] = (1, 2, 4, 8), **kwargs) -> None:
        if len(recall_ks) == 0:
            raise ValueError("recall_ks must hold at least one K, got an empty sequence")
        for value in recall_ks:
            check_positive_int("recall_ks", value)
        self.recall_ks = tuple(sorted(set(recall_ks)))
        super().__init__(**kwargs)

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), "recall_at_k"]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        available = num_reference_embeddings - int(ref_includes_query)
        return min(max(k, max(self.recall_ks)), available)

    def calculate_recall_at_k(self, knn_labels, query_labels, not_lone_query_mask, **kwargs) -> dict[int, float]:
        knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return {k: float("nan") for k in self.recall_ks}
        hits = self.label_comparison_fn(query_labels[:, None], knn_labels)
        return {k: hits[:, :k].any(dim=1).double().mean().item() for k in self.recall_ks}


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
    map_at_r: bool = True,
) -> dict[str, float]:
    """Recall@K, MAP@R and precision@1 by cosine similarity, computed by PML's ``AccuracyCalculator``.

    Without ``reference`` the queries are retrieved among themselves, each query's own row left out
    (the unseen-class protocol). MAP@R (Musgrave et al., 2020) is computed over the R nearest
    references, R being the number of references of the query's class.

    Args:
        query: query embeddings.
        query_labels: class id of each query.
        reference: embeddings to search; ``None`` searches ``query`` itself.
        reference_labels: class id of each reference.
        recall_ks: the K of Recall@K.
        chunk_size: queries per similarity block of the kNN search.
        map_at_r: compute MAP@R, which needs each query's R nearest references (R up to the largest
            class); ``False`` searches only ``max(recall_ks)`` neighbours, much cheaper for a monitor.

    Returns:
        ``{"recall@1": ..., "recall@2": ..., "map@r": ..., "precision@1": ...}`` (no ``"map@r"``
        when ``map_at_r`` is False).

    Shape:
        - query: (Q, D); query_labels: (Q,); reference: (N, D); reference_labels: (N,)

    Example::

        >>> x, y = torch.randn(40, 8), torch.arange(40) % 4
        >>> sorted(retrieval_metrics(x, y, recall_ks=(1, 4)))
        ['map@r', 'precision@1', 'recall@1', 'recall@4']
    """
    query = _embeddings("query", query)
    query_labels = _labels("query_labels", query_labels, query.shape[0])
    _nonempty("query", query)
    if (reference is None) != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together")
    if reference is not None:
        reference = _embeddings("reference", reference)
        reference_labels = _labels("reference_labels", reference_labels, reference.shape[0])
        if reference.shape[1] != query.shape[1]:
            raise ValueError(f"query has {query.shape[1]} dims but reference has {reference.shape[1]}")
    check_positive_int("chunk_size", chunk_size)
    if len(recall_ks) == 0:
        raise ValueError("recall_ks must hold at least one K, got an empty sequence")
    for value in recall_ks:
        check_positive_int("recall_ks", value)
    needed = query.shape[0] - 1 if reference is None else reference.shape[0]
    if needed < 1:
        raise ValueError(f"retrieval needs at least one reference per query, got {needed}")
    include = ("recall_at_k", "precision_at_1") + (("mean_average_precision_at_r",) if map_at_r else ())
    calculator = RetrievalCalculator(
        recall_ks=recall_ks,
        include=include,
        k="max_bin_count" if map_at_r else max(recall_ks),
        knn_func=CustomKNN(CosineSimilarity(), batch_size=chunk_size),
        device=query.device,
    )
    result = calculator.get_accuracy(query.float(), query_labels, reference, reference_labels)
    metrics = {f"recall@{k}": value for k, value in result["recall_at_k"].items()}
    if map_at_r:
        metrics["map@r"] = result["mean_average_precision_at_r"]
    metrics["precision@1"] = result["precision_at_1"]
    return metrics
