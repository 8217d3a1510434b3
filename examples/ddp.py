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
- Each rank seeds torch with ``seed + rank`` so that ranks draw different augmentations.
  A checkpoint (written by rank 0, atomically) therefore holds every rank's random state.

At the end every rank compares its memory (and its weights) with rank 0's, bitwise; rank 0 says
whether they are the same, and the script exits with status 1 if they are not.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import helpers
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from ssl_memory import MemoryBankLoss, MultiAugCollate, NeighbourMerger, WithIndex
from ssl_memory.checkpoint import capture_rng_state, restore_rng_state
from ssl_memory.distributed import broadcast_buffers_
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None):
    parser = helpers.parser(__doc__, checkpoint="checkpoints/ddp.pt", epochs=10, batch_size=64)
    parser.add_argument("--views", type=int, default=4, help="augmented views of each sample in a batch")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--merge-warmup", type=int, default=3, help="epochs before the first merge round")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="the merger's ratio test (1 turns it off)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    # a 2-epoch smoke network has no near-duplicates yet: ratio 1 turns the test off so that merging runs
    return helpers.smoke(parser.parse_args(argv), batch_size=16, knn_k=20, merge_warmup=1, merge_ratio=1.0)


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
    helpers.set_threads(args.threads, args.workers, processes=world)
    torch.manual_seed(args.seed + rank)  # different augmentations on each rank
    train_x, train_y, test_x, test_y = helpers.toy_signals(args.num_samples, args.seed)  # the same everywhere
    model = DistributedDataParallel(helpers.signal_encoder(args.dim, width=8 if args.smoke else 32))  # rank 0's
    dataset = WithIndex(TensorDataset(train_x))
    # no drop_last: every sample is written to the bank once an epoch, which is how the merger counts epochs
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=MultiAugCollate(helpers.random_view, views=args.views),
    )
    criterion = MemoryBankLoss(  # outside the DDP module: see the docstring
        num_samples=len(train_x),
        dim=args.dim,
        temperature=args.temperature,
        consistency_weight=args.consistency_weight,
        # rank 0 runs each round and broadcasts the groups
        merger=NeighbourMerger(warmup=args.merge_warmup, ratio=args.merge_ratio),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    start, history = 0, []
    if args.resume:
        state = helpers.load(args.checkpoint, model=model.module, criterion=criterion, optimizer=optimizer)
        if len(state["rng"]) != world:
            raise SystemExit(f"the checkpoint was written by {len(state['rng'])} ranks, this run has {world}")
        restore_rng_state(state["rng"][rank])
        start, history = state["epoch"], state["history"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} after epoch {start}")

    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        losses = []
        for batch in loader:
            loss = criterion(model(batch["views"]), batch["indices"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        # BatchNorm running statistics are updated locally by the last forward; DDP would send
        # rank 0's at the next forward: do it now, so evaluation and the checkpoint agree
        broadcast_buffers_(model.module)
        queries = helpers.embed(model.module, test_x)  # the bank is the gallery: it embeds the training split
        accuracy = knn_accuracy(queries, test_y, criterion.memory, train_y, args.knn_k, args.temperature)
        history.append({"epoch": epoch + 1, "losses": losses, "knn_accuracy": accuracy})  # rank 0's losses
        rng = [None] * world
        dist.all_gather_object(rng, capture_rng_state())
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}")
            helpers.save(args.checkpoint, epoch + 1, history, args.keep_epochs, rng=rng,
                         model=model.module, criterion=criterion, optimizer=optimizer)
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
