"""NeighbourMerger's schedule in epochs counted from the samples written to the bank, resume, and training with merges."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ssl_memory import MemoryBank, MemoryBankLoss, NeighbourMerger

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the bank's counter
def test_bank_counts_each_sample_once_per_update():
    bank = MemoryBank(10, 4)
    assert bank.num_written == 0 and bank.samples_written.dtype == torch.long and bank.samples_written.dim() == 0
    bank.update(torch.tensor([0, 1, 0, 1, 2, 2]), torch.randn(6, 4))  # two views each of samples 0, 1, 2
    assert bank.num_written == 3
    bank.update(torch.tensor([2, 9]), torch.randn(2, 4))
    assert bank.num_written == int(bank.samples_written) == 5
    with pytest.raises(ValueError):
        bank.update(torch.tensor([0]), torch.full((1, 4), float("nan")))
    assert bank.num_written == 5  # a refused update writes nothing and counts nothing


def test_bank_counter_follows_its_buffer_through_state_dict_and_direct_writes():
    bank = MemoryBank(10, 4)
    bank.update(torch.arange(7), torch.randn(7, 4))
    other = MemoryBank(10, 4)
    other.update(torch.arange(2), torch.randn(2, 4))
    assert other.num_written == 2
    other.load_state_dict(copy.deepcopy(bank.state_dict()))
    assert other.num_written == 7
    other.samples_written.fill_(40)
    assert other.num_written == 40
    assert copy.deepcopy(other).num_written == 40


# ---------------------------------------------------------------- when rounds run
def expected_round_epochs(warmup, interval, epochs):
    """Plain loop: a round at each completed epoch e >= 1 with e = warmup + k * interval."""
    return [e for e in range(1, epochs + 1) if e >= warmup and (e - warmup) % interval == 0]


@pytest.mark.parametrize("warmup, interval", [(0, 1), (0, 3), (2, 1), (3, 2), (1, 4)])
def test_rounds_run_when_the_written_samples_complete_a_scheduled_epoch(warmup, interval):
    n = 10
    bank = MemoryBank(n, 4, generator=torch.Generator().manual_seed(0))
    merger = NeighbourMerger(warmup=warmup, interval=interval, backend="torch")
    gen = torch.Generator().manual_seed(1)
    written, ran = 0, []
    while written < 12 * n:
        size = int(torch.randint(1, 5, (), generator=gen))
        bank.update(torch.arange(written, written + size) % n, torch.randn(size, 4, generator=gen))
        before, written = written // n, written + size
        report = merger.step(bank)
        if written // n != before and (written // n) in expected_round_epochs(warmup, interval, 12):
            ran.append(written // n)
            assert report is not None and report.epoch == written / n
        else:
            assert report is None
    assert [int(r.epoch) for r in merger.history] == ran == expected_round_epochs(warmup, interval, 12)


def test_a_merger_joining_a_trained_bank_runs_one_round_not_a_backlog():
    bank = MemoryBank(10, 4)
    bank.samples_written.fill_(150)  # the bank has seen 15 epochs
    merger = NeighbourMerger(warmup=10, backend="torch")
    assert merger.step(bank) is not None
    assert merger.step(bank) is None
    bank.update(torch.arange(10), torch.randn(10, 4))
    assert merger.step(bank) is not None and merger.rounds == 2


# ---------------------------------------------------------------- the README snippet, as written
def near_duplicate_data(num=120, width=16, pairs=10, seed=0):
    """Random inputs in which ``pairs`` pairs are near-copies (rows 2i and 2i + 1 for i < pairs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, width, generator=gen)
    x[1 : 2 * pairs : 2] = x[0 : 2 * pairs : 2] + 0.01 * torch.randn(pairs, width, generator=gen)
    return x


def augment(x):
    return x + 0.05 * torch.randn_like(x)


def readme_snippet():
    """The README's per-sample memory bank snippet: its set-up, and its loop over the loader (one epoch)."""
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    # the replicated bank's block (the sharded and Lightning sections have blocks of their own)
    (code,) = [b for b in blocks if "merger=NeighbourMerger()" in b and re.search(r"\bMemoryBankLoss\(", b)
               and "LightningModule" not in b]
    setup, loop = code.split("for batch in loader:")
    return setup, "for batch in loader:" + loop


def test_the_readme_snippet_merges_once_an_epoch_after_the_warmup():
    torch.manual_seed(0)
    setup, epoch = readme_snippet()
    model = torch.nn.Linear(16, 128)
    scope = {"DataLoader": DataLoader, "dataset": TensorDataset(near_duplicate_data(num=600, pairs=20)),
             "augment": augment, "model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.05)}
    exec(setup, scope)
    criterion, loader = scope["criterion"], scope["loader"]
    assert len(loader) == 3  # 256, 256 and 88 samples
    reports = []
    for _ in range(14):
        exec(epoch, scope)
        reports.append(criterion.last["merge"])
    history = criterion.merger.history
    assert reports[:9] == [None] * 9 and reports[9:] == history
    # a round only at the last step of each epoch from the tenth: N samples written make an epoch
    assert [r.epoch for r in history] == [10.0, 11.0, 12.0, 13.0, 14.0]
    groups = criterion.memory.groups
    merged = {tuple(torch.nonzero(groups == g).squeeze(1).tolist()) for g in groups.unique()} - {(i,) for i in range(600)}
    assert merged and merged <= {(2 * i, 2 * i + 1) for i in range(20)}  # planted pairs only


# ---------------------------------------------------------------- resume mid-run
def timeless(history):
    """Reports without their wall time, nan written as None so that equal reports compare equal."""
    return [{k: (None if v != v else v) for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in history]


def make_run():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 32)
    criterion = MemoryBankLoss(
        num_samples=120, dim=32, temperature=0.1, merger=NeighbourMerger(warmup=2, backend="torch")
    )
    return model, criterion, torch.optim.SGD(model.parameters(), lr=0.05)


def batches(epochs, num=120, batch=32):
    gen = torch.Generator().manual_seed(5)
    return [chunk for _ in range(epochs) for chunk in torch.randperm(num, generator=gen).split(batch)]


def train(model, criterion, optimizer, steps, start):
    data = near_duplicate_data()
    for step, indices in enumerate(steps, start):
        views = indices.repeat(2)
        noise = 0.05 * torch.randn(views.numel(), 16, generator=torch.Generator().manual_seed(step))
        loss = criterion(model(data[views] + noise), views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_resumed_run_continues_the_schedule_and_the_history_exactly():
    plan = batches(6)  # 4 steps an epoch
    model, criterion, optimizer = make_run()
    train(model, criterion, optimizer, plan[:13], 0)  # stop one step into epoch 4, after rounds at epochs 2 and 3
    saved = copy.deepcopy({"model": model.state_dict(), "criterion": criterion.state_dict(),
                           "optimizer": optimizer.state_dict()})
    train(model, criterion, optimizer, plan[13:], 13)

    model2, criterion2, optimizer2 = make_run()
    train(model2, criterion2, optimizer2, plan[:2], 0)  # stale state in the fresh objects must not survive the load
    model2.load_state_dict(saved["model"])
    criterion2.load_state_dict(saved["criterion"])
    optimizer2.load_state_dict(saved["optimizer"])
    assert len(criterion2.merger.history) == 2
    train(model2, criterion2, optimizer2, plan[13:], 13)

    assert timeless(criterion2.merger.history) == timeless(criterion.merger.history)
    assert [r.epoch for r in criterion.merger.history] == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert sum(r.pairs_merged for r in criterion.merger.history) > 0
    assert torch.equal(criterion2.memory.groups, criterion.memory.groups)
    assert torch.equal(criterion2.memory.features, criterion.memory.features)


# ---------------------------------------------------------------- training keeps a gradient
def test_training_with_merging_keeps_a_useful_gradient():
    """30 epochs, a round every epoch from epoch 2, the default rule: the loss keeps something to learn."""
    torch.manual_seed(1)
    data = near_duplicate_data(num=200, width=16, pairs=30)
    model = torch.nn.Linear(16, 64)
    merger = NeighbourMerger(warmup=2, backend="torch", max_merged_share=0.4)
    criterion = MemoryBankLoss(num_samples=200, dim=64, temperature=0.5, consistency_weight=1.0, merger=merger)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        for indices in torch.randperm(200, generator=gen).split(50):
            views = indices.repeat(4)
            loss = criterion(model(augment(data[views])), views)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    history = merger.history
    assert len(history) == 29 and history[-1].entries_in_merged_groups == 60  # the 30 planted pairs, nothing else
    assert all(r.largest_group <= 4 and r.entries_in_merged_groups <= 80 for r in history)

    # On the final bank: the positive group's probability stays well below 1, and the gradient
    # through the merged groups is comparable to the one the same bank gives without any merge.
    embeddings = model(data).detach().requires_grad_()
    indices = torch.arange(200)
    merged_loss = criterion(embeddings, indices, update_memory=False)
    (merged_grad,) = torch.autograd.grad(merged_loss, embeddings)
    assert float(criterion.last["positive_prob"]) < 0.5
    plain = MemoryBankLoss(memory=copy.deepcopy(criterion.memory), temperature=0.5, consistency_weight=1.0)
    plain.memory.groups.copy_(torch.arange(200))
    (plain_grad,) = torch.autograd.grad(plain(embeddings, indices, update_memory=False), embeddings)
    assert merged_grad.norm() > 0.5 * plain_grad.norm() > 0
    assert float(F.cosine_similarity(merged_grad.flatten(), plain_grad.flatten(), dim=0)) > 0.5
