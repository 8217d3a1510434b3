from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_memory import Queue


def oldest_first(queue: Queue):
    """The queue's rows and labels from oldest to newest, whatever the ring position."""
    count, pointer = len(queue), int(queue.pointer)
    order = torch.arange(count) if not queue.is_full else (torch.arange(count) + pointer) % count
    labels = queue.labels[order].tolist() if queue.labelled else None
    return queue.features[order], labels


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    labelled=st.booleans(),
)
def test_queue_matches_a_deque(size, batch_sizes, labelled):
    queue = Queue(size, 3, labelled=labelled)
    reference = deque(maxlen=size)
    counter = 0
    for batch_size in batch_sizes:
        ids = torch.arange(counter, counter + batch_size)
        counter += batch_size
        features = ids.float().unsqueeze(1).repeat(1, 3)  # each row carries its arrival number
        queue.enqueue(features, ids + 1000 if labelled else None)
        reference.extend(ids.tolist())
        rows, labels = oldest_first(queue)
        assert rows[:, 0].long().tolist() == list(reference)
        assert len(queue) == len(reference) and queue.is_full == (len(reference) == size)
        if labelled:
            assert labels == [i + 1000 for i in reference]


def test_batch_larger_than_queue_keeps_its_last_rows():
    queue = Queue(4, 2)
    queue.enqueue(torch.arange(10.0).unsqueeze(1).repeat(1, 2))
    assert sorted(queue.features[:, 0].tolist()) == [6.0, 7.0, 8.0, 9.0]


def test_features_are_the_valid_rows_only_while_filling():
    queue = Queue(8, 2)
    assert queue.features.shape == (0, 2) and len(queue) == 0
    queue.enqueue(torch.ones(3, 2))
    assert queue.features.shape == (3, 2) and not queue.is_full


def test_state_dict_round_trip_restores_pointer_fill_and_contents():
    gen = torch.Generator().manual_seed(0)
    first = Queue(10, 4, labelled=True)
    first.enqueue(torch.randn(7, 4, generator=gen), torch.arange(7))
    first.enqueue(torch.randn(6, 4, generator=gen), torch.arange(6))
    assert set(first.state_dict()) == {"slots", "slot_labels", "pointer", "count"}
    second = Queue(10, 4, labelled=True)
    second.load_state_dict(first.state_dict())
    batch = torch.randn(5, 4, generator=gen), torch.arange(5)
    first.enqueue(*batch)
    second.enqueue(*batch)
    for name in ("slots", "slot_labels", "pointer", "count"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_reset_empties_the_queue():
    queue = Queue(5, 2, labelled=True)
    queue.enqueue(torch.randn(7, 2), torch.arange(7))
    queue.reset()
    assert len(queue) == 0 and int(queue.pointer) == 0


def test_unlabelled_queue_has_no_labels():
    with pytest.raises(RuntimeError, match="labelled=False"):
        _ = Queue(4, 2).labels


@pytest.mark.parametrize(
    ("labelled", "features", "labels", "error", "match"),
    [
        (False, torch.randn(2, 3), None, ValueError, r"features must have shape \(B, 4\), got \(2, 3\)"),
        (False, torch.randn(4), None, ValueError, r"features must have shape \(B, 4\), got \(4,\)"),
        (False, torch.ones(2, 4, dtype=torch.int32), None, TypeError, "features must be a floating-point tensor"),
        (False, torch.randn(2, 4), torch.arange(2), ValueError, "labels were given to a Queue built with labelled=False"),
        (True, torch.randn(2, 4), None, ValueError, "labels are required"),
        (True, torch.randn(2, 4), torch.arange(3), ValueError, r"labels must have shape \(2,\).*got \(3,\)"),
        (True, torch.randn(2, 4), torch.rand(2), TypeError, "labels must be an integer tensor"),
        (False, torch.empty(2, 4, device="meta"), None, ValueError, "features is on meta but the memory is on cpu"),
        (False, torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), None, ValueError, "NaN or infinite"),
    ],
)
def test_bad_input_is_rejected_and_leaves_the_queue_unchanged(labelled, features, labels, error, match):
    queue = Queue(6, 4, labelled=labelled)
    queue.enqueue(torch.randn(3, 4), torch.arange(3) if labelled else None)
    before = {name: tensor.clone() for name, tensor in queue.state_dict().items()}
    with pytest.raises(error, match=match):
        queue.enqueue(features, labels)
    for name, tensor in queue.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        Queue(0, 4)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        Queue(4, 4, dtype=torch.long)
