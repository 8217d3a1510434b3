"""CrossBatchMemory under torch.distributed (gloo, 2 and 3 CPU processes): identical memories on every rank.

The oracle is one process fed every rank's batch in rank order: PML's own CrossBatchMemory for the memory
and the loss, PML's plain loss for the rows one rank scores.
"""


import pytest
import torch
from distributed_helpers import run_distributed
from pytorch_metric_learning import losses, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ssl_memory.pml import CrossBatchMemory, DistributedLossWrapper

DIM, MEMORY, STEPS = 8, 30, 6


def make_loss(name):
    return {
        "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8),
        "ntxent": lambda: losses.NTXentLoss(0.1),
        "supcon_mean": lambda: losses.SupConLoss(reducer=reducers.MeanReducer()),
        "circle": lambda: losses.CircleLoss(),
    }[name]()


def rank_batch(rank, step, masked, equal_sizes):
    """One rank's batch at one step; PML's wrapper needs equal sizes on every rank, ours does not."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    size = 4 + step % 3 if equal_sizes else 3 + (rank + step) % 4
    mask = None
    if masked:
        mask = torch.rand(size, generator=gen) < 0.5
        mask[0] = True
    return torch.randn(size, DIM, generator=gen, dtype=torch.float64), torch.randint(0, 4, (size,), generator=gen), mask


def wrapper_worker(rank, world_size, runs):
    """Each run is (wrapper, loss, masked, efficient, equal_sizes): our CrossBatchMemory in our wrapper; each
    step gives this rank's loss and gradient, and the memory. One spawn serves several runs."""
    results = []
    for _, loss_name, masked, efficient, equal_sizes in runs:
        criterion = CrossBatchMemory(make_loss(loss_name), DIM, MEMORY)
        loss_fn = DistributedLossWrapper(criterion, efficient=efficient)
        out = []
        for step in range(STEPS):
            embeddings, labels, mask = rank_batch(rank, step, masked, equal_sizes)
            x = embeddings.clone().requires_grad_()
            loss = loss_fn(x, labels, enqueue_mask=mask)
            loss.backward()
            out.append((loss.detach(), x.grad, criterion.embedding_memory.clone(), criterion.label_memory.clone()))
        results.append(out)
    return results


def run_all(world_size, runs):
    """Per run, the list of every rank's results."""
    per_rank = run_distributed(wrapper_worker, world_size, runs)
    return [[per_rank[rank][i] for rank in range(world_size)] for i in range(len(runs))]


def reference(world_size, loss_name, masked, equal_sizes):
    """PML's CrossBatchMemory in one process, fed every rank's batch in rank order: each step, its loss, its
    memory, the filled rows, every rank's batch and the slots the batch went to."""
    criterion = losses.CrossBatchMemory(make_loss(loss_name), DIM, MEMORY)
    out = []
    for step in range(STEPS):
        pieces = [rank_batch(rank, step, masked, equal_sizes) for rank in range(world_size)]
        embeddings, labels = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        mask = torch.cat([p[2] for p in pieces]) if masked else None
        loss = criterion(embeddings, labels, enqueue_mask=mask)
        filled = MEMORY if criterion.has_been_filled else criterion.queue_idx
        out.append(
            {
                "loss": loss,
                "memory": criterion.embedding_memory.clone(),
                "memory_labels": criterion.label_memory.clone(),
                "rows": criterion.embedding_memory[:filled].clone(),
                "row_labels": criterion.label_memory[:filled].clone(),
                "pieces": pieces,
                "slots": criterion.curr_batch_idx,
            }
        )
    return out


def assert_memories_shared(results, expected):
    for step, want in enumerate(expected):
        for rank_results in results:
            assert torch.equal(rank_results[step][2], want["memory"]), f"step {step}: a rank's memory differs"
            assert torch.equal(rank_results[step][3], want["memory_labels"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_our_wrapper_gives_every_rank_the_memory_in_rank_order(world_size):
    """PML's DistributedLossWrapper hands each rank its own rows first (#639); ours gathers in rank order."""
    runs = [("ours", "contrastive", masked, False, True) for masked in (False, True)]
    for (_, name, masked, _, equal_sizes), results in zip(runs, run_all(world_size, runs)):
        expected = reference(world_size, name, masked, equal_sizes)
        assert_memories_shared(results, expected)
        for step, want in enumerate(expected):  # the wrapper returns world_size x the loss of the whole batch
            for rank_results in results:
                torch.testing.assert_close(rank_results[step][0], world_size * want["loss"])


def test_our_wrapper_gathers_in_rank_order_any_batch_sizes():
    world_size = 3
    runs = [("ours", "ntxent", masked, False, False) for masked in (False, True)]
    for (_, name, masked, _, equal_sizes), results in zip(runs, run_all(world_size, runs)):
        expected = reference(world_size, name, masked, equal_sizes)
        assert_memories_shared(results, expected)
        for step, want in enumerate(expected):
            for rank_results in results:
                torch.testing.assert_close(rank_results[step][0], world_size * want["loss"])


def test_efficient_wrapper_scores_this_ranks_rows_against_the_shared_memory():
    """#448: every rank enqueues every rank's rows, and scores its own queries only."""
    world_size = 2
    runs = [("ours", name, masked, True, False) for name in ("ntxent", "circle") for masked in (False, True)]
    for (_, name, masked, _, equal_sizes), results in zip(runs, run_all(world_size, runs)):
        expected = reference(world_size, name, masked, equal_sizes)
        assert_memories_shared(results, expected)
        plain = make_loss(name)
        for step, want in enumerate(expected):
            rows, row_labels, start = want["rows"], want["row_labels"], 0
            for rank, (embeddings, labels, mask) in enumerate(want["pieces"]):
                if mask is None:  # every row is a query, and its pair with its own slot is dropped
                    pairs = lmu.get_all_pairs_indices(labels, row_labels)
                    own = want["slots"][start : start + len(labels)]
                    keep = pairs[1] != own[pairs[0]]
                    value = plain(embeddings, labels, (pairs[0][keep], pairs[1][keep], *pairs[2:]), rows, row_labels)
                    start += len(labels)
                else:
                    queries, query_labels = embeddings[~mask], labels[~mask]
                    pairs = lmu.get_all_pairs_indices(query_labels, row_labels)
                    value = plain(queries, query_labels, pairs, rows, row_labels)
                torch.testing.assert_close(results[rank][step][0], value)


def test_efficient_gives_the_gradient_of_the_whole_batch():
    """With a mean over the queries and equal batches, each rank's gradient is efficient=False's."""
    efficient, whole = run_all(2, [("ours", "supcon_mean", False, True, True), ("ours", "supcon_mean", False, False, True)])
    for rank in range(2):
        for step in range(STEPS):
            torch.testing.assert_close(efficient[rank][step][1], whole[rank][step][1])
            assert torch.equal(efficient[rank][step][2], whole[rank][step][2])


def test_efficient_refuses_pmls_own_class_and_says_why():
    with pytest.raises(ValueError, match="needs ssl_memory.pml.CrossBatchMemory"):
        DistributedLossWrapper(losses.CrossBatchMemory(losses.NTXentLoss(), DIM), efficient=True)
    DistributedLossWrapper(CrossBatchMemory(losses.NTXentLoss(), DIM), efficient=True)
    with pytest.raises(TypeError, match="must extend BaseMetricLossFunction or CrossBatchMemory"):
        DistributedLossWrapper(torch.nn.MSELoss())


def test_outside_a_process_group_the_wrapper_returns_the_memorys_loss():
    """PML's wrapper hands a CrossBatchMemory ref_emb and ref_labels there, a TypeError."""
    gen = torch.Generator().manual_seed(0)
    wrapped = DistributedLossWrapper(CrossBatchMemory(make_loss("ntxent"), DIM, MEMORY))
    alone = CrossBatchMemory(make_loss("ntxent"), DIM, MEMORY)
    for _ in range(3):
        embeddings, labels = torch.randn(6, DIM, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        mask = torch.arange(6) % 2 == 0
        torch.testing.assert_close(wrapped(embeddings, labels, enqueue_mask=mask), alone(embeddings, labels, enqueue_mask=mask))
    assert torch.equal(wrapped.loss.embedding_memory, alone.embedding_memory)
