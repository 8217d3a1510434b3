"""Nothing non-finite or zero is ever stored, the module's own state always loads back, and threads keep the count."""

import threading

import pytest
import torch
import torch.nn.functional as F

from ssl_memory import MemoryBank, MemoryBankLoss, Queue


def test_bank_stores_unit_rows_for_float64_rows_near_the_largest_double():
    bank = MemoryBank(6, 4, momentum=0.5)
    rows = torch.tensor([[1e300, 1e300, 0, 0], [-1e300, 0, 0, 1e300], [3e307, 0, 0, 0]], dtype=torch.float64)
    bank.update(torch.tensor([0, 1, 2]), rows)
    assert torch.isfinite(bank.features).all()
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(6))
    fresh = MemoryBank(6, 4)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.features, bank.features)


def test_views_that_cancel_leave_the_entry_as_it_was():
    bank = MemoryBank(5, 3, momentum=0.0)
    before = bank.features.clone()
    v = F.normalize(torch.randn(1, 3), dim=1)
    bank.update(torch.tensor([2, 2, 4]), torch.cat([v, -v, v]))
    assert torch.equal(bank.features[2], before[2])  # no zero row: no direction to move to
    torch.testing.assert_close(bank.features[4], v[0])
    assert bank.num_written == 2
    MemoryBank(5, 3).load_state_dict(bank.state_dict())


def test_float16_queue_refuses_rows_beyond_its_range_and_stores_nothing():
    queue = Queue(8, 3, dtype=torch.float16)
    queue.enqueue(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"features \(stored as torch.float16\) contain NaN or infinite"):
        queue.enqueue(torch.full((2, 3), 1e5))
    assert len(queue) == 2 and torch.isfinite(queue.slots).all()
    Queue(8, 3, dtype=torch.float16).load_state_dict(queue.state_dict())


def test_two_threads_on_one_loss_leave_num_written_equal_to_samples_written():
    criterion = MemoryBankLoss(num_samples=64, dim=8)
    barrier = threading.Barrier(2)

    def train(seed):
        gen = torch.Generator().manual_seed(seed)
        barrier.wait()
        for _ in range(150):
            embeddings = torch.randn(16, 8, generator=gen, requires_grad=True)
            criterion(embeddings, torch.randperm(64, generator=gen)[:16]).backward()
            assert criterion.memory.num_written >= 0  # the merger's read, racing the other thread's writes

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert criterion.memory.num_written == int(criterion.memory.samples_written)
