import pytest
import torch
import torch.nn.functional as F

from ssl_memory import MemoryBank


def reference_update(bank: torch.Tensor, indices, features, momentum):
    """NPID's update written as a plain loop over samples."""
    bank = bank.clone()
    for i in sorted(set(indices.tolist())):
        rows = [F.normalize(features[r], dim=0) for r in range(len(indices)) if indices[r] == i]
        mean = sum(rows) / len(rows)
        bank[i] = F.normalize(momentum * bank[i] + (1 - momentum) * mean, dim=0)
    return bank


def test_initial_state_is_unit_rows_and_identity_groups():
    bank = MemoryBank(100, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(100))
    assert torch.equal(bank.groups, torch.arange(100))
    assert set(bank.state_dict()) == {"features", "groups", "samples_written"}


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_update_matches_plain_loop_with_duplicate_indices(momentum):
    gen = torch.Generator().manual_seed(1)
    bank = MemoryBank(20, 8, momentum=momentum, generator=gen)
    indices = torch.tensor([3, 7, 3, 19, 0, 7, 3])
    features = torch.randn(7, 8, generator=gen) * 3
    expected = reference_update(bank.features, indices, features, momentum)
    bank.update(indices, features)
    torch.testing.assert_close(bank.features, expected)


def test_momentum_weights_the_old_entry():
    bank = MemoryBank(4, 3, momentum=0.9)
    old = bank.features[1].clone()
    bank.update(torch.tensor([1]), -old.unsqueeze(0) + 0.01)
    assert torch.dot(bank.features[1], old) > 0.99  # 0.9 old - 0.1 new stays near the old entry


def test_half_storage_computes_in_float32():
    gen = torch.Generator().manual_seed(2)
    bank = MemoryBank(30, 8, dtype=torch.bfloat16, generator=gen)
    indices, features = torch.tensor([1, 2, 1]), torch.randn(3, 8, generator=gen)
    expected = reference_update(bank.features.float(), indices, features, 0.5)
    bank.update(indices, features)
    assert bank.features.dtype == torch.bfloat16
    torch.testing.assert_close(bank.features.float(), expected, atol=1e-2, rtol=1e-2)


def test_memory_follows_module_to():
    bank = MemoryBank(10, 4).to(torch.float64)
    assert bank.features.dtype == torch.float64 and bank.groups.dtype == torch.long
    bank.update(torch.tensor([0]), torch.randn(1, 4, dtype=torch.float64))
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(3)
    first = MemoryBank(50, 8, generator=gen)
    first.update(torch.randint(0, 50, (16,), generator=gen), torch.randn(16, 8, generator=gen))
    first.groups[3] = 1  # state written by a merger must travel too
    second = MemoryBank(50, 8)
    second.load_state_dict(first.state_dict())
    batch = torch.randint(0, 50, (16,), generator=gen), torch.randn(16, 8, generator=gen)
    first.update(*batch)
    second.update(*batch)
    assert torch.equal(first.features, second.features) and torch.equal(first.groups, second.groups)


@pytest.mark.parametrize(
    ("indices", "features", "error", "match"),
    [
        (torch.tensor([0, 1]), torch.randn(2, 8, 1), ValueError, r"features must have shape \(B, 8\), got \(2, 8, 1\)"),
        (torch.tensor([0, 1]), torch.randn(2, 5), ValueError, r"features must have shape \(B, 8\), got \(2, 5\)"),
        (torch.tensor([0, 10]), torch.randn(2, 8), ValueError, r"indices must lie in \[0, 10\), got values in \[0, 10\]"),
        (torch.tensor([-1, 2]), torch.randn(2, 8), ValueError, r"indices must lie in \[0, 10\)"),
        (torch.tensor([0, 1, 2]), torch.randn(2, 8), ValueError, r"indices must have shape \(2,\).*got \(3,\)"),
        (torch.tensor([0.0, 1.0]), torch.randn(2, 8), TypeError, r"indices must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([0, 1]), torch.ones(2, 8, dtype=torch.long), TypeError, r"features must be a floating-point tensor"),
        ([0, 1], torch.randn(2, 8), TypeError, r"indices must be a torch.Tensor, got list"),
        (torch.tensor([0, 1]), torch.empty(2, 8, device="meta"), ValueError, r"features is on meta but the memory is on cpu"),
    ],
)
def test_bad_input_is_rejected_and_leaves_memory_unchanged(indices, features, error, match):
    bank = MemoryBank(10, 8)
    before = bank.features.clone()
    with pytest.raises(error, match=match):
        bank.update(indices, features)
    assert torch.equal(bank.features, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_never_reach_the_memory(bad):
    bank = MemoryBank(10, 8)
    before = bank.features.clone()
    features = torch.randn(3, 8)
    features[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        bank.update(torch.tensor([0, 1, 2]), features)
    assert torch.equal(bank.features, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_entries": 0, "dim": 4}, "num_entries must be a positive int, got 0"),
        ({"num_entries": 4, "dim": -2}, "dim must be a positive int, got -2"),
        ({"num_entries": 4, "dim": 4, "momentum": 1.0}, r"momentum must lie in \[0, 1\), got 1.0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBank(**kwargs)
