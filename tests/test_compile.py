"""torch.compile of the losses trains exactly as eager does, memory writes included.

``aot_eager_decomp_partition`` runs every loss through what torch.compile does before generating code
(dynamo's graphs and breaks, decompositions, AOT autograd, the min-cut partitioner). ``inductor`` adds
the generated kernels, which may recompute a tensor saved for the backward from a memory the forward
has written since (the hazard ``Memory.snapshot`` guards against: without its guard this test fails).
Inductor compiles for about a second a graph on CPU, so it runs the memory bank loss alone: the
queue losses read their memory through the same ``Memory.similarity``.
"""

import pytest
import torch

from ssl_memory import CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, QueueLoss


def train(backend, names, steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 8)
    bank_loss = MemoryBankLoss(30, 8, temperature=0.1, consistency_weight=0.5)
    bank_loss.memory.groups[[4, 9, 11]] = 4  # a merged group
    mixer = HardNegativeMixer(4, 4, 2, generator=torch.Generator().manual_seed(2))
    queue_loss = QueueLoss(size=14, dim=8, mixer=mixer)  # 14: batches wrap around the ring
    cross_batch_loss = CrossBatchLoss(size=16, dim=8, margin=0.2, start_step=1)
    modules = {"bank": bank_loss, "queue": queue_loss, "cross_batch": cross_batch_loss}
    losses = {
        name: modules[name] if backend is None else torch.compile(modules[name], backend=backend) for name in names
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    values = []
    for _ in range(steps):
        x = torch.randn(12, 10, generator=gen)
        indices = torch.randint(0, 30, (6,), generator=gen).repeat(2)
        embeddings = model(x)
        inputs = {
            "bank": (embeddings, indices),
            "queue": (embeddings[:6], embeddings[6:].detach(), indices[:6]),
            "cross_batch": (embeddings, indices % 4),
        }
        loss = sum(losses[name](*inputs[name]) for name in names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.detach())
    return torch.stack(values), [*model.parameters()], [modules[name].state_dict() for name in names]


@pytest.mark.parametrize(
    "backend, names, steps",
    [("aot_eager_decomp_partition", ("bank", "queue", "cross_batch"), 4), ("inductor", ("bank",), 2)],
)
def test_compiled_losses_train_as_eager(backend, names, steps):
    torch._dynamo.reset()
    eager, compiled = train(None, names, steps), train(backend, names, steps)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled[2], eager[2]):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
