"""A drop-in for PML's ``losses.CrossBatchMemory``: dense matrix products and resumable state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .._validation import check_features, check_index_vector, check_positive_int
from ..queue import Queue
from . import dense


def _drop_self_pairs(indices_tuple: tuple, own_slots: torch.Tensor) -> tuple:
    """Remove the pairs (anchor i, memory slot of row i itself) from a pair or triplet tuple."""
    anchors, others = indices_tuple[0], indices_tuple[1]
    keep = others != own_slots[anchors]
    if len(indices_tuple) == 3:
        return tuple(x[keep] for x in indices_tuple)
    return anchors[keep], others[keep], indices_tuple[2], indices_tuple[3]


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    r"""PML's ``CrossBatchMemory`` with the loss computed by dense matrix products, on a :class:`~ssl_memory.Queue`.

    Same constructor, ``forward`` and semantics as ``pytorch_metric_learning.losses.CrossBatchMemory``
    (it subclasses it, so ``DistributedLossWrapper`` accepts it): the rows to remember are enqueued
    first, then the loss compares the queries with the whole memory, the batch included.
    Without ``enqueue_mask`` every row is both a query and enqueued, and a row's pair with its own
    memory slot is dropped; with it, rows where the mask is True only go to the memory and the others
    are only queries (MoCo: keys enqueued, queries scored).

    For ``NTXentLoss``, ``SupConLoss`` and ``ContrastiveLoss`` (see :func:`ssl_memory.pml.dense.supports`
    for the distances and reducers covered), with no miner and no ``indices_tuple``, the loss is
    computed from one (B, M) similarity matrix and the list of equal-label pairs instead of PML's index
    tensors over all pairs: the same values and gradients, hundreds of times faster with a large
    memory (PML's NTXentLoss builds a positives x negatives matrix). The memory is read through
    :meth:`Queue.similarity`, so several forwards may precede one backward (gradient accumulation).
    Any other loss, a miner or an ``indices_tuple`` runs PML's own computation on this memory.

    Differences from PML's class, all deliberate:

    - The memory, its labels, pointer and fill count are buffers of :attr:`queue`, so ``state_dict()``
      resumes exactly (PML keeps the pointer and fill flag as plain attributes). The memory follows
      the embeddings' device, and their dtype promoted to at least float32 (PML stores float16 under AMP).
    - When every consumer of the memory normalises (the loss is one of the three above with a
      normalising distance, and so is the miner's distance, if any; decided at construction), rows
      are stored L2-normalised (:attr:`unit_rows`); nothing PML computes from them changes.
    - A user ``indices_tuple`` indexes the batch; its positives and negatives are mapped to the memory
      slots where the batch was written (PML 2.9 appends them unshifted, as if they were slots).
    - A batch of one row drops its self-pair too (PML 2.9 keeps it).
    - An ``enqueue_mask`` with no True entry leaves the memory as it is (PML 2.9 then marks its memory
      full and scores the zero rows of unfilled slots).
    - NTXentLoss's per-pair loss is computed as a softplus, without PML's ``+ tiny`` inside the
      logarithm, which caps a pair's loss near 87 (float32) for extreme logits.
    - Labels must be integers, and non-finite embeddings raise ``ValueError`` before anything is written.
    - Under ``torch.distributed`` nothing is gathered here, as in PML: wrap it in
      ``DistributedLossWrapper``, which passes every rank's batch.

    Args:
        loss: a PML loss from :meth:`supported_losses`.
        embedding_size: embedding width D.
        memory_size: number of rows M kept.
        miner: optional PML miner, called as ``miner(queries, labels, memory, memory_labels)``.

    Shape:
        - embeddings: (B, D); labels: (B,) integers; enqueue_mask: (B,) bool.
        - output: scalar.

    Example::

        >>> criterion = CrossBatchMemory(NTXentLoss(temperature=0.07), 128, memory_size=4096)
        >>> q, k = F.normalize(torch.randn(256, 128), dim=1), F.normalize(torch.randn(256, 128), dim=1)
        >>> labels = torch.arange(256).repeat(2) + 1 + int(criterion.label_memory.max())
        >>> mask = torch.arange(512) >= 256  # keys go to the memory, queries are scored
        >>> loss = criterion(torch.cat([q, k]), labels, enqueue_mask=mask)
    """

    queue: Queue

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, **kwargs) -> None:
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("memory_size", memory_size)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)
        self.unit_rows = type(loss) in dense.DENSE_LOSSES and dense.distance_normalises(loss)
        if miner is not None:
            self.unit_rows = self.unit_rows and dense.distance_normalises(miner)

    def reset_queue(self) -> None:
        """Empty the memory (PML's method; also called once by PML's constructor)."""
        if "queue" in self._modules:
            self.queue.reset()
        else:
            self.queue = Queue(self.memory_size, self.embedding_size, labelled=True)

    @property
    def embedding_memory(self) -> torch.Tensor:
        """All ``memory_size`` rows, unfilled ones zero (PML's attribute)."""
        return self.queue.slots

    @property
    def label_memory(self) -> torch.Tensor:
        """All ``memory_size`` labels, unfilled ones zero (PML's attribute)."""
        return self.queue.slot_labels

    @property
    def queue_idx(self) -> int:
        """The slot the next row goes to (PML's attribute)."""
        return int(self.queue.pointer)

    @property
    def has_been_filled(self) -> bool:
        """Whether every slot holds a row (PML's attribute)."""
        return self.queue.is_full

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        enqueue_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
        elif embeddings.shape[0] > self.memory_size:
            raise ValueError(
                f"without enqueue_mask the batch must fit in the memory: got {embeddings.shape[0]} rows "
                f"for memory_size={self.memory_size}"
            )
        self.reset_stats()
        self._follow(embeddings)

        if enqueue_mask is not None:
            keys, key_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            keys, key_labels = embeddings, labels
        self.curr_batch_idx = self._enqueue(keys, key_labels)
        own_slots = None if enqueue_mask is not None else self.curr_batch_idx

        if self.miner is None and indices_tuple is None and self.unit_rows and dense.supports(self.loss):
            return dense.memory_loss(self.loss, embeddings, labels, self.queue, own_slots)
        memory, memory_labels = self.queue.features, self.queue.labels
        if memory.dtype != embeddings.dtype:
            memory = memory.to(embeddings.dtype)
        indices_tuple = self.create_indices_tuple(
            embeddings, labels, memory, memory_labels, indices_tuple, own_slots is not None
        )
        return self.loss(embeddings, labels, indices_tuple, memory, memory_labels)

    def create_indices_tuple(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        E_mem: torch.Tensor,
        L_mem: torch.Tensor,
        input_indices_tuple: tuple | None,
        do_remove_self_comparisons: bool,
    ) -> tuple:
        """The miner's (or all) pairs against the memory, plus ``input_indices_tuple`` mapped to memory slots."""
        if self.miner is not None:
            indices_tuple = self.miner(embeddings, labels, E_mem, L_mem)
        else:
            indices_tuple = lmu.get_all_pairs_indices(labels, L_mem)
        if do_remove_self_comparisons:
            indices_tuple = _drop_self_pairs(indices_tuple, self.curr_batch_idx)
        if input_indices_tuple is None:
            return indices_tuple
        if len(input_indices_tuple) == 3 and len(indices_tuple) == 4:
            input_indices_tuple = lmu.convert_to_pairs(input_indices_tuple, labels)
        elif len(input_indices_tuple) == 4 and len(indices_tuple) == 3:
            input_indices_tuple = lmu.convert_to_triplets(input_indices_tuple, labels)
        slots = self.curr_batch_idx
        anchor_positions = (0,) if len(input_indices_tuple) == 3 else (0, 2)
        shifted = tuple(
            x if i in anchor_positions else slots[c_f.to_device(x, slots)] for i, x in enumerate(input_indices_tuple)
        )
        return c_f.concatenate_indices_tuples(indices_tuple, shifted)

    def _follow(self, embeddings: torch.Tensor) -> None:
        """Move the memory to the embeddings' device and (at least float32) dtype, as PML does each step."""
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        if self.queue.slots.device != embeddings.device or self.queue.slots.dtype != dtype:
            self.queue.to(device=embeddings.device, dtype=dtype)

    @torch.no_grad()
    def _enqueue(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write this process's rows (no gathering: under DDP, DistributedLossWrapper already did) and
        return the slot of each row; rows beyond ``memory_size`` keep only the newest ones, whose slots are returned."""
        queue = self.queue
        rows, labels = rows.detach()[-queue.size :], labels[-queue.size :]
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("embeddings contain NaN or infinite values; the memory was left unchanged")
        if self.unit_rows:
            rows = F.normalize(rows, dim=1)
        slots = queue.next_slots(rows.shape[0])
        queue.enqueue(rows, labels.to(torch.long), gather=False)
        return slots

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, unit_rows={self.unit_rows}"
