"""PML's ``DistributedLossWrapper`` with the CrossBatchMemory memory in rank order, and ``efficient=True``.

PML's wrapper gathers each rank's rows as ``[own rows, the other ranks' in rank order]``, so every
rank enqueues the same rows in a different order and the memories drift apart (PML #639). Our
:class:`~ssl_memory.pml.CrossBatchMemory` puts the rows back in rank order when PML's wrapper calls
it (:func:`pml_gather_order`), and :class:`DistributedLossWrapper` gathers in rank order in the
first place and also accepts ``efficient=True`` (PML #448).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory
from pytorch_metric_learning.utils import distributed as pml_distributed

_PML_CROSS_BATCH_CALL = pml_distributed.DistributedLossWrapper.forward_cross_batch.__code__


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def pml_gather_order(module: torch.nn.Module, num_rows: int) -> torch.Tensor | None:
    """The permutation that puts rows gathered by PML's ``DistributedLossWrapper`` in rank order.

    None unless ``module`` is being called by PML's wrapper itself (found on the call stack: the
    wrapper passes nothing that says so) under a process group of more than one rank. PML gathers
    equal shares, own rows first: rank ``k``'s rows sit in block 0 on rank ``k`` itself, in block
    ``k + 1`` on higher ranks and in block ``k`` on lower ones.
    """
    world, rank = _world()
    if world <= 1:
        return None
    frame = sys._getframe(1)
    for _ in range(8):  # forward <- Module._call_impl <- Module._wrapped_call_impl <- forward_cross_batch
        if frame is None:
            return None
        if frame.f_code is _PML_CROSS_BATCH_CALL and getattr(frame.f_locals.get("self"), "loss", None) is module:
            break
        frame = frame.f_back
    else:
        return None
    share = num_rows // world
    block = [0 if k == rank else (k + 1 if k < rank else k) for k in range(world)]
    return torch.cat([torch.arange(b * share, (b + 1) * share) for b in block])


def gather_in_rank_order(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every rank's rows of each tensor, concatenated in rank order; and where this rank's rows start.

    Ranks may hold different numbers of rows. This rank's piece is the tensor itself, so gradients
    reach it (the other ranks' pieces are constants here, as in PML).
    """
    world, rank = _world()
    device = tensors[0].device
    size = torch.tensor([tensors[0].shape[0]], device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    gathered = []
    for tensor in tensors:
        # all_gather needs equal shapes: pad to the longest rank, then trim each piece
        padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        pieces = [piece[:count] for piece, count in zip(pieces, sizes)]
        pieces[rank] = tensor
        gathered.append(torch.cat(pieces))
    return gathered, sum(sizes[:rank])


class DistributedLossWrapper(pml_distributed.DistributedLossWrapper):
    r"""PML's ``DistributedLossWrapper``, gathering in rank order, with ``efficient=True`` for CrossBatchMemory.

    Same arguments and results as PML's for every loss it accepts; what differs concerns a
    ``CrossBatchMemory``:

    - Outside a process group it returns the memory's own loss (PML's raises a TypeError).
    - Rows are gathered in rank order (any number of rows per rank), so every rank enqueues the same
      rows in the same order and holds the same memory (PML #639).
    - ``efficient=True`` works with :class:`~ssl_memory.pml.CrossBatchMemory` (PML #448): every
      rank's rows are enqueued, but only this rank's queries are scored against the memory, and the
      loss returned is this rank's own (not multiplied by the world size). Its gradient equals the
      one ``efficient=False`` gives whenever the loss is a mean over queries or pairs that every rank
      holds equally many of, at 1/world_size of the cost; with PML's own class it raises, since that
      class cannot enqueue rows it does not score.

    Args:
        loss: a PML loss, PML's ``CrossBatchMemory`` or ours.
        efficient: for a plain loss, PML's meaning; for a CrossBatchMemory, see above.

    Example::

        >>> loss_fn = DistributedLossWrapper(CrossBatchMemory(ContrastiveLoss(), 128, 8192), efficient=True)
        >>> loss = loss_fn(embeddings, labels)  # this rank's batch
    """

    def __init__(self, loss: torch.nn.Module, efficient: bool = False) -> None:
        # PML's __init__ refuses efficient=True for any CrossBatchMemory before we could say why
        torch.nn.Module.__init__(self)
        if not isinstance(loss, (BaseMetricLossFunction, PMLCrossBatchMemory)):
            raise TypeError("The input loss must extend BaseMetricLossFunction or CrossBatchMemory")
        from .cross_batch_memory import CrossBatchMemory  # that module imports this one

        if efficient and isinstance(loss, PMLCrossBatchMemory) and not isinstance(loss, CrossBatchMemory):
            raise ValueError(
                "efficient=True with a CrossBatchMemory needs ssl_memory.pml.CrossBatchMemory: it enqueues every "
                "rank's rows but scores only this rank's, which PML's own CrossBatchMemory cannot do"
            )
        self.loss = loss
        self.efficient = efficient

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        if isinstance(self.loss, PMLCrossBatchMemory) and _world()[0] <= 1:
            # PML's forward hands a CrossBatchMemory ref_emb and ref_labels here, a TypeError
            return self.forward_cross_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, 1, enqueue_mask)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask)

    def forward_cross_batch(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size, enqueue_mask):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
        if world_size <= 1:
            return self.loss(emb, labels, indices_tuple, enqueue_mask)
        labels = labels.to(emb.device)
        tensors = (emb, labels) if enqueue_mask is None else (emb, labels, enqueue_mask.to(emb.device))
        gathered, offset = gather_in_rank_order(*tensors)
        all_mask = gathered[2] if enqueue_mask is not None else None
        if self.efficient:
            return self.loss.forward_shared(emb, labels, indices_tuple, enqueue_mask, gathered, offset)
        if indices_tuple is not None:  # the caller's indices point into its own rows
            indices_tuple = tuple(x.to(emb.device) + offset for x in indices_tuple)
        return self.loss(gathered[0], gathered[1], indices_tuple, all_mask) * world_size
