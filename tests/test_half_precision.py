"""Half-precision banks: stochastic rounding keeps small momentum updates that round-to-nearest loses."""

import pytest
import torch
import torch.nn.functional as F

from ssl_memory import MemoryBank, MemoryBankLoss, knn_accuracy
from ssl_memory.rounding import to_storage

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    x = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    draws = torch.stack([to_storage(x, dtype, seed=seed).float() for seed in range(200)])
    below = x.to(dtype).float().minimum(draws.amin(0))
    gap = torch.nextafter(below.to(dtype), torch.tensor(torch.inf, dtype=dtype)).float() - below
    assert ((draws - x).abs() < gap).all()  # always the representable value just below or just above x
    # each value's mean over 200 draws is within 5 standard errors (gap / 2 / sqrt(200) at most) of x
    assert ((draws.mean(0) - x).abs() / gap).max() < 5 * 0.5 / 200**0.5
    assert abs((draws.mean(0) - x).mean()) < 1e-3 * gap.mean()  # no bias overall
    x_rounded = x.to(dtype)
    assert torch.equal(to_storage(x_rounded.float(), dtype, seed=3), x_rounded)  # representable: unchanged
    assert torch.equal(to_storage(x, dtype, seed=3), to_storage(x, dtype, seed=3))  # seeded: reproducible
    assert torch.equal(to_storage(x.double(), torch.float32, seed=3), x)  # other dtypes: a plain cast


def test_round_to_nearest_would_lose_a_small_step_that_stochastic_rounding_keeps():
    x = torch.full((100_000,), 1.0 + 2.0**-10)  # a quarter of a bfloat16 ulp above 1
    assert x.to(torch.bfloat16).float().eq(1.0).all()
    assert abs(to_storage(x, torch.bfloat16, seed=0).float().mean().item() - x[0].item()) < 2e-5


def trajectories(momentum, dtype, rows=128, dim=32, steps=100):
    """A half and a float32 bank from the same start, after ``steps`` updates towards nearby targets."""
    generator = torch.Generator().manual_seed(0)
    start = F.normalize(torch.randn(rows, dim, generator=generator), dim=1).to(dtype).float()
    # targets ~0.001 away per component: a step at momentum 0.9 is ~1/10 of a bfloat16 ulp of the entries
    target = F.normalize(start + 0.001 * torch.randn(rows, dim, generator=generator), dim=1)
    reference, half = MemoryBank(rows, dim, momentum), MemoryBank(rows, dim, momentum, dtype=dtype)
    reference.features.copy_(start)
    half.features.copy_(start)
    for _ in range(steps):
        reference.update(torch.arange(rows), target)
        half.update(torch.arange(rows), target)
    return start, reference.features, half.features.float()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_small_updates_move_a_half_entry_as_they_move_a_float32_entry(momentum, dtype):
    start, reference, half = trajectories(momentum, dtype)
    moved, half_moved = reference - start, half - start
    # share of the float32 motion the half entries made (round-to-nearest: 0.15 to 0.96 here)
    assert abs((half_moved * moved).sum() / (moved * moved).sum() - 1) < 0.02
    eps = torch.finfo(dtype).eps
    assert (half - reference).abs().max() < eps  # within one storage ulp of 1 of the float32 entry
    assert (half.norm(dim=1) - 1).abs().max() < eps / 2  # no drift in the norm


def short_training_run(dtype, seed):
    """Final loss and kNN accuracy of 12 epochs of MemoryBankLoss on 8 Gaussian classes (a linear encoder)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(320) % 8
    data = torch.randn(8, 32, generator=generator)[labels] + 1.5 * torch.randn(320, 32, generator=generator)
    encoder = torch.nn.Linear(32, 16)
    criterion = MemoryBankLoss(memory=MemoryBank(256, 16, dtype=dtype), temperature=0.1)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.3)
    losses = []
    for _ in range(12):
        for indices in torch.randperm(256).view(4, 64):
            views = data[indices].repeat(2, 1)
            loss = criterion(encoder(views + 0.5 * torch.randn_like(views)), indices.repeat(2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = knn_accuracy(encoder(data[256:]), labels[256:], criterion.memory.features.float(), labels[:256], k=20)
    return sum(losses[-4:]) / 4, accuracy


def test_a_short_training_run_in_half_precision_ends_within_noise_of_float32():
    loss, accuracy = short_training_run(torch.float32, seed=0)
    other_seed_loss, _ = short_training_run(torch.float32, seed=1)
    for dtype in HALF:
        half_loss, half_accuracy = short_training_run(dtype, seed=0)
        assert abs(half_loss - loss) < abs(other_seed_loss - loss)  # closer than a change of seed
        assert abs(half_accuracy - accuracy) <= 2 / 64
