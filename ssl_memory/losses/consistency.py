"""ConsistencyLoss: the views of one sample should give the same distribution over the memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_index_vector, check_matrix, check_positive_number

MODES = ("pairwise", "mean")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"consistency_mode must be one of {MODES}, got {mode!r}")


def view_layout(indices: torch.Tensor) -> torch.Tensor:
    """What the consistency term needs to know on the host about a batch's views, as a device tensor not yet read.

    ``[S, any sample has 2+ views, every sample has, the batch is view-major]``: the number of
    distinct samples and three flags. View-major (V blocks holding the same samples in the same
    order, as :class:`~ssl_memory.MultiAugCollate` returns) lets sums over views be reshapes. A
    caller reads it with its other values of the step in one transfer and passes the list to
    :func:`consistency_from_log_probs`.
    """
    rows = indices.numel()
    ordered, _ = torch.sort(indices)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    samples = starts.sum()
    run = starts.cumsum(0) - 1  # each sorted row's sample, 0 .. S-1
    views = torch.zeros_like(run).index_add_(0, run, torch.ones_like(run))  # (R,): S counts, then zeros
    used = torch.arange(rows, device=indices.device) < samples
    view_major = (indices[torch.arange(rows, device=indices.device) % samples.clamp(min=1)] == indices).all()
    view_major &= rows % samples.clamp(min=1) == 0
    return torch.stack([samples, (views > 1).any(), ((views > 1) | ~used).all(), view_major]).long()


def _sample_slots(indices: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sample slot (its rank among the sorted distinct ids) and the views per slot, on the device.

    ``num_slots`` is any bound on the number of distinct ids known on the host (the row count will
    do): slots past the last sample stay empty, so nothing here waits for the device.
    """
    ordered, order = torch.sort(indices)
    starts = torch.ones_like(ordered)
    starts[1:] = ordered[1:] != ordered[:-1]
    slot = torch.empty_like(order).index_copy_(0, order, starts.cumsum(0) - 1)
    views = torch.zeros(num_slots, dtype=torch.long, device=indices.device).index_add_(0, slot, torch.ones_like(slot))
    return slot, views


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # measured faster on CPU than a batched (1, N) @ (N, 1) product, whose backward is very slow
    return torch.linalg.vecdot(a, b, dim=1)


def consistency_from_log_probs(
    log_probs: torch.Tensor, indices: torch.Tensor, mode: str, layout: list[int] | None = None
) -> torch.Tensor:
    """The consistency loss of rows whose log-distributions are given (shared with MemoryBankLoss).

    Works on per-sample sums only, so memory grows with (R + 2S) x N (S sample slots), never with the
    number of view pairs. ``layout`` is :func:`view_layout` read on the host by a caller that reads the device anyway:
    a view-major batch then sums its views with a reshape. Without it nothing is read: sums go
    through ``index_add_`` into R slots, and samples with a single view get weight 0.
    """
    rows = indices.numel()
    if layout is not None and not layout[1]:
        return log_probs.reshape(-1)[:0].sum()  # no sample has two views: a zero attached to the graph
    if layout is not None and layout[2] and layout[3]:  # every sample has V views, in V blocks
        num_samples, blocks = layout[0], rows // layout[0]
        samples = _SampleRows(None, num_samples, blocks)
        v = log_probs.new_full((num_samples,), float(blocks))
        weights = v.new_full((num_samples,), 1.0 / num_samples)
    else:
        slot, views = _sample_slots(indices, layout[0] if layout is not None else rows)
        samples = _SampleRows(slot, views.numel(), 0)
        v = views.to(log_probs.dtype)
        counted = views > 1
        weights = counted.to(v.dtype) / counted.sum().clamp(min=1)  # the mean over samples with 2+ views
    if mode == "pairwise":
        weights = weights / (v * (v - 1)).clamp(min=1)
        return _PairwiseConsistency.apply(log_probs, samples, v, weights)
    prob_sums = samples.sum(log_probs.detach().exp())
    log_sums = samples.sum(log_probs)
    # mean_v KL(Pbar || P_v) = <Pbar, log Pbar> - <Pbar, sum_v log P_v> / V, Pbar held fixed
    v = v.clamp(min=1)
    mean_probs = prob_sums / v.unsqueeze(1)
    per_sample = torch.special.xlogy(mean_probs, mean_probs).sum(1) - _rowwise_dot(prob_sums, log_sums) / (v * v)
    return (weights * per_sample).sum()


class _SampleRows:
    """Sums rows per sample, and spreads per-sample values back onto rows.

    Batches from :class:`~ssl_memory.MultiAugCollate` are view-major: V blocks holding the same
    samples in the same order. For them both are a reshape (``view(V, S, N).sum(0)`` and a broadcast),
    several times faster on CPU than ``index_add_`` and a row gather, which any other layout uses.
    """

    def __init__(self, slot: torch.Tensor | None, num_samples: int, blocks: int) -> None:
        self.slot, self.num_samples, self.blocks = slot, num_samples, blocks

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            return x.view(self.blocks, self.num_samples, *x.shape[1:]).sum(0)
        return x.new_zeros(self.num_samples, *x.shape[1:]).index_add_(0, self.slot, x)

    def sub_(self, rows: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        """``rows -= per_sample`` of each row's sample, in place."""
        if self.blocks:
            rows.view(self.blocks, self.num_samples, -1).sub_(per_sample)
            return rows
        return rows.sub_(per_sample[self.slot])

    def spread(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(S,) -> (R, 1)."""
        if self.blocks:
            return per_sample.repeat(self.blocks).unsqueeze(1)
        return per_sample[self.slot].unsqueeze(1)


class _PairwiseConsistency(torch.autograd.Function):
    r"""Weighted sum over samples of :math:`\sum_{k \ne j} \mathrm{KL}(P_k \| P_j)`, from log-probabilities.

    With :math:`A_s = \sum_j \log P_j` and :math:`Q_s = \sum_j P_j` over the sample's views, the
    per-sample sum is :math:`V \sum_k \langle P_k, \log P_k\rangle - \langle Q_s, A_s \rangle` and its
    gradient with respect to :math:`\log P_k` is :math:`P_k \odot (V (\log P_k + 1) - A_s) - Q_s`.
    Writing that backward by hand keeps few (R, N) passes, where autograd through the expression
    above records (and replays) about twice as many: measured 1.2-2x faster for 64 samples x 4 views
    over 65,536 entries on CPU. It is first-order only: a double backward raises.
    """

    @staticmethod
    def forward(
        ctx, log_probs: torch.Tensor, samples: _SampleRows, views: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        probs = log_probs.exp()
        prob_sums, log_sums = samples.sum(probs), samples.sum(log_probs)
        self_terms = samples.sum(_rowwise_dot(probs, log_probs))
        per_sample = views * self_terms - _rowwise_dot(prob_sums, log_sums)
        ctx.samples = samples
        ctx.save_for_backward(log_probs, probs, log_sums, prob_sums, views, weights)
        return (weights * per_sample).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward has no derivative of its own
            raise RuntimeError(
                "ConsistencyLoss(mode='pairwise') is first-order only: its hand-written backward cannot be "
                "differentiated again (create_graph=True); use mode='mean' for double backward"
            )
        log_probs, probs, log_sums, prob_sums, views, weights = ctx.saved_tensors
        samples = ctx.samples
        grad_log_probs = samples.sub_((log_probs + 1).mul_(samples.spread(views)), log_sums).mul_(probs)
        return samples.sub_(grad_log_probs, prob_sums).mul_(samples.spread(grad * weights)), None, None, None


class ConsistencyLoss(nn.Module):
    r"""Asks the views of each sample to agree on their distribution over a set of entries.

    With :math:`P_r = \operatorname{softmax}(\text{logits}_r / \tau)` and :math:`V_s \ge 2` views
    :math:`r \in s` of sample :math:`s` (rows sharing an index), ``mode="pairwise"`` (Bulat et al.,
    2021, as transcribed in METHODS.md) is the mean over ordered pairs of distinct views

    .. math::
        \ell_s = \frac{1}{V_s (V_s - 1)} \sum_{k \ne j} \mathrm{KL}(P_k \,\|\, P_j)
               = \frac{V_s \sum_k \langle P_k, \log P_k\rangle
                 - \langle \sum_k P_k, \sum_j \log P_j \rangle}{V_s (V_s - 1)},

    with gradients through both sides. ``mode="mean"`` is the cheaper

    .. math::
        \ell_s = \frac{1}{V_s} \sum_v \mathrm{KL}(\bar P_s \,\|\, P_v), \qquad
        \bar P_s = \tfrac{1}{V_s} \textstyle\sum_v P_v \ \text{(held fixed)} .

    The loss is the mean of :math:`\ell_s` over samples with two or more views; samples with one
    view contribute nothing and a batch without any gives 0 (still attached to the graph, never NaN).
    It is computed in float32 (autocast off) whatever the logits' dtype.
    Both modes are computed from per-sample sums (the right-hand form above), so no (V*V, N) or
    (R, R, N) tensor is built. Logits must be finite.

    Args:
        temperature: :math:`\tau`, divides the logits before the softmax.
        mode: ``"pairwise"`` or ``"mean"`` (``"pairwise"`` has a first derivative only: a double
            backward through it raises).

    Shape:
        - logits: (R, N), one row per view
        - indices: (R,), integer sample ids; rows with equal ids are views of one sample
        - output: scalar

    Example::

        >>> criterion = ConsistencyLoss(temperature=0.1)
        >>> logits = torch.randn(8, 1000, requires_grad=True)
        >>> loss = criterion(logits, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 1.0, mode: str = "pairwise") -> None:
        super().__init__()
        check_positive_number("temperature", temperature)
        check_mode(mode)
        self.temperature = float(temperature)
        self.mode = mode

    def forward(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        check_matrix("logits", logits, rows="R", cols="N")
        check_index_vector("indices", indices, logits.shape[0], logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            log_probs = F.log_softmax(logits / self.temperature, dim=1)
            return consistency_from_log_probs(log_probs, indices.long(), self.mode)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mode={self.mode!r}"
