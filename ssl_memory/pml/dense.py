"""PML's NTXentLoss, SupConLoss and ContrastiveLoss against a memory, as dense matrix products.

PML turns "every query against every memory row" into index tensors of pairs, and NTXentLoss then
builds a (positive pairs x negative pairs) matrix: quadratic in the memory size. Here the same
losses are computed from one (B, M) similarity matrix; only the pairs with equal labels (few:
usually one or a handful per query) are listed, found by sorting the memory's labels, and every
other entry of a row is a negative. The results are PML's: the same per-pair or per-row losses,
handed to the loss's own reducer as the same sub-loss dicts PML builds, except for
ContrastiveLoss's negative part, whose reduction (mean, or mean over the losses a
``ThresholdReducer`` keeps) is done on the dense matrix (so that reducer records no stats).

:func:`supports` says whether a PML loss can take this path; :func:`memory_loss` computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, NTXentLoss, SupConLoss
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, MultipleReducers, ThresholdReducer
from pytorch_metric_learning.utils import common_functions as c_f

from ..queue import Queue

DENSE_LOSSES = (NTXentLoss, SupConLoss, ContrastiveLoss)


def distance_normalises(module: object) -> bool:
    """True when ``module.distance`` normalises its inputs, so that it ignores the scale of each row."""
    return getattr(getattr(module, "distance", None), "normalize_embeddings", False) is True


def _dense_distance(distance: object) -> bool:
    if getattr(distance, "power", None) != 1 or getattr(distance, "normalize_embeddings", False) is not True:
        return False
    if type(distance) in (CosineSimilarity, DotProductSimilarity):
        return True
    return type(distance) is LpDistance and distance.p == 2


def supports(loss: torch.nn.Module) -> bool:
    """Whether ``loss`` (a PML loss) has a dense implementation here.

    Exactly NTXentLoss, SupConLoss or ContrastiveLoss (not subclasses, which may override any
    step), with a normalising cosine, dot-product or Euclidean distance of power 1 and no
    embedding regulariser. NTXentLoss and SupConLoss accept any reducer (they get PML's own
    sub-loss dict); ContrastiveLoss needs a ``MeanReducer`` or ``ThresholdReducer`` (its default
    ``AvgNonZeroReducer`` is one) for its negative pairs.
    """
    if type(loss) not in DENSE_LOSSES or getattr(loss, "embedding_regularizer", None) is not None:
        return False
    if not _dense_distance(loss.distance):
        return False
    if type(loss) is ContrastiveLoss:
        reducer = loss.reducer
        if type(reducer) is not MultipleReducers or set(reducer.reducers) != {"pos_loss", "neg_loss"}:
            return False
        return type(reducer.reducers["neg_loss"]) in (MeanReducer, ThresholdReducer, AvgNonZeroReducer)
    return True


class _UnitDistance(torch.autograd.Function):
    """Euclidean distance from squared distances, with a zero gradient at distance 0 as ``torch.cdist`` has."""

    @staticmethod
    def forward(ctx, squared: torch.Tensor) -> torch.Tensor:
        distance = squared.clamp_min(0).sqrt()
        ctx.save_for_backward(distance)
        return distance

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (distance,) = ctx.saved_tensors
        return torch.where(distance > 0, grad / (2 * distance), 0)


class _NTXentPairs(torch.autograd.Function):
    r"""Per positive pair (a, p): :math:`\log(e^{L_{ap}} + \sum_{n \in N(a)} e^{L_{an}}) - L_{ap}`.

    ``logits`` (B, M) are similarities over the temperature; the negatives of row a are all its
    entries but ``(same_rows, same_cols)``, the pairs with equal labels. One shifted exponential
    of the matrix serves forward and backward: with :math:`S_a = \sum_n e^{L_{an} - m_a}`, the loss is
    :math:`\operatorname{softplus}(\log S_a - (L_{ap} - m_a))`. The shift :math:`m_a` is the row's
    largest entry when ``spread`` (a bound on the range of a row) cannot underflow the exponential,
    which saves a masked copy of the matrix, else its largest negative.
    """

    @staticmethod
    def forward(ctx, logits, same_rows, same_cols, anchors, positives, spread):
        if spread < -0.9 * math.log(torch.finfo(logits.dtype).tiny):
            top = logits.amax(dim=1)
            weights = (logits - top[:, None]).exp_()
            weights.index_put_((same_rows, same_cols), weights.new_zeros(()))
        else:
            weights = logits.index_put((same_rows, same_cols), logits.new_tensor(float("-inf")))
            top = weights.amax(dim=1)
            top = top.masked_fill(torch.isinf(top), 0)  # rows without negatives: any finite shift will do
            weights = weights.sub_(top[:, None]).exp_()
        total = weights.sum(dim=1)
        gap = total.log()[anchors] - (logits[anchors, positives] - top[anchors])
        ctx.save_for_backward(weights, total, gap, anchors, positives)
        return F.softplus(gap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weights, total, gap, anchors, positives = ctx.saved_tensors
        # d/dL_ap = -sigmoid(gap); d/dL_an = sigmoid(gap) * w_an / S_a for each negative n of a
        share = torch.sigmoid(gap) * grad
        per_row = torch.zeros_like(total).index_add_(0, anchors, share)
        per_row = torch.where(total > 0, per_row / total, 0)
        grad_logits = weights * per_row[:, None]
        grad_logits.index_put_((anchors, positives), -share, accumulate=True)
        return grad_logits, None, None, None, None, None


def equal_label_pairs(labels: torch.Tensor, ref_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (i, j) with ``labels[i] == ref_labels[j]``, in row-major order, without a (B, M) mask.

    Sorting the reference labels once makes this O(M log M + pairs) instead of a (B, M)
    comparison and a ``nonzero`` over it, which cost more than the loss itself at M = 65536.
    """
    ordered, order = torch.sort(ref_labels, stable=True)
    low = torch.searchsorted(ordered, labels.to(ordered.dtype))
    counts = torch.searchsorted(ordered, labels.to(ordered.dtype), right=True) - low
    rows = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    cols = order[low[rows] + torch.arange(rows.numel(), device=labels.device) - starts[rows]]
    return rows, cols


def _reduce_dense(reducer, losses: torch.Tensor, mask: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """What ``MeanReducer`` or a ``ThresholdReducer`` returns for the losses at the True entries of ``mask``."""
    if isinstance(reducer, ThresholdReducer):
        if reducer.low is not None:
            mask = mask & (losses > reducer.low)
        if reducer.high is not None:
            mask = mask & (losses < reducer.high)
    count = int(mask.sum())
    if count == 0:
        return reducer.zero_loss(embeddings)
    return torch.where(mask, losses, 0).sum() / count


def memory_loss(
    loss: torch.nn.Module,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory: Queue,
    self_slots: torch.Tensor | None,
) -> torch.Tensor:
    """PML's ``loss(embeddings, labels, None, memory.features, memory.labels)`` with self-pairs removed.

    ``memory`` holds unit rows (the caller normalised them on enqueue, which changes nothing for a
    normalising distance); ``self_slots[i]``, when given, is the memory slot holding row ``i`` of
    ``embeddings`` itself, which PML's CrossBatchMemory drops from the positives. Call only when
    :func:`supports` is true.

    Args:
        loss: an NTXentLoss, SupConLoss or ContrastiveLoss.
        embeddings: the queries, not normalised.
        labels: their labels.
        memory: a labelled :class:`~ssl_memory.Queue`.
        self_slots: each query's own slot, or None.

    Shape:
        - embeddings: (B, D); labels: (B,); self_slots: (B,)
        - output: scalar
    """
    loss.reset_stats()
    distance = loss.distance
    unit = F.normalize(embeddings, dim=1)
    same = equal_label_pairs(labels, memory.labels)
    anchors, positives = same
    if self_slots is not None:
        keep = positives != self_slots[anchors]
        anchors, positives = anchors[keep], positives[keep]
    num_neg = labels.numel() * len(memory) - same[0].numel()
    if anchors.numel() <= 1 and num_neg <= 1:  # GenericPairLoss's "nothing to compare" rule
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    scale = 1.0 / loss.temperature if hasattr(loss, "temperature") else 1.0
    if distance.is_inverted:
        # the scale folds into the (B, D) queries instead of the (B, M) product
        matrix = logits = memory.similarity(unit * scale)
    else:
        cosine = memory.similarity(unit)
        squared = (unit * unit).sum(1)[:, None] + (memory.features * memory.features).sum(1).to(cosine.dtype)
        matrix = _UnitDistance.apply(squared - 2 * cosine)
        logits = -matrix * scale  # PML negates a distance to make it a similarity
    if type(loss) is NTXentLoss:
        if anchors.numel() == 0 or num_neg == 0:
            return loss.reducer(loss.zero_losses(), embeddings, labels)
        # unit rows: cosines lie in [-1, 1] and distances in [0, 2], so a row spans at most 2 * scale
        losses = _NTXentPairs.apply(logits, *same, anchors, positives, 2.0 * scale * (1 + 1e-3))
        sub_losses = {"loss": {"losses": losses, "indices": (anchors, positives), "reduction_type": "pos_pair"}}
        return loss.reducer(sub_losses, embeddings, labels)
    if type(loss) is SupConLoss:
        if anchors.numel() == 0 or num_neg == 0:
            return loss.reducer(loss.zero_losses(), embeddings, labels)
        return _supcon(loss, logits, anchors, positives, self_slots, embeddings, labels)
    return _contrastive(loss, matrix, same, anchors, positives, embeddings, labels)


def _supcon(loss, logits, anchors, positives, self_slots, embeddings, labels):
    rows = torch.arange(logits.shape[0], device=logits.device)
    # PML shifts by the row maximum over every column; it cancels but sets the rounding
    logits = logits - logits.amax(dim=1, keepdim=True).detach()
    kept = logits
    if self_slots is not None:  # a row's own slot is neither positive nor negative
        kept = logits.index_put((rows, self_slots), logits.new_tensor(float("-inf")))
    denominator = torch.logsumexp(kept, dim=1)
    denominator = denominator.masked_fill(torch.isinf(denominator), 0)
    log_probs = logits[anchors, positives] - denominator[anchors]
    log_prob_sum = torch.zeros_like(denominator).index_add(0, anchors, log_probs)
    count = torch.bincount(anchors, minlength=logits.shape[0]).to(logits.dtype)
    losses = -log_prob_sum / (count + c_f.small_val(logits.dtype))
    sub_losses = {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
    return loss.reducer(sub_losses, embeddings, labels)


def _contrastive(loss, matrix, same, anchors, positives, embeddings, labels):
    reducers = loss.reducer.reducers
    if anchors.numel():
        pos_losses = F.relu(loss.distance.margin(matrix[anchors, positives], loss.pos_margin))
    else:
        pos_losses = 0
    pos_dict = {"pos_loss": {"losses": pos_losses, "indices": (anchors, positives), "reduction_type": "pos_pair"}}
    pos_value = reducers["pos_loss"](pos_dict, embeddings, labels)
    negatives = torch.ones_like(matrix, dtype=torch.bool).index_put_(same, torch.tensor(False, device=matrix.device))
    if negatives.any():
        neg_losses = F.relu(loss.distance.margin(loss.neg_margin, matrix))
        neg_value = _reduce_dense(reducers["neg_loss"], neg_losses, negatives, embeddings)
    else:
        neg_value = reducers["neg_loss"].zero_loss(embeddings)
    return torch.stack([pos_value.to(embeddings.dtype), neg_value.to(embeddings.dtype)]).sum()
