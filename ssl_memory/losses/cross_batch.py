"""CrossBatchLoss: XBM's contrastive loss within the batch and against a memory of past batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_features, check_index_vector, check_non_negative_int, check_non_negative_number
from ..queue import Queue

# positives this similar are the anchor itself (or an exact duplicate) and are skipped, as in research-xbm
_SELF_SIMILARITY = 1 - 1e-5


class CrossBatchLoss(nn.Module):
    r"""Cross-batch memory (XBM, Wang et al., 2020): a contrastive loss whose pairs also reach past batches.

    For anchor :math:`b` with label :math:`y_b` and cosine similarities :math:`s_{bj}` to a set of
    references with labels :math:`y_j`, research-xbm's contrastive loss is

    .. math::
        \ell_b = \sum_{j:\, y_j = y_b,\ s_{bj} < 1 - 10^{-5}} (1 - s_{bj})
               + \sum_{j:\, y_j \ne y_b,\ s_{bj} > \text{margin}} s_{bj},

    (a negative above the margin adds :math:`s` itself, not :math:`s - \text{margin}`; the bound on
    positives skips the anchor itself). The loss is

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_b \big(\ell_b^{\text{batch}} + w\,\ell_b^{\text{memory}}\big),

    with the batch as references for the first term and the memory of past (detached, normalised)
    embeddings for the second, once ``start_step`` calls have passed (a buffer counts them). From then
    on each call enqueues its batch with its labels after computing the loss; as in research-xbm,
    nothing is enqueued during the warm-up, so the memory never holds warm-up embeddings.

    Where ours differs from research-xbm: it enqueues the batch *before* computing the memory term,
    so its memory term also pairs the batch with itself (those pairs then count twice); here the
    memory term compares the batch with the memory as it was *before* this batch is added, so the
    batch's own pairs count once (in the batch term). The queue also accepts any size with any batch
    size.

    Args:
        size: memory capacity M (research-xbm uses 55,000 on SOP).
        dim: embedding width D.
        margin: similarity above which a negative pair is penalised.
        memory_weight: :math:`w \ge 0`.
        start_step: number of calls (with ``update_memory=True``) before the memory is used and filled.

    Shape:
        - embeddings: (B, D), any scale (normalised inside); labels: (B,) integers
        - output: scalar; :meth:`terms` gives ``"batch"`` and ``"memory"``, (B,) each (the memory
          term is zeros before ``start_step``)

    Example::

        >>> criterion = CrossBatchLoss(size=55_000, dim=128, start_step=1000)
        >>> loss = criterion(model(images), labels)
        >>> loss.backward()
    """

    queue: Queue
    step: torch.Tensor

    def __init__(
        self, size: int, dim: int, margin: float = 0.5, memory_weight: float = 1.0, start_step: int = 0
    ) -> None:
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number, got {margin!r}")
        check_non_negative_number("memory_weight", memory_weight)
        check_non_negative_int("start_step", start_step)
        self.queue = Queue(size, dim, labelled=True)
        self.margin = float(margin)
        self.memory_weight = float(memory_weight)
        self.start_step = start_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        terms = self.terms(embeddings, labels, update_memory=update_memory)
        return (terms["batch"] + self.memory_weight * terms["memory"]).mean()

    def terms(
        self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool = True
    ) -> dict[str, torch.Tensor]:
        """Per-anchor batch and memory terms; enqueues the batch and counts the step when ``update_memory``."""
        queue = self.queue
        device = queue.slots.device
        check_features("embeddings", embeddings, queue.dim, device)
        check_index_vector("labels", labels, embeddings.shape[0], device)
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings must hold at least one row, got shape (0, D)")

        unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
        batch = self._pair_loss(unit @ unit.T, labels.unsqueeze(1) == labels.unsqueeze(0))
        memory_on = int(self.step) >= self.start_step
        if memory_on and len(queue) > 0:
            memory = self._memory_loss(unit, labels)
        else:
            memory = torch.zeros_like(batch)
        if update_memory:
            if memory_on:
                queue.enqueue(unit.detach(), labels)
            self.step += 1
        return {"batch": batch, "memory": memory}

    def _pair_loss(self, similarity: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """research-xbm's contrastive loss of each anchor (row), summed over its references."""
        cost = torch.where(same, 1 - similarity, similarity)
        counted = torch.where(same, similarity < _SELF_SIMILARITY, similarity > self.margin)
        return (cost * counted).sum(1)

    def _memory_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`_pair_loss` against the memory, written so autograd keeps no (B, M) tensor.

        Each counted pair adds ``1 - s`` or ``s``, so an anchor's loss is ``#positives + sum_m c_m s_m``
        with ``c_m`` = -1 (counted positive), +1 (counted negative) or 0: linear in the anchor once
        ``c`` is known, ``u . (c @ memory) + #positives``. ``c`` and ``c @ memory`` are computed without
        gradient from the memory before this step's write, which also makes the later write safe.
        """
        with torch.no_grad():
            memory = self.queue.features.to(unit.dtype)
            similarity = unit @ memory.T
            same = labels.unsqueeze(1) == self.queue.labels.unsqueeze(0)
            positive = same & (similarity < _SELF_SIMILARITY)
            negative = ~same & (similarity > self.margin)
            weights = negative.to(unit.dtype) - positive.to(unit.dtype)
            direction = weights @ memory
            positives = positive.sum(1).to(unit.dtype)
        return torch.linalg.vecdot(unit, direction, dim=1) + positives

    def extra_repr(self) -> str:
        return (
            f"size={self.queue.size}, dim={self.queue.dim}, margin={self.margin}, "
            f"memory_weight={self.memory_weight}, start_step={self.start_step}"
        )
