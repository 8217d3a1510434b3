"""Memory-bank training under DistributedDataParallel on CPU (gloo), checked for identical memories on every rank.

Launch with torchrun::

    torchrun --nproc_per_node=2 examples/ddp.py --smoke
    torchrun --nproc_per_node=2 examples/ddp.py --smoke --epochs 3 --resume   # continue from --checkpoint

What matters under DDP:

- The loss (it holds the MemoryBank and the NeighbourMerger) stays **outside** the DDP-wrapped model.
  DDP's ``broadcast_buffers=True`` copies rank 0's buffers of the wrapped module on every forward;
  a bank inside it would be sent every step. The bank keeps itself in sync instead: every rank builds
  the same initial bank (a fixed seed), and each update gathers every rank's rows in rank order.
- ``DistributedSampler`` gives each rank its share of the samples; ``MultiAugCollate`` turns them
  into views on each rank; ``sampler.set_epoch`` reshuffles from ``seed + epoch``.
- Each rank seeds its own generator (``seed + rank``) so that ranks draw different augmentations.
  A checkpoint (written by rank 0, atomically) therefore holds every rank's random state.

At the end every rank compares its memory (and its weights) with rank 0's, bitwise; rank 0 says
whether they are the same, and the script exits with status 1 if they are not.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from common import OneSignalAugment, SignalCNN, checkpoint_paths, embed, load_mnist1d, seed_everything
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ssl_memory import MemoryBankLoss, MultiAugCollate, NeighbourMerger, WithIndex
from ssl_memory.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ssl_memory.distributed import broadcast_buffers_
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="total epochs (a resumed run counts the saved ones)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples a step on each rank")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--merge-warmup", type=int, default=3, help="epochs before the first merge round")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="ratio test of a merge (1 turns it off)")
    parser.add_argument("--merge-share", type=float, default=0.05, help="share of the passing pairs merged at first")
    parser.add_argument("--merge-max-share", type=float, default=0.25, help="the share grows by --merge-share a round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples (80%% train)")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="checkpoints/ddp.pt", help="written by rank 0 after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint (.epochN.pt)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 epochs: a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.batch_size, args.dim, args.knn_k = 500, 16, 16, 20
        # a 2-epoch network has no near-duplicates yet: drop the ratio test so that merging is exercised
        args.epochs, args.merge_warmup, args.merge_ratio = min(args.epochs, 2), 1, 1.0
    return args


@torch.no_grad()
def same_on_every_rank(module: nn.Module) -> bool:
    """Whether every rank holds exactly rank 0's state_dict of ``module`` (same answer on all ranks)."""
    same = True
    for tensor in module.state_dict().values():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        same &= torch.equal(reference, tensor)
    verdict = torch.tensor(int(same))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    return bool(verdict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("launch this script with torchrun, e.g. torchrun --nproc_per_node=2 examples/ddp.py --smoke")
    dist.init_process_group("gloo")
    try:
        return run(args)
    finally:
        # run()'s objects (the DDP model holds the process group) are freed by now; collect any cycle
        # too, so that destroying the group joins gloo's worker threads while Python still runs. Left
        # to interpreter exit, a worker thread releasing a tensor can abort the process ("terminate
        # called without an active exception") or deadlock it.
        gc.collect()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Train on this rank; returns 0 when every rank ends with the same memory and weights."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(args.seed + rank)  # different augmentations on each rank
    data = load_mnist1d(args.num_samples, seed=args.seed)  # the same data everywhere
    train, test = data.train, data.test
    model = DistributedDataParallel(SignalCNN(dim=args.dim, width=8 if args.smoke else 32))  # rank 0's weights
    dataset = WithIndex(TensorDataset(train.x, train.y))
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=MultiAugCollate(OneSignalAugment(), views=args.views),
    )

    merger = NeighbourMerger(  # rank 0 computes each round and broadcasts the groups
        warmup=args.merge_warmup,
        ratio=args.merge_ratio,
        initial_share=args.merge_share,
        share_growth=args.merge_share,
        max_share=args.merge_max_share,
    )
    criterion = MemoryBankLoss(  # outside the DDP module: see the docstring
        num_samples=len(train),
        dim=args.dim,
        temperature=args.temperature,
        consistency_weight=args.consistency_weight,
        merger=merger,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    start_epoch, history = 0, []
    if args.resume:
        state = load_checkpoint(args.checkpoint)
        if len(state["rng"]) != world:
            raise SystemExit(f"the checkpoint was written by {len(state['rng'])} ranks, this run has {world}")
        model.module.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"][rank])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} after epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=rank != 0)
        for batch in progress:
            loss = criterion(model(batch["views"]), batch["indices"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        # BatchNorm running statistics are updated locally by the last forward; DDP would send
        # rank 0's at the next forward: do it now, so evaluation and the checkpoint agree
        broadcast_buffers_(model.module)
        accuracy = knn_accuracy(
            embed(model.module, test.x),
            test.y,
            criterion.memory,
            train.y,
            k=args.knn_k,
            temperature=args.temperature,
        )
        history.append({"epoch": epoch + 1, "losses_rank0": losses, "knn_accuracy": accuracy})
        rng = [None] * world
        dist.all_gather_object(rng, capture_rng_state())
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}")
            if args.checkpoint:
                state = {
                    "epoch": epoch + 1,
                    "model": model.module.state_dict(),
                    "criterion": criterion.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng,
                    "history": history,
                }
                for path in checkpoint_paths(args.checkpoint, epoch + 1, args.keep_epochs):
                    save_checkpoint(state, path)
        dist.barrier()  # the checkpoint is complete before any rank moves on (or exits)

    memory_same = same_on_every_rank(criterion)
    weights_same = same_on_every_rank(model.module)
    if rank == 0:
        if memory_same and weights_same:
            checksum = float(criterion.memory.features.double().sum())
            print(f"same memory on all {world} ranks (bank checksum {checksum:.6f}); weights equal too")
        else:
            print(f"MISMATCH across {world} ranks: memory same={memory_same}, weights same={weights_same}")
    return 0 if memory_same and weights_same else 1


if __name__ == "__main__":
    sys.exit(main())
