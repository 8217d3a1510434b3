"""ShardedMemoryBank and ShardedMemoryBankLoss against the replicated MemoryBank and MemoryBankLoss (float64)."""

import pytest
import torch
from distributed_helpers import run_distributed

from ssl_memory import (
    DistributedInputError,
    MemoryBank,
    MemoryBankLoss,
    NeighbourMerger,
    ShardedMemoryBank,
    ShardedMemoryBankLoss,
)

N, D = 23, 4  # N divisible by neither 2 nor 3
CONFIGS = (  # (consistency weight, mode, merge groups of three entries on different ranks, merger)
    (0.7, "pairwise", True, False),
    (0.3, "mean", True, True),
    (0.0, "pairwise", False, False),
)


def merger():
    """Merges plenty on a small bank in few dimensions, every epoch."""
    return NeighbourMerger(warmup=0, ratio=1.0, min_similarity=-1.0, initial_share=0.5, max_share=0.5, backend="torch")


def loss_pair(weight, mode, grouped, with_merger):
    replicated = MemoryBankLoss(
        memory=MemoryBank(N, D, dtype=torch.float64), temperature=0.3, consistency_weight=weight,
        consistency_mode=mode, merger=merger() if with_merger else None,
    )
    sharded = ShardedMemoryBankLoss(
        memory=ShardedMemoryBank(N, D, dtype=torch.float64), temperature=0.3, consistency_weight=weight,
        consistency_mode=mode, merger=merger() if with_merger else None,
    )
    if grouped:
        replicated.memory.groups.copy_(torch.arange(N) // 3)
    sharded.memory.load_shards([replicated.memory.state_dict()])
    return replicated, sharded


def batch(rank, step):
    """Rank r: 2 + r samples (uneven), 4 views, view-major; indices drawn over all N (owned anywhere)."""
    samples = torch.randperm(N, generator=torch.Generator().manual_seed(10 * step + rank))[: 2 + rank]
    embeddings = torch.randn(4 * samples.numel(), D, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
    return embeddings.requires_grad_(), samples.repeat(4)


def exactness_worker(rank, world_size):
    differences = []
    for config in CONFIGS:
        replicated, sharded = loss_pair(*config)
        for step in range(6):  # 7 to 9 samples a step over 23 entries: the merger runs about every third step
            embeddings, indices = batch(rank, step)
            expected = replicated(embeddings, indices)
            (expected_grad,) = torch.autograd.grad(expected, embeddings)
            loss = sharded(embeddings, indices)
            (grad,) = torch.autograd.grad(loss, embeddings)
            differences.append(((loss - expected).abs().item(), (grad - expected_grad).abs().max().item()))
        full = sharded.memory.gather_features()
        differences.append(((full - replicated.memory.features).abs().max().item(), 0.0))
        assert torch.equal(sharded.memory.groups, replicated.memory.groups)
        assert sharded.memory.num_written == replicated.memory.num_written
        if config[3]:
            assert len(sharded.merger.history) == len(replicated.merger.history) > 0
            assert int((torch.bincount(sharded.memory.groups) > 1).sum()) > N // 3  # the merger did merge
    return differences, sharded.memory.shard.num_entries


@pytest.mark.parametrize("world_size", [2, 3])
def test_mp_sharded_loss_and_gradients_equal_the_replicated_loss(world_size):
    results = run_distributed(exactness_worker, world_size)
    for differences, _ in results:
        assert max(max(pair) for pair in differences) < 1e-10
    assert [rows for _, rows in results] == [len(range(r, N, world_size)) for r in range(world_size)]


def one_process_exactness():
    replicated, sharded = loss_pair(0.7, "pairwise", True, False)
    embeddings, indices = batch(0, 0)
    return replicated(embeddings, indices), sharded(embeddings, indices)


def test_one_process_sharded_loss_equals_the_replicated_loss():
    expected, loss = one_process_exactness()
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)


def state_worker(rank, world_size, states=None):
    if states is None:  # the saving run: a few updates from this rank's own random start
        bank = ShardedMemoryBank(N, D, dtype=torch.bfloat16)
        for step in range(3):
            bank.update(torch.randint(0, N, (5,), generator=torch.Generator().manual_seed(step + rank)),
                        torch.randn(5, D, generator=torch.Generator().manual_seed(rank)))
        bank.groups.copy_(torch.arange(N) // 2)
        return bank.state_dict(), bank.full_state_dict()
    bank = ShardedMemoryBank(N, D, dtype=torch.bfloat16)
    bank.load_shards(states)
    with pytest.raises(ValueError, match="load_shards"):
        bank.load_state_dict(states[rank])  # another layout: refused, the bank left as it was
    return bank.full_state_dict()


def test_mp_checkpoint_saved_on_three_ranks_loads_on_two_and_on_one():
    saved = run_distributed(state_worker, 3)
    states, full = [state for state, _ in saved], saved[0][1]
    assert all(torch.equal(other["features"], full["features"]) for _, other in saved)
    for loaded in run_distributed(state_worker, 2, states):
        for key in full:
            assert torch.equal(loaded[key], full[key]), key
    single = ShardedMemoryBank(N, D, dtype=torch.bfloat16)
    single.load_shards(states[::-1])  # any order
    assert torch.equal(single.shard.features, full["features"])
    replicated = MemoryBank(N, D, dtype=torch.bfloat16)
    replicated.load_state_dict(single.full_state_dict())  # a sharded checkpoint becomes a replicated bank
    assert torch.equal(replicated.groups, torch.arange(N) // 2)


def bad_input_worker(rank, world_size):
    criterion = ShardedMemoryBankLoss(num_samples=N, dim=D, consistency_weight=0.5)
    before = criterion.memory.shard.features.clone()
    good = torch.randn(4, D, requires_grad=True), torch.tensor([0, 1, 0, 1])
    bad = (torch.full((4, D), float("nan")), good[1]) if rank == 1 else good
    errors = []
    for call in (
        lambda: criterion(*bad),
        lambda: criterion.update_memory(*bad),
        lambda: criterion.memory.update(bad[1], bad[0]),
        lambda: criterion(good[0], torch.tensor([0, 1, 0, N]) if rank == 0 else good[1], update_memory=False),
    ):
        with pytest.raises(DistributedInputError) as caught:
            call()
        errors.append(str(caught.value))
    unchanged = torch.equal(criterion.memory.shard.features, before) and criterion.memory.num_written == 0
    criterion(*good).backward()  # the next step works on every rank
    return errors, unchanged, criterion.memory.num_written


def test_mp_bad_input_on_one_rank_raises_the_same_error_on_every_rank():
    (errors0, unchanged0, written0), (errors1, unchanged1, written1) = run_distributed(bad_input_worker, 2)
    assert errors0 == errors1 and unchanged0 and unchanged1 and written0 == written1 == 2
    assert "rank(s) [1]" in errors0[0] and "embeddings contain NaN" in errors0[0]
    assert "rank(s) [0]" in errors0[3] and "indices must lie in [0, 23)" in errors0[3]


def test_ownership_rule_and_shard_sizes():
    bank = ShardedMemoryBank(N, D)
    assert torch.equal(bank.owned_entries(), torch.arange(N)) and bank.shard.num_entries == N
    with pytest.raises(TypeError, match="must be a ShardedMemoryBank"):
        ShardedMemoryBankLoss(memory=MemoryBank(N, D))
    with pytest.raises(ValueError, match="layouts"):
        bank.load_shards([bank.state_dict(), bank.state_dict()])


def test_a_loss_state_loads_with_its_prefix_and_float64_rows_stay_exact():
    saved = ShardedMemoryBankLoss(memory=ShardedMemoryBank(N, D, dtype=torch.float64))
    saved.memory.shard.features.copy_(torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64), dim=1))
    saved.memory.groups.copy_(torch.arange(N) // 4)
    loaded = ShardedMemoryBank(N, D, dtype=torch.float64)
    loaded.load_shards([saved.state_dict()], prefix="memory.")
    assert torch.equal(loaded.shard.features, saved.memory.shard.features)
    assert torch.equal(loaded.groups, saved.memory.groups)
