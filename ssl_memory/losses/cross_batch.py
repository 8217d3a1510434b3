"""CrossBatchLoss: XBM's contrastive loss within the batch and against a memory of past batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._state import CheckedLoad
from .._validation import (
    check_features,
    check_index_vector,
    check_non_negative_int,
    check_non_negative_number,
    check_values,
    first_failure,
    raise_for_values,
    value_flags,
)
from ..distributed import agree, share_reads
from ..queue import Queue

# positives this similar are the anchor itself (or an exact duplicate) and are skipped, as in research-xbm
_SELF_SIMILARITY = 1 - 1e-5
# candidates are taken this far below a threshold, so that rounding in the (B, R) product never drops a pair
# whose own dot product exceeds it (float32 dot products of unit vectors err by ~D * 6e-8)
_SLACK = 1e-4


def label_runs(labels: torch.Tensor, ref_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference labels' sort order, and for each label where its run starts in it and how long it is.

    Shape:
        - labels: (B,); ref_labels: (R,)
        - output: order (R,), starts (B,), counts (B,): ``counts.sum()`` is the number of equal-label pairs
    """
    ordered, order = torch.sort(ref_labels, stable=True)
    labels = labels.to(ordered.dtype)
    low = torch.searchsorted(ordered, labels)
    return order, low, torch.searchsorted(ordered, labels, right=True) - low


def equal_label_pairs(
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``labels[i] == ref_labels[j]``, in row-major order, without a (B, R) mask.

    Sorting the reference labels once makes this O(R log R + pairs) instead of a (B, R) comparison
    and a ``nonzero`` over it, which cost more than a whole loss at R = 65,536. ``runs``
    (:func:`label_runs`) and ``total`` (the number of pairs, read by the caller) spare recomputing
    them and the device sync of sizing the output.

    Shape:
        - labels: (B,); ref_labels: (R,)
        - output: two (P,) long tensors
    """
    order, low, counts = runs if runs is not None else label_runs(labels, ref_labels)
    rows = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    cols = order[low[rows] + torch.arange(rows.numel(), device=labels.device) - starts[rows]]
    return rows, cols


def pairs_above(
    similarity: torch.Tensor, threshold: float, excluded: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``similarity`` above ``threshold`` (less a rounding slack), except the ``excluded`` pairs.

    In metric learning few pairs of different labels are similar enough to violate a margin, so a
    hinge loss over a (B, R) similarity needs only these candidates; the caller recomputes their
    exact values (:func:`pair_similarities`) and applies its own strict test.
    """
    candidates = similarity > threshold - _SLACK
    if excluded[0].numel():
        candidates.index_put_(excluded, candidates.new_zeros(()))
    return candidates.nonzero(as_tuple=True)


def pair_similarities(
    query: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    r"""``query[rows] . reference[cols]`` for a list of pairs, differentiable.

    Few pairs (at most :math:`BR / D`) are computed row by row in O(pairs x D); more are read from
    the (B, R) product, whose backward is then one (B, R) @ (R, D) product. Autograd may keep
    ``reference`` for the backward: pass a copy (:meth:`Queue.snapshot`) of a memory that is
    written before then.

    Shape:
        - query: (B, D); reference: (R, D); rows, cols: (P,)
        - output: (P,)
    """
    if rows.numel() * query.shape[1] <= query.shape[0] * reference.shape[0]:
        return torch.linalg.vecdot(query[rows], reference[cols])
    return (query @ reference.T)[rows, cols]


class _XbmPairs:
    """The pairs research-xbm's loss sums over, found on the device; their counts are read by the caller.

    Equal labels (:func:`label_runs`) and the other-label pairs above the margin (a (B, R) mask):
    :attr:`counts` holds both totals, so that listing the pairs (:meth:`loss`) waits for nothing more.
    """

    @torch.no_grad()
    def __init__(
        self, query: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, ref_labels: torch.Tensor,
        margin: float,
    ) -> None:
        self.reference, self.ref_labels, self.margin = reference, ref_labels, margin
        self.runs = label_runs(labels, ref_labels)
        similarity = query @ reference.T
        self.negatives = (similarity > margin - _SLACK) & (labels.unsqueeze(1) != ref_labels.unsqueeze(0))
        self.counts = torch.stack([self.runs[2].sum(), self.negatives.sum()])

    def loss(self, query: torch.Tensor, labels: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Per-anchor loss (B,), differentiable in ``query``; ``counts`` is :attr:`counts` read on the host."""
        pos_rows, pos_cols = equal_label_pairs(labels, self.ref_labels, self.runs, counts[0])
        neg_rows, neg_cols = torch.nonzero_static(self.negatives, size=counts[1]).unbind(1)
        positive = pair_similarities(query, self.reference, pos_rows, pos_cols)
        negative = pair_similarities(query, self.reference, neg_rows, neg_cols)
        per_anchor = query.new_zeros(query.shape[0])
        per_anchor = per_anchor.index_add(0, pos_rows, torch.where(positive < _SELF_SIMILARITY, 1 - positive, 0))
        return per_anchor.index_add(0, neg_rows, torch.where(negative > self.margin, negative, 0))


def xbm_contrastive(
    query: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, ref_labels: torch.Tensor, margin: float
) -> torch.Tensor:
    r"""research-xbm's contrastive loss of each query against a reference set, summed over the references.

    .. math::
        \ell_b = \sum_{j:\, y_j = y_b,\ s_{bj} < 1 - 10^{-5}} (1 - s_{bj})
               + \sum_{j:\, y_j \ne y_b,\ s_{bj} > \text{margin}} s_{bj}

    on the dot products :math:`s` of unit rows. Only the pairs that count are ever listed (equal
    labels, and the negatives above the margin), so a large reference set costs one (B, R) product
    without gradient and a comparison.

    Shape:
        - query: (B, D) unit rows; labels: (B,); reference: (R, D) unit rows; ref_labels: (R,)
        - output: (B,)
    """
    pairs = _XbmPairs(query, labels, reference, ref_labels, margin)
    return pairs.loss(query, labels, pairs.counts.tolist())


def xbm_contrastive_unlisted(
    query: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, ref_labels: torch.Tensor, margin: float
) -> torch.Tensor:
    r""":func:`xbm_contrastive` without listing the pairs, so that nothing waits for the device.

    The loss is linear in the similarities it keeps: with :math:`w_{bj} = -1` for a positive below
    :math:`1 - 10^{-5}`, :math:`+1` for a negative above the margin and 0 otherwise (chosen without
    gradient), :math:`\ell_b = \#\{j: w_{bj} = -1\} + q_b \cdot \sum_j w_{bj} r_j`, differentiable in
    both. That costs one more (B, R) @ (R, D) product where the pair lists cost a host read of their
    sizes; ``benchmarks/speed.py`` times both (``cross-batch`` and ``cross-batch-nosync``).

    Shape:
        - query: (B, D) unit rows; labels: (B,); reference: (R, D) unit rows; ref_labels: (R,)
        - output: (B,)
    """
    with torch.no_grad():
        similarity = query @ reference.T
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        weights = torch.where(
            same, torch.where(similarity < _SELF_SIMILARITY, -1.0, 0.0), torch.where(similarity > margin, 1.0, 0.0)
        ).to(similarity.dtype)
    # differentiable in the reference too (the batch term's references are the batch)
    return (weights < 0).sum(1) + torch.linalg.vecdot(query, weights @ reference)


class CrossBatchLoss(CheckedLoad):
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
        checks: check that the embeddings are finite, which costs one device sync a step (that read
            also sizes the lists of pairs); ``False`` keeps only the checks of shapes, dtypes and
            devices, and the step never waits for the device: the loss is then computed without
            listing pairs (:func:`xbm_contrastive_unlisted`, one more (B, R) @ (R, D) product).

    Bad input (shapes, NaN, an empty batch) raises before anything is written; under
    ``torch.distributed`` every rank raises the same :class:`~ssl_memory.distributed.DistributedInputError`
    and no rank counts the step, also during the warm-up (where the ranks exchange their verdicts
    though nothing is enqueued), so the step counters stay equal. The loss is float32 under autocast.

    Shape:
        - embeddings: (B, D), any scale (normalised inside); labels: (B,) of any integer dtype
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
        self,
        size: int,
        dim: int,
        margin: float = 0.5,
        memory_weight: float = 1.0,
        start_step: int = 0,
        checks: bool = True,
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
        self.checks = bool(checks)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step_seen: tuple[tuple[int, int], int] | None = None  # host copy of step, with its key

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        """The loss of a batch; then, when ``update_memory``, the step is counted and (after the warm-up) enqueued.

        Args:
            embeddings: the batch's embeddings (any scale, any floating dtype).
            labels: their class labels (any integer dtype).
            update_memory: enqueue the batch and count the step; pass False for the micro-batches of
                gradient accumulation and call :meth:`update_memory` once per optimiser step.
        """
        terms = self.terms(embeddings, labels, update_memory=update_memory)
        return (terms["batch"] + self.memory_weight * terms["memory"]).mean()

    def terms(
        self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool = True
    ) -> dict[str, torch.Tensor]:
        """Per-anchor batch and memory terms; enqueues the batch and counts the step when ``update_memory``."""
        queue = self.queue
        memory_on = self._memory_on()
        with_memory = memory_on and len(queue) > 0
        error = first_failure(lambda: self._check(embeddings, labels))
        num_flags = int(self.checks)
        with torch.autocast(embeddings.device.type, enabled=False):
            if error is None:
                labels = labels.long()
                unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
                references = [(unit, labels)]
                if with_memory:  # a copy: the batch is enqueued before the backward
                    references.append((queue.snapshot(unit.dtype), queue.labels))
                # with checks the step reads the device anyway, and the pair counts ride along
                sets = [_XbmPairs(unit, labels, *ref, self.margin) for ref in references] if self.checks else []
                flags = value_flags(embeddings) if self.checks else unit.new_zeros(0, dtype=torch.long)
                values = torch.cat([flags, *(pairs.counts for pairs in sets)])
            else:
                values = torch.zeros(num_flags * (3 + 2 * with_memory), dtype=torch.long, device=queue.slots.device)
            # the step's one device read (none without checks in one process): the value checks and the
            # pair counts that size the lists, shared by the ranks (with their row counts and verdicts)
            # when the step is counted
            read, counts = share_reads(
                values, embeddings.shape[0] if error is None else 0, error,
                lambda read: raise_for_values("embeddings", read[:num_flags]), collective=update_memory,
            )
            if self.checks:
                counted = read[num_flags:]
                per_reference = [pairs.loss(unit, labels, counted[2 * k : 2 * k + 2]) for k, pairs in enumerate(sets)]
            else:
                per_reference = [xbm_contrastive_unlisted(unit, labels, *ref, self.margin) for ref in references]
            batch = per_reference[0]
            memory = per_reference[1] if with_memory else torch.zeros_like(batch)
        if update_memory:
            self._write(unit.detach(), labels, memory_on, counts)
        return {"batch": batch, "memory": memory}

    @torch.no_grad()
    def update_memory(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a step and (after the warm-up) enqueue embeddings: what a forward with ``update_memory=True`` does.

        Shape:
            - embeddings: (B, D); labels: (B,)
        """
        memory_on = self._memory_on()
        error = first_failure(lambda: self._check(embeddings, labels, values=self.checks))
        if error is not None:
            self._refuse(embeddings, labels, memory_on, error)  # raises, on every rank
        unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
        self._write(unit, labels.long(), memory_on)

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor, values: bool = False) -> None:
        """Shapes, dtypes and devices; the values too when ``values`` (a forward reads them with its pair counts)."""
        queue = self.queue
        check_features("embeddings", embeddings, queue.dim, queue.slots.device)
        check_index_vector("labels", labels, embeddings.shape[0], queue.slots.device)
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings must hold at least one row, got shape (0, D)")
        if values:
            check_values("embeddings", embeddings)

    # Eager under torch.compile, as Queue._filled: a host copy keyed by the buffer's data pointer.
    @torch.compiler.disable
    def _memory_on(self) -> bool:
        """Whether the warm-up is over, from a host copy of ``step`` (read from the buffer only when it changed)."""
        key = (self.step.data_ptr(), self.step._version)
        if self._step_seen is None or self._step_seen[0] != key:
            self._step_seen = (key, int(self.step))
        return self._step_seen[1] >= self.start_step

    def _refuse(self, embeddings: torch.Tensor, labels: torch.Tensor, memory_on: bool, error: Exception) -> None:
        """Raise ``error`` on every rank: through the enqueue's gather, or during the warm-up a verdict alone."""
        if memory_on:
            self.queue.write(embeddings, labels, gather=True, error=error)
        agree(error, self.step.device)

    @torch.compiler.disable
    def _write(
        self, unit: torch.Tensor, labels: torch.Tensor, memory_on: bool, counts: list[int] | None = None
    ) -> None:
        if memory_on:
            self.queue.write(unit, labels, gather=True, error=None, counts=counts)
        elif counts is None:
            agree(None, self.step.device)  # the ranks' verdicts, also during the warm-up: they count steps together
        self.step += 1
        if self._step_seen is not None:
            self._step_seen = ((self.step.data_ptr(), self.step._version), self._step_seen[1] + 1)

    def extra_repr(self) -> str:
        return (
            f"size={self.queue.size}, dim={self.queue.dim}, margin={self.margin}, "
            f"memory_weight={self.memory_weight}, start_step={self.start_step}"
        )
