"""NeighbourMerger on planted near-duplicates, against a plain-Python round and a plain-Python union-find."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_memory import MemoryBank, MergeReport, NeighbourMerger
from ssl_memory import neighbours as neighbours_module
from ssl_memory.merging import canonical_groups, union_groups
from ssl_memory.neighbours import FaissIVFSearch

needs_faiss = pytest.mark.skipif(not neighbours_module.faiss_available(), reason="faiss is not installed")


# ---------------------------------------------------------------- independent references
def python_union(groups, pairs):
    """Union-find with a dict; returns canonical ids (smallest member)."""
    parent = {i: i for i in range(len(groups))}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(groups)):
        for j in range(i):
            if groups[i] == groups[j]:
                parent[find(i)] = find(j)
    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    roots = [find(i) for i in range(len(groups))]
    return [min(j for j in range(len(groups)) if roots[j] == roots[i]) for i in range(len(groups))]


def python_round(features, groups, share, floor):
    """One merge round written as loops: nearest neighbour outside the own group, mutual pairs, top share."""
    n = features.shape[0]
    sims = (features @ features.T).tolist()
    groups = groups.tolist()
    nearest = []
    for i in range(n):
        others = [j for j in range(n) if groups[j] != groups[i]]
        nearest.append(max(others, key=lambda j: sims[i][j]) if others else -1)
    pairs = [(i, j) for i, j in enumerate(nearest) if j > i and nearest[j] == i]
    pairs.sort(key=lambda p: -sims[p[0]][p[1]])
    chosen = [p for p in pairs[: math.floor(share * len(pairs) + 1e-9)] if sims[p[0]][p[1]] >= floor]
    return python_union(groups, chosen), len(chosen), len(pairs)


def planted(num_random=300, dim=64, pairs=20, triples=10, seed=0, noise=0.1):
    """Random unit vectors plus planted groups of near-duplicates (cosine > 0.98), at shuffled positions.

    Returns the features and the planted partition as canonical group ids.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [2] * pairs + [3] * triples
    rows, labels = [], []
    for g, size in enumerate(sizes):
        base = torch.randn(dim, generator=gen)
        base = base / base.norm()
        for _ in range(size):
            rows.append(F.normalize(base + noise * torch.randn(dim, generator=gen) / dim**0.5, dim=0))
            labels.append(g)
    for r in range(num_random):
        rows.append(F.normalize(torch.randn(dim, generator=gen), dim=0))
        labels.append(len(sizes) + r)
    perm = torch.randperm(len(rows), generator=gen)
    features = torch.stack(rows)[perm]
    labels = torch.tensor(labels)[perm]
    members = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~torch.eye(len(rows), dtype=torch.bool)
    assert ((features @ features.T)[members] > 0.98).all()
    return features, canonical_groups(labels)


def bank_with(features):
    bank = MemoryBank(*features.shape)
    bank.features.copy_(features)
    return bank


def greedy(**kwargs):
    """Merge every mutual pair above 0.9 in each round."""
    defaults = dict(initial_share=1.0, max_share=1.0, min_similarity=0.9, backend="torch")
    return NeighbourMerger(**{**defaults, **kwargs})


# ---------------------------------------------------------------- planted data
BACKENDS = [
    "torch",
    pytest.param("faiss-flat", marks=needs_faiss),
    pytest.param("faiss-ivf", marks=needs_faiss),
    pytest.param("faiss-hnsw", marks=needs_faiss),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_share_merges_exactly_the_planted_groups(backend):
    features, expected = planted()
    bank, merger = bank_with(features), greedy(backend=backend)
    first = merger(bank)
    # A triple has one mutual pair in the first round; its third member joins in the second,
    # when its nearest entry outside its own group is in the pair and vice versa.
    assert first.pairs_merged == 20 + 10
    assert first.candidate_pairs > first.pairs_merged  # random mutual pairs exist, stopped by the floor
    second = merger(bank)
    assert second.pairs_merged == 10
    assert torch.equal(bank.groups, expected)
    assert merger(bank).pairs_merged == 0
    assert second.entries_in_merged_groups == 20 * 2 + 10 * 3
    assert second.num_groups == 300 + 20 + 10


def test_small_share_merges_only_the_most_similar_planted_pairs():
    features, _ = planted(pairs=0, triples=0, num_random=200, dim=64, seed=1)
    gen = torch.Generator().manual_seed(2)
    anchors = features[:8]
    # eight planted pairs, each less similar than the one before (cosine 0.9998 down to 0.985)
    twins = torch.stack(
        [F.normalize(a + (0.02 + 0.025 * i) * F.normalize(torch.randn(64, generator=gen), dim=0), dim=0) for i, a in enumerate(anchors)]
    )
    features = torch.cat([features, twins])
    pairs = [(i, 200 + i) for i in range(8)]
    similarity = [float(features[a] @ features[b]) for a, b in pairs]
    assert similarity == sorted(similarity, reverse=True) and similarity[-1] > 0.98
    _, _, candidates = python_round(features, torch.arange(208), 1.0, -1.0)
    share = 3.5 / candidates  # room for exactly three pairs
    bank = bank_with(features)
    report = greedy(initial_share=share, min_similarity=-1.0)(bank)
    assert report.pairs_merged == 3 and report.candidate_pairs == candidates
    expected = torch.arange(208)
    expected[200:203] = torch.arange(3)
    assert torch.equal(bank.groups, expected)


def test_non_mutual_neighbours_are_not_merged_until_the_group_reaches_them():
    """a -> b -> c <-> b on an arc: b and c merge; a, whose neighbour b prefers c, waits for the next round."""
    gen = torch.Generator().manual_seed(3)
    rest = F.normalize(torch.randn(50, 16, generator=gen), dim=1)
    e1, e2 = torch.eye(16)[0], torch.eye(16)[1]
    arc = torch.stack([math.cos(t) * e1 + math.sin(t) * e2 for t in (0.06, 0.02, 0.0)])  # a, b, c
    bank = bank_with(torch.cat([arc, rest]))
    merger = greedy()
    assert merger(bank).pairs_merged == 1
    assert bank.groups[:3].tolist() == [0, 1, 1]
    assert merger(bank).pairs_merged == 1
    assert bank.groups[:3].tolist() == [0, 0, 0]
    assert torch.equal(bank.groups[3:], torch.arange(3, 53))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    dim=st.integers(3, 6),
    num_groups=st.integers(1, 30),
    share=st.floats(0.0, 1.0),
    floor=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_round_matches_the_python_reference(n, dim, num_groups, share, floor, seed):
    gen = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    groups = torch.randint(0, num_groups, (n,), generator=gen)
    expected, pairs, candidates = python_round(features, groups, share, floor)
    bank = bank_with(features)
    bank.groups.copy_(groups)
    report = greedy(initial_share=share, min_similarity=floor)(bank)
    assert bank.groups.tolist() == expected
    assert (report.pairs_merged, report.candidate_pairs, report.share) == (pairs, candidates, share)
    sizes = torch.bincount(torch.tensor(expected), minlength=n)
    assert report.num_groups == len(set(expected))
    assert report.entries_in_merged_groups == int(sizes[sizes > 1].sum())


def test_repeated_rounds_never_split_a_group_and_keep_the_smallest_member_as_id():
    gen = torch.Generator().manual_seed(4)
    bank = MemoryBank(200, 8, generator=gen)
    merger = greedy(initial_share=0.3, min_similarity=-1.0)
    for _ in range(6):
        before = bank.groups.clone()
        merger(bank)
        after = bank.groups
        same_before = before.unsqueeze(0) == before.unsqueeze(1)
        assert (after.unsqueeze(0) == after.unsqueeze(1))[same_before].all()
        assert torch.equal(after, canonical_groups(after))
        indices = torch.randint(0, 200, (64,), generator=gen)
        bank.update(indices, torch.randn(64, 8, generator=gen))
    assert merger.rounds == 6 and bank.groups.unique().numel() < 200


@needs_faiss
def test_torch_and_exact_faiss_give_the_same_groups():
    features, _ = planted(num_random=300, dim=12, seed=5, noise=0.05)
    banks = [bank_with(features) for _ in range(2)]
    mergers = [greedy(backend=b, initial_share=0.5, min_similarity=-1.0) for b in ("torch", "faiss-flat")]
    for _ in range(5):
        reports = [m(b) for m, b in zip(mergers, banks)]
        assert torch.equal(banks[0].groups, banks[1].groups)
        assert reports[0].pairs_merged == reports[1].pairs_merged
    assert banks[0].groups.unique().numel() < 200  # groups grew well past the planted ones


@needs_faiss
def test_a_configured_search_object_is_accepted_as_backend():
    features, expected = planted(seed=6)
    bank, merger = bank_with(features), greedy(backend=FaissIVFSearch(nlist=8, nprobe=8))
    merger(bank), merger(bank)
    assert torch.equal(bank.groups, expected)


def test_groups_are_written_in_place_and_low_precision_banks_work():
    features, expected = planted(seed=7)
    bank = MemoryBank(*features.shape, dtype=torch.bfloat16)
    bank.features.copy_(features)
    groups = bank.groups
    merger = greedy()
    merger(bank), merger(bank)
    assert bank.groups is groups and torch.equal(groups, expected)


# ---------------------------------------------------------------- union-find
@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 40),
    num_groups=st.integers(1, 40),
    num_pairs=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_union_matches_a_python_union_find(n, num_groups, num_pairs, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = canonical_groups(torch.randint(0, num_groups, (n,), generator=gen))
    left, right = torch.randint(0, n, (2, num_pairs), generator=gen)
    expected = python_union(groups.tolist(), list(zip(left.tolist(), right.tolist())))
    assert union_groups(groups, left, right).tolist() == expected


def test_union_of_a_long_chain_given_in_reverse():
    n = 1000
    left, right = torch.arange(n - 1).flip(0), torch.arange(1, n).flip(0)
    assert torch.equal(union_groups(torch.arange(n), left, right), torch.zeros(n, dtype=torch.long))


def test_canonical_groups_names_each_group_after_its_smallest_member():
    assert canonical_groups(torch.tensor([5, 9, 5, 9, 2, 5])).tolist() == [0, 1, 0, 1, 4, 0]


# ---------------------------------------------------------------- schedule and state
def test_step_runs_rounds_after_the_warmup_then_every_interval():
    bank = MemoryBank(30, 4, generator=torch.Generator().manual_seed(8))
    merger = NeighbourMerger(warmup=2, interval=3, steps_per_epoch=2, min_similarity=-1.0, backend="torch")
    ran = [step for step in range(1, 40) if merger.step(bank) is not None]
    assert ran == [4, 10, 16, 22, 28, 34]
    assert int(merger.steps) == 39 and int(merger.rounds) == 6


def test_without_warmup_the_first_round_comes_after_one_interval():
    bank = MemoryBank(30, 4)
    merger = NeighbourMerger(warmup=0, interval=5, backend="torch")
    assert [step for step in range(1, 16) if merger.step(bank) is not None] == [5, 10, 15]


def test_share_grows_linearly_up_to_its_cap():
    merger = NeighbourMerger()
    assert [round(merger.share(r), 10) for r in range(7)] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.25, 0.25]
    bank = MemoryBank(20, 4)
    assert [merger(bank).share for _ in range(3)] == [merger.share(0), merger.share(1), merger.share(2)]


def test_state_dict_resumes_schedule_and_groups_exactly():
    def make():
        bank = MemoryBank(80, 6, generator=torch.Generator().manual_seed(9))
        merger = NeighbourMerger(warmup=1, interval=2, steps_per_epoch=3, min_similarity=-1.0, backend="torch")
        return bank, merger

    def train(bank, merger, steps, start):
        reports = []
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(step)
            bank.update(torch.randint(0, 80, (16,), generator=gen), torch.randn(16, 6, generator=gen))
            report = merger.step(bank)
            reports.append(None if report is None else dataclasses.replace(report, seconds=0.0))
        return reports

    bank, merger = make()
    train(bank, merger, 10, 0)
    # a copy, as torch.save would make: state_dict() holds the live buffers, which keep changing in place
    saved = copy.deepcopy({"bank": bank.state_dict(), "merger": merger.state_dict()})
    assert set(saved["merger"]) == {"steps", "rounds"}
    expected = train(bank, merger, 12, 10)
    resumed_bank, resumed = make()
    resumed.step(resumed_bank)  # a stale step count in the fresh merger must not survive the load
    resumed_bank.load_state_dict(saved["bank"])
    resumed.load_state_dict(saved["merger"])
    assert torch.equal(resumed_bank.groups, saved["bank"]["groups"])
    assert train(resumed_bank, resumed, 12, 10) == expected
    assert torch.equal(resumed_bank.groups, bank.groups)
    assert any(r is not None and r.pairs_merged for r in expected)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup": -1}, "warmup must be a non-negative int, got -1"),
        ({"interval": 0}, "interval must be a positive int, got 0"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch must be a positive int, got 2.5"),
        ({"initial_share": 1.5}, r"initial_share must lie in \[0, 1\], got 1.5"),
        ({"share_growth": -0.1}, r"share_growth must lie in \[0, 1\], got -0.1"),
        ({"initial_share": 0.5, "max_share": 0.25}, r"initial_share \(0.5\) must not exceed max_share \(0.25\)"),
        ({"min_similarity": 2.0}, r"min_similarity must lie in \[-1, 1\], got 2.0"),
        ({"backend": "annoy"}, "backend must be one of"),
        ({"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeighbourMerger(**kwargs)


def test_faiss_backend_without_faiss_fails_at_construction(monkeypatch):
    monkeypatch.setattr(neighbours_module, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'ssl_memory\[faiss\]'"):
        NeighbourMerger(backend="faiss-ivf")
    NeighbourMerger(backend="auto")  # auto falls back to torch


def test_merging_something_that_is_not_a_bank_raises():
    with pytest.raises(TypeError, match="memory must be a MemoryBank"):
        NeighbourMerger()(torch.nn.Linear(2, 2))


def test_report_is_a_dataclass_with_the_agreed_fields():
    names = [f.name for f in dataclasses.fields(MergeReport)]
    assert names[:5] == ["pairs_merged", "entries_in_merged_groups", "num_groups", "seconds", "share"]


# ---------------------------------------------------------------- torch.distributed
def merge_worker(rank, world_size):
    torch.manual_seed(rank)  # every rank starts from its own bank: rank 0's round must win everywhere
    bank = MemoryBank(60, 5)
    features = bank.features.clone()
    merger = NeighbourMerger(warmup=0, interval=1, initial_share=0.5, max_share=0.5, min_similarity=-1.0, backend="torch")
    reports = [dataclasses.replace(merger.step(bank), seconds=0.0) for _ in range(2)]
    return features, bank.groups.clone(), reports


def test_all_ranks_agree_with_rank_zero():
    results = run_distributed(merge_worker, 2)
    (features, groups, reports), (other_features, other_groups, other_reports) = results
    assert not torch.equal(features, other_features)
    reference_bank = bank_with(features)
    reference = NeighbourMerger(warmup=0, initial_share=0.5, max_share=0.5, min_similarity=-1.0, backend="torch")
    expected = [dataclasses.replace(reference.step(reference_bank), seconds=0.0) for _ in range(2)]
    assert torch.equal(groups, reference_bank.groups) and torch.equal(other_groups, groups)
    assert reports == other_reports == expected
    assert expected[0].pairs_merged > 0
