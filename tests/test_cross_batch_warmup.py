"""CrossBatchLoss under torch.distributed: a bad batch during the warm-up fails on every rank, counters stay equal."""

import torch
from distributed_helpers import run_distributed

from ssl_memory import CrossBatchLoss
from ssl_memory.distributed import DistributedInputError

DIM = 6


def warmup_nan_worker(rank, world_size):
    gen = torch.Generator().manual_seed(rank)
    criterion = CrossBatchLoss(size=9, dim=DIM, start_step=2)
    criterion(torch.randn(4, DIM, generator=gen), torch.arange(4))
    embeddings = torch.randn(4, DIM, generator=gen)
    if rank == 1:
        embeddings[2, 0] = float("nan")
    try:
        criterion(embeddings, torch.arange(4))  # still in the warm-up: nothing is enqueued
        error = None
    except DistributedInputError as caught:
        error = str(caught)
    steps_after_error = int(criterion.step)
    for _ in range(3):  # the queue's gathers start once the warm-up ends: every rank must be in step
        criterion(torch.randn(3 + rank, DIM, generator=gen), torch.arange(3 + rank))
    return error, steps_after_error, criterion.state_dict()


def test_nan_on_one_rank_during_the_warm_up_raises_on_every_rank_and_keeps_the_counters_equal():
    results = run_distributed(warmup_nan_worker, 2)
    for error, steps_after_error, state in results:
        assert error is not None and "rank(s) [1]" in error and "NaN" in error
        assert steps_after_error == 1 and int(state["step"]) == 4
        assert int(state["queue.count"]) == 9  # two steps of 3 + 4 rows after the warm-up: full
        assert all(torch.equal(v, results[0][2][k]) for k, v in state.items())
