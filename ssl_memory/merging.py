"""NeighbourMerger: gradually merge near-duplicate samples of a MemoryBank into groups (Bulat et al., 2021).

A round finds each entry's nearest neighbour outside its own group, keeps the pairs that are
each other's nearest neighbour, and merges the most similar share of them; groups are closed
under transitivity and never split. :class:`~ssl_memory.MemoryBankLoss` then treats every entry
of a sample's group as a positive for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ._validation import check_positive_int
from .distributed import is_distributed, rank
from .neighbours import NeighbourSearch, check_backend, make_search, nearest_neighbours


@dataclass
class MergeReport:
    """What one merge round did.

    Attributes:
        pairs_merged: mutual nearest-neighbour pairs merged this round.
        entries_in_merged_groups: entries that belong to a group of two or more after the round.
        num_groups: groups after the round (singletons included).
        seconds: wall time of the round (search, selection, union, broadcast).
        share: the share of candidate pairs this round was allowed to merge.
        candidate_pairs: mutual nearest-neighbour pairs found this round, before the share and floor.
    """

    pairs_merged: int
    entries_in_merged_groups: int
    num_groups: int
    seconds: float
    share: float
    candidate_pairs: int


def canonical_groups(groups: torch.Tensor) -> torch.Tensor:
    """Relabel groups so that each group's id is its smallest member index; the partition is unchanged.

    Example::

        >>> canonical_groups(torch.tensor([5, 9, 5, 9, 2]))
        tensor([0, 1, 0, 1, 4])
    """
    ids, inverse = torch.unique(groups, return_inverse=True)
    positions = torch.arange(groups.numel(), device=groups.device)
    smallest = torch.full_like(ids, groups.numel(), dtype=torch.long)
    return smallest.scatter_reduce_(0, inverse, positions, "amin")[inverse]


def union_groups(groups: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Join the groups of ``left[p]`` and ``right[p]`` for every pair ``p``, closing under transitivity.

    Vectorised union-find over the group ids: every root joined to a smaller root points to the
    smallest such root (a scatter ``amin``), pointers are then shortened by jumping
    (``parent = parent[parent]``) until each points at its root, and this repeats until every pair
    shares a root. Each pass settles at least one pair, and in practice a handful of passes suffice.
    Roots only ever move to smaller ids, so a group's id stays its smallest member.

    Args:
        groups: canonical group ids (each group's smallest member index, see :func:`canonical_groups`).
        left, right: entries to join, pairwise.

    Returns:
        The new canonical group ids; no group is ever split.

    Shape:
        - groups: (N,); left, right: (P,); output: (N,)
    """
    parent = torch.arange(groups.numel(), device=groups.device)
    u, v = groups[left], groups[right]
    while u.numel():
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        if not u.numel():
            break
        parent.scatter_reduce_(0, torch.maximum(ru, rv), torch.minimum(ru, rv), "amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return parent[groups]


class NeighbourMerger(nn.Module):
    r"""Merges mutual nearest neighbours of a :class:`~ssl_memory.MemoryBank` into groups, on a schedule.

    One round (:meth:`merge`, or calling the module):

    1. every entry :math:`i` finds its nearest neighbour :math:`n(i)` by cosine similarity among the
       entries **outside its own group** (so a group keeps growing from round to round instead of
       finding its own members again);
    2. pairs with :math:`n(n(i)) = i` (mutual nearest neighbours) are the candidates;
    3. they are ranked by similarity and the top :math:`\lfloor s_r \cdot \#\text{candidates}\rfloor`
       are merged, skipping any below ``min_similarity``;
    4. groups are joined with union-find (transitive closure); a group's id is its smallest member
       index, and ``memory.groups`` is overwritten in place.

    The share grows linearly with the rounds already done, :math:`s_r = \min(\text{max\_share},
    \text{initial\_share} + r \cdot \text{share\_growth})`.

    :meth:`step` is meant to be called once per training step (``MemoryBankLoss`` does): it counts
    steps and runs a round after ``warmup * steps_per_epoch`` steps, then every
    ``interval * steps_per_epoch`` steps. With the default ``steps_per_epoch=1`` the unit is one
    call, which suits calling :meth:`step` once per epoch yourself; when the loss calls it every
    step, pass ``steps_per_epoch=len(loader)``. The counters are buffers, so ``state_dict()``
    resumes the schedule exactly.

    Under ``torch.distributed`` rank 0 computes the round and broadcasts the groups, so every rank
    holds the same groups (every rank must call :meth:`merge` / :meth:`step` together).

    Defaults and why:

    - ``warmup=10`` epochs: an entry is refreshed about once an epoch with NPID's momentum 0.5, so
      after 10 epochs its random initial value weighs :math:`0.5^{10} \approx 0.001`: the
      neighbours found are the network's, not the initialisation's.
    - ``interval=1`` epoch: each entry changes about once an epoch, so more frequent rounds would
      mostly see the same bank (the paper merges periodically, e.g. once per epoch).
    - ``initial_share=0.05``, ``share_growth=0.05``, ``max_share=0.25``: AND (Huang et al., 2019)
      grows its share of merged anchors linearly over five rounds; here groups accumulate across
      rounds (AND recomputes them each round), so each round takes a fifth of that: 5% of the
      candidate pairs at first, 25% from the fifth round on.
    - ``min_similarity=0.5``: above the nearest-neighbour cosine of unrelated 128-d unit vectors
      (about :math:`\sqrt{2 \ln N / D} \approx 0.47` for N = 1.28M), so a bank that has learnt nothing
      never merges.
    - ``backend="auto"``: exact torch search below ``faiss_threshold`` rows or on a GPU; faiss IVF on
      CPU above it when faiss is installed.
    - ``faiss_threshold=200_000``: below it an exact round takes at most a few minutes on two CPU
      cores (about 25 s at N = 100,000, growing as :math:`N^2 D`); above it faiss IVF takes about a
      minute even at N = 1.28M (``benchmarks/merger_scale.py``).

    Args:
        warmup: steps (in units of ``steps_per_epoch``) before the first round; 0 allowed.
        interval: steps (in units of ``steps_per_epoch``) between rounds.
        steps_per_epoch: how many :meth:`step` calls make one unit of ``warmup`` and ``interval``.
        initial_share: share of the candidate pairs merged in the first round, in [0, 1].
        share_growth: added to the share after each round, in [0, 1].
        max_share: cap on the share, in [0, 1].
        min_similarity: pairs less similar than this are never merged, in [-1, 1].
        backend: ``"auto"``, ``"torch"``, ``"faiss-flat"``, ``"faiss-ivf"``, ``"faiss-hnsw"``, or a
            configured :class:`~ssl_memory.neighbours.NeighbourSearch` such as
            ``FaissIVFSearch(nprobe=16)``.
        chunk_size: query rows per block of the torch search (``None``: blocks of about 2**26 similarities).
        faiss_threshold: bank size from which ``"auto"`` uses faiss on CPU.

    Shape:
        - ``memory.features``: (N, D); ``memory.groups``: (N,)

    Example::

        >>> bank = MemoryBank(50_000, 128)
        >>> merger = NeighbourMerger(warmup=10, steps_per_epoch=len(loader))
        >>> criterion = MemoryBankLoss(memory=bank, merger=merger)
        >>> report = merger(bank)  # or one round now, e.g. at the end of an epoch
        >>> report.pairs_merged, report.num_groups
    """

    steps: torch.Tensor
    rounds: torch.Tensor

    def __init__(
        self,
        warmup: int = 10,
        interval: int = 1,
        steps_per_epoch: int = 1,
        initial_share: float = 0.05,
        share_growth: float = 0.05,
        max_share: float = 0.25,
        min_similarity: float = 0.5,
        backend: str | NeighbourSearch = "auto",
        chunk_size: int | None = None,
        faiss_threshold: int = 200_000,
    ) -> None:
        super().__init__()
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        check_positive_int("interval", interval)
        check_positive_int("steps_per_epoch", steps_per_epoch)
        for name, value in (("initial_share", initial_share), ("share_growth", share_growth), ("max_share", max_share)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if initial_share > max_share:
            raise ValueError(f"initial_share ({initial_share!r}) must not exceed max_share ({max_share!r})")
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity must lie in [-1, 1], got {min_similarity!r}")
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        check_positive_int("faiss_threshold", faiss_threshold)
        check_backend(backend)  # fail on every rank at construction, not inside a collective
        self.warmup, self.interval, self.steps_per_epoch = warmup, interval, steps_per_epoch
        self.initial_share, self.share_growth, self.max_share = initial_share, share_growth, max_share
        self.min_similarity = min_similarity
        self.backend, self.chunk_size, self.faiss_threshold = backend, chunk_size, faiss_threshold
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))
        # A host copy of `steps`, so step() never reads a GPU buffer back (no sync per training step).
        self._steps_seen: int | None = None

    def share(self, round_index: int | None = None) -> float:
        """The share of candidate pairs merged at ``round_index`` (by default the next round)."""
        r = int(self.rounds) if round_index is None else round_index
        return min(self.max_share, self.initial_share + r * self.share_growth)

    def is_due(self, steps_seen: int) -> bool:
        """Whether the schedule runs a round once ``steps_seen`` steps have been counted."""
        first = self.warmup * self.steps_per_epoch
        every = self.interval * self.steps_per_epoch
        return steps_seen >= max(first, 1) and (steps_seen - first) % every == 0

    @torch.no_grad()
    def step(self, memory: nn.Module) -> MergeReport | None:
        """Count one training step; run a round and return its report when the schedule says so."""
        if self._steps_seen is None:
            self._steps_seen = int(self.steps)
        self._steps_seen += 1
        self.steps.fill_(self._steps_seen)
        return self.merge(memory) if self.is_due(self._steps_seen) else None

    def forward(self, memory: nn.Module) -> MergeReport:
        """One round now, whatever the schedule (same as :meth:`merge`)."""
        return self.merge(memory)

    @torch.no_grad()
    def merge(self, memory: nn.Module) -> MergeReport:
        """Run one round on ``memory`` now, write ``memory.groups`` in place and return the report."""
        features, groups = _checked_tables(memory)
        start = time.perf_counter()
        share = self.share()
        counts = torch.zeros(2, dtype=torch.long, device=groups.device)
        if rank() == 0:
            merged, pairs, candidates = self._round(features, groups, share)
            counts[0], counts[1] = pairs, candidates
        else:
            merged = torch.empty_like(groups)
        if is_distributed():
            dist.broadcast(merged, 0)
            dist.broadcast(counts, 0)
        groups.copy_(merged)
        self.rounds.add_(1)
        sizes = torch.bincount(merged, minlength=merged.numel())
        return MergeReport(
            pairs_merged=int(counts[0]),
            entries_in_merged_groups=int(sizes[sizes > 1].sum()),
            num_groups=int((sizes > 0).sum()),
            seconds=time.perf_counter() - start,
            share=share,
            candidate_pairs=int(counts[1]),
        )

    def _round(self, features: torch.Tensor, groups: torch.Tensor, share: float) -> tuple[torch.Tensor, int, int]:
        groups = canonical_groups(groups)
        search = make_search(self.backend, features.shape[0], features.device, self.chunk_size, self.faiss_threshold)
        sims, neighbour = nearest_neighbours(features, 1, groups, backend=search)
        sims, neighbour = sims[:, 0], neighbour[:, 0]
        entry = torch.arange(neighbour.numel(), device=neighbour.device)
        found = neighbour >= 0
        mutual = found & (neighbour[neighbour.clamp(min=0)] == entry) & (entry < neighbour)
        left, right, similarity = entry[mutual], neighbour[mutual], sims[mutual]
        candidates = left.numel()
        allowed = math.floor(share * candidates + 1e-9)  # the epsilon absorbs float error in share * count
        ranked = torch.argsort(similarity, descending=True, stable=True)[:allowed]
        ranked = ranked[similarity[ranked] >= self.min_similarity]
        merged = union_groups(groups, left[ranked], right[ranked])
        return merged, ranked.numel(), candidates

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._steps_seen = None  # re-read from the loaded buffer at the next step

    def extra_repr(self) -> str:
        return (
            f"warmup={self.warmup}, interval={self.interval}, steps_per_epoch={self.steps_per_epoch}, "
            f"initial_share={self.initial_share}, share_growth={self.share_growth}, max_share={self.max_share}, "
            f"min_similarity={self.min_similarity}, backend={self.backend!r}"
        )


def _checked_tables(memory: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    features, groups = getattr(memory, "features", None), getattr(memory, "groups", None)
    if not isinstance(features, torch.Tensor) or not isinstance(groups, torch.Tensor):
        raise TypeError(
            f"memory must be a MemoryBank (a module with `features` and `groups` buffers), got {type(memory).__name__}"
        )
    if features.dim() != 2 or groups.shape != (features.shape[0],) or groups.dtype != torch.long:
        raise ValueError(
            f"memory.features must be (N, D) and memory.groups (N,) int64, got {tuple(features.shape)} "
            f"and {tuple(groups.shape)} {groups.dtype}"
        )
    return features, groups
