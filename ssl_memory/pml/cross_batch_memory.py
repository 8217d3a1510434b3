"""A drop-in for PML's ``losses.CrossBatchMemory``: dense losses, resumable state, warm-up, rank-ordered memory."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .._validation import check_features, check_index_vector, check_non_negative_int, check_positive_int
from ..distributed import is_distributed
from . import dense
from .triplet_swap import swap_triplet_loss


def _drop_self_pairs(indices_tuple: tuple, self_refs: torch.Tensor) -> tuple:
    """Remove the pairs (anchor i, reference row of i itself) from a pair or triplet tuple."""
    anchors, others = indices_tuple[0], indices_tuple[1]
    keep = others != self_refs[anchors]
    if len(indices_tuple) == 3:
        return tuple(x[keep] for x in indices_tuple)
    return anchors[keep], others[keep], indices_tuple[2], indices_tuple[3]


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    r"""PML's ``CrossBatchMemory``, computing its loss from the dense (B, M) similarities, and resumable.

    Same constructor, ``forward``, attributes and semantics as PML 2.9's
    ``pytorch_metric_learning.losses.CrossBatchMemory`` (it subclasses it, so PML's
    ``DistributedLossWrapper`` and trainers accept it): the rows to remember are enqueued first,
    then the loss compares the queries with the whole memory, the batch included. Without
    ``enqueue_mask`` every row is both a query and enqueued, and a row's pair with its own memory
    slot is dropped; with it, rows where the mask is True only go to the memory and the others are
    only queries (MoCo: keys enqueued, queries scored). ``embedding_memory`` and ``label_memory``
    hold exactly what was enqueued; they follow the embeddings' device and dtype (and the labels'
    dtype) at each call, and may be assigned; ``queue_idx`` and ``has_been_filled`` are plain
    attributes; ``add_to_memory`` and ``reset_queue`` are PML's.

    With no miner and no ``indices_tuple``, NTXentLoss, SupConLoss, ContrastiveLoss,
    MultiSimilarityLoss and TripletMarginLoss (see :func:`ssl_memory.pml.dense.supports` for the
    distances and reducers covered) are computed from one (B, M) similarity matrix instead of PML's
    index tensors over all pairs or triplets: the same values and gradients, in a fraction of the
    time and memory. Every other loss in :meth:`supported_losses`, a miner or an ``indices_tuple``
    runs PML's own computation on this memory.

    Beyond PML:

    - ``start_step``: no memory term for the first ``start_step`` calls (XBM's warm-up, PML #478):
      the loss compares the batch with itself (or the queries with this batch's keys) and nothing is
      enqueued.
    - ``state_dict()`` also holds ``queue_idx``, ``has_been_filled`` and the call count (as extra
      state), so a resumed run continues exactly; PML loses them. A state_dict saved by PML's class
      loads too. It has no pointer, so the rows up to its last non-zero row are taken as the filled
      ones, the next write going after them, and a memory without a zero row is taken as full with
      the next write at slot 0 (where PML's pointer is whenever the rows written so far are a
      multiple of ``memory_size``); assign ``queue_idx`` after loading if you know better. A
      checkpoint of ours loads into PML's class with ``strict=False``.
    - Under ``torch.distributed`` it runs inside :class:`~ssl_memory.pml.DistributedLossWrapper`
      (ours, and it refuses any other caller there): every rank's rows are enqueued in rank order, so
      every rank holds the same memory (PML's wrapper gathers each rank's own rows first, PML #639),
      batch sizes may differ, bad input on any rank raises on every rank, and ``efficient=True``
      works (PML #448).
    - ``TripletMarginLoss(swap=True)`` takes the positive-negative distance between the two memory
      rows (PML 2.9 indexes the batch with memory slots: wrong values on the first call, an
      IndexError from the second, PML #748).
    - A user ``indices_tuple`` indexes the batch; its positives and negatives are mapped to the memory
      slots where the batch was written (PML 2.9 appends them unshifted, as if they were slots).
    - A batch of one row drops its self-pair too (PML 2.9 keeps it); an ``enqueue_mask`` with no True
      entry leaves the memory as it is (PML 2.9 then marks its memory full and scores the zero rows of
      unfilled slots); more masked rows than ``memory_size`` keep the newest.
    - On the dense path the loss is computed in float32 (or wider) and returned in the embeddings'
      dtype; NTXentLoss's per-pair loss is a softplus, without PML's ``+ tiny`` inside the
      logarithm, which caps a pair's loss near 87 (float32) for extreme logits.
    - Labels must be integers, and non-finite embeddings raise ``ValueError`` before anything is
      written.

    Args:
        loss: a PML loss from :meth:`supported_losses`.
        embedding_size: embedding width D.
        memory_size: number of rows M kept.
        miner: optional PML miner, called as ``miner(queries, labels, memory, memory_labels)``.
        start_step: calls before the memory is used and filled (0: from the first call).

    Shape:
        - embeddings: (B, D); labels: (B,) integers; enqueue_mask: (B,) bool.
        - output: scalar, in the embeddings' dtype.

    Example::

        >>> criterion = CrossBatchMemory(ContrastiveLoss(pos_margin=1, neg_margin=0.5), 128, memory_size=8192)
        >>> loss = criterion(embeddings, labels)
        >>> loss.backward()
    """

    def __init__(
        self, loss, embedding_size: int, memory_size: int = 1024, miner=None, start_step: int = 0, **kwargs: Any
    ) -> None:
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("memory_size", memory_size)
        check_non_negative_int("start_step", start_step)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)
        self.start_step = start_step
        self.step = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        enqueue_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if is_distributed():
            # Rows reaching forward here come from a caller that gathered them in its own order (PML's
            # wrapper puts each rank's rows first) or not at all: either way the memories would differ.
            raise RuntimeError(
                "under torch.distributed, wrap ssl_memory.pml.CrossBatchMemory in "
                "ssl_memory.pml.DistributedLossWrapper: it gathers every rank's rows in rank order (any batch "
                "sizes), so every rank holds the same memory, and raises bad input on every rank. PML's own "
                "DistributedLossWrapper gathers each rank's rows first (PML #639), and a direct call would "
                "remember only this rank's rows"
            )
        return self.forward_shared(embeddings, labels, indices_tuple, enqueue_mask)

    def forward_shared(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        enqueue_mask: torch.Tensor | None = None,
        gathered: list[torch.Tensor | None] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """These queries against a memory that receives ``gathered`` rows (by default the queries' own).

        :class:`~ssl_memory.pml.DistributedLossWrapper` calls it with every rank's rows in rank order:
        as queries too (``efficient=False``), or with ``gathered`` (every rank's embeddings, labels and
        enqueue mask) and ``offset``, where this rank's rows start in them (``efficient=True``).
        """
        labels, enqueue_mask = self._checked(embeddings, labels, indices_tuple, enqueue_mask)
        if gathered is None:
            every_rank = (embeddings, labels, enqueue_mask)
        else:
            every_rank = [None if x is None else x.to(embeddings.device) for x in gathered]
        return self._forward_rows(embeddings, labels, indices_tuple, enqueue_mask, every_rank, offset)

    def _forward_rows(self, embeddings, labels, indices_tuple, enqueue_mask, every_rank, offset) -> torch.Tensor:
        """This process's queries against a memory that receives ``every_rank``'s (embeddings, labels, mask):
        this process's own rows, or every rank's under ``efficient=True`` (this rank's from ``offset`` on)."""
        all_embeddings, all_labels, all_mask = every_rank
        self.reset_stats()
        self._follow(embeddings, labels)
        if enqueue_mask is None:
            if all_embeddings.shape[0] > self.memory_size:
                raise ValueError(
                    f"without enqueue_mask the batch must fit in the memory: got {all_embeddings.shape[0]} rows "
                    f"for memory_size={self.memory_size}"
                )
            own = offset + torch.arange(embeddings.shape[0], device=embeddings.device)
            return self._step(embeddings, labels, all_embeddings, all_labels, own, indices_tuple)
        keep = ~enqueue_mask
        return self._step(embeddings[keep], labels[keep], all_embeddings[all_mask], all_labels[all_mask], None, None)

    def _checked(self, embeddings, labels, indices_tuple, enqueue_mask):
        """Validate the inputs; return the labels and mask on the embeddings' device."""
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        check_features("embeddings", embeddings, self.embedding_size, embeddings.device)
        labels = c_f.to_device(labels, device=embeddings.device)
        check_index_vector("labels", labels, embeddings.shape[0], embeddings.device)
        if enqueue_mask is not None:
            enqueue_mask = c_f.to_device(enqueue_mask, device=embeddings.device)
            if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != labels.shape:
                raise ValueError(
                    f"enqueue_mask must be a bool tensor of shape ({labels.shape[0]},), "
                    f"got {enqueue_mask.dtype} of shape {tuple(enqueue_mask.shape)}"
                )
        return labels, enqueue_mask

    def _follow(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the memory to the embeddings' device and dtype, and its labels to the labels' dtype, as PML does."""
        self.embedding_memory = c_f.to_device(self.embedding_memory, device=embeddings.device, dtype=embeddings.dtype)
        self.label_memory = c_f.to_device(self.label_memory, device=embeddings.device, dtype=labels.dtype)

    def _step(self, queries, query_labels, keys, key_labels, own, indices_tuple) -> torch.Tensor:
        """Enqueue ``keys`` and score ``queries`` against the memory (or, in the warm-up, against ``keys``).

        ``own[i]``, when given, is the position in ``keys`` of query ``i``'s own row, whose pair is dropped.
        """
        if self.step < self.start_step:
            self.step += 1
            if own is not None and keys is queries:  # the batch against itself: PML's plain loss
                return self.loss(queries, query_labels, self._mined_with(queries, query_labels, indices_tuple))
            pairs = self._pairs(queries, query_labels, keys, key_labels, indices_tuple, own)
            return self._loss(queries, query_labels, pairs, keys, key_labels)
        self._enqueue(keys, key_labels)  # raises before writing anything if a row is not finite
        self.step += 1
        memory, memory_labels = self._contents()
        self_slots = None if own is None else self.curr_batch_idx[own]
        if self.miner is None and indices_tuple is None and dense.supports(self.loss):
            return dense.memory_loss(self.loss, queries, query_labels, memory, memory_labels, self_slots)
        if torch.is_grad_enabled():  # PML's loss keeps the rows for its backward; the next write is in place
            memory = memory.clone()
        pairs = self._pairs(queries, query_labels, memory, memory_labels, indices_tuple, self_slots)
        return self._loss(queries, query_labels, pairs, memory, memory_labels)

    def _mined_with(self, embeddings, labels, indices_tuple):
        """The miner's tuples within the batch, with the caller's, as PML's plain loss would get them."""
        if self.miner is None:
            return indices_tuple
        mined = self.miner(embeddings, labels)
        return mined if indices_tuple is None else self._joined(mined, indices_tuple, labels, None)

    def _pairs(self, queries, labels, references, ref_labels, indices_tuple, self_refs) -> tuple:
        """The miner's (or all) pairs of queries and references, without self-pairs, plus the caller's.

        ``self_refs[i]`` is the reference row holding query ``i`` itself; the caller's ``indices_tuple``
        indexes the batch, and its positives and negatives are mapped to those rows.
        """
        if self.miner is not None:
            pairs = self.miner(queries, labels, references, ref_labels)
        else:
            pairs = lmu.get_all_pairs_indices(labels, ref_labels)
        if self_refs is not None:
            pairs = _drop_self_pairs(pairs, self_refs)
        if indices_tuple is None:
            return pairs
        return self._joined(pairs, indices_tuple, labels, self_refs)

    @staticmethod
    def _joined(pairs, indices_tuple, labels, self_refs):
        if len(indices_tuple) == 3 and len(pairs) == 4:
            indices_tuple = lmu.convert_to_pairs(indices_tuple, labels)
        elif len(indices_tuple) == 4 and len(pairs) == 3:
            indices_tuple = lmu.convert_to_triplets(indices_tuple, labels)
        device = labels.device
        anchor_positions = (0,) if len(indices_tuple) == 3 else (0, 2)
        indices_tuple = tuple(
            c_f.to_device(x, device=device) if i in anchor_positions or self_refs is None else self_refs[x.to(device)]
            for i, x in enumerate(indices_tuple)
        )
        return c_f.concatenate_indices_tuples(pairs, indices_tuple)

    def _loss(self, queries, labels, pairs, references, ref_labels) -> torch.Tensor:
        if isinstance(self.loss, pml_losses.TripletMarginLoss) and self.loss.swap:
            return swap_triplet_loss(self.loss, queries, labels, pairs, references, ref_labels)
        return self.loss(queries, labels, pairs, references, ref_labels)

    def create_indices_tuple(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        E_mem: torch.Tensor,
        L_mem: torch.Tensor,
        input_indices_tuple: tuple | None,
        do_remove_self_comparisons: bool,
    ) -> tuple:
        """PML's method: the miner's (or all) pairs against the memory, plus ``input_indices_tuple`` mapped to slots."""
        self_slots = self.curr_batch_idx if do_remove_self_comparisons else None
        return self._pairs(embeddings, labels, E_mem, L_mem, input_indices_tuple, self_slots)

    @torch.no_grad()
    def _enqueue(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        """Write this process's rows (no gathering: under DDP the wrapper already did); only the newest
        ``memory_size`` can survive. Sets ``curr_batch_idx`` to the slots of the rows written."""
        rows, labels = rows.detach()[-self.memory_size :], labels[-self.memory_size :]
        self.add_to_memory(rows, labels, rows.shape[0])

    @torch.no_grad()
    def add_to_memory(self, embeddings: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        """PML's method: write ``batch_size`` rows at ``queue_idx`` (wrapping), set ``curr_batch_idx`` to their slots.

        Unlike PML's, non-finite rows raise before anything is written, no rows change nothing (PML
        marks the memory full), and more rows than ``memory_size`` keep the newest.
        """
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain NaN or infinite values; the memory was left unchanged")
        embeddings, labels = embeddings[-self.memory_size :], labels[-self.memory_size :]
        batch_size = min(batch_size, self.memory_size)
        slots = torch.arange(self.queue_idx, self.queue_idx + batch_size, device=labels.device) % self.memory_size
        self.curr_batch_idx = slots
        if batch_size == 0:
            return
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels.detach()
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        if self.queue_idx <= previous:
            self.has_been_filled = True

    def _contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows and their labels (views)."""
        if self.has_been_filled:
            return self.embedding_memory, self.label_memory
        return self.embedding_memory[: self.queue_idx], self.label_memory[: self.queue_idx]

    @property
    def num_filled(self) -> int:
        """How many rows the memory holds."""
        return self.memory_size if self.has_been_filled else int(self.queue_idx)

    def get_extra_state(self) -> dict:
        return {"queue_idx": int(self.queue_idx), "has_been_filled": bool(self.has_been_filled), "step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.queue_idx, self.has_been_filled, self.step = state["queue_idx"], state["has_been_filled"], state["step"]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: a state refused for any reason (a check below,
        a missing or unexpected key under ``strict=True``, a submodule's own check) leaves the module as it was."""
        previous = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.state_dict().items()}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            # torch raises on unexpected keys only after copying the rest: put the previous state back
            super().load_state_dict(previous, strict=False)
            raise

    def _check_state(self, state_dict, prefix) -> None:
        """Refuse a state that would corrupt the memory, naming the key, before anything is copied."""
        memory = state_dict.get(prefix + "embedding_memory")
        if isinstance(memory, torch.Tensor) and memory.is_floating_point() and not bool(torch.isfinite(memory).all()):
            raise ValueError(f"state_dict['{prefix}embedding_memory'] holds NaN or infinite values")
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return
        name = f"state_dict['{prefix}_extra_state']"
        expected = ("queue_idx", "has_been_filled", "step")
        if not isinstance(extra, dict):
            raise ValueError(f"{name} must be a dict, got {type(extra).__name__}")
        missing = [key for key in expected if key not in extra]
        if missing:
            raise ValueError(f"{name} lacks {missing} (it holds {sorted(extra)})")
        queue_idx, filled, step = (extra[key] for key in expected)
        if isinstance(queue_idx, bool) or not isinstance(queue_idx, int) or not 0 <= queue_idx < self.memory_size:
            raise ValueError(f"{name}['queue_idx'] must lie in [0, {self.memory_size}), got {queue_idx!r}")
        if not isinstance(filled, bool):
            raise ValueError(f"{name}['has_been_filled'] must be a bool, got {filled!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{name}['step'] must be a non-negative int, got {step!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self._check_state(state_dict, prefix)
        memory = state_dict.get(prefix + "embedding_memory")
        for name in ("embedding_memory", "label_memory"):  # take the saved dtype, as the saving run had it
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.dtype != getattr(self, name).dtype:
                setattr(self, name, getattr(self, name).to(saved.dtype))
        if prefix + "_extra_state" not in state_dict and isinstance(memory, torch.Tensor):
            # saved by PML's class: no pointer (see the class docstring for what is assumed)
            filled = (memory != 0).any(dim=1).nonzero()
            end = int(filled.max()) + 1 if filled.numel() else 0
            full = end == memory.shape[0]
            state = {"queue_idx": 0 if full else end, "has_been_filled": full, "step": self.start_step if end else 0}
            state_dict[prefix + "_extra_state"] = state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, start_step={self.start_step}"
