"""MemoryBank: one momentum-updated unit vector per training sample (NPID)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import (
    check_features,
    check_fraction,
    check_index_vector,
    check_loaded,
    check_positive_int,
    check_values,
    first_failure,
    loaded_tensor,
)
from .distributed import gather_rows
from .memory import Memory, unit_rows
from .rounding import HALF_DTYPES, to_storage


class MemoryBank(Memory):
    r"""One slot per training sample, updated with momentum after each step (Wu et al., 2018).

    For sample :math:`i` with view embeddings :math:`f_1..f_V` in a step, the entry becomes

    .. math::
        \text{bank}_i \leftarrow \operatorname{normalize}\big(m\,\text{bank}_i
        + (1 - m)\,\tfrac{1}{V}\textstyle\sum_v \hat f_v\big),
        \qquad \hat f = f / \lVert f \rVert .

    ``momentum`` weights the **old** entry, as in NPID (``m = 0.5``); ``m = 0`` replaces it.
    All state is in buffers: ``features`` (unit rows, random on the sphere at start),
    ``groups`` (the merged-instance id of each entry, ``arange`` until a
    :class:`~ssl_memory.NeighbourMerger` writes it) and ``samples_written`` (entries updated so far,
    the views of a sample in one update counting once: N of them make an epoch), so
    ``state_dict()`` resumes exactly, and ``load_state_dict`` refuses a state of the wrong shape,
    with non-finite rows or group ids out of range, leaving the bank as it was.

    Under ``torch.distributed``, :meth:`update` gathers every rank's rows in rank order before
    writing, so every rank holds the same bank; the initial entries come from a generator seeded
    with 0 unless one is given, so every rank also starts from the same bank.

    Args:
        num_entries: number of training samples N.
        dim: embedding width D.
        momentum: weight of the old entry, in [0, 1).
        dtype: storage dtype; ``torch.bfloat16`` or ``torch.float16`` halve the memory. Updates and
            similarities are computed in float32, and written back with stochastic rounding
            (:func:`~ssl_memory.rounding.to_storage`) so that small momentum steps are not lost.
        device: where the bank lives.
        generator: random generator for the initial entries (default: seeded with 0). Under
            ``torch.distributed`` it must give every rank the same draws.

    Shape:
        - ``features``: (N, D); ``groups``: (N,)
        - :meth:`update`: indices (B,), features (B, D)

    Example::

        >>> bank = MemoryBank(50_000, 128)
        >>> f = F.normalize(torch.randn(8, 128), dim=1)
        >>> bank.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), f)  # two views of samples 0-3
    """

    features: torch.Tensor
    groups: torch.Tensor
    samples_written: torch.Tensor

    def __init__(
        self,
        num_entries: int,
        dim: int,
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_entries", num_entries)
        check_positive_int("dim", dim)
        check_fraction("momentum", momentum)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.momentum = momentum
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        initial = F.normalize(torch.randn(num_entries, dim, generator=generator), dim=1)
        self.register_buffer("features", initial.to(device=device, dtype=dtype))
        self.register_buffer("groups", torch.arange(num_entries, device=device))
        self.register_buffer("samples_written", torch.zeros((), dtype=torch.long, device=device))
        self._written: tuple[tuple[int, int], int] | None = None  # host copy of samples_written, with its key

    @property
    def num_entries(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return self.num_entries

    @property
    def num_written(self) -> int:
        """``samples_written`` as an int, read from the buffer whenever it changed since the last read.

        Derived from the buffer (never counted on the host beside it), so it cannot drift from it, even
        when several threads write the bank: a read after the writes gives their total. Reading costs
        a device sync once per write; only a merger's schedule reads it.
        """
        key = (self.samples_written.data_ptr(), self.samples_written._version)
        cached = self._written
        if cached is None or cached[0] != key:
            cached = (key, int(self.samples_written))
            self._written = cached
        return cached[1]

    def readable(self) -> torch.Tensor:
        """Every entry: (N, D)."""
        return self.features

    def check(
        self,
        indices: torch.Tensor,
        features: torch.Tensor,
        names: tuple[str, str] = ("indices", "features"),
        values: bool = True,
    ) -> None:
        """Raise unless ``features`` is a finite (B, D) tensor and ``indices`` (B,) integers in [0, N), on the bank.

        ``values=False`` skips the checks that read the device (finite values, index range): shapes,
        dtypes and devices only.
        """
        device = self.features.device
        check_features(names[1], features, self.dim, device)
        check_index_vector(names[0], indices, features.shape[0], device)
        if values:
            check_values(names[1], features, indices_name=names[0], indices=indices, upper=self.num_entries)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, gather: bool = True) -> None:
        """Move the entries of ``indices`` towards ``features``; rows sharing an index are averaged first.

        Nothing is written when any check fails (on any rank, under ``torch.distributed``: every rank
        raises :class:`~ssl_memory.distributed.DistributedInputError`). ``gather=False`` writes this
        process's rows only, for a batch already gathered from every rank.
        """
        self.write(indices, features, gather, first_failure(lambda: self.check(indices, features)))

    @torch.no_grad()
    def write(
        self,
        indices: torch.Tensor,
        features: torch.Tensor,
        gather: bool,
        error: Exception | None,
        counts: list[int] | None = None,
        agreed: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """:meth:`update` for callers that checked the rows themselves (``error``: their verdict, or None).

        ``counts``: every rank's row count, when the caller exchanged them already
        (:func:`~ssl_memory.distributed.share_reads`). ``agreed``: counters that must be equal on
        every rank, checked in the same exchange (by default ``samples_written``, which a merger's
        schedule reads: ranks that disagree on it would not enter a merge round together).
        """
        if error is not None:  # this rank still joins the gather, with no rows, so every rank can raise
            indices, features = self.groups[:0], self.features.new_empty(0, self.dim, dtype=torch.float32)
        indices, features = indices.long(), unit_rows(features).float()
        if gather:
            agreed = agreed if agreed is not None else {"samples_written": self.samples_written}
            indices, features = gather_rows(indices, features, error=error, counts=counts, agreed=agreed)
        elif error is not None:
            raise error
        if indices.numel() == 0:
            return
        # Rows sharing an index form a segment of the sorted indices. Each segment's mean and new entry
        # are computed once, in a (R, D) table whose first rows are the segments, then every row writes
        # its segment's entry (duplicates agree, stochastic rounding included). No unique(): nothing
        # here waits for the device.
        ordered, order = torch.sort(indices)
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        segment = torch.empty_like(order).index_copy_(0, order, starts.cumsum(0) - 1)
        entry = torch.zeros_like(indices).index_copy_(0, segment, indices)  # rows past the segments: entry 0, unused
        sums = features.new_zeros(features.shape).index_add_(0, segment, features)
        views = features.new_zeros(features.shape[0]).index_add_(0, segment, features.new_ones(features.shape[0]))
        old = self.features[entry].float()
        moved = self.momentum * old + (1 - self.momentum) * sums / views.clamp(min=1).unsqueeze(1)
        # views that cancel exactly (v and -v) leave no direction to move to: the entry keeps its value
        norm = moved.norm(dim=1, keepdim=True)
        new = torch.where(norm > 0, moved / norm.clamp(min=1e-30), old)
        # half-precision storage rounds stochastically, seeded by the count written (the same on every rank)
        seed = self.num_written if self.features.dtype in HALF_DTYPES else 0
        self.features.index_copy_(0, indices, to_storage(new, self.features.dtype, seed=seed)[segment])
        self.samples_written.add_(starts.sum())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_loaded_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_loaded_state(self, state_dict, prefix: str) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds a bank state (under ``prefix``) that would corrupt it."""
        features = loaded_tensor(state_dict, prefix, "features", (self.num_entries, self.dim), floating=True)
        groups = loaded_tensor(state_dict, prefix, "groups", (self.num_entries,), floating=False)
        written = loaded_tensor(state_dict, prefix, "samples_written", (), floating=False)
        if features is not None:
            check_loaded(prefix + "features", bool(torch.isfinite(features).all()), "holds NaN or infinite values")
        if groups is not None and groups.numel():
            low, high = (int(v) for v in torch.aminmax(groups))
            check_loaded(
                prefix + "groups",
                low >= 0 and high < self.num_entries,
                f"must hold entry ids in [0, {self.num_entries}), got values in [{low}, {high}]",
            )
        if written is not None:
            check_loaded(prefix + "samples_written", int(written) >= 0, f"must be non-negative, got {int(written)}")

    def extra_repr(self) -> str:
        return f"num_entries={self.num_entries}, dim={self.dim}, momentum={self.momentum}, dtype={self.features.dtype}"
