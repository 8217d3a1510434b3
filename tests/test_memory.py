"""A loss reads a memory and writes it in the same forward: backward must see the values it read."""

import pytest
import torch

from ssl_memory import MemoryBank, Queue


def read_then_write(memory, writes):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(5, memory.dim, generator=gen, requires_grad=True)
    table_read = memory._table[: memory._num_readable()].clone().float()
    similarity = memory.similarity(query)
    weights = torch.randn(similarity.shape, generator=gen)
    for write in writes:
        write(memory, gen)
    (similarity * weights).sum().backward()
    return query.grad, weights @ table_read, table_read


def bank_write(memory, gen):
    memory.update(torch.randint(0, memory.num_entries, (6,), generator=gen), torch.randn(6, memory.dim, generator=gen))


def queue_write(memory, gen):
    memory.enqueue(torch.randn(7, memory.dim, generator=gen))


def filled_queue():
    queue = Queue(12, 4)
    queue.enqueue(torch.randn(9, 4))
    return queue


@pytest.mark.parametrize("num_writes", [0, 1, 3])
@pytest.mark.parametrize(("make", "write"), [(lambda: MemoryBank(20, 4), bank_write), (filled_queue, queue_write)])
def test_backward_uses_the_memory_as_it_was_read(make, write, num_writes):
    memory = make()
    grad, expected, table_read = read_then_write(memory, [write] * num_writes)
    if num_writes:
        assert not torch.equal(memory._table[: table_read.shape[0]], table_read)  # the writes did land
    torch.testing.assert_close(grad, expected)


def test_write_that_bypasses_the_api_is_detected():
    bank = MemoryBank(10, 4)
    query = torch.randn(3, 4, requires_grad=True)
    similarity = bank.similarity(query)
    bank.features.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place outside"):
        similarity.sum().backward()


def test_similarity_computes_in_float32_from_half_storage():
    bank = MemoryBank(10, 4, dtype=torch.float16)
    assert bank.similarity(torch.randn(3, 4)).dtype == torch.float32
    grad, expected, _ = read_then_write(bank, [bank_write])
    torch.testing.assert_close(grad, expected)


def test_finished_reads_are_released():
    bank = MemoryBank(10, 4)
    for _ in range(3):
        bank.similarity(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert len(bank._readers) == 0
