"""MemoryBankLoss: instance discrimination against a memory bank, with views, consistency and merged positives."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._state import CheckedLoad
from .._validation import (
    check_non_negative_number,
    check_positive_number,
    first_failure,
    raise_for_values,
    value_flags,
)
from ..bank import MemoryBank
from ..distributed import share_reads
from .consistency import check_mode, consistency_from_log_probs, view_layout


class MemoryBankLoss(CheckedLoad):
    r"""Non-parametric instance discrimination (NPID) with the improvements of Bulat et al. (ICASSP 2021).

    Each row :math:`r` of the batch is a view of sample :math:`i_r`; with :math:`f_r` its normalised
    embedding, :math:`\ell_{r,j} = f_r \cdot \text{bank}_j / \tau` its logits over all N entries and
    :math:`G(i)` the merge group of sample :math:`i` (entries :math:`j` with
    ``memory.groups[j] == memory.groups[i]``),

    .. math::
        \mathcal{L} = \frac{1}{R} \sum_r -\log \frac{\sum_{j \in G(i_r)} e^{\ell_{r,j}}}{\sum_{j=1}^{N} e^{\ell_{r,j}}}
            \; + \; \lambda \, \mathcal{L}_{\text{cons}}(\ell, i),

    where :math:`\mathcal{L}_{\text{cons}}` is :class:`~ssl_memory.ConsistencyLoss` (temperature 1 on
    these logits, so its distributions are exactly the ones the first term uses). Without merges,
    views or consistency this is NPID's full softmax: a cross-entropy with the dataset indices as
    targets. Rows sharing an index are views of one sample; after the loss, the bank entry of each
    sample moves towards the mean of its views (:meth:`MemoryBank.update`, no gradient), and a
    ``merger`` then gets one :meth:`step` on the updated bank.

    The bank is read through :meth:`MemoryBank.similarity`, which multiplies by a copy of the bank
    when a gradient is needed, so writing it in the same forward is safe. Merged positives are
    gathered from each row's logits through a padded (R, G_max) index built by sorting
    ``memory.groups`` (cached until the groups change); consistency reuses the discrimination's
    log-softmax: no second (R, N) product.

    Args:
        num_samples: N, the number of training samples (when the loss builds its bank).
        dim: embedding width D (when the loss builds its bank).
        temperature: :math:`\tau`.
        momentum: momentum of the bank it builds (weight of the old entry); an existing ``memory``
            keeps its own.
        consistency_weight: :math:`\lambda \ge 0`; 0 skips the term.
        consistency_mode: ``"pairwise"`` or ``"mean"``, see :class:`~ssl_memory.ConsistencyLoss`.
        merger: an object with ``step(memory)`` (a :class:`~ssl_memory.NeighbourMerger`), called once
            after every memory update; it may rewrite ``memory.groups``, which this loss only reads.
            A ``NeighbourMerger`` counts epochs from the samples written to the bank, so its
            ``warmup`` and ``interval`` are in epochs with no further setting.
        memory: an existing :class:`~ssl_memory.MemoryBank` to use instead of building one.
        checks: check the values of each batch (NaN, indices in range), which costs one device sync a
            step (the host must read the verdict); ``False`` keeps only the checks of shapes, dtypes and
            devices, so that the step never waits for the device (an index out of range then fails in
            the indexing kernel, and a NaN reaches the loss and the bank).

    Shape:
        - embeddings: (R, D), any scale (normalised inside), any floating dtype; the loss is float32
          (computed with autocast off)
        - indices: (R,), dataset indices in [0, N), any integer dtype; equal indices mark views of one sample
        - output: scalar; :meth:`terms` gives ``"discrimination"`` (R,) and ``"consistency"`` (scalar)

    Bad input (a wrong shape, an index out of range, NaN) raises before anything is written; under
    ``torch.distributed`` every rank then raises the same
    :class:`~ssl_memory.distributed.DistributedInputError` and the next step works on every rank.

    Gradient accumulation: call the loss with ``update_memory=False`` on each micro-batch and
    :meth:`update_memory` once per optimiser step with all the micro-batches' detached embeddings;
    the gradient and the memory are then those of one step on the whole batch::

        >>> kept = []
        >>> for views, indices in micro_batches:
        ...     embeddings = model(views)
        ...     (criterion(embeddings, indices, update_memory=False) / len(micro_batches)).backward()
        ...     kept.append((embeddings.detach(), indices))
        >>> criterion.update_memory(torch.cat([e for e, _ in kept]), torch.cat([i for _, i in kept]))
        >>> optimizer.step()

    After each call, :attr:`last` holds detached 0-d tensors for logging (no device sync):
    ``"discrimination"`` (mean over rows), ``"consistency"``, ``"positive_prob"`` (the mean over rows
    of the probability of the row's group) and ``"merge"`` (the :class:`~ssl_memory.MergeReport` of a
    round the merger ran at this call, else None; every round's report stays in ``merger.history``).

    Example::

        >>> criterion = MemoryBankLoss(num_samples=50_000, dim=128, consistency_weight=1.0)
        >>> batch = next(iter(loader))  # MultiAugCollate(transform, views=4)
        >>> loss = criterion(model(batch["views"]), batch["indices"])
        >>> loss.backward()
    """

    memory: MemoryBank

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
        checks: bool = True,
    ) -> None:
        super().__init__()
        check_positive_number("temperature", temperature)
        check_non_negative_number("consistency_weight", consistency_weight)
        check_mode(consistency_mode)
        if merger is not None and not callable(getattr(merger, "step", None)):
            raise TypeError(f"merger must have a step(memory) method, got {type(merger).__name__}")
        if memory is None:
            if num_samples is None or dim is None:
                raise ValueError("give num_samples and dim, or an existing MemoryBank as memory=")
            memory = MemoryBank(num_samples, dim, momentum=momentum)
        elif not isinstance(memory, MemoryBank):
            raise TypeError(f"memory must be a MemoryBank, got {type(memory).__name__}")
        else:
            for name, value, actual in (("num_samples", num_samples, memory.num_entries), ("dim", dim, memory.dim)):
                if value is not None and value != actual:
                    raise ValueError(f"{name}={value!r} does not match the given memory's {actual}")
        self.memory = memory
        self.temperature = float(temperature)
        self.consistency_weight = float(consistency_weight)
        self.consistency_mode = consistency_mode
        self.merger = merger
        self.checks = bool(checks)
        self.last: dict[str, Any] = {}
        self._groups_key: tuple | None = None
        self._members: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, embeddings: torch.Tensor, indices: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        """The loss of a batch; then, when ``update_memory``, the bank update and a merger step.

        Args:
            embeddings: the batch's embeddings (any scale, any floating dtype).
            indices: their dataset indices (any integer dtype).
            update_memory: write the batch into the bank (and step the merger) after computing the
                loss. Pass False for the micro-batches of gradient accumulation and call
                :meth:`update_memory` once per optimiser step with all of them.
        """
        terms = self.terms(embeddings, indices, update_memory=update_memory)
        loss = terms["discrimination"].mean()
        if self.consistency_weight > 0:
            loss = loss + self.consistency_weight * terms["consistency"]
        return loss

    def terms(
        self,
        embeddings: torch.Tensor,
        indices: torch.Tensor,
        update_memory: bool = True,
        *,
        error: Exception | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unreduced parts of the loss; updates the memory (and steps the merger) when asked.

        ``error``: a check the caller's own code failed on this input (a wrapper's): raised here instead
        of computing anything, on every rank together under ``torch.distributed``.
        """
        memory = self.memory
        error = error or first_failure(lambda: self._check(embeddings, indices, values=False))
        # the step's one device read, shared by the ranks when the memory is written: the value
        # checks, the views' layout (which the checks' read carries for free; without it the
        # consistency term runs its slower layout-free path) and every rank's row count and verdict
        num_flags, num_layout = 3 * self.checks, 4 * (self.checks and self.consistency_weight > 0)
        if error is None:
            flags = value_flags(embeddings, indices=indices) if self.checks else indices.new_zeros(0, dtype=torch.long)
            layout = view_layout(indices) if num_layout else flags[:0]
            values = torch.cat([flags, layout])
        else:
            values = torch.zeros(num_flags + num_layout, dtype=torch.long, device=memory.features.device)
        read, counts = share_reads(
            values,
            embeddings.shape[0] if error is None else 0,
            error,
            lambda read: raise_for_values("embeddings", read[:num_flags], "indices", memory.num_entries),
            collective=update_memory,
            agreed=self._counters(),
        )
        layout = read[num_flags:] if num_layout else None
        indices = indices.long()
        with torch.autocast(embeddings.device.type, enabled=False):
            unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
            logits = memory.similarity(unit * (1.0 / self.temperature))
            members = self._group_members()
            if self.consistency_weight > 0:
                log_probs = F.log_softmax(logits, dim=1)
                consistency = consistency_from_log_probs(log_probs, indices, self.consistency_mode, layout)
                if members is None:
                    discrimination = -log_probs.gather(1, indices.unsqueeze(1)).squeeze(1)
                else:
                    discrimination = -_group_logsumexp(log_probs, indices, members)
            else:
                consistency = logits.new_zeros(())
                if members is None:
                    discrimination = F.cross_entropy(logits, indices, reduction="none")
                else:
                    discrimination = torch.logsumexp(logits, dim=1) - _group_logsumexp(logits, indices, members)

        report = self._write(unit.detach(), indices, counts) if update_memory else None
        detached = discrimination.detach()
        self.last = {
            "discrimination": detached.mean(),
            "consistency": consistency.detach(),
            "positive_prob": torch.exp(-detached).mean(),
            "merge": report,
        }
        return {"discrimination": discrimination, "consistency": consistency}

    @torch.no_grad()
    def update_memory(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        """Write embeddings into the bank and step the merger: what a forward with ``update_memory=True`` does.

        For gradient accumulation: run each micro-batch with ``update_memory=False``, keep its detached
        embeddings and indices, and call this once per optimiser step with all of them. The bank and
        the merger's schedule then end the step exactly as after one forward on the whole batch.

        Shape:
            - embeddings: (R, D); indices: (R,)
        """
        error = first_failure(lambda: self._check(embeddings, indices, values=self.checks))
        if error is not None:  # raises, on every rank
            self.memory.write(indices, embeddings, gather=True, error=error, agreed=self._counters())
        unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
        self.last["merge"] = self._write(unit, indices.long())

    def _check(self, embeddings: torch.Tensor, indices: torch.Tensor, values: bool) -> None:
        self.memory.check(indices, embeddings, names=("indices", "embeddings"), values=values)
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings must hold at least one row, got shape (0, D)")

    def _counters(self) -> dict[str, torch.Tensor]:
        """What must be equal on every rank before a write: the counters the merge schedule reads."""
        counters = {"memory.samples_written": self.memory.samples_written}
        seen = getattr(self.merger, "epochs_seen", None)
        if isinstance(seen, torch.Tensor):
            counters["merger.epochs_seen"] = seen
        return counters

    # Eager under torch.compile (as the queue losses' writes and _group_members): host bookkeeping,
    # collectives and the merger, which dynamo would split into many small graphs recompiled as they change.
    @torch.compiler.disable
    def _write(self, unit: torch.Tensor, indices: torch.Tensor, counts: list[int] | None = None) -> Any:
        self.memory.write(indices, unit, gather=True, error=None, counts=counts, agreed=self._counters())
        return self.merger.step(self.memory) if self.merger is not None else None

    @torch.compiler.disable
    def _group_members(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """Entries sorted by group, for each entry where its group starts and how many it has, and the largest group.

        None while every group is a single entry. Recomputed only when ``memory.groups`` changes
        (a merger writes it in place, which bumps its version counter): the one device sync here
        (the largest group's size, which shapes the gather) is paid then, not at every step.
        """
        groups = self.memory.groups
        key = (id(groups), groups.data_ptr(), groups._version)
        if key != self._groups_key:
            order = torch.argsort(groups, stable=True)
            _, rank, counts = torch.unique_consecutive(groups[order], return_inverse=True, return_counts=True)
            largest = int(counts.max()) if groups.numel() else 0
            if largest <= 1:
                self._members = None
            else:
                entry_rank = torch.empty_like(rank).index_copy_(0, order, rank)
                starts = counts.cumsum(0) - counts
                self._members = (order, starts[entry_rank], counts[entry_rank], largest)
            self._groups_key = key
        return self._members

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, consistency_weight={self.consistency_weight}, "
            f"consistency_mode={self.consistency_mode!r}"
        )


def _group_logsumexp(
    scores: torch.Tensor, indices: torch.Tensor, members: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
) -> torch.Tensor:
    """``log sum_{j in G(i_r)} exp(scores[r, j])`` for each row, from a padded (R, G_max) gather.

    G_max is the largest group of the bank (known on the host), not of the batch: no device read.
    """
    order, starts, counts, largest = members
    row_start, row_count = starts[indices], counts[indices]
    offsets = torch.arange(largest, device=scores.device)
    slots = (row_start.unsqueeze(1) + offsets).clamp_(max=order.numel() - 1)
    picked = scores.gather(1, order[slots])
    picked = picked.masked_fill(offsets >= row_count.unsqueeze(1), float("-inf"))
    return torch.logsumexp(picked, dim=1)
