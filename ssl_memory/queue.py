"""Queue: a FIFO ring of the most recent embeddings, optionally with labels (MoCo, XBM)."""

from __future__ import annotations

import torch

from ._validation import (
    check_features,
    check_index_vector,
    check_loaded,
    check_positive_int,
    check_values,
    first_failure,
    loaded_tensor,
)
from .distributed import gather_rows
from .memory import Memory


class Queue(Memory):
    r"""A first-in first-out memory of the ``size`` most recent embeddings.

    :meth:`enqueue` accepts any batch size: ``size`` need not be a multiple of it, a batch that
    crosses the end of the ring wraps around, and a batch longer than ``size`` keeps its last
    ``size`` rows. Rows are stored as given (the losses enqueue unit vectors). With
    ``labelled=True`` each row keeps an integer label (XBM keeps class labels; MoCo needs none).

    The ring, its labels, the write ``pointer`` and the fill ``count`` are buffers, so
    ``state_dict()`` restores the exact queue; ``load_state_dict`` refuses a state of the wrong shape,
    with non-finite rows, a count above ``size`` or a pointer out of range, leaving the queue as it
    was. Under ``torch.distributed`` every rank's batch is gathered in rank order before writing, so
    all ranks hold the same queue.

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
        super().__init__()
        check_positive_int("size", size)
        check_positive_int("dim", dim)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.labelled = labelled
        self.register_buffer("slots", torch.zeros(size, dim, device=device, dtype=dtype))
        self.register_buffer("slot_labels", torch.zeros(size, dtype=torch.long, device=device) if labelled else None)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))
        self._count: tuple[tuple[int, int], int] | None = None  # host copy of count, with its key

    # Eager under torch.compile: dynamo cannot trace the data-pointer key, and would break the graph around it.
    @torch.compiler.disable
    def _filled(self) -> int:
        """``count`` as an int, from a host copy kept by :meth:`write`: a device sync only after an outside change."""
        key = (self.count.data_ptr(), self.count._version)
        cached = self._count
        if cached is None or cached[0] != key:
            cached = (key, int(self.count))
            self._count = cached
        return cached[1]

    @property
    def size(self) -> int:
        return self.slots.shape[0]

    @property
    def dim(self) -> int:
        return self.slots.shape[1]

    def __len__(self) -> int:
        return self._filled()

    def readable(self) -> torch.Tensor:
        """The filled rows (:attr:`features`)."""
        return self.features

    @property
    def is_full(self) -> bool:
        return self._filled() == self.size

    @property
    def features(self) -> torch.Tensor:
        """The valid rows (a view, not a copy)."""
        return self.slots[: self._filled()]

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the valid rows (a view)."""
        if self.slot_labels is None:
            # not AttributeError: nn.Module.__getattr__ would replace this message with a generic one
            raise RuntimeError("this Queue was built with labelled=False and keeps no labels")
        return self.slot_labels[: self._filled()]

    def next_slots(self, num_rows: int) -> torch.Tensor:
        """The slots that enqueuing ``num_rows`` rows (at most ``size``) will write, in order."""
        return (self.pointer + torch.arange(num_rows, device=self.slots.device)) % self.size

    def check(
        self, features: torch.Tensor, labels: torch.Tensor | None = None, name: str = "features", values: bool = True
    ) -> None:
        """Raise unless ``features`` is a finite (B, D) tensor on the queue's device, with (B,) labels iff labelled.

        ``values=False`` skips the one check that reads the device (finite values): shapes, dtypes and
        devices only.
        """
        device = self.slots.device
        check_features(name, features, self.dim, device)
        if self.labelled:
            if labels is None:
                raise ValueError("labels are required: this Queue was built with labelled=True")
            check_index_vector("labels", labels, features.shape[0], device)
        elif labels is not None:
            raise ValueError("labels were given to a Queue built with labelled=False; build it with labelled=True")
        if not values:
            return
        # rows must also fit the storage dtype: a float16 ring would store inf for 1e5
        stored = features if features.dtype == self.slots.dtype else features.to(self.slots.dtype)
        check_values(name if stored is features else f"{name} (stored as {self.slots.dtype})", stored)

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor | None = None, gather: bool = True) -> None:
        """Append rows (and their labels), overwriting the oldest once full.

        Nothing is written when any check fails (on any rank, under ``torch.distributed``: every rank
        raises :class:`~ssl_memory.distributed.DistributedInputError`). ``gather=False`` writes this
        process's rows only: for callers whose batch was already gathered from every rank (PML's
        ``DistributedLossWrapper``).
        """
        self.write(features, labels, gather, first_failure(lambda: self.check(features, labels)))

    @torch.no_grad()
    def write(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None,
        gather: bool,
        error: Exception | None,
        counts: list[int] | None = None,
    ) -> None:
        """:meth:`enqueue` for callers that checked the rows themselves (``error``: their verdict, or None).

        ``counts``: every rank's row count, when the caller exchanged them already
        (:func:`~ssl_memory.distributed.share_reads`).
        """
        if error is not None:  # this rank still joins the gather, with no rows, so every rank can raise
            features, labels = self.slots[:0], self.pointer.new_empty(0)
        tensors = (features.to(self.slots.dtype),) + ((labels.long(),) if self.labelled else ())
        if gather:
            tensors = gather_rows(*tensors, error=error, counts=counts)
        elif error is not None:
            raise error
        tensors = [t[-self.size :] for t in tensors]  # only the newest `size` rows can survive
        num_rows = tensors[0].shape[0]
        if num_rows == 0:
            return
        filled = self._filled()
        slots = self.next_slots(num_rows)
        self.slots.index_copy_(0, slots, tensors[0])
        if self.labelled:
            self.slot_labels.index_copy_(0, slots, tensors[1])
        self.pointer.add_(num_rows).remainder_(self.size)
        self.count.add_(num_rows).clamp_(max=self.size)
        self._count = ((self.count.data_ptr(), self.count._version), min(filled + num_rows, self.size))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.slots.zero_()
        if self.slot_labels is not None:
            self.slot_labels.zero_()
        self.pointer.zero_()
        self.count.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_loaded_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_loaded_state(self, state_dict, prefix: str) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds a queue state (under ``prefix``) that would corrupt it."""
        slots = loaded_tensor(state_dict, prefix, "slots", (self.size, self.dim), floating=True)
        if self.labelled:
            loaded_tensor(state_dict, prefix, "slot_labels", (self.size,), floating=False)
        pointer = loaded_tensor(state_dict, prefix, "pointer", (), floating=False)
        count = loaded_tensor(state_dict, prefix, "count", (), floating=False)
        if slots is not None:
            check_loaded(prefix + "slots", bool(torch.isfinite(slots).all()), "holds NaN or infinite values")
        size = self.size
        if count is not None:
            check_loaded(prefix + "count", 0 <= int(count) <= size, f"must lie in [0, {size}], got {int(count)}")
        if pointer is not None:
            check_loaded(prefix + "pointer", 0 <= int(pointer) < size, f"must lie in [0, {size}), got {int(pointer)}")
        if count is not None and pointer is not None and int(count) < size:
            # until the ring is full, rows are written from slot 0 on, so the pointer is the count
            check_loaded(
                prefix + "pointer",
                int(pointer) == int(count),
                f"must equal count ({int(count)}) while the queue is not full, got {int(pointer)}",
            )

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, labelled={self.labelled}, dtype={self.slots.dtype}"
