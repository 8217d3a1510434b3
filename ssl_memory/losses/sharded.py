"""ShardedMemoryBankLoss: MemoryBankLoss on a bank split across ranks, its softmax assembled exactly."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._state import CheckedLoad
from .._validation import check_non_negative_number, check_positive_number, first_failure
from ..distributed_autograd import all_reduce_max, all_reduce_sum, gather_rows_with_grad
from ..sharded_bank import ShardedMemoryBank
from .consistency import check_mode, consistency_from_log_probs


class ShardedMemoryBankLoss(CheckedLoad):
    r""":class:`~ssl_memory.MemoryBankLoss` against a :class:`~ssl_memory.ShardedMemoryBank`: same loss, same gradients.

    Every rank returns the loss of its own rows, equal to what ``MemoryBankLoss`` on a replicated bank
    gives (to rounding). A step gathers the normalised queries of every rank (R rows in all); each
    rank k scores them against its shard :math:`S_k`, (R, N / W) logits, and the sums over entries
    that the loss needs are reduced across ranks: with :math:`\lambda_{r,k} = \log \sum_{j \in S_k}
    e^{\ell_{r,j}}` and :math:`m_r = \max_k \lambda_{r,k}`,

    .. math::
        \log Z_r = m_r + \log \sum_k e^{\lambda_{r,k} - m_r},

    and the same for the merge group's numerator :math:`\sum_{j \in G(i_r)} e^{\ell_{r,j}}` (the
    group may span shards) and for the consistency term, whose per-sample value is a sum over entries
    (:func:`~ssl_memory.losses.consistency.consistency_from_log_probs` on a shard's
    :math:`\log P = \ell - \log Z` gives that shard's part). Gradients flow back through the reductions
    and the gather to each rank's own embeddings, so **every rank must call** ``backward`` on its loss
    (the backward runs collectives, as DDP's does). The bank is then written with the rows already
    gathered: each rank updates the entries it owns.

    Per step and rank: an (R, D) gather, two (2, R) all-reduces and, with consistency on, a (W,) one;
    the backward all-reduces (R, D) and the same small vectors. A rank scores R rows against N / W
    entries, as many products as a replicated rank's R / W rows against N: the compute per rank is
    the same, the bank (and the copy of it a step keeps for the backward) is 1/W of it.

    Args:
        num_samples: N (when the loss builds its bank).
        dim: D (when the loss builds its bank).
        temperature: :math:`\tau`.
        momentum: momentum of the bank it builds.
        consistency_weight: :math:`\lambda \ge 0`; 0 skips the term.
        consistency_mode: ``"pairwise"`` or ``"mean"``.
        merger: an object with ``step(memory)`` (a :class:`~ssl_memory.NeighbourMerger`), given the
            bank's :meth:`~ssl_memory.ShardedMemoryBank.merge_view` after each update.
        memory: an existing :class:`~ssl_memory.ShardedMemoryBank`.
        dtype: storage dtype of the bank it builds.

    Shape:
        - embeddings: (R_r, D) on rank r, any scale and floating dtype; indices: (R_r,) in [0, N)
        - output: scalar, the loss of this rank's rows; :meth:`terms` gives ``"discrimination"`` (R_r,)
          and ``"consistency"`` (scalar)

    Example::

        >>> criterion = ShardedMemoryBankLoss(num_samples=1_281_167, dim=128, dtype=torch.bfloat16)
        >>> loss = criterion(model(batch["views"]), batch["indices"])  # on every rank
        >>> loss.backward()  # on every rank
    """

    memory: ShardedMemoryBank

    def __init__(
        self,
        num_samples: int | None = None,
        dim: int | None = None,
        temperature: float = 0.07,
        momentum: float = 0.5,
        consistency_weight: float = 0.0,
        consistency_mode: str = "pairwise",
        merger: Any = None,
        memory: ShardedMemoryBank | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_positive_number("temperature", temperature)
        check_non_negative_number("consistency_weight", consistency_weight)
        check_mode(consistency_mode)
        if merger is not None and not callable(getattr(merger, "step", None)):
            raise TypeError(f"merger must have a step(memory) method, got {type(merger).__name__}")
        if memory is None:
            if num_samples is None or dim is None:
                raise ValueError("give num_samples and dim, or an existing ShardedMemoryBank as memory=")
            memory = ShardedMemoryBank(num_samples, dim, momentum=momentum, dtype=dtype)
        elif not isinstance(memory, ShardedMemoryBank):
            raise TypeError(f"memory must be a ShardedMemoryBank, got {type(memory).__name__}")
        else:
            for name, value, actual in (("num_samples", num_samples, memory.num_entries), ("dim", dim, memory.dim)):
                if value is not None and value != actual:
                    raise ValueError(f"{name}={value!r} does not match the given memory's {actual}")
        self.memory = memory
        self.temperature = float(temperature)
        self.consistency_weight = float(consistency_weight)
        self.consistency_mode = consistency_mode
        self.merger = merger
        self.last: dict[str, Any] = {}
        self._groups_key: tuple | None = None
        self._local_groups: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, embeddings: torch.Tensor, indices: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        """The loss of this rank's rows; then, when ``update_memory``, the bank update and a merger step."""
        terms = self.terms(embeddings, indices, update_memory=update_memory)
        loss = terms["discrimination"].mean()
        if self.consistency_weight > 0:
            loss = loss + self.consistency_weight * terms["consistency"]
        return loss

    def terms(
        self, embeddings: torch.Tensor, indices: torch.Tensor, update_memory: bool = True
    ) -> dict[str, torch.Tensor]:
        """The unreduced parts of this rank's loss; updates the memory (and steps the merger) when asked."""
        bank = self.memory
        error = first_failure(lambda: self._check(embeddings, indices))
        if error is None:
            unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
        else:  # join the gather with no rows: every rank raises DistributedInputError there
            unit, indices = bank.shard.features.new_empty(0, bank.dim, dtype=torch.float32), bank.groups[:0]
        with torch.autocast(unit.device.type, enabled=False):
            queries, all_indices, source = gather_rows_with_grad(unit, indices.long(), error)
            own = source == bank.rank
            logits = bank.shard.similarity(queries * (1.0 / self.temperature))  # (R, N / W)
            positives = self._positive_logits(logits, all_indices)  # (R, G), -inf where padded
            # This shard's log-sum-exp of each row (it keeps no (R, N / W) table beyond the logits) and the
            # group's logits, shifted by their maxima over ranks, then summed over ranks: exact and stable.
            local = torch.logsumexp(logits, 1)
            shift = all_reduce_max(torch.stack([local.detach(), _row_max(positives.detach())]))
            sums = torch.stack([(local - shift[0]).exp(), (positives - shift[1].unsqueeze(1)).exp().sum(1)])
            log_sums = shift + all_reduce_sum(sums).log()  # log Z and log of the group's numerator, per row
            discrimination = (log_sums[0] - log_sums[1])[own]
            if self.consistency_weight > 0:
                log_probs = logits - log_sums[0].unsqueeze(1)
                counts = torch.bincount(source, minlength=bank.world_size).tolist()  # rows arrive in rank order
                parts = [
                    consistency_from_log_probs(rows, rows_indices, self.consistency_mode)
                    for rows, rows_indices in zip(log_probs.split(counts), all_indices.split(counts))
                ]
                consistency = all_reduce_sum(torch.stack(parts))[bank.rank]
            else:
                consistency = logits.new_zeros(())

        report = self._write(queries.detach(), all_indices, gather=False) if update_memory else None
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
        """Write embeddings into the bank and step the merger, as a forward with ``update_memory=True`` does."""
        error = first_failure(lambda: self._check(embeddings, indices))
        if error is not None:
            self.memory.write(indices, embeddings, gather=True, error=error)  # raises, on every rank
        unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
        self.last["merge"] = self._write(unit, indices.long(), gather=True)

    def _check(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        self.memory.check(indices, embeddings, names=("indices", "embeddings"))
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings must hold at least one row, got shape (0, D)")

    def _write(self, unit: torch.Tensor, indices: torch.Tensor, gather: bool) -> Any:
        self.memory.write(indices, unit, gather=gather, error=None)
        return self.merger.step(self.memory.merge_view()) if self.merger is not None else None

    def _positive_logits(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each row's logits against the members of its merge group held on this rank, padded with -inf: (R, G)."""
        order, sorted_groups = self._local_group_order()
        wanted = self.memory.groups[indices]
        start = torch.searchsorted(sorted_groups, wanted)
        count = torch.searchsorted(sorted_groups, wanted, right=True) - start
        offsets = torch.arange(int(count.max()), device=logits.device)
        slots = (start.unsqueeze(1) + offsets).clamp_(max=order.numel() - 1)
        return logits.gather(1, order[slots]).masked_fill(offsets >= count.unsqueeze(1), float("-inf"))

    def _local_group_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows sorted by merge group, and their sorted group ids; cached until the groups change."""
        groups = self.memory.groups
        key = (id(groups), groups.data_ptr(), groups._version)
        if key != self._groups_key:
            local = groups[self.memory.owned_entries()]
            order = torch.argsort(local, stable=True)
            self._local_groups = (order, local[order])
            self._groups_key = key
        return self._local_groups  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, consistency_weight={self.consistency_weight}, "
            f"consistency_mode={self.consistency_mode!r}"
        )


def _row_max(scores: torch.Tensor) -> torch.Tensor:
    """Maximum of each row, -inf for rows of an empty (R, 0) table."""
    if scores.shape[1] == 0:
        return scores.new_full((scores.shape[0],), float("-inf"))
    return scores.amax(1)
