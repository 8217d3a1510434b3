"""PML's losses against a memory as dense (B, M) computations, with PML's values and gradients.

PML turns "every query against every memory row" into index tensors of all B x M pairs; NTXentLoss
then builds a (positive pairs x negative pairs) matrix and TripletMarginLoss a list of every
(anchor, positive, negative) triplet, so time and memory grow with M squared. Here each loss is
computed from the (B, M) similarity matrix of the unit queries and the unit memory rows. Only the
pairs with equal labels are listed (usually a handful a query, found by sorting the memory's labels,
:func:`~ssl_memory.losses.cross_batch.equal_label_pairs`); every other entry of a row is a negative.

- NTXentLoss, SupConLoss, MultiSimilarityLoss: one log-sum-exp per row over its negatives (or all
  its entries), one exponential of the matrix serving forward and backward (:class:`_RowLogSumExp`).
- ContrastiveLoss: only the negatives inside the margin contribute, so they are listed by one
  comparison (:func:`~ssl_memory.losses.cross_batch.pairs_above`), as research-xbm's loss is.
- TripletMarginLoss: for each anchor, the number of its positives whose margin a negative violates
  comes from one ``searchsorted`` of the row against the anchor's sorted positive thresholds, so the
  B x P x M triplets are never listed; their sum and count follow in closed form.

The per-pair or per-row losses go to the loss's own reducer as the sub-loss dicts PML builds, except
where noted in :func:`supports` (a closed-form reduction does not record the reducer's stats).
:func:`supports` says whether a loss can take this path; :func:`memory_loss` computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import (
    ContrastiveLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    TripletMarginLoss,
)
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    MeanReducer,
    MultipleReducers,
    SumReducer,
    ThresholdReducer,
)
from pytorch_metric_learning.utils import common_functions as c_f

from ..losses.cross_batch import equal_label_pairs, pair_similarities, pairs_above

DENSE_LOSSES = (NTXentLoss, SupConLoss, ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss)


def _dense_distance(distance: object) -> bool:
    if getattr(distance, "power", None) != 1 or getattr(distance, "normalize_embeddings", False) is not True:
        return False
    if type(distance) in (CosineSimilarity, DotProductSimilarity):
        return True
    return type(distance) is LpDistance and distance.p == 2


def _ignores_zeros(reducer: object) -> bool:
    """Whether ``reducer`` gives the same value when the zero losses are left out of its input."""
    if type(reducer) is SumReducer:
        return True
    return isinstance(reducer, ThresholdReducer) and reducer.low is not None and reducer.low >= 0


def supports(loss: torch.nn.Module) -> bool:
    """Whether ``loss`` (a PML loss) has a dense implementation here.

    Exactly one of :data:`DENSE_LOSSES` (not a subclass, which may override any step), with a
    normalising cosine, dot-product or Euclidean distance of power 1 and no embedding regulariser:

    - NTXentLoss, SupConLoss, MultiSimilarityLoss: any reducer (they get PML's own sub-loss dict).
    - ContrastiveLoss: its negative pairs' reducer must ignore zero losses (``AvgNonZeroReducer``, its
      default, a ``ThresholdReducer`` with ``low >= 0``, ``SumReducer``: it gets the pairs inside the
      margin) or be a ``MeanReducer`` (computed here, over all negative pairs).
    - TripletMarginLoss: ``swap=False``, ``smooth_loss=False`` and an ``AvgNonZeroReducer``,
      ``MeanReducer`` or ``SumReducer`` (computed here in closed form). ``triplets_per_anchor`` does
      not matter: against a memory PML uses every triplet.
    """
    if type(loss) not in DENSE_LOSSES or getattr(loss, "embedding_regularizer", None) is not None:
        return False
    if not _dense_distance(loss.distance):
        return False
    if type(loss) is ContrastiveLoss:
        reducer = loss.reducer
        if type(reducer) is not MultipleReducers or set(reducer.reducers) != {"pos_loss", "neg_loss"}:
            return False
        negative = reducer.reducers["neg_loss"]
        return type(negative) is MeanReducer or _ignores_zeros(negative)
    if type(loss) is TripletMarginLoss:
        reducer_ok = type(loss.reducer) in (AvgNonZeroReducer, MeanReducer, SumReducer)
        return reducer_ok and not loss.swap and not loss.smooth_loss
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


class _RowLogSumExp(torch.autograd.Function):
    r"""Per row :math:`\log(e^{c} + \sum_j e^{z_{ij}})` over all entries but the ``excluded`` (row, col) pairs.

    The constant term :math:`e^{c}` is there when ``extra`` = :math:`c` is given (PML's
    ``logsumexp(..., add_one=True)`` is ``extra=0``); without it, a row with nothing to sum gives
    ``-inf``. One shifted exponential of the matrix serves forward and backward. The shift is the
    row's largest entry, over every column when ``spread`` (a bound on the range of a row) cannot
    underflow the exponential, which saves a masked copy of the matrix; else over the kept entries.
    """

    @staticmethod
    def forward(ctx, z, excluded_rows, excluded_cols, extra, spread):
        excluded = (excluded_rows, excluded_cols)
        if spread is not None and spread < -0.9 * math.log(torch.finfo(z.dtype).tiny):
            top = z.amax(dim=1)
            if extra is not None:
                top = top.clamp_min(extra)
            weights = (z - top[:, None]).exp_()
            weights.index_put_(excluded, weights.new_zeros(()))
        else:
            weights = z.index_put(excluded, z.new_tensor(float("-inf")))
            top = weights.amax(dim=1)
            top = top.clamp_min(extra) if extra is not None else top.masked_fill(torch.isinf(top), 0)
            weights = weights.sub_(top[:, None]).exp_()
        total = weights.sum(dim=1)
        if extra is not None:
            total = total + torch.exp(extra - top)
        ctx.save_for_backward(weights, total)
        return total.log() + top

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weights, total = ctx.saved_tensors
        per_row = torch.where(total > 0, grad / total, 0)
        return weights * per_row[:, None], None, None, None, None


def _row_log_sum_exp(z, excluded, extra=None, spread=None):
    return _RowLogSumExp.apply(z, excluded[0], excluded[1], extra, spread)


def _row_log_sum_exp_sparse(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per row ``log(1 + sum(exp(values)))`` over a list of (row, value) entries; 0 for rows without any."""
    top = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, rows, values.detach(), "amax", include_self=True)
    total = torch.exp(-top).index_add(0, rows, torch.exp(values - top[rows]))
    return total.log() + top


class _Batch:
    """What every dense loss starts from: unit queries and memory rows, their labels, the pairs by label."""

    def __init__(self, loss, embeddings, labels, memory, memory_labels, self_slots):
        self.distance = loss.distance
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        self.unit = F.normalize(embeddings.to(dtype), dim=1)
        # a private normalised copy: the memory itself may be written in place before the backward
        self.memory = F.normalize(memory.detach().to(dtype), dim=1)
        self.same = equal_label_pairs(labels, memory_labels)
        anchors, positives = self.same
        if self_slots is not None:  # a row's pair with its own memory slot is neither positive nor negative
            keep = positives != self_slots[anchors]
            anchors, positives = anchors[keep], positives[keep]
        self.anchors, self.positives = anchors, positives
        self.self_slots = self_slots
        self.num_rows, self.num_memory = labels.numel(), memory.shape[0]
        self.num_neg = self.num_rows * self.num_memory - self.same[0].numel()

    def mat(self, similarity: torch.Tensor) -> torch.Tensor:
        """PML's ``distance`` matrix (or its values at some pairs) from dot products of unit rows."""
        if self.distance.is_inverted:
            return similarity
        return _UnitDistance.apply(2 - 2 * similarity)

    def similarity_beyond(self, margin: float) -> float:
        """The dot product above which a pair is closer than ``margin`` in the loss's distance."""
        if self.distance.is_inverted:
            return margin
        return 1 - margin * margin / 2 if margin > 0 else math.inf

    def pair_mat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.mat(pair_similarities(self.unit, self.memory, rows, cols))


def memory_loss(
    loss: torch.nn.Module,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    self_slots: torch.Tensor | None,
) -> torch.Tensor:
    """PML's ``loss(embeddings, labels, pairs, memory, memory_labels)`` over all pairs, self-pairs removed.

    ``self_slots[i]``, when given, is the memory row holding row ``i`` of ``embeddings`` itself, which
    PML's CrossBatchMemory drops from the positives. Computed in float32 (or wider) whatever the
    inputs' dtype, autocast included; the loss is returned in the embeddings' dtype, as PML's. Call
    only when :func:`supports` is true.

    Args:
        loss: a loss that :func:`supports` accepts.
        embeddings: the queries, any scale.
        labels: their labels.
        memory: the memory rows, any scale.
        memory_labels: their labels.
        self_slots: each query's own memory row, or None.

    Shape:
        - embeddings: (B, D); labels: (B,); memory: (M, D); memory_labels: (M,); self_slots: (B,)
        - output: scalar
    """
    loss.reset_stats()
    compute = {
        NTXentLoss: _ntxent,
        SupConLoss: _supcon,
        ContrastiveLoss: _contrastive,
        MultiSimilarityLoss: _multi_similarity,
        TripletMarginLoss: _triplet,
    }[type(loss)]
    with torch.autocast(embeddings.device.type, enabled=False):  # the (B, M) products stay in float32
        batch = _Batch(loss, embeddings, labels, memory, memory_labels, self_slots)
        return compute(loss, batch, embeddings, labels).to(embeddings.dtype)


def _nothing_to_compare(batch: _Batch) -> bool:
    """GenericPairLoss's rule: no loss when every pair list holds at most one pair."""
    return batch.anchors.numel() <= 1 and batch.num_neg <= 1


def _logits(loss, batch: _Batch) -> tuple[torch.Tensor, float]:
    """Similarities over the temperature (negated distances for a distance), and a bound on a row's range."""
    scale = 1.0 / loss.temperature
    if batch.distance.is_inverted:
        # the scale folds into the (B, D) queries instead of the (B, M) product
        return (batch.unit * scale) @ batch.memory.T, 2.0 * scale * (1 + 1e-3)
    return -batch.mat(batch.unit @ batch.memory.T) * scale, 2.0 * scale * (1 + 1e-3)


def _ntxent(loss, batch, embeddings, labels):
    if _nothing_to_compare(batch) or batch.anchors.numel() == 0 or batch.num_neg == 0:
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    logits, spread = _logits(loss, batch)
    negatives = _row_log_sum_exp(logits, batch.same, spread=spread)
    positive = batch.pair_mat(batch.anchors, batch.positives)
    positive = (positive if batch.distance.is_inverted else -positive) / loss.temperature
    # -log(e^p / (e^p + sum_n e^n)) = softplus(logsumexp_n - p), without PML's "+ tiny" in the log
    losses = F.softplus(negatives[batch.anchors] - positive)
    sub_losses = {"loss": {"losses": losses, "indices": (batch.anchors, batch.positives), "reduction_type": "pos_pair"}}
    return loss.reducer(sub_losses, embeddings, labels)


def _supcon(loss, batch, embeddings, labels):
    if _nothing_to_compare(batch) or batch.anchors.numel() == 0 or batch.num_neg == 0:
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    logits, spread = _logits(loss, batch)
    rows = torch.arange(batch.num_rows, device=logits.device)
    own = (rows[:0], rows[:0]) if batch.self_slots is None else (rows, batch.self_slots)
    denominator = _row_log_sum_exp(logits, own, spread=spread)  # every pair but the row's own slot
    denominator = denominator.masked_fill(torch.isinf(denominator), 0)
    positive = batch.pair_mat(batch.anchors, batch.positives)
    positive = (positive if batch.distance.is_inverted else -positive) / loss.temperature
    log_prob_sum = torch.zeros_like(denominator).index_add(0, batch.anchors, positive - denominator[batch.anchors])
    count = torch.bincount(batch.anchors, minlength=batch.num_rows).to(logits.dtype)
    losses = -log_prob_sum / (count + c_f.small_val(logits.dtype))
    sub_losses = {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
    return loss.reducer(sub_losses, embeddings, labels)


def _multi_similarity(loss, batch, embeddings, labels):
    if _nothing_to_compare(batch):
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    distance, beta = batch.distance, loss.beta
    # log(1 + sum_n e^{beta margin(base, mat)}) over the row's negatives, as one dense row log-sum-exp;
    # a row of unit dot products (or distances) spans at most 2, so 2 beta bounds its range
    spread = 2.0 * beta * (1 + 1e-3)
    if distance.is_inverted:  # = log(e^{beta base} + sum_n e^{beta s}) - beta base: beta folds into the queries
        z = (batch.unit * beta) @ batch.memory.T
        negative = _row_log_sum_exp(z, batch.same, extra=beta * loss.base, spread=spread) - beta * loss.base
    else:
        z = beta * distance.margin(loss.base, batch.mat(batch.unit @ batch.memory.T))
        negative = _row_log_sum_exp(z, batch.same, extra=0.0, spread=spread)
    positive = batch.pair_mat(batch.anchors, batch.positives)
    positive = _row_log_sum_exp_sparse(loss.alpha * distance.margin(positive, loss.base), batch.anchors, batch.num_rows)
    losses = positive / loss.alpha + negative / loss.beta
    rows = torch.arange(batch.num_rows, device=losses.device)
    sub_losses = {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
    return loss.reducer(sub_losses, embeddings, labels)


def _contrastive(loss, batch, embeddings, labels):
    if _nothing_to_compare(batch):
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    distance, reducers = batch.distance, loss.reducer.reducers
    anchors, positives = batch.anchors, batch.positives
    pos_losses = F.relu(distance.margin(batch.pair_mat(anchors, positives), loss.pos_margin)) if anchors.numel() else 0
    # only the negatives inside the margin have a non-zero loss: list those
    with torch.no_grad():
        similarity = batch.unit @ batch.memory.T
    threshold = batch.similarity_beyond(loss.neg_margin)
    if threshold < math.inf:
        near_rows, near_cols = pairs_above(similarity, threshold, batch.same)
    else:
        near_rows, near_cols = anchors[:0], positives[:0]
    neg_losses = F.relu(distance.margin(loss.neg_margin, batch.pair_mat(near_rows, near_cols)))
    if batch.num_neg == 0:
        neg_losses = 0
    sub_losses = {
        "pos_loss": {"losses": pos_losses, "indices": (anchors, positives), "reduction_type": "pos_pair"},
        "neg_loss": {"losses": neg_losses, "indices": (near_rows, near_cols), "reduction_type": "neg_pair"},
    }
    if _ignores_zeros(reducers["neg_loss"]) or batch.num_neg == 0:
        return loss.reducer(sub_losses, embeddings, labels)
    # MeanReducer: the mean over every negative pair, most of which have a zero loss
    pos_value = reducers["pos_loss"]({"pos_loss": sub_losses["pos_loss"]}, embeddings, labels)
    neg_value = neg_losses.sum() / batch.num_neg
    return torch.stack([pos_value.to(embeddings.dtype), neg_value.to(embeddings.dtype)]).sum()


def _triplet(loss, batch, embeddings, labels):
    r"""Every (a, p, n) triplet in closed form, with the score :math:`x` (similarity, or minus distance).

    A triplet violates its margin when :math:`x_{an} > \tau_{ap} = x_{ap} - \text{margin}`. With
    :math:`c_{an}` the number of positives of ``a`` whose threshold ``n`` exceeds and :math:`N_{ap}`
    the number of negatives above :math:`\tau_{ap}`, the violating triplets number
    :math:`K = \sum c_{an} = \sum N_{ap}` and their losses sum to
    :math:`\sum_{an} c_{an} x_{an} - \sum_{ap} N_{ap} \tau_{ap}`.
    """
    anchors, positives = batch.anchors, batch.positives
    negatives_per_row = batch.num_memory - torch.bincount(batch.same[0], minlength=batch.num_rows)
    positives_per_row = torch.bincount(anchors, minlength=batch.num_rows)
    num_triplets = int((positives_per_row * negatives_per_row).sum())
    if num_triplets == 0:
        return loss.reducer(loss.zero_losses(), embeddings, labels)
    sign = 1 if batch.distance.is_inverted else -1
    score = sign * batch.mat(batch.unit @ batch.memory.T)
    thresholds = sign * batch.pair_mat(anchors, positives) - loss.margin
    with torch.no_grad():
        # each row's thresholds, sorted, padded with +inf (never below a score)
        width = int(positives_per_row.max())
        slot = torch.arange(anchors.numel(), device=anchors.device) - (
            torch.cumsum(positives_per_row, 0) - positives_per_row
        )[anchors]
        table = thresholds.new_full((batch.num_rows, width), math.inf).index_put_((anchors, slot), thresholds.detach())
        table = table.sort(dim=1).values
        negative_scores = score.detach().index_put(batch.same, score.new_tensor(-math.inf))
        violated = torch.searchsorted(table, negative_scores)  # c_an: thresholds strictly below x_an
        counts = torch.zeros(batch.num_rows, width + 1, dtype=torch.long, device=score.device)
        counts.scatter_add_(1, violated, violated.new_ones(()).expand_as(violated))
        above = counts.flip(1).cumsum(1).flip(1)  # above[a, k]: negatives of a exceeding >= k thresholds
        # x_an > tau_ap exactly when x_an exceeds every threshold <= tau_ap
        rank = torch.searchsorted(table[anchors], thresholds.detach()[:, None], right=True).squeeze(1)
        per_threshold = above[anchors, rank]
        num_violating = int(per_threshold.sum())
    # both sums are ~20 times the difference: accumulate them in float64
    total = (violated.to(score.dtype) * score).sum(dtype=torch.float64)
    total = (total - (per_threshold.to(score.dtype) * thresholds).sum(dtype=torch.float64)).to(score.dtype)
    reducer = type(loss.reducer)
    if reducer is SumReducer:
        return total
    divisor = num_violating if reducer is AvgNonZeroReducer else num_triplets
    if divisor == 0:
        return loss.reducer.zero_loss(embeddings)
    return total / divisor
