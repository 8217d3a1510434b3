"""Our memory losses behind PML's loss API: ``BaseMetricLossFunction`` subclasses with reducers and records.

Each wraps the core loss of :mod:`ssl_memory.losses` and maps its ``terms(...)`` to PML sub-losses:
per-row terms as ``"element"`` losses, scalars as ``"already_reduced"``. PML's reducer then reduces
each, and the default (a ``MeanReducer`` per term, summed) gives exactly the core loss's value.
The losses are defined on cosine similarities of L2-normalised embeddings, so the only ``distance``
accepted is ``CosineSimilarity`` (the default) or a normalising ``DotProductSimilarity``.

Under ``torch.distributed``, call them directly: their memories gather every rank's rows
themselves. ``DistributedLossWrapper`` would hand them every rank's batch as well, so queues would
receive each row once per rank (a memory bank is unaffected: duplicates average to the same update).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f

from .. import losses as core
from ..bank import MemoryBank
from ..queue import Queue


def _check_distance(owner: str, distance: object) -> None:
    if type(distance) not in (CosineSimilarity, DotProductSimilarity) or not (
        distance.normalize_embeddings and distance.power == 1
    ):
        raise ValueError(
            f"{owner} is defined on the cosine similarity of L2-normalised embeddings: distance must be "
            f"CosineSimilarity() or DotProductSimilarity(normalize_embeddings=True), got {distance!r}"
        )


def _rows(values: torch.Tensor) -> torch.Tensor:
    return c_f.torch_arange_from_size(values)


class _CoreLoss(BaseMetricLossFunction):
    """What the three wrappers share: the distance check, the sub-loss dict and the stats."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_distance(type(self).__name__, self.distance)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def _record(self, **stats: torch.Tensor | float) -> None:
        """Set stats for PML's record keeper (only when ``collect_stats``: ``item()`` syncs with the device)."""
        if self.collect_stats:
            for name, value in stats.items():
                setattr(self, name, float(value))


class MemoryBankLoss(_CoreLoss):
    r""":class:`ssl_memory.MemoryBankLoss` as a PML loss: instance discrimination against a memory bank.

    ``labels`` are the samples' dataset indices (rows sharing one are views of one sample), not
    class labels. Sub-losses: ``"discrimination"``, one ``"element"`` loss per row
    (:math:`-\log p(\text{group} \mid f_r)`), and ``"consistency"``, the weighted consistency term
    (``"already_reduced"``). The memory is updated (and a merger stepped) at every call.
    ``indices_tuple`` and ``ref_emb`` are not supported (the bank is the reference set) and raise.

    Stats for PML's record keeper (with ``collect_stats=True``): ``discrimination``,
    ``consistency``, ``positive_prob`` (mean probability of the rows' own groups) and
    ``pairs_merged`` (at this call; 0 when no merge ran).

    Args:
        num_samples, dim, temperature, momentum, consistency_weight, consistency_mode, merger, memory:
            as :class:`ssl_memory.MemoryBankLoss`.
        **kwargs: PML's ``reducer``, ``distance`` (cosine only), ``collect_stats``,
            ``embedding_regularizer``, ``embedding_reg_weight``.

    Shape:
        - embeddings: (R, D); labels: (R,) dataset indices in [0, N)
        - output: scalar

    Example::

        >>> loss_fn = MemoryBankLoss(num_samples=len(dataset), dim=128, consistency_weight=1.0)
        >>> loss = loss_fn(model(batch["views"]), batch["indices"])
    """

    def __init__(
        self,
        num_samples: int | None = None,
        dim: int | None = None,
        temperature: float = 0.07,
        momentum: float = 0.5,
        consistency_weight: float = 0.0,
        consistency_mode: str = "pairwise",
        merger: Any = None,
        memory: MemoryBank | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = core.MemoryBankLoss(
            num_samples, dim, temperature, momentum, consistency_weight, consistency_mode, merger, memory
        )
        self.add_to_recordable_attributes(list_of_names=["temperature", "consistency_weight"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["discrimination", "consistency", "positive_prob", "pairs_merged"], is_stat=True
        )

    @property
    def memory(self) -> MemoryBank:
        return self.criterion.memory

    @property
    def temperature(self) -> float:
        return self.criterion.temperature

    @property
    def consistency_weight(self) -> float:
        return self.criterion.consistency_weight

    def _sub_loss_names(self) -> list[str]:
        return ["discrimination", "consistency"]

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.indices_tuple_not_supported(indices_tuple)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        c_f.labels_required(labels)
        terms = self.criterion.terms(embeddings, labels)
        last = self.criterion.last
        report = last.get("merge")
        self._record(
            discrimination=last["discrimination"],
            consistency=last["consistency"],
            positive_prob=last["positive_prob"],
            pairs_merged=getattr(report, "pairs_merged", 0),
        )
        discrimination = terms["discrimination"]
        return {
            "discrimination": {"losses": discrimination, "indices": _rows(discrimination), "reduction_type": "element"},
            "consistency": {
                "losses": self.consistency_weight * terms["consistency"],
                "indices": None,
                "reduction_type": "already_reduced",
            },
        }


class QueueLoss(_CoreLoss):
    r""":class:`ssl_memory.QueueLoss` (MoCo) as a PML loss: ``embeddings`` are the queries, ``ref_emb`` their keys.

    Row ``b`` of ``ref_emb`` is the key (positive) of query ``b``; the keys are detached and
    enqueued after the loss, and the queue supplies the negatives. ``labels``, when given, are the
    queries' dataset ids: queue entries of a query's own sample are then not its negatives (the
    queue stores the ids). ``ref_labels`` must be None or equal to ``labels``. This keeps MoCo's
    (query, key) pairing explicit; PML's own MoCo recipe (``CrossBatchMemory`` with an
    ``enqueue_mask``) is served by :class:`ssl_memory.pml.CrossBatchMemory`.

    Sub-loss: ``"contrastive"``, one ``"element"`` loss per query. ``indices_tuple`` is not
    supported. Stats (with ``collect_stats=True``): ``queue_fill`` (rows in the queue before this call).

    Args:
        size, dim, temperature, mixer: as :class:`ssl_memory.QueueLoss`.
        **kwargs: PML's ``reducer``, ``distance`` (cosine only), ``collect_stats``, ...

    Shape:
        - embeddings: (B, D) queries; ref_emb: (B, D) keys; labels: (B,) or None
        - output: scalar

    Example::

        >>> loss_fn = QueueLoss(size=65536, dim=128, temperature=0.2)
        >>> loss = loss_fn(encoder(view_1), ref_emb=momentum_encoder(view_2).detach())
    """

    def __init__(
        self, size: int = 65536, dim: int = 128, temperature: float = 0.2, mixer: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = core.QueueLoss(size, dim, temperature, mixer)
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)
        self.add_to_recordable_attributes(name="queue_fill", is_stat=True)

    @property
    def queue(self) -> Queue:
        return self.criterion.queue

    @property
    def temperature(self) -> float:
        return self.criterion.temperature

    def _sub_loss_names(self) -> list[str]:
        return ["contrastive"]

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.indices_tuple_not_supported(indices_tuple)
        if ref_emb is embeddings:
            raise ValueError("QueueLoss needs the keys as ref_emb: loss_fn(queries, labels, ref_emb=keys)")
        if ref_labels is not None and (labels is None or not torch.equal(ref_labels, labels)):
            raise ValueError("ref_labels must be None or equal to labels: a key shares its query's sample id")
        self._record(queue_fill=len(self.queue))
        contrastive = self.criterion.terms(embeddings, ref_emb, labels)["contrastive"]
        return {"contrastive": {"losses": contrastive, "indices": _rows(contrastive), "reduction_type": "element"}}


class CrossBatchLoss(_CoreLoss):
    r""":class:`ssl_memory.CrossBatchLoss` (XBM) as a PML loss: pairs within the batch and against a memory.

    ``labels`` are class labels. Sub-losses, one ``"element"`` loss per anchor each: ``"batch"``
    (pairs within the batch) and ``"memory"`` (pairs with the memory, times ``memory_weight``;
    zeros during the warm-up). With PML's default ``MeanReducer`` per sub-loss their sum is the core
    loss; an ``AvgNonZeroReducer`` averages each over the anchors that have a non-zero term.
    ``indices_tuple`` and ``ref_emb`` are not supported (the memory is the reference set).
    Stats (with ``collect_stats=True``): ``memory_fill`` (rows in the memory before this call).

    Args:
        size, dim, margin, memory_weight, start_step: as :class:`ssl_memory.CrossBatchLoss`.
        **kwargs: PML's ``reducer``, ``distance`` (cosine only), ``collect_stats``, ...

    Shape:
        - embeddings: (B, D); labels: (B,) integers
        - output: scalar

    Example::

        >>> loss_fn = CrossBatchLoss(size=55_000, dim=128, start_step=1000)
        >>> loss = loss_fn(model(images), labels)
    """

    def __init__(
        self,
        size: int,
        dim: int,
        margin: float = 0.5,
        memory_weight: float = 1.0,
        start_step: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = core.CrossBatchLoss(size, dim, margin, memory_weight, start_step)
        self.add_to_recordable_attributes(list_of_names=["margin", "memory_weight"], is_stat=False)
        self.add_to_recordable_attributes(name="memory_fill", is_stat=True)

    @property
    def queue(self) -> Queue:
        return self.criterion.queue

    @property
    def margin(self) -> float:
        return self.criterion.margin

    @property
    def memory_weight(self) -> float:
        return self.criterion.memory_weight

    def _sub_loss_names(self) -> list[str]:
        return ["batch", "memory"]

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.indices_tuple_not_supported(indices_tuple)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        c_f.labels_required(labels)
        self._record(memory_fill=len(self.queue))
        terms = self.criterion.terms(embeddings, labels)
        memory = self.memory_weight * terms["memory"]
        return {
            "batch": {"losses": terms["batch"], "indices": _rows(terms["batch"]), "reduction_type": "element"},
            "memory": {"losses": memory, "indices": _rows(memory), "reduction_type": "element"},
        }
