"""The PML path under torch.distributed (gloo, 2 CPU processes): any batch size per rank, bad input on one
rank raised on every rank with nothing written, and our CrossBatchMemory refusing any wrapper but ours.

Each worker runs several cases in one spawn; after a refused step every rank takes a good one, which
shows the ranks are still in step (a rank left one collective behind would hang or mix up rows).
"""

import functools

import pytest
import torch
from distributed_helpers import run_distributed
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper as PMLDistributedLossWrapper

from ssl_memory import DistributedInputError
from ssl_memory.pml import CrossBatchMemory, DistributedLossWrapper

DIM = 6


def batch(rank, step, size=None):
    gen = torch.Generator().manual_seed(10 * step + rank)
    size = size or (4 if rank == 0 else 3)
    return torch.randn(size, DIM, generator=gen, dtype=torch.float64), torch.randint(0, 3, (size,), generator=gen)


def plain_loss(name):
    return {"contrastive": losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8), "ntxent": losses.NTXentLoss(0.1)}[
        name
    ]


def plain_worker(rank, world_size, name, efficient):
    """Our wrapper around a plain PML loss, batches of 4 and 3 rows: this rank's loss and gradient."""
    loss_fn = DistributedLossWrapper(plain_loss(name), efficient=efficient)
    out = []
    for step in range(3):
        embeddings, labels = batch(rank, step)
        x = embeddings.clone().requires_grad_()
        loss = loss_fn(x, labels)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("name", ["contrastive", "ntxent"])
def test_a_plain_loss_takes_batches_of_4_and_3(name):
    """PML's wrapper aborts a rank here (all_gather of unequal shapes); ours gives world x the loss of the
    whole batch and, on each rank, world x its rows' gradient of it."""
    results = run_distributed(plain_worker, 2, name, False)
    for step in range(3):
        pieces = [batch(rank, step) for rank in range(2)]
        x = torch.cat([p[0] for p in pieces]).requires_grad_()
        loss = plain_loss(name)(x, torch.cat([p[1] for p in pieces]))
        loss.backward()
        for rank, rows in enumerate((slice(0, 4), slice(4, 7))):
            torch.testing.assert_close(results[rank][step][0], 2 * loss.detach())
            torch.testing.assert_close(results[rank][step][1], 2 * x.grad[rows])


def test_an_efficient_plain_loss_scores_this_ranks_rows_against_every_rank():
    results = run_distributed(plain_worker, 2, "ntxent", True)
    for step in range(3):
        pieces = [batch(rank, step) for rank in range(2)]
        everyone, all_labels = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        for rank, offset in enumerate((0, 4)):
            x = pieces[rank][0].clone().requires_grad_()
            a1, p, a2, n = (t for t in _all_pairs(pieces[rank][1], all_labels))
            keep_p, keep_n = p != a1 + offset, n != a2 + offset  # a row's pair with itself
            references = torch.cat([everyone[:offset], x, everyone[offset + len(x):]])
            pairs = (a1[keep_p], p[keep_p], a2[keep_n], n[keep_n])
            loss = plain_loss("ntxent")(x, pieces[rank][1], pairs, references, all_labels) * 2
            loss.backward()
            torch.testing.assert_close(results[rank][step][0], loss.detach())
            torch.testing.assert_close(results[rank][step][1], x.grad)


def _all_pairs(labels, ref_labels):
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    return (*torch.where(same), *torch.where(~same))


def _labels_short(e, y, m):
    return e, y[:-1], m


def _labels_column(e, y, m):
    return e, y.unsqueeze(1), m


def _labels_none(e, y, m):
    return e, None, m


def _labels_float(e, y, m):
    return e, y.double(), m


def _other_width(e, y, m):
    return torch.cat([e, e[:, :1]], dim=1), y, m


def _float32(e, y, m):
    return e.float(), y, m


def _mask_here_only(e, y, m):
    return e, y, torch.ones(len(y), dtype=torch.bool)


def _mask_int(e, y, m):
    return e, y, torch.ones(len(y), dtype=torch.long)


BAD_MEMORY_INPUTS = {
    "labels too short": _labels_short,
    "labels (B, 1)": _labels_column,
    "labels None": _labels_none,
    "float labels": _labels_float,
    "another embedding width": _other_width,
    "another dtype": _float32,
    "enqueue_mask on one rank only": _mask_here_only,
    "integer enqueue_mask": _mask_int,
}


def bad_memory_worker(rank, world_size, efficient):
    """For each bad input, on rank 1 only: every rank's error, then a good step; and the memories."""
    criterion = CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=40)
    loss_fn = DistributedLossWrapper(criterion, efficient=efficient)
    loss_fn(*batch(rank, 0))
    out = {}
    for step, (case, spoil) in enumerate(BAD_MEMORY_INPUTS.items(), start=1):
        embeddings, labels = batch(rank, step)
        before = criterion.embedding_memory.clone(), criterion.queue_idx
        args = spoil(embeddings, labels, None) if rank == 1 else (embeddings, labels, None)
        try:
            loss_fn(args[0], args[1], enqueue_mask=args[2])
            error = None
        except DistributedInputError as caught:
            error = str(caught)
        unchanged = torch.equal(criterion.embedding_memory, before[0]) and criterion.queue_idx == before[1]
        loss = loss_fn(*batch(rank, 100 + step))  # every rank still in step
        out[case] = (error, unchanged, loss.detach(), criterion.embedding_memory.clone())
    return out


@pytest.mark.parametrize("efficient", [False, True])
def test_bad_input_on_one_rank_raises_on_every_rank_and_writes_nothing(efficient):
    results = run_distributed(bad_memory_worker, 2, efficient)
    for case in BAD_MEMORY_INPUTS:
        for rank in range(2):
            error, unchanged, _, memory = results[rank][case]
            assert error is not None, f"{case}: rank {rank} did not raise"
            assert unchanged, f"{case}: rank {rank} wrote its memory"
            assert torch.equal(memory, results[0][case][3]), f"{case}: the memories differ after the next step"
        assert results[0][case][0] == results[1][case][0], case
    assert "rank(s) [1]" in results[0]["labels too short"][0] and "labels must have shape (3,)" in (
        results[0]["labels too short"][0]
    )
    assert "same enqueue_mask" in results[0]["enqueue_mask on one rank only"][0]
    assert "same embeddings dtype" in results[0]["another dtype"][0]


def bad_plain_worker(rank, world_size):
    loss_fn = DistributedLossWrapper(losses.ContrastiveLoss())
    out = {}
    spoilers = {"another embedding width": _other_width, "labels None": _labels_none, "labels (B, 1)": _labels_column}
    for step, (case, spoil) in enumerate(spoilers.items()):
        embeddings, labels = batch(rank, step)
        args = spoil(embeddings, labels, None) if rank == 1 else (embeddings, labels, None)
        try:
            loss_fn(args[0], args[1])
            out[case] = None
        except DistributedInputError as caught:
            out[case] = str(caught)
        loss_fn(*batch(rank, 50 + step))
    return out


def test_bad_input_around_a_plain_loss_raises_on_every_rank():
    results = run_distributed(bad_plain_worker, 2)
    assert results[0] == results[1]
    assert all(message is not None for message in results[0].values()), results[0]


class RewrittenCrossBatch(PMLDistributedLossWrapper):
    """A subclass of PML's wrapper that re-implements forward_cross_batch (the old stack check missed it)."""

    def forward_cross_batch(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size, enqueue_mask):
        return super().forward_cross_batch(emb, labels, indices_tuple, ref_emb, ref_labels, world_size, enqueue_mask)


def passing(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        return method(*args, **kwargs)

    return call


class Decorated(PMLDistributedLossWrapper):
    @passing
    @passing
    @passing
    @passing
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def foreign_wrapper_worker(rank, world_size):
    out = []
    for wrap in (PMLDistributedLossWrapper, RewrittenCrossBatch, Decorated, None):
        criterion = CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=40)
        loss_fn = criterion if wrap is None else wrap(criterion)
        try:
            loss_fn(*batch(rank, 0, size=4))
            out.append(None)
        except RuntimeError as caught:
            out.append((str(caught), bool(criterion.embedding_memory.any())))
    return out


def test_our_memory_refuses_any_caller_but_our_wrapper_on_every_rank():
    """PML's wrapper (and its subclasses, however decorated) would hand it rows in each rank's own order, and
    a direct call only this rank's rows: every rank raises, naming the wrapper to use, with nothing written."""
    results = run_distributed(foreign_wrapper_worker, 2)
    assert results[0] == results[1]
    for message, written in results[0]:
        assert "ssl_memory.pml.DistributedLossWrapper" in message and not written


def _bank_call(loss_fn, e, y, spoil):
    kwargs = {}
    if spoil == "labels (B, 1)":
        y = y.unsqueeze(1)
    elif spoil == "labels None":
        y = None
    elif spoil == "labels too short":
        y = y[:-1]
    elif spoil == "indices_tuple":
        kwargs["indices_tuple"] = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    elif spoil == "ref_emb":
        kwargs["ref_emb"] = e
    return loss_fn(e, y, **kwargs)


PML_LOSS_SPOILERS = ("labels (B, 1)", "labels None", "labels too short", "indices_tuple", "ref_emb")


def pml_loss_worker(rank, world_size):
    """PMLMemoryBankLoss and PMLQueueLoss called directly, PML's own checks failing on rank 1 only."""
    from ssl_memory.pml import PMLMemoryBankLoss, PMLQueueLoss

    bank_fn = PMLMemoryBankLoss(num_samples=20, dim=DIM)
    queue_fn = PMLQueueLoss(size=16, dim=DIM)
    out = {}
    for step, spoil in enumerate(PML_LOSS_SPOILERS):
        e = torch.randn(4, DIM, generator=torch.Generator().manual_seed(step + 10 * rank))
        y = torch.arange(4) + 4 * rank
        for name, loss_fn, memory in (("bank", bank_fn, bank_fn.memory.features), ("queue", queue_fn, queue_fn.queue.slots)):
            before = memory.clone()
            try:
                if name == "bank":
                    _bank_call(loss_fn, e, y, spoil if rank == 1 else None)
                else:
                    keys = e.flip(0)
                    spoiled = {"labels (B, 1)": y.unsqueeze(1), "labels too short": y[:-1]}.get(spoil, y)
                    if spoil == "indices_tuple" and rank == 1:
                        loss_fn(e, y, indices_tuple=(torch.tensor([0]),) * 3, ref_emb=keys)
                    else:
                        loss_fn(e, spoiled if rank == 1 else y, ref_emb=e if spoil == "ref_emb" and rank == 1 else keys)
                error = None
            except DistributedInputError as caught:
                error = str(caught)
            out[(name, spoil)] = (error, torch.equal(memory, before))
            loss_fn(e, y, ref_emb=None if name == "bank" else e.flip(0))  # still in step
        out["memories"] = (bank_fn.memory.features.clone(), queue_fn.queue.slots.clone())
    return out


def test_pml_memory_losses_raise_pmls_own_checks_on_every_rank():
    """PML's shape checks ran before our gather, so only the bad rank raised and the others wrote."""
    results = run_distributed(pml_loss_worker, 2)
    for key in [(name, spoil) for name in ("bank", "queue") for spoil in PML_LOSS_SPOILERS]:
        if key == ("queue", "labels None"):  # labels are optional for a queue
            continue
        assert results[0][key] == results[1][key], key
        error, unchanged = results[0][key]
        assert error is not None and "rank(s) [1]" in error and unchanged, (key, error)
    for mine, theirs in zip(results[0]["memories"], results[1]["memories"]):
        assert torch.equal(mine, theirs)
