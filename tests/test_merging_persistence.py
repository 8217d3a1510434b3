"""NeighbourMerger(persistence=k): a pair merges only after passing k rounds in a row (plain-loop reference,
a known answer, state_dict resume and two-rank gloo runs)."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_merging import bank_with, merger, python_round, timeless

from ssl_memory import MemoryBank, MemoryBankLoss, MemoryDivergenceError


def drifting(n, dim, rounds, drift, seed):
    """``rounds`` banks of ``n`` unit rows, each the last one moved by ``drift`` times Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    out = []
    for _ in range(rounds):
        out.append(F.normalize(x, dim=1))
        x = x + drift * torch.randn(n, dim, generator=gen)
    return out


def no_float_ties(x):
    n = x.shape[0]
    sims = x.double() @ x.double().T
    return n < 3 or float(sims[torch.triu_indices(n, n, 1).unbind()].sort().values.diff().min()) > 1e-5


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 16),
    dim=st.integers(2, 3),
    ratio=st.floats(0.5, 1.0),
    cap=st.integers(2, 4),
    share=st.floats(0.3, 1.0),
    persistence=st.integers(1, 3),
    immediate=st.none() | st.floats(0.2, 1.0),
    drift=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_rounds_in_a_row_match_the_python_reference(n, dim, ratio, cap, share, persistence, immediate, drift, seed):
    banks = drifting(n, dim, 5, drift, seed)
    assume(all(no_float_ties(x) for x in banks))
    bank = MemoryBank(n, dim)
    immediate = None if immediate is None else immediate * ratio  # a fraction of the ratio: never above it
    rounds = merger(
        ratio=ratio,
        max_group_size=cap,
        max_merged_share=1.0,
        initial_share=share,
        max_share=share,
        persistence=persistence,
        immediate_ratio=immediate,
    )
    streaks, groups = {}, torch.arange(n)
    for x in banks:
        expected, counts = python_round(
            x, groups, ratio, cap, 1.0, share, 0.5, streaks=streaks, persistence=persistence, immediate=immediate or 0.0
        )
        assume(counts.pop("margin") > 1e-4)
        bank.features.copy_(x)
        report = rounds(bank)
        assert bank.groups.tolist() == expected
        counts.pop("weakest_similarity")
        assert {name: getattr(report, name) for name in counts} == counts
        groups = bank.groups.clone()


def flickering_bank():
    """Round 1: entries 0, 1 and entries 2, 3 are near-duplicates; round 2: only 0, 1 still are."""
    gen = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    first = base.clone()
    first[1] = F.normalize(base[0] + 0.01 * torch.randn(16, generator=gen), dim=0)
    first[3] = F.normalize(base[2] + 0.01 * torch.randn(16, generator=gen), dim=0)
    second = first.clone()
    second[3] = base[3]
    return first, second


def test_a_pair_that_passes_once_waits_and_one_that_passes_again_merges():
    first, second = flickering_bank()
    bank, rounds = bank_with(first), merger(ratio=0.5, persistence=2)
    report = rounds(bank)
    assert report.pairs_merged == 0 and report.deferred_by_share == 2  # both passed, neither twice yet
    assert rounds.pending[0].tolist() == [1, 1] and rounds.pending[2].tolist() == [3, 1]
    bank.features.copy_(second)
    report = rounds(bank)
    assert report.pairs_merged == 1 and bank.groups[:4].tolist() == [0, 0, 2, 3]
    assert (rounds.pending[:, 0] == -1).all()  # 2, 3 stopped passing: its count starts again
    eager = bank_with(first)
    assert merger(ratio=0.5)(eager).pairs_merged == 2 and eager.groups[:4].tolist() == [0, 0, 2, 2]


def test_a_pair_far_under_the_immediate_ratio_merges_the_round_it_first_passes():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    x[1] = F.normalize(x[0] + 0.001 * torch.randn(16, generator=gen), dim=0)  # ratio about 0.003
    x[3] = F.normalize(x[2] + 0.05 * torch.randn(16, generator=gen), dim=0)  # ratio about 0.15
    bank, rounds = bank_with(x), merger(ratio=0.5, persistence=2, immediate_ratio=0.05)
    report = rounds(bank)
    assert report.pairs_merged == 1 and report.deferred_by_share == 1
    assert bank.groups[:4].tolist() == [0, 0, 2, 3] and rounds.pending[2].tolist() == [3, 1]
    report = rounds(bank)  # passed again: the second pair's turn
    assert report.pairs_merged == 1 and bank.groups[:4].tolist() == [0, 0, 2, 2]


def test_merging_at_once_takes_the_worse_side_and_still_needs_the_bank():
    """Entries 0, 1, 2 at angles 0, 0.02 and 0.05 in one plane (groups of 2: the reference is the nearest entry
    outside the pair): 0, 1 pass the ratio test at 0.4 from 0's side and 0.67 from 1's, so an immediate ratio
    of 0.5 does not apply, 0.7 does; and a pair under it in the embeddings that the bank rows do not confirm
    never merges."""
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    x[:3] = 0.0
    for i, angle in enumerate((0.0, 0.02, 0.05)):
        x[i, 0], x[i, 1] = math.cos(angle), math.sin(angle)
    assert merger(ratio=0.8, max_group_size=2, persistence=2, immediate_ratio=0.5)(bank_with(x)).pairs_merged == 0
    assert merger(ratio=0.8, max_group_size=2, persistence=2, immediate_ratio=0.7)(bank_with(x)).pairs_merged == 1
    rows = F.normalize(torch.randn(40, 16, generator=gen), dim=1)  # entries 0 and 1 unrelated in the bank
    rounds = merger(ratio=0.8, bank_ratio=0.8, max_group_size=2, persistence=2, immediate_ratio=0.7)
    report = rounds(bank_with(rows), x)
    assert report.pairs_merged == 0 and report.deferred_by_share == 0


def test_pending_pairs_resume_exactly_and_older_state_dicts_load():
    first, second = flickering_bank()
    bank, rounds = bank_with(first), merger(ratio=0.5, persistence=2)
    rounds(bank)
    buffer = io.BytesIO()
    torch.save({"bank": bank.state_dict(), "merger": rounds.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_bank, resumed = MemoryBank(40, 16), merger(ratio=0.5, persistence=2)
    resumed_bank.load_state_dict(saved["bank"])
    resumed.load_state_dict(saved["merger"])
    assert torch.equal(resumed.pending, rounds.pending)
    for b, r in ((bank, rounds), (resumed_bank, resumed)):
        b.features.copy_(second)
        r(b)
    assert torch.equal(resumed_bank.groups, bank.groups) and timeless(*resumed.history) == timeless(*rounds.history)
    assert bank.groups[1] == 0
    older = {key: value for key, value in saved["merger"].items() if key != "pending"}
    fresh = merger(ratio=0.5, persistence=2)
    fresh.load_state_dict(older)  # strict: a state_dict saved before `pending` existed has none pending
    assert fresh.pending.shape == (0, 2)


@pytest.mark.parametrize(
    "pending, message",
    [
        (torch.zeros(4, 3, dtype=torch.long), r"must be \(N, 2\) integers, got \(4, 3\)"),
        (torch.zeros(4, 2), r"must be \(N, 2\) integers, got \(4, 2\)"),
        (torch.tensor([[7, 1], [-1, 0]]), "must pair each group with an entry id and a count"),
        (torch.tensor([[1, 0], [-1, 0]]), "must pair each group with an entry id and a count"),
    ],
)
def test_a_bad_pending_table_is_refused_and_changes_nothing(pending, message):
    rounds = merger(persistence=2)
    criterion = MemoryBankLoss(num_samples=40, dim=16, merger=rounds)
    state = criterion.state_dict()
    state["merger.pending"] = pending
    before = {key: value.clone() for key, value in criterion.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict\['merger.pending'\] " + message):
        criterion.load_state_dict(state)
    assert all(torch.equal(value, criterion.state_dict()[key]) for key, value in before.items())


def test_pending_pairs_of_another_bank_and_after_known_groups():
    first, second = flickering_bank()
    bank, rounds = bank_with(first), merger(ratio=0.5, persistence=2)
    rounds(bank)
    with pytest.raises(ValueError, match="kept for a bank of 40 entries, got a bank of 30"):
        rounds(MemoryBank(30, 16))
    rounds.add_groups(bank, [[5, 6]])  # a joined group is a new group: nothing is pending any more
    assert rounds.pending.shape == (0, 2)
    bank.features.copy_(first)
    assert rounds(bank).pairs_merged == 0


def persistence_worker(rank_, world_size):
    banks = drifting(60, 3, 6, 0.05, seed=0)  # the same rows on every rank
    bank, rounds = MemoryBank(60, 3), merger(ratio=1.0, min_similarity=-1.0, persistence=2)
    for x in banks[:3]:
        bank.features.copy_(x)
        rounds(bank)
    state = (bank.groups.clone(), rounds.pending.clone(), timeless(*rounds.history))
    if rank_ == 1:  # a pending table that drifted apart: every rank refuses the round
        rounds.pending[0] = torch.tensor([59, 1])
    try:
        rounds(bank)
        refused = None
    except MemoryDivergenceError as error:
        refused = str(error)
    return (*state, refused)


def test_every_rank_holds_rank_zeros_pending_pairs_and_refuses_a_divergent_table():
    (groups, pending, history, refused), other = run_distributed(persistence_worker, 2)
    assert torch.equal(other[0], groups) and torch.equal(other[1], pending) and other[2] == history
    bank, alone = MemoryBank(60, 3), merger(ratio=1.0, min_similarity=-1.0, persistence=2)
    for x in drifting(60, 3, 6, 0.05, seed=0)[:3]:
        bank.features.copy_(x)
        alone(bank)
    assert torch.equal(bank.groups, groups) and torch.equal(alone.pending, pending) and history == timeless(*alone.history)
    assert history[0]["pairs_merged"] == 0 and history[1]["pairs_merged"] > 0
    assert refused is not None and refused == other[3] and "merger pending checksum" in refused
