"""Every Python block of README.md runs as written, and does what the text around it says.

The blocks are read from README.md when the tests run. What a block leaves to the reader (its
``dataset``, ``augment``, ``model``, ``optimizer``, MoCo's encoders, PML's ``embeddings``...) comes
from a tiny stand-in; everything else runs as printed. A block's training loop (its first top-level
``for``) is run again for each further epoch, in the namespace the block built. The checks find the
block's objects by type, not by name, so a renamed variable does not break them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory

from ssl_memory import HardNegativeMixer, MemoryBankLoss, NeighbourMerger, QueueLoss

README = Path(__file__).resolve().parents[1] / "README.md"
NUM_SAMPLES, WIDTH, DIM = 600, 32, 128


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", README.read_text(), flags=re.S)


def block_using(name: str, lightning: bool = False) -> str:
    """The one README block that uses ``name`` (among the Lightning blocks, or among the others)."""
    found = [
        block
        for block in python_blocks()
        if re.search(rf"\b{name}\b", block) and ("LightningModule" in block) == lightning
    ]
    assert len(found) == 1, f"expected one README block using {name}, found {len(found)}"
    return found[0]


def stand_ins(block: str) -> dict:
    """What a reader supplies: tiny data and models; the optimizer trains whichever model the block uses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 64), torch.nn.ReLU(), torch.nn.Linear(64, DIM))
    encoder_q = torch.nn.Sequential(torch.nn.Linear(WIDTH, 64), torch.nn.ReLU(), torch.nn.Linear(64, DIM))
    encoder_k = torch.nn.Sequential(torch.nn.Linear(WIDTH, 64), torch.nn.ReLU(), torch.nn.Linear(64, DIM))
    encoder_k.load_state_dict(encoder_q.state_dict())

    def momentum_update(query_encoder, key_encoder, momentum=0.99):
        for q, k in zip(query_encoder.parameters(), key_encoder.parameters()):
            k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)

    trained = encoder_q if "encoder_q" in block else model
    return {
        "dataset": torch.utils.data.TensorDataset(torch.randn(NUM_SAMPLES, WIDTH)),
        "augment": lambda x: x + 0.1 * torch.randn_like(x),
        "model": model,
        "encoder_q": encoder_q,
        "encoder_k": encoder_k,
        "momentum_update": momentum_update,
        "optimizer": torch.optim.Adam(trained.parameters(), lr=1e-3),
        "embeddings": torch.randn(32, DIM, requires_grad=True),
        "labels": torch.arange(32) % 4,
    }


class Block:
    """A README block split into its set-up and its training loop, run in one namespace."""

    def __init__(self, source: str) -> None:
        tree = ast.parse(source)
        loops = [i for i, node in enumerate(tree.body) if isinstance(node, ast.For)]
        cut = loops[0] if loops else len(tree.body)
        self.setup = compile(ast.Module(tree.body[:cut], []), "README.md", "exec")
        self.loop = compile(ast.Module(tree.body[cut:], []), "README.md", "exec") if loops else None
        self.namespace = stand_ins(source)

    def run_setup(self) -> None:
        exec(self.setup, self.namespace)

    def run_epoch(self) -> None:
        assert self.loop is not None, "the block has no training loop"
        exec(self.loop, self.namespace)

    def find(self, cls: type):
        found = [value for value in self.namespace.values() if isinstance(value, cls)]
        assert len(found) == 1, f"expected one {cls.__name__} in the block, found {len(found)}"
        return found[0]


def test_every_python_block_runs_as_written():
    blocks = python_blocks()
    assert blocks, "README.md has no python block"
    for source in blocks:
        block = Block(source)
        block.run_setup()
        if block.loop is not None:
            block.run_epoch()


def test_the_memory_bank_block_writes_every_entry_and_its_loss_falls():
    block = Block(block_using("MemoryBankLoss"))
    block.run_setup()
    criterion = block.find(MemoryBankLoss)
    assert criterion.consistency_weight > 0 and isinstance(criterion.merger, NeighbourMerger)
    losses = []
    criterion.register_forward_hook(lambda module, args, output: losses.append(float(output.detach())))
    before = criterion.memory.features.clone()
    block.run_epoch()
    assert (criterion.memory.features != before).any(dim=1).all(), "an epoch must write every sample's entry"
    first = sum(losses) / len(losses)
    for _ in range(4):
        losses.clear()
        block.run_epoch()
    assert sum(losses) / len(losses) < first - 0.5


def test_the_memory_bank_block_merges_once_an_epoch_after_a_warm_up():
    block = Block(block_using("MemoryBankLoss"))
    block.run_setup()
    criterion = block.find(MemoryBankLoss)
    rounds: list[int] = []

    def count_rounds(module, args, output):
        rounds[-1] += module.last["merge"] is not None

    criterion.register_forward_hook(count_rounds)
    while sum(rounds) == 0 and len(rounds) < 60:
        rounds.append(0)
        block.run_epoch()
    for _ in range(3):
        rounds.append(0)
        block.run_epoch()
    first = rounds.index(1)
    assert first >= 1 and rounds == [0] * first + [1] * (len(rounds) - first), rounds


def test_the_moco_block_fills_the_queue_with_keys_labelled_by_their_sample():
    block = Block(block_using("QueueLoss"))
    block.run_setup()
    criterion = block.find(QueueLoss)
    assert isinstance(criterion.mixer, HardNegativeMixer)
    calls = []
    criterion.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    block.run_epoch()

    def argument(call, position, name):
        args, kwargs = call
        return args[position] if len(args) > position else kwargs.get(name)

    for call in calls:
        indices = argument(call, 2, "indices")
        assert indices is not None and indices.shape == (argument(call, 0, "query").shape[0],)
    queue = criterion.queue
    assert len(queue) == NUM_SAMPLES  # one key of each sample, the queue being larger than the data set
    assert sorted(queue.labels.tolist()) == list(range(NUM_SAMPLES))  # whose key each entry is: that masks it
    key, indices = argument(calls[-1], 1, "key"), argument(calls[-1], 2, "indices")
    torch.testing.assert_close(queue.features[-len(key) :], F.normalize(key, dim=1))  # MoCo's enqueue, done
    assert torch.equal(queue.labels[-len(key) :], indices)


def test_the_pml_block_is_ours_backpropagates_and_fills_its_memory_as_pml_does():
    block = Block(block_using("CrossBatchMemory"))
    block.run_setup()
    loss_fn = block.find(PMLCrossBatchMemory)
    assert type(loss_fn).__module__.startswith("ssl_memory"), "the block must use ssl_memory's CrossBatchMemory"
    embeddings, labels = block.namespace["embeddings"], block.namespace["labels"]
    loss = [value for value in block.namespace.values() if isinstance(value, torch.Tensor) and value.dim() == 0]
    assert len(loss) == 1 and torch.isfinite(loss[0])
    loss[0].backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    # a warm-up (if the block sets one) enqueues nothing; then the batch is written where PML writes it
    calls = 1
    while int(loss_fn.queue_idx) == 0 and not loss_fn.has_been_filled and calls < 5000:
        loss_fn(embeddings.detach(), labels)
        calls += 1
    rows = len(labels)
    assert int(loss_fn.queue_idx) == rows, "the memory never received a batch"
    assert torch.equal(loss_fn.label_memory[:rows], labels)
    torch.testing.assert_close(F.normalize(loss_fn.embedding_memory[:rows], dim=1), F.normalize(embeddings.detach(), dim=1))


def test_the_lightning_block_trains_writes_each_sample_once_an_epoch_and_keeps_the_bank_out_of_ddp():
    pl = __import__("pytest").importorskip("pytorch_lightning")
    block = Block(block_using("MemoryBankLoss", lightning=True))
    block.run_setup()
    trainer = block.find(pl.Trainer)
    module = trainer.lightning_module
    criterion = module.criterion
    assert isinstance(criterion, MemoryBankLoss) and isinstance(criterion.merger, NeighbourMerger)
    assert int(criterion.memory.samples_written) == trainer.max_epochs * NUM_SAMPLES
    assert "criterion.memory.features" in module._ddp_params_and_buffers_to_ignore
    assert not module.written  # every micro-batch was written at its optimiser step
