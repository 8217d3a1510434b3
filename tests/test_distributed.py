"""Every rank ends each call with the memory one process would hold after the rank-ordered batch."""

import pytest
import torch
from distributed_helpers import run_distributed

from ssl_memory import MemoryBank, Queue

NUM_ENTRIES, DIM, STEPS = 40, 6, 4


def batch(step: int, rank: int):
    """Rank-specific data of one step; ranks hold different batch sizes, one of them sometimes empty."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    size = (step + 2 * rank) % 5
    return torch.randint(0, NUM_ENTRIES, (size,), generator=gen), torch.randn(size, DIM, generator=gen)


def bank_worker(rank, world_size):
    torch.manual_seed(rank)  # different initial banks: the first update must adopt rank 0's
    bank = MemoryBank(NUM_ENTRIES, DIM)
    initial = bank.features.clone()
    for step in range(STEPS):
        bank.update(*batch(step, rank))
    return initial, bank.state_dict()


def queue_worker(rank, world_size):
    queue = Queue(7, DIM, labelled=True)
    for step in range(STEPS):
        indices, features = batch(step, rank)
        queue.enqueue(features, indices)
    return queue.state_dict()


def non_finite_worker(rank, world_size):
    bank = MemoryBank(NUM_ENTRIES, DIM)
    bank.update(*batch(0, rank))
    before = bank.features.clone()
    indices, features = torch.tensor([1, 2]), torch.randn(2, DIM)
    if rank == world_size - 1:
        features[0, 0] = float("nan")
    try:
        bank.update(indices, features)
        message = None
    except ValueError as error:
        message = str(error)
    return message, torch.equal(before, bank.features)


def concatenated(step, world_size):
    pieces = [batch(step, rank) for rank in range(world_size)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


@pytest.mark.parametrize("world_size", [2, 3])
def test_bank_is_identical_on_every_rank_and_equals_one_process(world_size):
    results = run_distributed(bank_worker, world_size)
    reference = MemoryBank(NUM_ENTRIES, DIM)
    reference.features.copy_(results[0][0])
    for step in range(STEPS):
        reference.update(*concatenated(step, world_size))
    assert not torch.equal(results[0][0], results[1][0])  # the ranks really started apart
    for _, state in results:
        torch.testing.assert_close(state["features"], reference.features, rtol=0, atol=1e-6)
        assert torch.equal(state["features"], results[0][1]["features"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_queue_is_identical_on_every_rank_and_equals_one_process(world_size):
    results = run_distributed(queue_worker, world_size)
    reference = Queue(7, DIM, labelled=True)
    for step in range(STEPS):
        indices, features = concatenated(step, world_size)
        reference.enqueue(features, indices)
    for state in results:
        for name, tensor in reference.state_dict().items():
            assert torch.equal(state[name], tensor), name


def test_non_finite_features_on_one_rank_stop_every_rank():
    for message, unchanged in run_distributed(non_finite_worker, 2):
        assert message is not None and "rank(s) [1]" in message
        assert unchanged
