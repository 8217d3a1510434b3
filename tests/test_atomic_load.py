"""A refused load_state_dict leaves the whole module as it was (README), for our PML memory and the loss containers."""

import pytest
import torch
from pytorch_metric_learning import losses
from state_helpers import assert_unchanged, snapshot

from ssl_memory import CrossBatchLoss, MemoryBankLoss, NeighbourMerger, QueueLoss
from ssl_memory.pml import CrossBatchMemory


def used_cbm():
    torch.manual_seed(0)
    cbm = CrossBatchMemory(losses.ContrastiveLoss(), 3, memory_size=8)
    cbm(torch.randn(3, 3), torch.arange(3))
    return cbm


def saved_cbm_state():
    torch.manual_seed(1)
    other = CrossBatchMemory(losses.ContrastiveLoss(), 3, memory_size=8)
    other(torch.randn(5, 3), torch.arange(5))
    return dict(other.state_dict())


def with_extra(**changes):
    def change(state):
        state["_extra_state"] = {**state["_extra_state"], **changes}

    return change


def without_step(state):
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "step"}


def nan_row(state):
    state["embedding_memory"] = state["embedding_memory"].index_fill(0, torch.tensor([1]), float("nan"))


CBM_CASES = [
    (nan_row, ValueError, "embedding_memory'\\] holds NaN"),
    (with_extra(queue_idx=8), ValueError, r"queue_idx.*\[0, 8\), got 8"),
    (with_extra(queue_idx=-1), ValueError, r"queue_idx.*got -1"),
    (with_extra(step=-2), ValueError, r"step.*got -2"),
    (without_step, ValueError, r"_extra_state'\].*step"),
    (lambda s: s.update(surplus=torch.zeros(1)), RuntimeError, "Unexpected key.*surplus"),
]


@pytest.mark.parametrize(("change", "error", "match"), CBM_CASES)
def test_pml_cross_batch_memory_refuses_a_bad_state_and_is_left_unchanged(change, error, match):
    cbm = used_cbm()
    before, extra = snapshot(cbm), cbm.get_extra_state()
    state = saved_cbm_state()
    change(state)
    with pytest.raises(error, match=match):
        cbm.load_state_dict(state)
    assert_unchanged(cbm, before)
    assert cbm.get_extra_state() == extra and cbm.embedding_memory.dtype == torch.float32


def used_bank_loss():
    torch.manual_seed(0)
    criterion = MemoryBankLoss(6, 3, merger=NeighbourMerger(warmup=0, interval=1, ratio=1.0))
    criterion(torch.randn(4, 3), torch.arange(4))
    return criterion


@pytest.mark.parametrize("strict", [True, False])
def test_a_bad_merger_history_leaves_the_bank_unchanged(strict):
    criterion = used_bank_loss()
    before = snapshot(criterion)
    state = dict(MemoryBankLoss(6, 3, merger=NeighbourMerger()).state_dict())
    state["merger._extra_state"] = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="merger._extra_state.*history"):
        criterion.load_state_dict(state, strict=strict)
    assert_unchanged(criterion, before)


def used_queue_loss():
    torch.manual_seed(0)
    criterion = QueueLoss(size=5, dim=3)
    criterion(torch.randn(2, 3), torch.randn(2, 3))
    return criterion


def used_cross_batch_loss():
    torch.manual_seed(0)
    criterion = CrossBatchLoss(size=5, dim=3)
    criterion(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    return criterion


@pytest.mark.parametrize("make", [used_bank_loss, used_queue_loss, used_cross_batch_loss])
def test_a_strict_load_with_an_unexpected_or_missing_key_changes_nothing(make):
    criterion = make()
    before = snapshot(criterion)
    fresh = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in make().state_dict().items()}
    with pytest.raises(RuntimeError, match="Unexpected key.*surplus"):
        criterion.load_state_dict({**fresh, "surplus": torch.zeros(1)})
    missing = dict(fresh)
    missing.pop(next(k for k in fresh if not k.endswith("_extra_state")))
    with pytest.raises(RuntimeError, match="Missing key"):
        criterion.load_state_dict(missing)
    assert_unchanged(criterion, before)
    criterion.load_state_dict({**fresh, "surplus": torch.zeros(1)}, strict=False)  # non-strict ignores it
