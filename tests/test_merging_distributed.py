"""NeighbourMerger under torch.distributed (gloo, several CPU processes, each run under a time limit)."""

import pytest
import torch
from distributed_helpers import run_distributed

from ssl_memory import MemoryBank, MemoryDivergenceError, NeighbourMerger
from ssl_memory.distributed import rank
from ssl_memory.neighbours import TorchSearch


def timeless(history):
    return [{k: (None if v != v else v) for k, v in vars(r).items() if k != "seconds"} for r in history]


def low_dim_merger(**kwargs):
    """A merger that merges plenty on small random banks (the ratio test passes often in 3 dimensions)."""
    return NeighbourMerger(ratio=1.0, min_similarity=-1.0, initial_share=0.5, max_share=0.5, backend="torch", **kwargs)


def agreement_worker(rank_, world_size):
    torch.manual_seed(rank_)  # ranks seeded apart, as a DDP script seeds its augmentations
    bank = MemoryBank(60, 3)
    features = bank.features.clone()
    merger = low_dim_merger(warmup=0, max_merged_share=1.0)
    reports = []
    for step in range(2 * 6):  # each rank writes 5 of its own samples a step: 10 written a step, 60 an epoch
        gen = torch.Generator().manual_seed(100 * rank_ + step)
        bank.update(torch.arange(5) + 5 * (2 * step + rank_) % 60, torch.randn(5, 3, generator=gen))
        report = merger.step(bank)
        reports.append(None if report is None else timeless([report])[0])
    state = (bank.features.clone(), bank.groups.clone(), bank.num_written, reports, timeless(merger.history))
    if rank_ > 0:  # a bank that drifted apart (written behind the API's back): every rank refuses the round
        bank.features.copy_(torch.nn.functional.normalize(torch.randn(60, 3), dim=1))
    try:
        merger(bank)
        refused = None
    except MemoryDivergenceError as error:
        refused = str(error)
    return features, *state, bank.groups.clone(), refused


def test_every_rank_counts_every_write_and_holds_rank_zeros_groups():
    (features, bank, groups, written, reports, history, after, refused), other = run_distributed(agreement_worker, 2)
    assert torch.equal(bank, other[1]) and torch.equal(groups, other[2])
    assert torch.equal(after, groups) and torch.equal(other[6], groups)  # the round was refused: groups kept
    assert refused == other[7] and "features checksum" in refused and "groups checksum" not in refused
    assert written == other[3] == 120  # both ranks' samples, on both ranks
    assert reports == other[4] and history == other[5]
    assert [i for i, r in enumerate(reports) if r is not None] == [5, 11]  # the ends of epochs 1 and 2
    # rank 0's round, recomputed in this process on rank 0's bank as it stood at the first round
    reference = MemoryBank(60, 3)
    reference.features.copy_(features)
    for step in range(6):
        for r in range(2):
            gen = torch.Generator().manual_seed(100 * r + step)
            reference.update(torch.arange(5) + 5 * (2 * step + r) % 60, torch.randn(5, 3, generator=gen))
    expected = timeless([low_dim_merger(max_merged_share=1.0)(reference)])[0]
    assert history[0] == {**expected, "epoch": 1.0} and expected["pairs_merged"] > 0


class FailsOnRankZero(TorchSearch):
    """A search that fails on rank 0 only, as an out-of-memory error or a faiss error would."""

    def _search(self, x, k, groups):
        if rank() == 0:
            raise MemoryError("injected: no memory left for the search")
        return super()._search(x, k, groups)


def failure_worker(rank_, world_size):
    torch.manual_seed(0)
    bank = MemoryBank(40, 3)
    merger = low_dim_merger(max_merged_share=0.5)
    merger.backend = FailsOnRankZero()
    try:
        merger(bank)
        message = None
    except RuntimeError as error:
        message = str(error)
    failed = (bank.groups.clone(), len(merger.history))
    merger.backend = "torch"  # the ranks are still in step: the next round works everywhere
    report = merger(bank)
    return message, failed, bank.groups.clone(), report.pairs_merged


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_failure_on_rank_zero_raises_the_same_error_on_every_rank(world_size):
    results = run_distributed(failure_worker, world_size)
    messages = {message for message, *_ in results}
    assert len(messages) == 1
    (message,) = messages
    assert "failed on rank 0" in message and "MemoryError: injected: no memory left for the search" in message
    assert "left unchanged on every rank" in message
    for _, (groups, rounds), after, merged in results:
        assert torch.equal(groups, torch.arange(40)) and rounds == 0
        assert torch.equal(after, results[0][2]) and merged == results[0][3] > 0


def confirming_merger(**kwargs):
    """Every passing pair at once, so that what the bank refuses shows in the count merged."""
    return NeighbourMerger(
        ratio=1.0,
        min_similarity=-1.0,
        initial_share=1.0,
        max_share=1.0,
        max_merged_share=1.0,
        backend="torch",
        **kwargs,
    )


def confirmed_worker(rank_, world_size):
    torch.manual_seed(0)  # the same bank rows on every rank
    bank = MemoryBank(40, 3)
    rows = bank.features.clone()
    # Embeddings that differ by rank (only rank 0's are searched), near the rows so that some pairs confirm.
    embeddings = rows + 0.1 * torch.randn(40, 3, generator=torch.Generator().manual_seed(rank_))
    report = confirming_merger(bank_ratio=0.7)(bank, embeddings)
    return rows, embeddings, bank.groups.clone(), timeless([report])[0]


def test_a_round_confirmed_by_the_bank_gives_every_rank_rank_zeros_groups():
    results = run_distributed(confirmed_worker, 2)
    rows, embeddings, groups, report = results[0]
    assert torch.equal(results[1][2], groups) and results[1][3] == report
    reference = MemoryBank(40, 3)
    reference.features.copy_(rows)
    expected = timeless([confirming_merger(bank_ratio=0.7)(reference, embeddings)])[0]
    assert report == expected and torch.equal(reference.groups, groups)
    unconfirmed = MemoryBank(40, 3)
    unconfirmed.features.copy_(rows)
    alone = confirming_merger()(unconfirmed, embeddings)
    assert 0 < report["pairs_merged"] < alone.pairs_merged  # the bank refused a pair the embeddings held
