"""ShardedMemoryBank: a MemoryBank split across the ranks of torch.distributed, each rank storing about N / W rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

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
from .bank import MemoryBank
from .distributed import gather_rows, is_distributed, rank


def _world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class ShardedMemoryBank(nn.Module):
    r"""A :class:`~ssl_memory.MemoryBank` whose N entries are split across the W ranks of a process group.

    **Ownership rule:** entry :math:`i` lives on rank :math:`i \bmod W`, at row :math:`\lfloor i / W
    \rfloor` of that rank's shard, so each rank stores :math:`\lceil (N - r) / W \rceil` rows and a batch
    of consecutive indices spreads evenly over the ranks. The shard is a :class:`~ssl_memory.MemoryBank`
    (:attr:`shard`) with the same momentum update and storage ``dtype`` (stochastic rounding in half
    precision). The merge ``groups`` (N,) and ``samples_written`` are replicated: every rank holds the
    same copy (8 bytes per entry), so merge groups may span shards.

    :meth:`update` gathers every rank's rows, as :meth:`MemoryBank.update` does, and each rank writes
    only the rows it owns (the mean of their views, then the momentum step): after it the union of
    the shards equals the bank a replicated :class:`~ssl_memory.MemoryBank` would hold. Bad input on
    any rank raises :class:`~ssl_memory.DistributedInputError` on every rank and writes nothing.
    :class:`~ssl_memory.ShardedMemoryBankLoss` reads it.

    The initial shard of rank r is random on the sphere from a generator seeded with r (unless one is
    given). ``state_dict()`` holds this rank's shard and its ``layout`` (rank, W); it loads back on
    the same layout only. :meth:`load_shards` loads the states of all the ranks of a run on any number
    of ranks (or a :class:`~ssl_memory.MemoryBank` state), :meth:`full_state_dict` gives the whole
    bank as a ``MemoryBank`` state: checkpoints move between world sizes and to and from replicated banks.

    Args:
        num_entries: N, at least the world size.
        dim: embedding width D.
        momentum: weight of the old entry, in [0, 1).
        dtype: storage dtype of the shard (``torch.bfloat16`` or ``torch.float16`` halve it).
        device: where the shard lives.
        generator: random generator for this rank's initial rows (default: seeded with the rank).

    Shape:
        - ``shard.features``: (ceil((N - rank) / W), D); ``groups``: (N,)
        - :meth:`update`: indices (B,), features (B, D)

    Example::

        >>> bank = ShardedMemoryBank(1_281_167, 128, dtype=torch.bfloat16)  # after init_process_group
        >>> bank.shard.features.shape  # on rank 0 of 8
        torch.Size([160146, 128])
    """

    groups: torch.Tensor
    samples_written: torch.Tensor
    layout: torch.Tensor

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
        check_fraction("momentum", momentum)
        world, here = _world_size(), rank()
        if num_entries < world:
            raise ValueError(f"num_entries must be at least the world size {world}, got {num_entries}")
        if generator is None:
            generator = torch.Generator().manual_seed(here)
        self.shard = MemoryBank(_shard_size(num_entries, world, here), dim, momentum, dtype, device, generator)
        device = self.shard.features.device
        self.register_buffer("groups", torch.arange(num_entries, device=device))
        self.register_buffer("samples_written", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("layout", torch.tensor([here, world], device=device))  # saved, so a load can check it
        self._rank, self._world = here, world  # host copies: no device read per step
        self._written: tuple[tuple[int, int], int] | None = None

    @property
    def num_entries(self) -> int:
        return self.groups.shape[0]

    @property
    def dim(self) -> int:
        return self.shard.dim

    @property
    def momentum(self) -> float:
        return self.shard.momentum

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def __len__(self) -> int:
        return self.num_entries

    @property
    def num_written(self) -> int:
        """``samples_written`` as an int, from a host copy (no device sync unless the buffer changed elsewhere)."""
        key = (self.samples_written.data_ptr(), self.samples_written._version)
        if self._written is None or self._written[0] != key:
            self._written = (key, int(self.samples_written))
        return self._written[1]

    def owned_entries(self) -> torch.Tensor:
        """The global indices of this rank's rows, in shard order: ``rank, rank + W, rank + 2W, ...``."""
        return torch.arange(self.rank, self.num_entries, self.world_size, device=self.groups.device)

    def check(self, indices: torch.Tensor, features: torch.Tensor, names: tuple[str, str] = ("indices", "features")):
        """Raise unless ``features`` is a finite (B, D) tensor and ``indices`` (B,) integers in [0, N), on the bank."""
        device = self.groups.device
        check_features(names[1], features, self.dim, device)
        check_index_vector(names[0], indices, features.shape[0], device)
        check_values(names[1], features, indices_name=names[0], indices=indices, upper=self.num_entries)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, gather: bool = True) -> None:
        """Move the entries of ``indices`` towards ``features`` on their owners; rows sharing an index are averaged.

        ``gather=False`` takes ``indices`` and ``features`` as the batch of every rank, already gathered.
        """
        self.write(indices, features, gather, first_failure(lambda: self.check(indices, features)))

    @torch.no_grad()
    def write(self, indices: torch.Tensor, features: torch.Tensor, gather: bool, error: Exception | None) -> None:
        """:meth:`update` for callers that checked the rows themselves (``error``: their verdict, or None)."""
        if error is not None:  # this rank still joins the gather, with no rows, so every rank can raise
            indices, features = self.groups[:0], self.shard.features.new_empty(0, self.dim, dtype=torch.float32)
        if gather:
            indices, features = gather_rows(indices.long(), features.float(), error=error)
        elif error is not None:
            raise error
        indices = indices.long()
        owned = indices % self.world_size == self.rank
        self.shard.write(indices[owned] // self.world_size, features[owned], gather=False, error=None)
        count = indices.unique().numel()
        written = self.num_written + count
        self.samples_written.add_(count)
        self._written = ((self.samples_written.data_ptr(), self.samples_written._version), written)

    @torch.no_grad()
    def gather_features(self, dst: int | None = None) -> torch.Tensor | None:
        """The whole (N, D) bank in global order and storage dtype, on every rank (``dst=None``) or on ``dst``.

        Holds all N rows on the receiving rank(s): for checkpoints, evaluation and the merger, not for
        every step. Ranks other than ``dst`` get None.
        """
        local = self.shard.features
        if not is_distributed():
            return local.clone()
        world, longest = self.world_size, self.shard.num_entries if self.rank == 0 else 0
        longest = _shard_size(self.num_entries, world, 0)  # rank 0 holds the most rows
        padded = local.new_zeros(longest, self.dim)
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(world)] if dst is None or dst == self.rank else None
        if dst is None:
            dist.all_gather(pieces, padded)
        else:
            dist.gather(padded, pieces, dst=dst)
        if pieces is None:
            return None
        full = local.new_empty(self.num_entries, self.dim)
        for owner, piece in enumerate(pieces):
            full[owner::world] = piece[: _shard_size(self.num_entries, world, owner)]
        return full

    def merge_view(self) -> MergeView:
        """What a :class:`~ssl_memory.NeighbourMerger` reads: pass it to ``merger.step`` or ``merger.merge``."""
        return MergeView(self)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole bank as a :class:`~ssl_memory.MemoryBank` ``state_dict`` (features, groups, samples_written).

        A collective: every rank must call it, and every rank receives all N rows.
        """
        return {
            "features": self.gather_features(),
            "groups": self.groups.clone(),
            "samples_written": self.samples_written.clone(),
        }

    @torch.no_grad()
    def load_shards(self, states: Sequence[Mapping[str, torch.Tensor]], prefix: str = "") -> None:
        """Load this rank's rows from the saved states of every rank of a run, on any number of ranks.

        ``states`` lists the ``state_dict()`` of each rank of the saving run (any order), or holds one
        :class:`~ssl_memory.MemoryBank` ``state_dict`` (:meth:`full_state_dict` gives one). Only the
        rows this rank owns are kept; each state's rows are read once, so a rank needs its shard plus
        one saved shard at a time. Every state is checked before anything is written. Not a collective.
        ``prefix`` is the bank's key prefix in the states (``"memory."`` in a loss's ``state_dict``).
        """
        if not states:
            raise ValueError("states must hold at least one state_dict, got none")
        layouts = [_saved_layout(state, prefix) for state in states]
        saved_world = layouts[0][1]
        seen = sorted(r for r, _ in layouts)
        if any(w != saved_world for _, w in layouts) or seen != list(range(saved_world)):
            raise ValueError(f"states must be the states of ranks 0..W-1 of one run, got layouts {layouts}")
        n, d, own = self.num_entries, self.dim, self.owned_entries()
        rows = torch.empty_like(self.shard.features)
        for state, (saved_rank, _) in zip(states, layouts):
            key = prefix + ("shard.features" if prefix + "layout" in state else "features")
            features = loaded_tensor(state, "", key, (_shard_size(n, saved_world, saved_rank), d), floating=True)
            check_loaded(key, features is not None, "is missing")
            check_loaded(key, bool(torch.isfinite(features).all()), "holds NaN or infinite values")
            saved = torch.arange(saved_rank, n, saved_world, device=own.device)
            mine = saved % self.world_size == self.rank
            rows[saved[mine] // self.world_size] = features.to(rows.device, rows.dtype)[mine]
        groups = loaded_tensor(states[0], prefix, "groups", (n,), floating=False)
        written = loaded_tensor(states[0], prefix, "samples_written", (), floating=False)
        check_loaded(prefix + "groups", groups is not None and written is not None, "and samples_written are missing")
        low, high = (int(v) for v in torch.aminmax(groups))
        check_loaded(prefix + "groups", low >= 0 and high < n, f"must hold entry ids in [0, {n}), got [{low}, {high}]")
        self.shard.features.copy_(rows)
        self.groups.copy_(groups)
        self.samples_written.copy_(written)
        self.shard.samples_written.copy_(written)  # the seed of its stochastic rounding

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_loaded_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_loaded_state(self, state_dict, prefix: str) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds a shard state (under ``prefix``) that would corrupt it."""
        layout = loaded_tensor(state_dict, prefix, "layout", (2,), floating=False)
        if layout is not None:
            check_loaded(
                prefix + "layout",
                layout.tolist() == [self.rank, self.world_size],
                f"is (rank, world size) {layout.tolist()} but this bank is {[self.rank, self.world_size]}: "
                "load the states of every rank with load_shards() instead",
            )
        groups = loaded_tensor(state_dict, prefix, "groups", (self.num_entries,), floating=False)
        if groups is not None and groups.numel():
            low, high = (int(v) for v in torch.aminmax(groups))
            n = self.num_entries
            check_loaded(prefix + "groups", low >= 0 and high < n, f"must lie in [0, {n}), got [{low}, {high}]")

    def extra_repr(self) -> str:
        return (
            f"num_entries={self.num_entries}, dim={self.dim}, momentum={self.momentum}, "
            f"dtype={self.shard.features.dtype}, rank={self.rank}, world_size={self.world_size}"
        )


class MergeView:
    """A sharded bank as :class:`~ssl_memory.NeighbourMerger` sees a :class:`~ssl_memory.MemoryBank`.

    The merger runs its round on rank 0 and broadcasts the groups. Reading :attr:`features` (which the
    merger does once per round, on every rank) gathers the whole bank to rank 0; the other ranks get a
    zero-stride placeholder of the same shape. Memory limit: rank 0 holds N x D in the storage dtype
    (25.6 GB for N = 10^8, D = 128 in bfloat16) on top of its shard and of the search's own memory;
    the other ranks hold nothing more. :attr:`groups` is the bank's own buffer, written in place.
    """

    features_on_every_rank = False  # rank 0 holds the rows, so a merger's divergence check skips them

    def __init__(self, bank: ShardedMemoryBank) -> None:
        self.bank = bank

    @property
    def features(self) -> torch.Tensor:
        full = self.bank.gather_features(dst=0)
        if full is None:
            return self.bank.shard.features.new_zeros(1, 1).expand(self.bank.num_entries, self.bank.dim)
        return full

    @property
    def groups(self) -> torch.Tensor:
        return self.bank.groups

    @property
    def num_entries(self) -> int:
        return self.bank.num_entries

    @property
    def num_written(self) -> int:
        return self.bank.num_written


def _shard_size(num_entries: int, world: int, owner: int) -> int:
    """Rows of rank ``owner`` under the rule "entry i lives on rank i mod W"."""
    return (num_entries - owner + world - 1) // world


def _saved_layout(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    if prefix + "layout" not in state:
        return (0, 1)  # a MemoryBank's state: one rank holding every entry
    layout = loaded_tensor(state, prefix, "layout", (2,), floating=False)
    return tuple(int(v) for v in layout)  # type: ignore[return-value]
