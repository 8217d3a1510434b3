"""pml.CrossBatchMemory.load_state_dict checks the whole state before copying any of it."""

import pytest
import torch
from pytorch_metric_learning import losses
from state_helpers import assert_unchanged, snapshot

from ssl_memory.pml import CrossBatchMemory


def filled():
    criterion = CrossBatchMemory(losses.ContrastiveLoss(), 3, memory_size=8)
    criterion(torch.randn(5, 3), torch.arange(5))
    return criterion


def extra(**changes):
    def edit(state):
        state["_extra_state"] = {**state["_extra_state"], **changes}
    return edit


def without(key):
    def edit(state):
        state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != key}
    return edit


def nan_row(state):
    state["embedding_memory"] = state["embedding_memory"].index_fill(0, torch.tensor([1]), float("nan"))


def extra_key(state):
    state["surplus"] = torch.zeros(1)


CASES = [
    (nan_row, r"embedding_memory'\] holds NaN"),
    (extra(queue_idx=9), r"queue_idx'\] must lie in \[0, 8\), got 9"),
    (extra(queue_idx=-1), r"queue_idx'\] must lie in \[0, 8\), got -1"),
    (extra(step=-2), r"step'\] must be a non-negative int, got -2"),
    (extra(has_been_filled="yes"), r"has_been_filled'\] must be a bool"),
    (without("step"), r"_extra_state'\] lacks \['step'\]"),
    (extra_key, "Unexpected key.*surplus"),
]


@pytest.mark.parametrize("edit, match", CASES)
def test_a_bad_state_is_refused_and_changes_nothing(edit, match):
    source = filled()
    source(torch.randn(2, 3), torch.arange(2))
    state = snapshot(source)
    edit(state)
    target = filled()
    before = snapshot(target)
    with pytest.raises((ValueError, RuntimeError), match=match):
        target.load_state_dict(state)
    assert_unchanged(target, before)
    assert target.queue_idx == 5 and target.step == 1


def test_a_good_state_still_loads_and_strict_false_ignores_an_extra_key():
    source = filled()
    source(torch.randn(2, 3), torch.arange(2))
    state = snapshot(source)
    state["surplus"] = torch.zeros(1)
    target = filled()
    assert target.load_state_dict(state, strict=False).unexpected_keys == ["surplus"]
    assert target.queue_idx == 7 and target.step == 2
    assert torch.equal(target.embedding_memory, source.embedding_memory)
