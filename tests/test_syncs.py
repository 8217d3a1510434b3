"""Host syncs per steady-state training step, counted with a dispatch mode (see tests/sync_counter.py).

README states these counts: with ``checks=False`` a step in one process never waits for the device;
default checks read their flags once, and the shapes the data decides (the views' layout, XBM's pair
counts) ride in that read. Under torch.distributed the one read also carries every rank's row count and
verdict, so a step reads the device once, checks or not.
"""

import pytest
import torch
from distributed_helpers import run_distributed
from sync_counter import SyncCounter

from ssl_memory import CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, QueueLoss

BATCH, DIM, SIZE = 16, 8, 64

# syncs per step: (checks=True, checks=False), one process
EXPECTED = {
    "bank": (1, 0),
    "bank+views": (1, 0),
    "queue": (1, 0),
    "queue+mixer": (1, 0),
    "cross-batch": (1, 0),
}


def make_case(case: str, checks: bool, seed: int = 0, device: str | torch.device = "cpu"):
    """``case``'s criterion on ``device``, its embeddings (a leaf) and the inputs of one call, built from ``seed``
    on CPU (a mixer draws with a generator on ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    embeddings, keys = torch.randn(BATCH, DIM, generator=gen), torch.randn(BATCH, DIM, generator=gen)
    if case.startswith("bank"):
        views = case == "bank+views"
        criterion = MemoryBankLoss(SIZE, DIM, consistency_weight=1.0 if views else 0.0, checks=checks)
        groups = torch.arange(SIZE)
        groups[:20] = groups[:20] // 2 * 2  # ten merged pairs
        criterion.memory.groups.copy_(groups)
        labels = torch.arange(BATCH // 4).repeat(4) if views else torch.randperm(SIZE, generator=gen)[:BATCH]
    elif case.startswith("queue"):
        generator = torch.Generator(device).manual_seed(seed)
        mixer = HardNegativeMixer(8, 6, 3, generator=generator) if "mixer" in case else None
        criterion = QueueLoss(SIZE, DIM, mixer=mixer, checks=checks)
        labels = torch.arange(BATCH)
    else:
        criterion = CrossBatchLoss(SIZE, DIM, checks=checks)
        labels = torch.arange(BATCH) // 4
    criterion.to(device)
    embeddings = embeddings.to(device).requires_grad_()
    inputs = (embeddings, *([keys.to(device)] if case.startswith("queue") else []), labels.to(device))
    return criterion, embeddings, inputs


def make_step(case: str, checks: bool, seed: int = 0):
    """A training step of ``case`` after a few steps of warm-up (memories filled, merge groups present)."""
    criterion, embeddings, inputs = make_case(case, checks, seed)

    def step():
        embeddings.grad = None
        criterion(*inputs).backward()

    for _ in range(5):
        step()
    return step


def count(step) -> SyncCounter:
    with SyncCounter() as counter:
        step()
    return counter


@pytest.mark.parametrize("case", list(EXPECTED))
@pytest.mark.parametrize("checks", [True, False])
def test_syncs_per_step_in_one_process(case, checks):
    counter = count(make_step(case, checks))
    assert counter.count == EXPECTED[case][0 if checks else 1], counter.where


def test_the_counter_sees_every_kind_of_host_read():
    x = torch.arange(6)
    with SyncCounter() as counter:
        int(x.sum()), bool(x.any()), x.tolist(), x[x > 2], x.nonzero(), x.unique(), torch.repeat_interleave(x)
    assert [name for name, _ in counter.where] == [
        "_local_scalar_dense",
        "_local_scalar_dense",
        "tolist",
        "index",
        "nonzero",
        "_unique2",
        "repeat_interleave",
    ]


def syncs_worker(rank, world_size):
    return {
        (case, checks): count(make_step(case, checks, seed=rank)).where for case in EXPECTED for checks in (True, False)
    }


def test_one_sync_per_step_under_torch_distributed_with_or_without_checks():
    # the step's one read also carries every rank's row count and verdict: nothing else reads the device
    for counts in run_distributed(syncs_worker, 2):
        for (case, checks), where in counts.items():
            assert len(where) == 1, (case, checks, where)
