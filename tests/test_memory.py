"""A loss reads a memory and writes it in the same forward: backward must see the values it read, whatever happens after."""

import weakref

import pytest
import torch

from ssl_memory import MemoryBank, Queue


def bank_write(memory, gen):
    memory.update(torch.randint(0, memory.num_entries, (6,), generator=gen), torch.randn(6, memory.dim, generator=gen))


def queue_write(memory, gen):
    memory.enqueue(torch.randn(7, memory.dim, generator=gen))


def data_write(memory, gen):
    """A write that bypasses every API and the version counter."""
    memory.readable().data.mul_(-2.0)


def reset(memory, gen):
    memory.reset()


def load(memory, gen):
    memory.load_state_dict({k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in memory.state_dict().items()})


def filled_queue():
    queue = Queue(12, 4)
    queue.enqueue(torch.randn(9, 4))
    return queue


CASES = [
    (lambda: MemoryBank(20, 4), bank_write),
    (filled_queue, queue_write),
    (lambda: MemoryBank(20, 4), data_write),
    (filled_queue, data_write),
    (filled_queue, reset),
    (lambda: MemoryBank(20, 4), load),
]


@pytest.mark.parametrize("num_writes", [1, 3])
@pytest.mark.parametrize(("make", "write"), CASES)
def test_backward_uses_the_memory_as_it_was_read(make, write, num_writes):
    memory = make()
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(5, memory.dim, generator=gen, requires_grad=True)
    table_read = memory.readable().clone().float()
    similarity = memory.similarity(query)
    weights = torch.randn(similarity.shape, generator=gen)
    for _ in range(num_writes):
        write(memory, gen)
    assert not torch.equal(memory.readable(), table_read[: memory.readable().shape[0]]) or len(memory.readable()) == 0
    (similarity * weights).sum().backward()
    torch.testing.assert_close(query.grad, weights @ table_read)  # d/dq sum(W * (q @ T.T)) = W @ T


def test_several_forwards_then_one_backward_accumulate_exact_gradients():
    bank, gen = MemoryBank(20, 4), torch.Generator().manual_seed(1)
    query = torch.randn(3, 4, generator=gen, requires_grad=True)
    total, expected = 0, torch.zeros(3, 4)
    for _ in range(4):
        weights = torch.randn(3, 20, generator=gen)
        expected += weights @ bank.features
        total = total + (bank.similarity(query) * weights).sum()
        bank_write(bank, gen)
    total.backward()
    torch.testing.assert_close(query.grad, expected)


def test_similarity_computes_in_float32_from_half_storage():
    bank = MemoryBank(10, 4, dtype=torch.float16)
    query = torch.randn(3, 4, requires_grad=True)
    similarity = bank.similarity(query)
    assert similarity.dtype == torch.float32
    table_read = bank.features.float()
    bank_write(bank, torch.Generator().manual_seed(0))
    similarity.sum().backward()
    torch.testing.assert_close(query.grad, table_read.sum(0).expand(3, 4))


def test_similarity_is_float32_under_autocast():
    bank = MemoryBank(10, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bank.similarity(torch.randn(3, 4)).dtype == torch.float32


def test_the_copy_a_read_keeps_goes_with_its_graph():
    bank = MemoryBank(10, 4)
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    query = torch.randn(3, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        similarity = bank.similarity(query)
    copies = [ref for ref in saved if ref() is not None and ref().numel() == bank.features.numel()]
    storage = bank.features.untyped_storage().data_ptr()
    assert copies and all(ref().untyped_storage().data_ptr() != storage for ref in copies)
    similarity.sum().backward()
    del similarity
    assert all(ref() is None for ref in copies)  # the graph's copy goes with the graph: nothing accumulates
    assert set(vars(bank)) == set(vars(MemoryBank(10, 4)))  # no per-read state on the module


def test_double_backward_through_a_read_is_exact():
    bank = MemoryBank(6, 3, dtype=torch.float64)
    query = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda q: bank.similarity(q).pow(2).sum(), (query,))
