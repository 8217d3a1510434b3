"""load_state_dict refuses a state that would corrupt a memory, with a clear error, and leaves the module as it was."""

import pytest
import torch

from ssl_memory import MemoryBank, MemoryBankLoss, Queue, QueueLoss


def filled_queue():
    queue = Queue(6, 3, labelled=True)
    queue.enqueue(torch.randn(4, 3), torch.arange(4))
    return queue


def corrupt(state, key, value):
    state = {k: v.clone() for k, v in state.items()}
    state[key] = value(state[key]) if callable(value) else value
    return state


BANK_CASES = [
    ("features", lambda t: t.index_fill(0, torch.tensor([2]), float("nan")), "features'\\] holds NaN"),
    ("features", lambda t: t[:-1], r"must have shape \(10, 3\), got \(9, 3\)"),
    ("groups", lambda t: t.index_fill(0, torch.tensor([0]), 10), r"entry ids in \[0, 10\), got values in \[1, 10\]"),
    ("groups", lambda t: t.float(), "integer tensor"),
]
QUEUE_CASES = [
    ("count", torch.tensor(7), r"count'\] must lie in \[0, 6\], got 7"),
    ("pointer", torch.tensor(6), r"pointer'\] must lie in \[0, 6\), got 6"),
    ("pointer", torch.tensor(1), r"must equal count \(4\) while the queue is not full, got 1"),
    ("slots", lambda t: t.index_fill(0, torch.tensor([5]), float("inf")), "holds NaN or infinite"),
    ("slot_labels", lambda t: t[:3], r"must have shape \(6,\)"),
    ("slot_labels", lambda t: t.double(), "integer tensor"),
]


@pytest.mark.parametrize(("key", "value", "match"), BANK_CASES)
def test_bank_refuses_a_bad_state(key, value, match):
    bank = MemoryBank(10, 3)
    bank.update(torch.tensor([1, 2]), torch.randn(2, 3))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bank.load_state_dict(corrupt(before, key, value))
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("key", "value", "match"), QUEUE_CASES)
def test_queue_refuses_a_bad_state(key, value, match):
    queue = filled_queue()
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        queue.load_state_dict(corrupt(before, key, value))
    for k, v in queue.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(queue) == 4


def test_a_full_queue_may_have_its_pointer_anywhere():
    queue = Queue(4, 2)
    queue.enqueue(torch.randn(3, 2))
    queue.enqueue(torch.randn(3, 2))
    state = queue.state_dict()
    fresh = Queue(4, 2)
    fresh.load_state_dict(state)
    assert int(fresh.pointer) == 2 and len(fresh) == 4 and torch.equal(fresh.slots, queue.slots)


def test_losses_refuse_a_bad_memory_state_by_its_full_key():
    criterion = MemoryBankLoss(10, 3)
    state = corrupt(criterion.state_dict(), "memory.features", lambda t: t * float("nan"))
    with pytest.raises(ValueError, match=r"state_dict\['memory.features'\] holds NaN"):
        criterion.load_state_dict(state)
    assert torch.isfinite(criterion.memory.features).all()
    queue_loss = QueueLoss(size=5, dim=3)
    with pytest.raises(ValueError, match=r"state_dict\['queue.count'\]"):
        queue_loss.load_state_dict(corrupt(queue_loss.state_dict(), "queue.count", torch.tensor(100)))
    assert len(queue_loss.queue) == 0
