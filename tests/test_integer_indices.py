"""Indices and labels of any integer dtype give exactly what int64 gives; other dtypes are refused, naming the argument."""

import pytest
import torch

from ssl_memory import ConsistencyLoss, CrossBatchLoss, MemoryBank, MemoryBankLoss, NeighbourMerger, Queue, QueueLoss

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def bank_loss_run(dtype):
    criterion = MemoryBankLoss(20, 4, temperature=0.2, consistency_weight=0.5)
    criterion.memory.groups[[3, 7]] = 3  # a merged group
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(8, 4, generator=gen, requires_grad=True)
    indices = torch.tensor([3, 1, 9, 3, 1, 9, 2, 7])
    loss = criterion(embeddings, indices.to(dtype))
    loss.backward()
    return loss.detach(), embeddings.grad, criterion.memory.features


def queue_loss_run(dtype):
    criterion = QueueLoss(size=6, dim=4)
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(3):
        query = torch.randn(4, 4, generator=gen, requires_grad=True)
        loss = criterion(query, torch.randn(4, 4, generator=gen), torch.tensor([0, 5, 5, 2]).to(dtype))
        loss.backward()
        outputs += [loss.detach(), query.grad]
    return (*outputs, criterion.queue.slots, criterion.queue.slot_labels)


def cross_batch_run(dtype):
    criterion = CrossBatchLoss(size=10, dim=4, margin=0.0)
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(3):
        embeddings = torch.randn(6, 4, generator=gen, requires_grad=True)
        loss = criterion(embeddings, torch.tensor([0, 1, 1, 2, 0, 7]).to(dtype))
        loss.backward()
        outputs += [loss.detach(), embeddings.grad]
    return (*outputs, criterion.queue.slots, criterion.queue.slot_labels)


def memories_run(dtype):
    bank, queue = MemoryBank(10, 3), Queue(5, 3, labelled=True)
    rows = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    bank.update(torch.tensor([1, 4, 1, 9]).to(dtype), rows)
    queue.enqueue(rows, torch.tensor([1, 4, 1, 9]).to(dtype))
    consistency = ConsistencyLoss(0.5)(rows @ rows.T, torch.tensor([0, 1, 0, 1]).to(dtype))
    return bank.features, queue.slot_labels, queue.slots, consistency


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("run", [bank_loss_run, queue_loss_run, cross_batch_run, memories_run])
def test_every_integer_dtype_gives_what_int64_gives(run, dtype):
    for got, expected in zip(run(dtype), run(torch.int64)):
        assert torch.equal(got, expected)


def test_merger_schedule_runs_with_narrow_indices():
    criterion = MemoryBankLoss(10, 3, merger=NeighbourMerger(warmup=0))
    criterion(torch.randn(4, 3), torch.tensor([0, 1, 2, 3], dtype=torch.int16))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_non_integer_indices_are_refused_by_name(dtype):
    indices = torch.tensor([0, 1]).to(dtype)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        MemoryBankLoss(4, 3)(torch.randn(2, 3), indices)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        QueueLoss(4, 3)(torch.randn(2, 3), torch.randn(2, 3), indices)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        MemoryBank(4, 3).update(indices, torch.randn(2, 3))
