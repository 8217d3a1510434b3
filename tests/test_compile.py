"""torch.compile of the losses (aot_eager and inductor on CPU) trains exactly as eager does, memory writes included."""

import pytest
import torch

from ssl_memory import CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, QueueLoss


def train(backend, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 8)
    bank_loss = MemoryBankLoss(30, 8, temperature=0.1, consistency_weight=0.5)
    bank_loss.memory.groups[[4, 9, 11]] = 4  # a merged group
    mixer = HardNegativeMixer(4, 4, 2, generator=torch.Generator().manual_seed(2))
    queue_loss = QueueLoss(size=14, dim=8, mixer=mixer)  # 14: batches wrap around the ring
    cross_batch_loss = CrossBatchLoss(size=16, dim=8, margin=0.2, start_step=1)
    losses = (bank_loss, queue_loss, cross_batch_loss)
    if backend is not None:
        losses = tuple(torch.compile(loss, backend=backend) for loss in losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    values = []
    for _ in range(steps):
        x = torch.randn(12, 10, generator=gen)
        indices = torch.randint(0, 30, (6,), generator=gen).repeat(2)
        embeddings = model(x)
        loss = losses[0](embeddings, indices) + losses[1](embeddings[:6], embeddings[6:].detach(), indices[:6])
        loss = loss + losses[2](embeddings, indices % 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.detach())
    states = (bank_loss.state_dict(), queue_loss.state_dict(), cross_batch_loss.state_dict())
    return torch.stack(values), [*model.parameters()], *states


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_losses_train_as_eager(backend):
    torch._dynamo.reset()
    eager, compiled = train(None), train(backend)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled[2:], eager[2:]):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
