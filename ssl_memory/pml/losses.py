"""Our memory losses behind PML's loss API: ``BaseMetricLossFunction`` subclasses with reducers and records.

``PMLMemoryBankLoss`` and ``PMLQueueLoss`` wrap :class:`ssl_memory.MemoryBankLoss` and
:class:`ssl_memory.QueueLoss` (the ``PML`` prefix keeps each name to one class). XBM needs no
wrapper: PML's own recipe, ``CrossBatchMemory(ContrastiveLoss(...))``, runs on the drop-in
:class:`~ssl_memory.pml.CrossBatchMemory`, warm-up included. Each wrapper maps the core loss's
``terms(...)`` to PML sub-losses:
per-row terms as ``"element"`` losses, scalars as ``"already_reduced"``. PML's reducer then reduces
each, and the default (a ``MeanReducer`` per term, summed) gives exactly the core loss's value.
The losses are defined on cosine similarities of L2-normalised embeddings, so the only ``distance``
accepted is ``CosineSimilarity`` (the default) or a normalising ``DotProductSimilarity``.

Under ``torch.distributed``, call them directly: their memories gather every rank's rows
themselves, and input that fails a check on any rank (PML's own checks included) raises the same
:class:`~ssl_memory.DistributedInputError` on every rank before anything is written.
``DistributedLossWrapper`` would hand them every rank's batch as well, so queues would receive each
row once per rank (a memory bank is unaffected: duplicates average to the same update).
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
    """What the wrappers share: the distance check, the input checks, the sub-loss dict and the stats."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_distance(type(self).__name__, self.distance)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None) -> torch.Tensor:
        """PML's ``forward``, its input checks joined to the memory's verdict (see the module docstring)."""
        self.reset_stats()
        try:
            c_f.check_shapes(embeddings, labels)
            if labels is not None:
                labels = c_f.to_device(labels, embeddings)
            ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            self._check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        except (TypeError, ValueError) as error:
            self._refuse(error)
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def _check_call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> None:
        """Raise for arguments this loss does not take (neither takes an ``indices_tuple``)."""
        c_f.indices_tuple_not_supported(indices_tuple)

    def _refuse(self, error: Exception) -> None:
        """Raise ``error`` through the core loss's verdict: on every rank together under ``torch.distributed``."""
        self.criterion.terms(None, None, error=error)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def _record(self, **stats: torch.Tensor | float) -> None:
        """Set stats for PML's record keeper (only when ``collect_stats``: ``item()`` syncs with the device)."""
        if self.collect_stats:
            for name, value in stats.items():
                setattr(self, name, float(value))


class PMLMemoryBankLoss(_CoreLoss):
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

        >>> loss_fn = PMLMemoryBankLoss(num_samples=len(dataset), dim=128, consistency_weight=1.0)
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

    def _check_call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> None:
        super()._check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        c_f.labels_required(labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
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


class PMLQueueLoss(_CoreLoss):
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

        >>> loss_fn = PMLQueueLoss(size=65536, dim=128, temperature=0.2)
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

    def _check_call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> None:
        super()._check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if ref_emb is embeddings:
            raise ValueError("PMLQueueLoss needs the keys as ref_emb: loss_fn(queries, labels, ref_emb=keys)")
        if ref_labels is not None and (labels is None or not torch.equal(ref_labels, labels)):
            raise ValueError("ref_labels must be None or equal to labels: a key shares its query's sample id")

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._record(queue_fill=len(self.queue))
        contrastive = self.criterion.terms(embeddings, ref_emb, labels)["contrastive"]
        return {"contrastive": {"losses": contrastive, "indices": _rows(contrastive), "reduction_type": "element"}}
