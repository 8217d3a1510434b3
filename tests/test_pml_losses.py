"""PMLMemoryBankLoss and PMLQueueLoss against the core losses they wrap, with PML's reducers applied to the core terms."""

import pytest
import torch
from distributed_helpers import run_distributed
from pytorch_metric_learning import distances, reducers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

import ssl_memory
from ssl_memory import pml

DIM, SAMPLES = 8, 30


def batch(seed, rows=12, high=SAMPLES):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=gen), torch.randint(0, high, (rows,), generator=gen)


def twin_memory_bank_losses(**kwargs):
    ours = pml.PMLMemoryBankLoss(SAMPLES, DIM, consistency_weight=0.7, **kwargs)
    core = ssl_memory.MemoryBankLoss(SAMPLES, DIM, consistency_weight=0.7)
    core.memory.load_state_dict(ours.memory.state_dict())
    return ours, core


def value_and_grad(fn, x, *args, **kwargs):
    x = x.clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def test_memory_bank_loss_equals_the_core_loss():
    ours, core = twin_memory_bank_losses()
    assert isinstance(ours, BaseMetricLossFunction)
    for step in range(4):
        x, indices = batch(step)
        our_loss, our_grad = value_and_grad(ours, x, indices)
        core_loss, core_grad = value_and_grad(core, x, indices)
        assert torch.allclose(our_loss, core_loss, rtol=1e-6) and torch.allclose(our_grad, core_grad, atol=1e-7)
        assert torch.equal(ours.memory.features, core.memory.features)


def test_memory_bank_loss_applies_pml_reducers_to_the_rows():
    ours, core = twin_memory_bank_losses(reducer=reducers.ThresholdReducer(high=10.0))
    for step in range(3):
        x, indices = batch(step)
        terms = core.terms(x, indices)
        rows = terms["discrimination"]
        expected = rows[rows < 10.0].mean() + 0.7 * terms["consistency"]
        assert 0 < int((rows < 10.0).sum()) < len(rows)  # the threshold does filter
        assert torch.allclose(ours(x, indices), expected, rtol=1e-6)


def test_memory_bank_loss_records_stats_for_pml():
    ours, core = twin_memory_bank_losses(collect_stats=True)
    x, indices = batch(0)
    ours(x, indices)
    core(x, indices)
    assert {"discrimination", "consistency", "positive_prob", "pairs_merged"} <= set(ours._record_these_stats)
    for name in ("discrimination", "consistency", "positive_prob"):
        assert getattr(ours, name) == pytest.approx(float(core.last[name]), rel=1e-6)
    assert ours.pairs_merged == 0
    assert {"temperature", "consistency_weight"} <= set(ours._record_these)


def test_memory_bank_loss_shares_its_bank_with_the_merge_group_miner():
    ours = pml.PMLMemoryBankLoss(SAMPLES, DIM)
    ours.memory.groups[[3, 4]] = 3
    miner = pml.MergeGroupMiner(ours)
    a1, p, _, _ = miner(torch.randn(2, DIM), torch.tensor([3, 4]))
    assert sorted(zip(a1.tolist(), p.tolist())) == [(0, 1), (1, 0)]


def test_queue_loss_maps_keys_to_ref_emb():
    ours = pml.PMLQueueLoss(size=20, dim=DIM, temperature=0.2, collect_stats=True)
    core = ssl_memory.QueueLoss(size=20, dim=DIM, temperature=0.2)
    for step in range(5):
        query, ids = batch(step, rows=8)
        key, _ = batch(100 + step, rows=8)
        fill = len(core.queue)
        our_loss, our_grad = value_and_grad(ours, query, ids, ref_emb=key)
        core_loss, core_grad = value_and_grad(core, query, key, ids)
        assert torch.allclose(our_loss, core_loss, rtol=1e-6) and torch.allclose(our_grad, core_grad, atol=1e-7)
        assert ours.queue_fill == fill
    assert torch.equal(ours.queue.features, core.queue.features)


def test_queue_loss_without_ids_and_with_a_reducer():
    ours = pml.PMLQueueLoss(size=20, dim=DIM, reducer=reducers.SumReducer())
    core = ssl_memory.QueueLoss(size=20, dim=DIM)
    for step in range(3):
        query, _ = batch(step, rows=6)
        key, _ = batch(50 + step, rows=6)
        assert torch.allclose(ours(query, ref_emb=key), core.terms(query, key)["contrastive"].sum(), rtol=1e-6)


@pytest.mark.parametrize(
    "distance",
    [distances.LpDistance(), distances.DotProductSimilarity(normalize_embeddings=False), distances.SNRDistance()],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: pml.PMLMemoryBankLoss(SAMPLES, DIM, **kw),
        lambda **kw: pml.PMLQueueLoss(20, DIM, **kw),
    ],
)
def test_non_cosine_distances_are_rejected(make, distance):
    with pytest.raises(ValueError, match="cosine similarity of L2-normalised embeddings"):
        make(distance=distance)
    make(distance=distances.DotProductSimilarity())  # normalising: accepted


def test_unsupported_arguments_raise():
    x, indices = batch(0, rows=4)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="indices_tuple is not supported"):
        pml.PMLMemoryBankLoss(SAMPLES, DIM)(x, indices, pairs)
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        pml.PMLMemoryBankLoss(SAMPLES, DIM)(x, indices, ref_emb=x.clone(), ref_labels=indices)
    with pytest.raises(ValueError, match="needs the keys as ref_emb"):
        pml.PMLQueueLoss(20, DIM)(x, indices)
    with pytest.raises(ValueError, match="ref_labels must be None or equal to labels"):
        pml.PMLQueueLoss(20, DIM)(x, indices, ref_emb=x.clone(), ref_labels=indices + 1)
    with pytest.raises(ValueError, match="labels are required"):
        pml.PMLMemoryBankLoss(SAMPLES, DIM)(x)


def wrapper_worker(rank, world_size):
    """Per rank: gradients and bank after one step, called directly and through DistributedLossWrapper."""
    x, indices = batch(rank, rows=6)
    out = []
    for wrap in (False, True):
        torch.manual_seed(0)
        loss_fn = pml.PMLMemoryBankLoss(SAMPLES, DIM)
        criterion = DistributedLossWrapper(loss_fn) if wrap else loss_fn
        emb = x.clone().requires_grad_()
        criterion(emb, indices).backward()
        out.append((emb.grad, loss_fn.memory.features.clone()))
    return out


def test_memory_bank_loss_under_distributed_loss_wrapper_matches_direct_use():
    for (direct_grad, direct_bank), (wrapped_grad, wrapped_bank) in run_distributed(wrapper_worker, 2):
        assert torch.allclose(direct_grad, wrapped_grad, atol=1e-6)
        assert torch.allclose(direct_bank, wrapped_bank, atol=1e-6)
