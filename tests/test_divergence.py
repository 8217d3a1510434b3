"""Ranks whose memories diverged (gloo, 2 CPU processes): every rank raises MemoryDivergenceError together.

Before these checks, a rank resumed without ``samples_written`` entered a merge round alone (a hang), and
banks of different sizes raised on one rank only.
"""

import torch
from distributed_helpers import run_distributed

from ssl_memory import MemoryBank, MemoryBankLoss, MemoryDivergenceError, NeighbourMerger

N, DIM = 16, 4


def make_loss():
    merger = NeighbourMerger(warmup=0, interval=1, ratio=1.0, min_similarity=-1.0, backend="torch")
    return MemoryBankLoss(N, DIM, merger=merger)


def rows(rank, step):
    gen = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(4, DIM, generator=gen), torch.arange(4) + 4 * ((2 * step + rank) % 4)


def resumed_worker(rank, world_size, through_update_memory):
    """Three steps, a checkpoint, then rank 1 resumes without samples_written: the next step is refused
    on both ranks before anything is written."""
    criterion = make_loss()
    for step in range(3):
        criterion(*rows(rank, step))
    state = criterion.state_dict()
    if rank == 1:
        state = {k: v for k, v in state.items() if k != "memory.samples_written"}
        fresh = make_loss()
        fresh.load_state_dict(state, strict=False)
        criterion = fresh
    before = criterion.memory.features.clone(), criterion.memory.groups.clone()
    try:
        if through_update_memory:
            criterion.update_memory(*rows(rank, 3))
        else:
            criterion(*rows(rank, 3))
        error = None
    except MemoryDivergenceError as caught:
        error = str(caught)
    unchanged = torch.equal(criterion.memory.features, before[0]) and torch.equal(criterion.memory.groups, before[1])
    return error, unchanged


def test_a_rank_resumed_without_its_count_is_refused_on_every_rank():
    for through_update_memory in (False, True):
        (error, unchanged), other = run_distributed(resumed_worker, 2, through_update_memory)
        assert error is not None and error == other[0], (error, other)
        assert "memory.samples_written: [24, 0]" in error
        assert unchanged and other[1]


def sizes_worker(rank, world_size):
    bank = MemoryBank(N + 2 * rank, DIM)
    try:
        NeighbourMerger(backend="torch")(bank)
        return None
    except MemoryDivergenceError as caught:
        return str(caught)


def test_banks_of_different_sizes_are_refused_on_every_rank():
    errors = run_distributed(sizes_worker, 2)
    assert errors[0] is not None and errors[0] == errors[1] and "entries: [16, 18]" in errors[0]


def schedule_worker(rank, world_size):
    """Same bank, but rank 1's merger was restored from an older checkpoint (fewer epochs seen)."""
    criterion = make_loss()
    for step in range(5):
        criterion(*rows(rank, step))
    if rank == 1:
        criterion.merger.epochs_seen.fill_(0)
        criterion.merger._epochs_seen = None
    try:
        criterion(*rows(rank, 5))
        return None
    except MemoryDivergenceError as caught:
        return str(caught)


def test_mergers_on_different_schedules_are_refused_on_every_rank():
    errors = run_distributed(schedule_worker, 2)
    assert errors[0] is not None and errors[0] == errors[1] and "merger.epochs_seen: [2, 0]" in errors[0]
