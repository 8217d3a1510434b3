"""Gradient accumulation: micro-batches with update_memory=False plus one update_memory call equal one large batch."""

import torch

from ssl_memory import CrossBatchLoss, MemoryBankLoss, QueueLoss


class CountingMerger:
    """Stands in for a NeighbourMerger: records each step and what the bank held then."""

    def __init__(self):
        self.seen = []

    def step(self, memory):
        self.seen.append(memory.features.clone())


def data(seed, samples=8, views=2, dim=5, num_entries=30):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(num_entries, generator=gen)[:samples].repeat(views)
    return torch.randn(samples * views, dim, generator=gen), indices


def sample_major(embeddings, indices, chunks):
    """Split a view-major batch into micro-batches that keep every view of a sample together."""
    samples = indices.numel() // 2
    order = torch.arange(indices.numel()).view(2, samples).T.reshape(-1)  # sample by sample
    return list(zip(embeddings[order].chunk(chunks), indices[order].chunk(chunks)))


def test_memory_bank_loss_accumulated_equals_one_large_batch():
    large = MemoryBankLoss(30, 5, temperature=0.2, consistency_weight=0.5, merger=CountingMerger())
    small = MemoryBankLoss(30, 5, temperature=0.2, consistency_weight=0.5, merger=CountingMerger())
    for step in range(3):
        embeddings, indices = data(step)
        weights = torch.nn.Parameter(torch.eye(5))
        large(embeddings @ weights, indices).backward()
        expected = weights.grad.clone()

        weights.grad = None
        micro = sample_major(embeddings, indices, chunks=4)
        kept = []
        for chunk, chunk_indices in micro:
            out = chunk @ weights
            (small(out, chunk_indices, update_memory=False) / len(micro)).backward()
            kept.append((out.detach(), chunk_indices))
        assert not torch.equal(small.memory.features, large.memory.features)  # not written yet
        small.update_memory(torch.cat([e for e, _ in kept]), torch.cat([i for _, i in kept]))
        torch.testing.assert_close(weights.grad, expected)
        torch.testing.assert_close(small.memory.features, large.memory.features)
    assert len(small.merger.seen) == len(large.merger.seen) == 3  # once per optimiser step
    for a, b in zip(small.merger.seen, large.merger.seen):
        torch.testing.assert_close(a, b)


def test_queue_loss_accumulated_equals_one_large_batch():
    large, small = QueueLoss(size=20, dim=5, temperature=0.3), QueueLoss(size=20, dim=5, temperature=0.3)
    gen = torch.Generator().manual_seed(0)
    for criterion in (large, small):  # an empty queue's negatives are the batch's keys: not the case here
        criterion.update_memory(torch.randn(6, 5, generator=torch.Generator().manual_seed(1)))
    for _ in range(4):  # the queue fills and wraps
        query = torch.randn(8, 5, generator=gen, requires_grad=True)
        key, indices = torch.randn(8, 5, generator=gen), torch.randint(0, 40, (8,), generator=gen)
        large(query, key, indices).backward()
        expected, query.grad = query.grad.clone(), None
        for q, k, i in zip(query.split(2), key.split(2), indices.split(2)):
            (small(q, k, i, update_memory=False) / 4).backward()
        small.update_memory(key, indices)
        torch.testing.assert_close(query.grad, expected)
        for name, value in large.state_dict().items():
            torch.testing.assert_close(small.state_dict()[name], value)


def test_cross_batch_loss_update_memory_writes_what_one_large_batch_writes():
    """XBM's batch term pairs rows of one call, so only its memory and step count are shared with a large batch."""
    large, small = CrossBatchLoss(size=12, dim=5, start_step=1), CrossBatchLoss(size=12, dim=5, start_step=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        embeddings, labels = torch.randn(8, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        large(embeddings, labels)
        for chunk, chunk_labels in zip(embeddings.split(4), labels.split(4)):
            small(chunk, chunk_labels, update_memory=False)
        small.update_memory(embeddings, labels)
        for name, value in large.state_dict().items():
            torch.testing.assert_close(small.state_dict()[name], value)
    assert int(small.step) == 4 and len(small.queue) == 12
