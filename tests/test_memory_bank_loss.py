import pytest
import torch
import torch.nn.functional as F

from ssl_memory import MemoryBank, MemoryBankLoss


def reference_discrimination(embeddings, indices, bank, groups, temperature):
    """-log p(group) of each row, one row and one entry at a time."""
    losses = []
    for r in range(len(indices)):
        f = embeddings[r] / embeddings[r].norm()
        scores = torch.stack([f @ bank[j] / temperature for j in range(len(bank))])
        group = [j for j in range(len(bank)) if groups[j] == groups[indices[r]]]
        losses.append(-(torch.logsumexp(scores[group], 0) - torch.logsumexp(scores, 0)))
    return torch.stack(losses)


def reference_pairwise_consistency(embeddings, indices, bank, temperature):
    log_p = torch.log_softmax(F.normalize(embeddings, dim=1) @ bank.T / temperature, dim=1)
    per_sample = []
    for sample in sorted(set(indices.tolist())):
        rows = [r for r in range(len(indices)) if indices[r] == sample]
        if len(rows) > 1:
            kls = [(log_p[k].exp() * (log_p[k] - log_p[j])).sum() for k in rows for j in rows if k != j]
            per_sample.append(torch.stack(kls).mean())
    return torch.stack(per_sample).mean() if per_sample else embeddings.sum() * 0


def reference_bank_update(bank, indices, embeddings, momentum):
    bank = bank.clone()
    for i in sorted(set(indices.tolist())):
        views = [F.normalize(embeddings[r], dim=0) for r in range(len(indices)) if indices[r] == i]
        bank[i] = F.normalize(momentum * bank[i] + (1 - momentum) * sum(views) / len(views), dim=0)
    return bank


def planted_groups(n):
    """Groups of size 1, 2 and 3 (canonical id = smallest member), the rest singletons."""
    groups = torch.arange(n)
    groups[5] = 1  # {1, 5}
    groups[[7, 9]] = 2  # {2, 7, 9}
    return groups


def make(n=12, dim=6, dtype=torch.float64, seed=0, **kwargs):
    bank = MemoryBank(n, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return MemoryBankLoss(memory=bank, **kwargs)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("consistency_weight", [0.0, 0.7])
@pytest.mark.parametrize("checks", [True, False])  # the views' layout read with the checks, or no read
@pytest.mark.parametrize(
    "indices",
    [
        [2, 1, 4, 2, 1, 2, 9, 2],  # sample 2 (group of 3) has 4 views, 1 (group of 2) has 2, 4 and 9 one each
        [2, 1, 4, 2, 1, 4, 2, 1, 4],  # view-major, 3 views each, as MultiAugCollate returns
    ],
)
def test_loss_gradient_and_update_match_reference(merged, consistency_weight, checks, indices):
    temperature, momentum = 0.3, 0.5
    criterion = make(temperature=temperature, consistency_weight=consistency_weight, checks=checks)
    if merged:
        criterion.memory.groups.copy_(planted_groups(12))
    gen = torch.Generator().manual_seed(1)
    indices = torch.tensor(indices)
    embeddings = torch.randn(len(indices), 6, generator=gen, dtype=torch.float64) * 2
    bank_before, groups = criterion.memory.features.clone(), criterion.memory.groups.clone()

    x = embeddings.clone().requires_grad_()
    terms = criterion.terms(x, indices)
    loss = terms["discrimination"].mean() + consistency_weight * terms["consistency"]
    loss.backward()  # after the bank was written in the same forward

    y = embeddings.clone().requires_grad_()
    ref_terms = reference_discrimination(y, indices, bank_before, groups, temperature)
    ref_cons = reference_pairwise_consistency(y, indices, bank_before, temperature)
    (ref_terms.mean() + consistency_weight * ref_cons).backward()

    torch.testing.assert_close(terms["discrimination"], ref_terms, atol=1e-5, rtol=1e-5)
    if consistency_weight:
        torch.testing.assert_close(terms["consistency"], ref_cons, atol=1e-5, rtol=1e-5)
    else:
        assert float(terms["consistency"]) == 0.0
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        criterion.memory.features, reference_bank_update(bank_before, indices, embeddings, momentum)
    )
    assert torch.equal(criterion.memory.groups, groups)


def test_forward_is_mean_plus_weighted_consistency_and_last_reports_it():
    criterion = make(temperature=0.2, consistency_weight=2.0)
    criterion.memory.groups.copy_(planted_groups(12))
    indices = torch.tensor([0, 1, 0, 1, 7])
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    terms = criterion.terms(x, indices, update_memory=False)
    loss = criterion(x, indices, update_memory=False)
    torch.testing.assert_close(loss, terms["discrimination"].mean() + 2.0 * terms["consistency"])
    last = criterion.last
    torch.testing.assert_close(last["discrimination"], terms["discrimination"].mean())
    torch.testing.assert_close(last["consistency"], terms["consistency"])
    torch.testing.assert_close(last["positive_prob"], torch.exp(-terms["discrimination"]).mean())
    assert last["merge"] is None and not last["discrimination"].requires_grad


def test_without_options_it_is_npid_cross_entropy_in_float32():
    criterion = make(n=300, dim=16, dtype=torch.float32, temperature=0.07)
    bank = criterion.memory.features.clone()
    indices = torch.tensor([5, 17, 299, 0])
    x = torch.randn(4, 16, requires_grad=True)
    loss = criterion(x, indices)
    expected = F.cross_entropy(F.normalize(x, dim=1) @ bank.T / 0.07, indices)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pairwise", "mean"])
def test_consistency_term_is_consistency_loss_on_bank_logits(mode):
    from ssl_memory import ConsistencyLoss

    criterion = make(temperature=0.25, consistency_weight=1.0, consistency_mode=mode)
    bank = criterion.memory.features.clone()
    indices = torch.tensor([3, 3, 3, 4, 4, 8])
    x = torch.randn(6, 6, dtype=torch.float64)
    ours = criterion.terms(x, indices)["consistency"]
    expected = ConsistencyLoss(1.0, mode)(F.normalize(x, dim=1) @ bank.T / 0.25, indices)
    torch.testing.assert_close(ours, expected)


def test_single_view_batch_with_consistency_gives_zero_not_nan():
    criterion = make(consistency_weight=1.0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    terms = criterion.terms(x, torch.tensor([0, 1, 2]))
    assert float(terms["consistency"].detach()) == 0.0
    (terms["discrimination"].mean() + terms["consistency"]).backward()
    assert torch.isfinite(x.grad).all()


def test_update_memory_false_leaves_memory_untouched():
    criterion = make(consistency_weight=1.0)
    state = {k: v.clone() for k, v in criterion.state_dict().items()}
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    criterion(x, torch.tensor([1, 1, 2, 3]), update_memory=False).backward()
    for key, value in criterion.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_gradients_reach_embeddings_only():
    criterion = make()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = criterion(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in criterion.buffers())
    assert list(criterion.parameters()) == []


def test_groups_written_in_place_between_calls_are_used():
    criterion = make(temperature=0.5)
    x = torch.randn(2, 6, dtype=torch.float64)
    indices = torch.tensor([1, 2])
    before = criterion.terms(x, indices, update_memory=False)["discrimination"]
    criterion.memory.groups[5] = 1  # merge 1 and 5 after a call has cached the groups
    after = criterion.terms(x, indices, update_memory=False)["discrimination"]
    expected = reference_discrimination(x, indices, criterion.memory.features, criterion.memory.groups, 0.5)
    torch.testing.assert_close(after, expected)
    assert after[0] < before[0] and torch.allclose(after[1], before[1])
    criterion.memory.groups.copy_(torch.arange(12))  # and un-merged again
    torch.testing.assert_close(criterion.terms(x, indices, update_memory=False)["discrimination"], before)


class RecordingMerger:
    """Stands in for NeighbourMerger: merges entries 0 and 1 at its second step."""

    def __init__(self):
        self.calls = []

    def step(self, memory):
        self.calls.append(memory.features.clone())
        if len(self.calls) == 2:
            memory.groups[1] = 0
            return {"pairs_merged": 1}
        return None


def test_merger_steps_once_per_update_after_the_bank_update():
    merger = RecordingMerger()
    criterion = make(merger=merger)
    x = torch.randn(2, 6, dtype=torch.float64)
    indices = torch.tensor([0, 4])
    criterion(x, indices)
    assert len(merger.calls) == 1 and torch.equal(merger.calls[0], criterion.memory.features)
    assert criterion.last["merge"] is None
    criterion(x, indices, update_memory=False)
    assert len(merger.calls) == 1
    criterion(x, indices)
    assert len(merger.calls) == 2 and criterion.last["merge"] == {"pairs_merged": 1}
    assert criterion.memory.groups[1] == 0
    # the next call sees the merge: entries 0 and 1 are both positives of sample 0
    terms = criterion.terms(x, indices, update_memory=False)
    expected = reference_discrimination(x, indices, criterion.memory.features, criterion.memory.groups, 0.07)
    torch.testing.assert_close(terms["discrimination"], expected)


def test_builds_its_own_bank_and_state_dict_resumes():
    criterion = MemoryBankLoss(num_samples=20, dim=4, momentum=0.9)
    assert isinstance(criterion.memory, MemoryBank) and criterion.memory.momentum == 0.9
    assert set(criterion.state_dict()) == {"memory.features", "memory.groups", "memory.samples_written"}
    criterion(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    other = MemoryBankLoss(num_samples=20, dim=4, momentum=0.9)
    other.load_state_dict(criterion.state_dict())
    x, indices = torch.randn(3, 4), torch.tensor([4, 1, 1])
    torch.testing.assert_close(other(x, indices), criterion(x, indices))
    torch.testing.assert_close(other.memory.features, criterion.memory.features)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "num_samples and dim"),
        ({"num_samples": 10}, ValueError, "num_samples and dim"),
        ({"num_samples": 10, "dim": 4, "temperature": 0}, ValueError, "temperature"),
        ({"num_samples": 10, "dim": 4, "temperature": -1.0}, ValueError, "temperature"),
        ({"num_samples": 10, "dim": 4, "consistency_weight": -0.1}, ValueError, "consistency_weight"),
        ({"num_samples": 10, "dim": 4, "consistency_mode": "js"}, ValueError, "consistency_mode"),
        ({"num_samples": 10, "dim": 4, "merger": object()}, TypeError, "merger"),
        ({"num_samples": 10, "dim": 4, "momentum": 1.0}, ValueError, "momentum"),
        ({"memory": torch.zeros(3, 4)}, TypeError, "memory must be a MemoryBank"),
        ({"memory": MemoryBank(10, 4), "num_samples": 11}, ValueError, "num_samples=11"),
        ({"memory": MemoryBank(10, 4), "dim": 5}, ValueError, "dim=5"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemoryBankLoss(**kwargs)


@pytest.mark.parametrize(
    "embeddings, indices, error, match",
    [
        (torch.randn(3, 5), torch.arange(3), ValueError, r"embeddings must have shape \(B, 4\), got \(3, 5\)"),
        (torch.randn(3, 4), torch.arange(2), ValueError, r"indices must have shape \(3,\)"),
        (torch.randn(3, 4), torch.tensor([0, 1, 10]), ValueError, r"indices must lie in \[0, 10\)"),
        (torch.randn(3, 4), torch.tensor([0, -1, 2]), ValueError, r"indices must lie in \[0, 10\)"),
        (torch.randn(3, 4), torch.arange(3.0), TypeError, "indices must be an integer tensor"),
        (torch.randn(0, 4), torch.arange(0), ValueError, "at least one row"),
        (torch.tensor([[float("nan")] * 4]), torch.tensor([0]), ValueError, "NaN"),
    ],
)
def test_bad_inputs_raise_and_leave_memory_untouched(embeddings, indices, error, match):
    criterion = MemoryBankLoss(10, 4)
    before = criterion.memory.features.clone()
    with pytest.raises(error, match=match):
        criterion(embeddings, indices)
    assert torch.equal(criterion.memory.features, before)


def test_double_backward_without_consistency_is_exact():
    criterion = make(temperature=0.5)
    criterion.memory.groups.copy_(planted_groups(12))
    embeddings = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([1, 2, 5, 1, 7])
    assert torch.autograd.gradgradcheck(lambda e: criterion(e, indices, update_memory=False), (embeddings,))
