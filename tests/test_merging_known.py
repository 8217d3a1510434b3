"""NeighbourMerger on given embeddings against planted duplicates, and groups the user knows."""

import math

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed

from ssl_memory import MemoryBank, MemoryBankLoss, NeighbourMerger
from ssl_memory.merging import join_partitions, known_labels


def clustered(n, dim, classes, spread, seed):
    """Unit vectors around ``classes`` random centres, and their class."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = torch.arange(n) % classes
    return F.normalize(centres[labels] + spread * torch.randn(n, dim, generator=gen), dim=1), labels


def with_copies(x, count, scales, seed):
    """``x`` with one copy of each of its first ``count`` rows appended, moved by ``scales`` times a random unit step."""
    gen = torch.Generator().manual_seed(seed)
    step = F.normalize(torch.randn(count, x.shape[1], generator=gen), dim=1) * scales.unsqueeze(1)
    copies = F.normalize(x[:count] + step, dim=1)
    pairs = torch.stack([torch.arange(count), x.shape[0] + torch.arange(count)], 1)
    return torch.cat([x, copies]), pairs


def separable(x, pairs, ratio, cap=4):
    """Planted pairs that pass the ratio test as two singletons, by a plain loop over float64 distances."""
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    out = []
    for a, b in pairs.tolist():
        if int(d[a].argmin()) != b or int(d[b].argmin()) != a:
            continue  # not mutual nearest neighbours: no round can see the pair
        m = cap - 2 + 1
        refs = []
        for side in (a, b):
            rest = sorted(v for j, v in enumerate(d[side].tolist()) if j not in (a, b))
            refs.append(rest[m - 1])
        out.append(d[a, b] < ratio * min(refs))
    return torch.tensor(out)


def group_pairs(groups):
    """Every (i, j), i < j, sharing a group."""
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    return {tuple(p) for p in torch.nonzero(torch.triu(same, 1)).tolist()}


def test_rounds_on_given_embeddings_find_the_separable_copies_and_nothing_else():
    x, _ = clustered(400, 32, 10, 0.35, seed=0)
    scales = torch.linspace(0.02, 1.5, 60)  # from clear copies to copies lost among their class (NN at 0.97)
    embeddings, pairs = with_copies(x, 60, scales, seed=1)
    passing = separable(embeddings, pairs, ratio=0.75)
    assert 20 <= int(passing.sum()) < 60  # the data has both kinds
    bank = MemoryBank(460, 8)  # random rows: only the given embeddings can find the copies
    merger = NeighbourMerger(ratio=0.75, max_merged_share=0.5, backend="torch")
    calls = []
    for _ in range(12):
        merger.merge(bank, embeddings=lambda: calls.append(1) or embeddings)
    assert len(calls) == 12
    merged = group_pairs(bank.groups)
    planted = {tuple(p) for p in pairs.tolist()}
    assert merged <= planted  # no pair that was not planted
    separable_pairs = {p for p, ok in zip(map(tuple, pairs.tolist()), passing.tolist()) if ok}
    assert len(merged & separable_pairs) >= 0.9 * len(separable_pairs)


@pytest.mark.parametrize("seed", [0, 1])
def test_sixty_rounds_on_drifting_clean_embeddings_stay_bounded_and_as_pure_as_nearest_neighbours(seed):
    x, labels = clustered(600, 16, 20, 0.2, seed)
    distances = torch.cdist(x, x).fill_diagonal_(math.inf)
    neighbours_agree = float((labels[distances.argmin(1)] == labels).float().mean())  # about 0.95
    bank = MemoryBank(600, 4)
    merger = NeighbourMerger(ratio=0.75, backend="torch")
    gen = torch.Generator().manual_seed(seed + 10)
    for _ in range(60):
        x = F.normalize(x + 0.03 * F.normalize(torch.randn(x.shape, generator=gen), dim=1), dim=1)  # the model moves
        report = merger.merge(bank, embeddings=x)
        sizes = torch.bincount(bank.groups)
        assert int(sizes.max()) <= 4 and report.entries_in_merged_groups <= 0.1 * 600
    merged = group_pairs(bank.groups)
    assert merged and sum(int(labels[i] == labels[j]) for i, j in merged) >= neighbours_agree * len(merged)


def test_given_embeddings_are_checked():
    bank, merger = MemoryBank(10, 4), NeighbourMerger(backend="torch")
    for bad in (torch.randn(9, 4), torch.randn(10), torch.full((10, 3), math.nan), torch.ones(10, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="embeddings"):
            merger.merge(bank, embeddings=bad)
    assert merger.rounds == 0 and torch.equal(bank.groups, torch.arange(10))


def union_find(n, groups):
    """Plain union-find reference."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for members in groups:
        for m in members[1:]:
            a, b = find(members[0]), find(m)
            parent[max(a, b)] = min(a, b)
    return torch.tensor([find(i) for i in range(n)])


def test_known_groups_join_existing_groups_as_a_union():
    bank = MemoryBank(12, 4)
    bank.groups.copy_(torch.tensor([0, 0, 2, 3, 4, 4, 6, 7, 8, 9, 10, 11]))
    merger = NeighbourMerger(backend="torch")
    merger.add_groups(bank, [[1, 3], [5, 6, 11]])
    expected = union_find(12, [[0, 1], [4, 5], [1, 3], [5, 6, 11]])
    assert torch.equal(bank.groups, expected)
    merger.add_groups(bank, [[1, 3]])  # idempotent
    assert torch.equal(bank.groups, expected)
    pairs = torch.tensor([[2, 7], [7, 9], [10, 8]])  # pairs chain into groups
    merger.add_groups(bank, pairs)
    assert torch.equal(bank.groups, union_find(12, [[0, 1], [4, 5], [1, 3], [5, 6, 11], [2, 7, 9], [8, 10]]))
    assert torch.equal(known_labels(pairs, 12), union_find(12, [[2, 7, 9], [8, 10]]))
    a, b = torch.randint(0, 5, (30,)), torch.randint(0, 5, (30,))
    groups_a = [torch.nonzero(a == v).squeeze(1).tolist() for v in range(5)]
    groups_b = [torch.nonzero(b == v).squeeze(1).tolist() for v in range(5)]
    assert torch.equal(join_partitions(a, b), union_find(30, [g for g in groups_a + groups_b if g]))


@pytest.mark.parametrize(
    "groups, match",
    [
        ([[0]], "at least 2 distinct"),
        ([[0, 0]], "at least 2 distinct"),
        ([[0, 12]], r"in \[0, 12\)"),
        ([[0, -1]], r"in \[0, 12\)"),
        ([[0, 1], [1, 2]], "shares entries \\[1\\]"),
        (torch.tensor([[0, 1, 2]]), r"\(P, 2\)"),
        (torch.tensor([[0.0, 1.0]]), r"\(P, 2\)"),
        (torch.tensor([[0, 12]]), r"in \[0, 12\)"),
        (torch.tensor([[3, 3]]), "itself"),
    ],
)
def test_known_groups_are_validated_and_bad_ones_change_nothing(groups, match):
    bank = MemoryBank(12, 4)
    with pytest.raises(ValueError, match=match):
        NeighbourMerger().add_groups(bank, groups)
    assert torch.equal(bank.groups, torch.arange(12))


def test_known_groups_at_construction_are_checked_then_joined_at_the_first_step_and_resume():
    with pytest.raises(ValueError, match="shares entries"):
        NeighbourMerger(known_groups=[[0, 1], [1, 2]])
    known = [[0, 5], [2, 3, 9]]
    criterion = MemoryBankLoss(memory=MemoryBank(10, 4), merger=NeighbourMerger(warmup=1, known_groups=known))
    criterion(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]))
    expected = union_find(10, known)
    assert torch.equal(criterion.memory.groups, expected)
    for _ in range(3):  # a round after the first epoch keeps the known groups whole
        criterion(torch.randn(10, 4), torch.arange(10))
    assert criterion.merger.rounds >= 1
    groups = criterion.memory.groups
    assert all(groups[m].unique().numel() == 1 for m in known)
    resumed = MemoryBankLoss(memory=MemoryBank(10, 4), merger=NeighbourMerger(warmup=1, known_groups=known))
    resumed.load_state_dict(criterion.state_dict())
    resumed(torch.randn(2, 4), torch.tensor([4, 6]))
    assert torch.equal(resumed.memory.groups, groups) and resumed.merger.history == [
        type(r)(**{**vars(r), "seconds": math.nan}) for r in resumed.merger.history
    ]


def test_the_loss_counts_known_groups_as_positives():
    bank = MemoryBank(8, 4)
    NeighbourMerger().add_groups(bank, [[1, 4, 6]])
    criterion = MemoryBankLoss(memory=bank, temperature=0.5)
    x = torch.randn(3, 4)
    loss = criterion.terms(x, torch.tensor([4, 0, 1]), update_memory=False)["discrimination"]
    log_p = F.log_softmax(F.normalize(x, dim=1) @ bank.features.T / 0.5, dim=1)
    expected = -torch.stack([log_p[0, [1, 4, 6]].logsumexp(0), log_p[1, 0], log_p[2, [1, 4, 6]].logsumexp(0)])
    torch.testing.assert_close(loss, expected)


def known_worker(rank_, world_size):
    torch.manual_seed(0)  # every rank builds the same bank
    bank = MemoryBank(40, 3)
    merger = NeighbourMerger(warmup=1, ratio=1.0, min_similarity=-1.0, initial_share=1.0, max_share=1.0,
                             max_merged_share=0.5, backend="torch", known_groups=[[0, 39], [7, 8, 9]])
    torch.manual_seed(rank_)
    merger.step(bank)  # joins the known groups, no round yet
    joined = bank.groups.clone()
    # each rank hands its own embeddings; rank 0's search decides for everyone
    embeddings = torch.randn(40, 5)
    bank.update(torch.arange(40), torch.randn(40, 3))
    report = merger.step(bank, embeddings=embeddings)
    merger.add_groups(bank, torch.tensor([[1, 2]]))
    return joined, bank.groups.clone(), embeddings, report.pairs_merged, merger.state_dict()["_extra_state"]


def test_known_groups_and_given_embeddings_are_identical_on_every_rank_mp():
    (joined, groups, embeddings, merged, history), other = run_distributed(known_worker, 2)
    assert torch.equal(joined, union_find(40, [[0, 39], [7, 8, 9]])) and torch.equal(joined, other[0])
    assert torch.equal(groups, other[1]) and merged == other[3] > 0 and torch.equal(history, other[4])
    assert not torch.equal(embeddings, other[2])
    # rank 0's round, recomputed here from rank 0's embeddings
    reference = MemoryBank(40, 3)
    reference.groups.copy_(joined)
    NeighbourMerger(ratio=1.0, min_similarity=-1.0, initial_share=1.0, max_share=1.0, max_merged_share=0.5).merge(
        reference, embeddings=embeddings
    )
    NeighbourMerger().add_groups(reference, [[1, 2]])
    assert torch.equal(groups, reference.groups)
