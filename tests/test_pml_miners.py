"""HardNegativeMiner and MergeGroupMiner against brute-force loops, inside PML's losses and wrappers."""

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed
from pytorch_metric_learning import distances, losses
from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper

import ssl_memory
from ssl_memory import MemoryBank, pml

DIM = 6


def data(seed, rows=10, refs=25, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, DIM, generator=gen),
        torch.randint(0, classes, (rows,), generator=gen),
        torch.randn(refs, DIM, generator=gen),
        torch.randint(0, classes, (refs,), generator=gen),
    )


def brute_force(embeddings, labels, ref_emb, ref_labels, k, distance, ref_is_batch):
    """Positive pairs and each anchor's k hardest negatives, one anchor and one reference at a time."""
    positives, negatives = [], []
    for i in range(len(labels)):
        scored = []
        for j in range(len(ref_labels)):
            if labels[i] == ref_labels[j]:
                if not (ref_is_batch and i == j):
                    positives.append((i, j))
            else:
                if isinstance(distance, distances.LpDistance):
                    hardness = -torch.dist(F.normalize(embeddings[i], dim=0), F.normalize(ref_emb[j], dim=0)).item()
                else:
                    hardness = F.cosine_similarity(embeddings[i], ref_emb[j], dim=0).item()
                scored.append((-hardness, j))
        negatives += [(i, j) for _, j in sorted(scored)[: (len(scored) if k is None else k)]]
    return positives, negatives


def pair_tuple(positives, negatives):
    """(a1, p, a2, n) long tensors from lists of (anchor, reference) pairs, empty lists included."""
    columns = [[pair[c] for pair in pairs] for pairs in (positives, negatives) for c in (0, 1)]
    return tuple(torch.tensor(column, dtype=torch.long) for column in columns)


def as_pairs(first, second):
    return list(zip(first.tolist(), second.tolist()))


@pytest.mark.parametrize("distance", [None, distances.LpDistance()], ids=["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 3, None])
@pytest.mark.parametrize("with_ref", [True, False], ids=["reference_set", "batch"])
def test_hardest_negatives_and_positives_match_brute_force(k, distance, with_ref):
    embeddings, labels, ref_emb, ref_labels = data(seed=k or 0)
    if not with_ref:
        ref_emb, ref_labels = embeddings, labels
    kwargs = {} if distance is None else {"distance": distance}
    pairs_miner = pml.HardNegativeMiner(num_negatives=k, **kwargs)
    triplet_miner = pml.HardNegativeMiner(num_negatives=k, tuple_type="triplets", **kwargs)
    call = (lambda m: m(embeddings, labels, ref_emb, ref_labels)) if with_ref else (lambda m: m(embeddings, labels))
    a1, p, a2, n = call(pairs_miner)
    positives, negatives = brute_force(embeddings, labels, ref_emb, ref_labels, k, distance, not with_ref)
    assert sorted(as_pairs(a1, p)) == sorted(positives)
    # hardest first within each anchor
    assert as_pairs(a2, n) == negatives if k is not None else sorted(as_pairs(a2, n)) == sorted(negatives)
    a, tp, tn = call(triplet_miner)
    expected = sorted((i, j, m) for i, j in positives for i2, m in negatives if i2 == i)
    assert sorted(zip(a.tolist(), tp.tolist(), tn.tolist())) == expected


@pytest.mark.parametrize("tuple_type", ["pairs", "triplets"])
def test_tuples_are_accepted_by_pml_losses(tuple_type):
    embeddings, labels, ref_emb, ref_labels = data(seed=4)
    miner = pml.HardNegativeMiner(num_negatives=2, tuple_type=tuple_type)
    mined = miner(embeddings, labels, ref_emb, ref_labels)
    assert all(t.dtype == torch.long for t in mined)
    neg_anchors = mined[2] if tuple_type == "pairs" else mined[0]
    assert torch.equal(labels[mined[0]], ref_labels[mined[1]])
    assert (labels[neg_anchors] != ref_labels[mined[-1]]).all()
    loss_fns = (
        [losses.ContrastiveLoss(), losses.NTXentLoss()] if tuple_type == "pairs" else [losses.TripletMarginLoss()]
    )
    x = embeddings.clone().requires_grad_()
    for loss_fn in loss_fns:
        loss = loss_fn(x, labels, mined, ref_emb, ref_labels)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
    assert miner.num_negatives == 2  # recorded for PML's record keeper


def test_as_the_miner_of_pml_cross_batch_memory():
    """Inside PML's CrossBatchMemory the miner sees the memory as reference set; ours and PML's class agree."""
    theirs = losses.CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=30, miner=pml.HardNegativeMiner(3))
    ours = pml.CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=30, miner=pml.HardNegativeMiner(3))
    for step in range(8):
        embeddings, labels, _, _ = data(seed=10 + step, rows=8)
        expected_loss = theirs(embeddings, labels)
        # brute force on PML's memory after this step, minus each row's pair with its own slot
        memory, memory_labels = theirs.embedding_memory, theirs.label_memory
        if not theirs.has_been_filled:
            memory, memory_labels = memory[: theirs.queue_idx], memory_labels[: theirs.queue_idx]
        positives, negatives = brute_force(embeddings, labels, memory, memory_labels, 3, None, False)
        own = theirs.curr_batch_idx
        positives = [(i, j) for i, j in positives if j != own[i]]
        mined = pair_tuple(positives, negatives)
        expected = losses.ContrastiveLoss()(embeddings, labels, mined, memory, memory_labels)
        assert torch.allclose(expected_loss, expected, rtol=1e-5)
        assert torch.allclose(ours(embeddings, labels), expected, rtol=1e-5)


def merged_bank():
    bank = MemoryBank(12, DIM)
    bank.groups.copy_(torch.tensor([0, 1, 0, 3, 4, 1, 6, 0, 8, 9, 4, 11]))  # groups {0,2,7}, {1,5}, {4,10}
    return bank


def group_brute_force(groups, labels, ref_labels, ref_is_batch):
    positives, negatives = [], []
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            if groups[labels[i]] == groups[ref_labels[j]]:
                if not (ref_is_batch and i == j):
                    positives.append((i, j))
            else:
                negatives.append((i, j))
    return sorted(positives), sorted(negatives)


@pytest.mark.parametrize("source", ["bank", "core_loss", "pml_loss", "tensor"])
def test_merge_group_miner_treats_a_group_as_positives(source):
    bank = merged_bank()
    memory = {
        "bank": bank,
        "core_loss": ssl_memory.MemoryBankLoss(memory=bank),
        "pml_loss": pml.PMLMemoryBankLoss(memory=bank),
        "tensor": bank.groups,
    }[source]
    miner = pml.MergeGroupMiner(memory)
    gen = torch.Generator().manual_seed(0)
    embeddings, ref_emb = torch.randn(6, DIM, generator=gen), torch.randn(12, DIM, generator=gen)
    labels, ref_labels = torch.tensor([0, 2, 5, 3, 10, 1]), torch.arange(12)
    for args, ref_is_batch in (((embeddings, labels, ref_emb, ref_labels), False), ((embeddings, labels), True)):
        a1, p, a2, n = miner(*args)
        expected = group_brute_force(bank.groups, labels, ref_labels if not ref_is_batch else labels, ref_is_batch)
        assert (sorted(as_pairs(a1, p)), sorted(as_pairs(a2, n))) == expected
    # the groups are read at each call: a merge written into the bank is followed
    bank.groups[3] = 0
    a1, p, _, _ = miner(embeddings, labels, ref_emb, ref_labels)
    assert (3, 0) in as_pairs(a1, p) and (0, 3) in as_pairs(a1, p)


def test_merge_group_miner_feeds_pml_pair_and_triplet_losses():
    bank = merged_bank()
    embeddings, labels = torch.randn(8, DIM), torch.tensor([0, 2, 7, 1, 5, 4, 10, 3])
    pairs = pml.MergeGroupMiner(bank)(embeddings, labels)
    triplets = pml.MergeGroupMiner(bank, num_negatives=2, tuple_type="triplets")(embeddings, labels)
    assert torch.isfinite(losses.ContrastiveLoss()(embeddings, labels, pairs))
    assert losses.TripletMarginLoss(margin=10.0)(embeddings, labels, triplets) > 0
    groups = bank.groups[labels]
    assert torch.equal(groups[triplets[0]], groups[triplets[1]]) and (groups[triplets[0]] != groups[triplets[2]]).all()


def test_merge_group_miner_inside_cross_batch_memory():
    """Labels are dataset indices; the memory holds past samples' indices, mapped through the groups too."""
    bank = merged_bank()
    criterion = pml.CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=20, miner=pml.MergeGroupMiner(bank))
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        embeddings, labels = torch.randn(5, DIM, generator=gen), torch.randint(0, 12, (5,), generator=gen)
        loss = criterion(embeddings, labels)
        memory, memory_labels = criterion.embedding_memory[: criterion.num_filled], criterion.label_memory[: criterion.num_filled]
        positives, negatives = group_brute_force(bank.groups, labels, memory_labels, False)
        positives = [(i, j) for i, j in positives if j != criterion.curr_batch_idx[i]]
        mined = pair_tuple(positives, negatives)
        assert torch.allclose(
            loss, losses.ContrastiveLoss()(embeddings, labels, mined, memory, memory_labels), rtol=1e-5
        )


def miner_worker(rank, world_size):
    embeddings, labels, ref_emb, ref_labels = data(seed=rank, rows=5, refs=7)
    bank = merged_bank()
    index_labels = labels + 4 * rank  # dataset indices in [0, 12)
    wrapped_hard = DistributedMinerWrapper(pml.HardNegativeMiner(2))
    wrapped_group = DistributedMinerWrapper(pml.MergeGroupMiner(bank, num_negatives=3))
    return (
        wrapped_hard(embeddings, labels, ref_emb, ref_labels),
        wrapped_hard(embeddings, labels),
        wrapped_group(embeddings, index_labels),
    )


def test_miners_work_under_distributed_miner_wrapper():
    results = run_distributed(miner_worker, 2)
    pieces = [data(seed=rank, rows=5, refs=7) for rank in range(2)]
    for rank, result in enumerate(results):
        # PML gathers this rank's rows first, then the other ranks' in rank order
        order = [rank] + [r for r in range(2) if r != rank]
        embeddings, labels, ref_emb, ref_labels = (torch.cat([pieces[r][i] for r in order]) for i in range(4))
        index_labels = torch.cat([pieces[r][1] + 4 * r for r in order])
        expected = (
            pml.HardNegativeMiner(2)(embeddings, labels, ref_emb, ref_labels),
            pml.HardNegativeMiner(2)(embeddings, labels),
            pml.MergeGroupMiner(merged_bank(), num_negatives=3)(embeddings, index_labels),
        )
        for got, want in zip(result, expected):
            assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: pml.HardNegativeMiner(num_negatives=0), ValueError, "num_negatives must be a positive int or None"),
        (lambda: pml.HardNegativeMiner(tuple_type="quads"), ValueError, "tuple_type must be one of"),
        (lambda: pml.MergeGroupMiner(object()), TypeError, "memory must be a MemoryBank"),
        (lambda: pml.MergeGroupMiner(torch.zeros(3, 2, dtype=torch.long)), ValueError, "1-D integer tensor"),
    ],
)
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_merge_group_miner_rejects_labels_outside_the_bank():
    miner = pml.MergeGroupMiner(merged_bank())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\)"):
        miner(torch.randn(3, DIM), torch.tensor([0, 5, 12]))
