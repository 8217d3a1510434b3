"""Queue: a FIFO ring of the most recent embeddings, optionally with labels (MoCo, XBM)."""

from __future__ import annotations

import torch

from ._validation import check_features, check_index_vector, check_positive_int
from .distributed import gather_rows
from .memory import Memory


class Queue(Memory):
    r"""A first-in first-out memory of the ``size`` most recent embeddings.

    :meth:`enqueue` accepts any batch size: ``size`` need not be a multiple of it, a batch that
    crosses the end of the ring wraps around, and a batch longer than ``size`` keeps its last
    ``size`` rows. Rows are stored as given (the losses enqueue unit vectors). With
    ``labelled=True`` each row keeps an integer label (XBM keeps class labels; MoCo needs none).

    The ring, its labels, the write ``pointer`` and the fill ``count`` are buffers, so
    ``state_dict()`` restores the exact queue. Under ``torch.distributed`` every rank's batch is
    gathered in rank order before writing, so all ranks hold the same queue.

    Args:
        size: capacity M.
        dim: embedding width D.
        labelled: keep an integer label per row.
        dtype: storage dtype of the embeddings.
        device: where the queue lives.

    Shape:
        - :meth:`enqueue`: features (B, D), labels (B,)
        - :attr:`features`: (min(seen, M), D), :attr:`labels`: (min(seen, M),), in ring order
          (once full, the oldest row is at ``pointer``).

    Example::

        >>> queue = Queue(4096, 128)
        >>> queue.enqueue(F.normalize(torch.randn(256, 128), dim=1))
        >>> len(queue), queue.is_full
        (256, False)
    """

    slots: torch.Tensor
    slot_labels: torch.Tensor | None
    pointer: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        labelled: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__("slots")
        check_positive_int("size", size)
        check_positive_int("dim", dim)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.labelled = labelled
        self.register_buffer("slots", torch.zeros(size, dim, device=device, dtype=dtype))
        self.register_buffer("slot_labels", torch.zeros(size, dtype=torch.long, device=device) if labelled else None)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self.slots.shape[0]

    @property
    def dim(self) -> int:
        return self.slots.shape[1]

    def __len__(self) -> int:
        return int(self.count)

    def _num_readable(self) -> int:
        return int(self.count)

    @property
    def is_full(self) -> bool:
        return int(self.count) == self.size

    @property
    def features(self) -> torch.Tensor:
        """The valid rows (a view, not a copy)."""
        return self.slots[: int(self.count)]

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the valid rows (a view)."""
        if self.slot_labels is None:
            # not AttributeError: nn.Module.__getattr__ would replace this message with a generic one
            raise RuntimeError("this Queue was built with labelled=False and keeps no labels")
        return self.slot_labels[: int(self.count)]

    def next_slots(self, num_rows: int) -> torch.Tensor:
        """The slots that enqueuing ``num_rows`` rows (at most ``size``) will write, in order."""
        return (int(self.pointer) + torch.arange(num_rows, device=self.slots.device)) % self.size

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor | None = None, gather: bool = True) -> None:
        """Append rows (and their labels), overwriting the oldest once full.

        Nothing is written when any check fails (on any rank, under ``torch.distributed``).
        ``gather=False`` writes this process's rows only: for callers whose batch was already
        gathered from every rank (PML's ``DistributedLossWrapper``).
        """
        device = self.slots.device
        check_features("features", features, self.dim, device)
        if self.labelled:
            if labels is None:
                raise ValueError("labels are required: this Queue was built with labelled=True")
            check_index_vector("labels", labels, features.shape[0], device)
        elif labels is not None:
            raise ValueError("labels were given to a Queue built with labelled=False; build it with labelled=True")
        finite = bool(torch.isfinite(features).all())
        tensors = (features, labels) if self.labelled else (features,)
        gathered = gather_rows(*tensors, finite=finite) if gather else tensors
        if not finite:  # gather_rows raises for every rank; a local write still must not store NaN
            raise ValueError("features contain NaN or infinite values; the memory was left unchanged")
        self._sync_before_first_write()
        gathered = [t[-self.size :] for t in gathered]  # only the newest `size` rows can survive
        num_rows = gathered[0].shape[0]
        if num_rows == 0:
            return
        slots = self.next_slots(num_rows)
        self._write_rows_(slots, gathered[0])
        if self.labelled:
            self.slot_labels.index_copy_(0, slots, gathered[1].to(torch.long))
        self.pointer.fill_((int(self.pointer) + num_rows) % self.size)
        self.count.fill_(min(int(self.count) + num_rows, self.size))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.slots.zero_()
        if self.slot_labels is not None:
            self.slot_labels.zero_()
        self.pointer.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, labelled={self.labelled}, dtype={self.slots.dtype}"
