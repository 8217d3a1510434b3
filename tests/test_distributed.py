"""Under torch.distributed (gloo, 2 and 3 CPU processes): identical memories, an identical start, collective errors.

References: one process holding the concatenation of every rank's batch, in rank order, and plain
autograd on the bank a fresh process starts from.
"""

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed

from ssl_memory import CrossBatchLoss, MemoryBank, MemoryBankLoss, Queue, QueueLoss
from ssl_memory.distributed import DistributedInputError

NUM_ENTRIES, DIM, STEPS = 40, 6, 4


def batch(step: int, rank: int):
    """Rank-specific data of one step; ranks hold different batch sizes, one of them sometimes empty."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    size = (step + 2 * rank) % 5
    return torch.randint(0, NUM_ENTRIES, (size,), generator=gen), torch.randn(size, DIM, generator=gen)


def concatenated(step, world_size):
    pieces = [batch(step, rank) for rank in range(world_size)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def bank_worker(rank, world_size):
    torch.manual_seed(rank)  # ranks seeded differently, as a DDP script seeds its augmentations
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


@pytest.mark.parametrize("world_size", [2, 3])
def test_bank_starts_and_stays_identical_on_every_rank_and_equals_one_process(world_size):
    results = run_distributed(bank_worker, world_size)
    reference = MemoryBank(NUM_ENTRIES, DIM)
    for initial, _ in results:
        assert torch.equal(initial, reference.features)  # the same start, without any collective
    for step in range(STEPS):
        reference.update(*concatenated(step, world_size))
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


def loss_batch(step, rank, rows=6):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, DIM, generator=gen), torch.randint(0, NUM_ENTRIES, (rows,), generator=gen)


def first_step_worker(rank, world_size):
    torch.manual_seed(10 + rank)
    criterion = MemoryBankLoss(NUM_ENTRIES, DIM, temperature=0.1)
    embeddings, indices = loss_batch(0, rank)
    embeddings.requires_grad_(True)
    criterion(embeddings, indices).backward()
    return embeddings.grad, criterion.memory.features


@pytest.mark.parametrize("world_size", [2, 3])
def test_first_step_gradient_is_exact_on_differently_seeded_ranks(world_size):
    results = run_distributed(first_step_worker, world_size)
    start = MemoryBank(NUM_ENTRIES, DIM).features
    for rank, (grad, features) in enumerate(results):
        embeddings, indices = loss_batch(0, rank)
        embeddings.requires_grad_(True)
        F.cross_entropy(F.normalize(embeddings, dim=1) @ start.T / 0.1, indices).backward()
        torch.testing.assert_close(grad, embeddings.grad)
        assert torch.equal(features, results[0][1])


# One bad input on one rank: (what the loss gets on that rank, what the error names).
BAD_BANK_INPUTS = {
    "index out of range": (lambda e, i: (e, i + NUM_ENTRIES), "indices must lie in"),
    "NaN": (lambda e, i: (e.index_fill(0, torch.tensor([1]), float("nan")), i), "NaN"),
    "wrong width": (lambda e, i: (e[:, :-1], i), "shape"),
    "empty batch": (lambda e, i: (e[:0], i[:0]), "at least one row"),
    "float indices": (lambda e, i: (e, i.float()), "integer"),
    "too few indices": (lambda e, i: (e, i[:-1]), "shape"),
}


def bank_loss_errors_worker(rank, world_size, bad_rank):
    """Every bad case in turn, each followed by a good step: the collectives must stay in step throughout."""
    criterion = MemoryBankLoss(NUM_ENTRIES, DIM, temperature=0.1, consistency_weight=0.5)
    criterion(*loss_batch(0, rank))
    outcomes = []
    for step, (corrupt, _) in enumerate(BAD_BANK_INPUTS.values(), start=1):
        before = criterion.memory.state_dict()
        embeddings, indices = loss_batch(step, rank)
        if rank == bad_rank:
            embeddings, indices = corrupt(embeddings, indices)
        try:
            criterion(embeddings, indices).backward()
            error = None
        except DistributedInputError as caught:
            error = str(caught)
        unchanged = all(torch.equal(before[k], v) for k, v in criterion.memory.state_dict().items())
        criterion(*loss_batch(100 + step, rank))  # the next step works on every rank
        outcomes.append((error, unchanged))
    return outcomes, criterion.memory.features


@pytest.mark.parametrize(("world_size", "bad_rank"), [(2, 1), (3, 0), (3, 2)])
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(world_size, bad_rank):
    results = run_distributed(bank_loss_errors_worker, world_size, bad_rank)
    for case_index, (case, (_, named)) in enumerate(BAD_BANK_INPUTS.items()):
        errors = [outcomes[case_index][0] for outcomes, _ in results]
        assert errors[0] is not None and len(set(errors)) == 1, (case, errors)
        assert f"rank(s) [{bad_rank}]" in errors[0] and named in errors[0], (case, errors[0])
        assert all(outcomes[case_index][1] for outcomes, _ in results), case
    assert all(torch.equal(features, results[0][1]) for _, features in results)


def queue_loss_errors_worker(rank, world_size, bad_ranks):
    criterion = QueueLoss(size=10, dim=DIM)
    query, key = torch.randn(4, DIM), torch.randn(4, DIM)
    criterion(query, key)
    before = criterion.queue.state_dict()
    if rank in bad_ranks:
        query = query.clone()
        query[0, 0] = float("nan")
    try:
        criterion(query, key)
        error = None
    except DistributedInputError as caught:
        error = str(caught)
    unchanged = all(torch.equal(before[k], v) for k, v in criterion.queue.state_dict().items())
    criterion(torch.randn(3, DIM), torch.randn(3, DIM))
    return error, unchanged, criterion.queue.state_dict()


def test_nan_query_on_two_of_three_ranks_enqueues_nothing_anywhere():
    results = run_distributed(queue_loss_errors_worker, 3, (0, 2))
    for error, unchanged, state in results:
        assert error is not None and "rank(s) [0, 2]" in error and "query contain NaN" in error
        assert unchanged
        # 12 rows (4 a rank) keep their newest 10, a full turn of the ring; then 9 (3 a rank)
        assert int(state["count"]) == 10 and int(state["pointer"]) == 9
        assert all(torch.equal(v, results[0][2][k]) for k, v in state.items())


def cross_batch_errors_worker(rank, world_size):
    criterion = CrossBatchLoss(size=9, dim=DIM)
    criterion(torch.randn(4, DIM), torch.arange(4))
    before = criterion.state_dict()
    labels = torch.arange(4) if rank == 0 else torch.arange(3)  # too few labels on rank 1
    try:
        criterion(torch.randn(4, DIM), labels)
        error = None
    except DistributedInputError as caught:
        error = str(caught)
    unchanged = all(torch.equal(before[k], v) for k, v in criterion.state_dict().items())
    criterion(torch.randn(2, DIM), torch.arange(2))
    return error, unchanged, criterion.state_dict()


def test_cross_batch_loss_errors_are_collective():
    results = run_distributed(cross_batch_errors_worker, 2)
    for error, unchanged, state in results:
        assert error is not None and "rank(s) [1]" in error and "labels must have shape (4,)" in error
        assert unchanged and int(state["step"]) == 2 and int(state["queue.count"]) == 9  # 8 rows, then 4 more: full
        assert all(torch.equal(v, results[0][2][k]) for k, v in state.items())


def bank_update_errors_worker(rank, world_size):
    bank = MemoryBank(NUM_ENTRIES, DIM)
    before = bank.features.clone()
    indices, features = torch.tensor([1, 2]), torch.randn(2, DIM)
    if rank == world_size - 1:
        features[0, 0] = float("nan")
    try:
        bank.update(indices, features)
        message = None
    except DistributedInputError as error:
        message = str(error)
    return message, torch.equal(before, bank.features)


def test_non_finite_features_on_one_rank_stop_every_rank():
    for message, unchanged in run_distributed(bank_update_errors_worker, 2):
        assert message is not None and "rank(s) [1]" in message and "NaN" in message
        assert unchanged
