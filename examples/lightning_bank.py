"""A memory bank in a PyTorch Lightning module: 4 views a sample, consistency, merging, DDP, bf16, resume.

Runs on the CPU as it would on GPUs::

    python examples/lightning_bank.py --devices 2 --strategy ddp --accelerator cpu
    python examples/lightning_bank.py --devices 2 --strategy ddp --accelerator cpu --precision bf16-mixed
    python examples/lightning_bank.py --accumulate-grad-batches 4
    python examples/lightning_bank.py --resume checkpoints/lightning/last.ckpt --epochs 4

What a memory needs under Lightning, and where this module does it:

- **DDP's buffer broadcast.** Lightning wraps the LightningModule (and so the loss that holds the
  bank) in ``DistributedDataParallel(broadcast_buffers=True)``, which would send rank 0's bank to every
  rank at every step. Every bank write already gathers all ranks' rows in rank order, so the bank is
  the same everywhere without it: ``exclude_from_buffer_broadcast`` takes the loss's buffers out
  (``--broadcast-memory`` leaves them in; the memory is the same either way, only slower).
- **Gradient accumulation.** Each micro-batch runs the loss with ``update_memory=False``; the bank is
  written once per optimiser step, in ``on_before_optimizer_step``, from every micro-batch's detached
  embeddings: the memory and the merge schedule are those of one step on the whole batch.
- **Validation and the sanity check** only embed the test split and score it against the bank
  (weighted kNN); they never write the bank. The merger runs inside the bank write, so it runs once an
  epoch after its warm-up, on every rank together, whichever hooks Lightning calls.
- **Resume.** The bank, its merge groups and the merger's schedule are buffers of the loss, so they are
  in Lightning's checkpoint as they are; the random states of every rank (augmentations) are added in
  ``on_save_checkpoint`` and restored in ``on_load_checkpoint``. A checkpoint of another bank size is
  refused by the bank's own check (a ``ValueError`` naming ``state_dict['criterion.memory.features']``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any

import helpers
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from ssl_memory import MemoryBankLoss, MultiAugCollate, NeighbourMerger, WithIndex
from ssl_memory.checkpoint import capture_rng_state, restore_rng_state
from ssl_memory.ddp import exclude_from_buffer_broadcast
from ssl_memory.evaluation import knn_accuracy


class MemoryBankModule(pl.LightningModule):
    """An encoder trained by instance discrimination against a memory bank (``MemoryBankLoss``).

    Args:
        encoder: maps a batch of views to (R, dim) embeddings.
        train_labels: the classes of the training samples, for the kNN monitor only.
        dim: embedding width.
        temperature, consistency_weight: of the loss.
        merger: a ``NeighbourMerger`` (or None).
        lr: Adam's learning rate.
        broadcast_memory: leave the bank in DDP's buffer broadcast (default: taken out).
        knn_k: neighbours of the kNN monitor.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        train_labels: torch.Tensor,
        dim: int,
        temperature: float = 0.1,
        consistency_weight: float = 1.0,
        merger: NeighbourMerger | None = None,
        lr: float = 1e-3,
        broadcast_memory: bool = False,
        knn_k: int = 200,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.criterion = MemoryBankLoss(
            len(train_labels), dim, temperature=temperature, consistency_weight=consistency_weight, merger=merger
        )
        if not broadcast_memory:
            exclude_from_buffer_broadcast(self, self.criterion)
        self.register_buffer("train_labels", train_labels, persistent=False)
        self.lr, self.knn_k, self.temperature = lr, knn_k, temperature
        self.written: list[tuple[torch.Tensor, torch.Tensor]] = []  # this optimiser step's micro-batches

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embeddings = self.encoder(batch["views"])
        loss = self.criterion(embeddings, batch["indices"], update_memory=False)
        self.written.append((embeddings.detach(), batch["indices"]))
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # once per optimiser step, after the last micro-batch's backward (the loss read a copy of the bank)
        embeddings, indices = (torch.cat(parts) for parts in zip(*self.written))
        self.written.clear()
        self.criterion.update_memory(embeddings, indices)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = knn_accuracy(
            self.encoder(x), y, self.criterion.memory, self.train_labels, k=self.knn_k, temperature=self.temperature
        )
        self.log("knn_accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.encoder.parameters(), lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank runs this hook (rank 0 alone writes the file): each rank's random state goes in
        states = [capture_rng_state()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, capture_rng_state())
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if len(states) != world:
            raise ValueError(f"the checkpoint holds the random states of {len(states)} ranks, this run has {world}")
        restore_rng_state(states[dist.get_rank() if world > 1 else 0])


class SeedPerRank(pl.Callback):
    """Seed torch with ``seed + rank`` once the ranks exist, so each rank draws its own augmentations."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)


class MemoryChecksums(pl.Callback):
    """Print each rank's bank checksum at the end of training (rank 0 prints them all).

    With ``dump``, each rank also saves its final memory state, every optimiser step's bank write
    and every training loss to ``dump/rank<r>.pt``, which the tests compare with a one-process run.
    """

    def __init__(self, dump: str | None = None) -> None:
        self.dump = dump
        self.writes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: MemoryBankModule, optimizer) -> None:
        if self.dump:  # callbacks run before the module's hook: the step's micro-batches are still there
            embeddings, indices = (torch.cat(parts) for parts in zip(*module.written))
            self.writes.append((embeddings.float(), indices))

    def on_train_batch_end(self, trainer: pl.Trainer, module: MemoryBankModule, outputs, batch, batch_idx) -> None:
        if self.dump:
            self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, module: MemoryBankModule) -> None:
        memory = module.criterion.memory
        summary = {
            "bank": float(memory.features.double().sum()),
            "groups": int(memory.groups.sum()),
            "samples_written": int(memory.samples_written),
        }
        summaries = [summary]
        if trainer.world_size > 1:
            summaries = [None] * trainer.world_size
            dist.all_gather_object(summaries, summary)
        if trainer.is_global_zero:
            for rank, s in enumerate(summaries):
                print(f"rank {rank}: bank checksum {s['bank']:.6f}  groups {s['groups']}  "
                      f"written {s['samples_written']}")
            print("memory checksums agree on every rank" if all(s == summaries[0] for s in summaries)
                  else "MISMATCH: the ranks hold different memories")
        if self.dump:
            state = {
                "criterion": module.criterion.state_dict(),
                "history": [vars(report) for report in module.criterion.merger.history],
                "ddp_ignored": sorted(getattr(trainer.strategy.model, "parameters_to_ignore", ())),
                "writes": self.writes,
                "losses": self.losses,
            }
            os.makedirs(self.dump, exist_ok=True)
            torch.save(state, os.path.join(self.dump, f"rank{trainer.global_rank}.pt"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = helpers.parser(__doc__, epochs=2, batch_size=64)
    parser.add_argument("--views", type=int, default=4, help="augmented views of each sample in a batch")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--merge-warmup", type=int, default=1, help="epochs before the first merge round")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="the merger's ratio test (1 turns it off)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. ddp (gloo on the CPU)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--accumulate-grad-batches", type=int, default=1)
    parser.add_argument("--broadcast-memory", action="store_true", help="leave the bank in DDP's buffer broadcast")
    parser.add_argument("--checkpoint-dir", default="checkpoints/lightning", help="Lightning checkpoints (last.ckpt)")
    parser.add_argument("--resume", default=None, help="a checkpoint to continue from (trainer.fit(ckpt_path=...))")
    parser.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint (epoch=N-*.ckpt)")
    parser.add_argument("--dump", default=None, help="a folder for each rank's final memory state (for tests)")
    # a 2-epoch smoke network has no near-duplicates yet: ratio 1 turns the test off so that merging runs
    return helpers.smoke(parser.parse_args(argv), batch_size=16, knn_k=20, merge_ratio=1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    helpers.set_threads(args.threads, args.workers, processes=args.devices)
    pl.seed_everything(args.seed, verbose=False)  # the same model on every rank; SeedPerRank then splits
    train_x, train_y, test_x, test_y = helpers.toy_signals(args.num_samples, args.seed)
    train = DataLoader(
        WithIndex(TensorDataset(train_x)),
        batch_size=args.batch_size,
        shuffle=True,  # Lightning puts a DistributedSampler in its place under DDP
        num_workers=args.workers,
        collate_fn=MultiAugCollate(helpers.random_view, views=args.views),
    )
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=512)
    module = MemoryBankModule(
        helpers.signal_encoder(args.dim, width=8 if args.smoke else 32),
        train_y,
        args.dim,
        temperature=args.temperature,
        consistency_weight=args.consistency_weight,
        merger=NeighbourMerger(warmup=args.merge_warmup, ratio=args.merge_ratio),
        lr=args.lr,
        broadcast_memory=args.broadcast_memory,
        knn_k=args.knn_k,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        devices=args.devices,
        strategy=args.strategy,
        accelerator=args.accelerator,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate_grad_batches,
        default_root_dir=args.checkpoint_dir,
        callbacks=[
            SeedPerRank(args.seed),
            MemoryChecksums(args.dump),
            pl.callbacks.ModelCheckpoint(
                dirpath=args.checkpoint_dir, save_last=True, save_top_k=-1 if args.keep_epochs else 1
            ),
        ],
        logger=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=False,
    )
    trainer.fit(module, train, test, ckpt_path=args.resume)
    del trainer, module
    gc.collect()  # free the process group's users before Python exits (see examples/ddp.py)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
