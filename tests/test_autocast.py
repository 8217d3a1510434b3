"""Under autocast (bfloat16 on CPU) every loss returns float32, equal to the loss of the same inputs without autocast."""

import pytest
import torch

from ssl_memory import ConsistencyLoss, CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, QueueLoss


def memory_bank(inputs):
    return MemoryBankLoss(20, 8, temperature=0.1, consistency_weight=0.5)(inputs, torch.arange(6) % 3)


def queue(inputs):
    criterion = QueueLoss(size=16, dim=8, mixer=HardNegativeMixer(4, 4, 2, generator=torch.Generator().manual_seed(0)))
    criterion(inputs, inputs.flip(0).detach(), torch.arange(6))
    return criterion(inputs, inputs.roll(1, 0).detach(), torch.arange(6))


def consistency(inputs):
    return ConsistencyLoss(0.5)(inputs, torch.arange(6) % 3)  # rows as logits over 8 entries


def cross_batch(inputs):
    criterion = CrossBatchLoss(size=16, dim=8, margin=0.1)
    criterion(inputs, torch.arange(6) % 2)
    return criterion(inputs, torch.arange(6) % 3)  # the memory term is on from the second step


LOSSES = [memory_bank, queue, consistency, cross_batch]


@pytest.mark.parametrize("loss_of", LOSSES)
def test_loss_is_float32_under_autocast(loss_of):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = layer(x)
        assert embeddings.dtype == torch.bfloat16
        loss = loss_of(embeddings)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_of(embeddings.float()))
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()
