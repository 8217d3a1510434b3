"""Self-supervised MNIST-1D with a memory bank: 4 views a sample, consistency and neighbour merging.

A plain PyTorch loop. What ssl_memory adds to it: ``WithIndex`` + ``MultiAugCollate`` in the
DataLoader, a ``MemoryBankLoss`` (it holds the bank and the merger) in place of the criterion, and a
weighted-kNN monitor that uses the bank as its gallery (the bank already holds an embedding of every
training sample, so the monitor embeds only the test split).

Every epoch ends with an atomic checkpoint; ``--resume`` continues from it exactly (same batches,
same views, same bank, bitwise on CPU).

Examples::

    python examples/plain_pytorch.py                  # the full run
    python examples/plain_pytorch.py --smoke          # a few seconds on tiny data
    python examples/plain_pytorch.py --resume         # continue from --checkpoint
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import OneSignalAugment, SignalCNN, checkpoint_paths, embed, load_mnist1d, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from ssl_memory import MemoryBankLoss, MultiAugCollate, NeighbourMerger, WithIndex
from ssl_memory.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="total epochs (a resumed run counts the saved ones)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples a step (each gives --views rows)")
    parser.add_argument("--views", type=int, default=4, help="augmented views of each sample in a batch")
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.5, help="bank momentum (weight of the old entry)")
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--merge-warmup", type=int, default=10, help="epochs before the first merge round")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="ratio test of a merge (1 turns it off)")
    parser.add_argument("--merge-share", type=float, default=0.05, help="share of the passing pairs merged at first")
    parser.add_argument("--merge-max-share", type=float, default=0.25, help="the share grows by --merge-share a round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples (80%% train)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="checkpoints/plain_pytorch.pt", help="written after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint (.epochN.pt)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 epochs: a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.batch_size, args.dim, args.knn_k = 500, 32, 16, 20
        args.epochs = min(args.epochs, 2)
        # a 2-epoch network has no near-duplicates yet: drop the ratio test so that merging is exercised
        args.merge_warmup, args.merge_ratio = 1, 1.0
    return args


def build(args: argparse.Namespace, num_train: int):
    model = SignalCNN(dim=args.dim, width=8 if args.smoke else 32)
    merger = NeighbourMerger(  # stepped by the loss after every update: it counts epochs from the bank
        warmup=args.merge_warmup,
        ratio=args.merge_ratio,
        initial_share=args.merge_share,
        share_growth=args.merge_share,
        max_share=args.merge_max_share,
    )
    criterion = MemoryBankLoss(
        num_samples=num_train,
        dim=args.dim,
        temperature=args.temperature,
        momentum=args.momentum,
        consistency_weight=args.consistency_weight,
        merger=merger,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    return model, criterion, optimizer


def train_one_epoch(model, criterion, optimizer, loader, epoch: int) -> list[float]:
    model.train()
    losses = []
    progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False)
    for batch in progress:
        loss = criterion(model(batch["views"]), batch["indices"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", p_pos=f"{criterion.last['positive_prob']:.3f}")
    return losses


def merged_entries(groups: torch.Tensor) -> int:
    """Entries that share their group with at least one other entry."""
    return int((torch.bincount(groups, minlength=len(groups))[groups] > 1).sum())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    data = load_mnist1d(args.num_samples, seed=args.seed)
    train, test = data.train, data.test
    loader = DataLoader(
        WithIndex(TensorDataset(train.x, train.y)),
        batch_size=args.batch_size,
        shuffle=True,  # the permutation comes from torch's global generator: restored on resume
        drop_last=True,
        num_workers=args.workers,
        collate_fn=MultiAugCollate(OneSignalAugment(), views=args.views),
    )
    model, criterion, optimizer = build(args, len(train))

    start_epoch, history = 0, []
    if args.resume:
        # everything that changes during training; the loss's state_dict holds the bank and the merger
        state = load_checkpoint(args.checkpoint)
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        losses = train_one_epoch(model, criterion, optimizer, loader, epoch)
        accuracy = knn_accuracy(
            embed(model, test.x), test.y, criterion.memory, train.y, k=args.knn_k, temperature=args.temperature
        )
        merged = merged_entries(criterion.memory.groups)
        history.append({"epoch": epoch + 1, "losses": losses, "knn_accuracy": accuracy, "merged_entries": merged})
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}  merged {merged}")
        if args.checkpoint:
            state = {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": capture_rng_state(),
                "history": history,
            }
            for path in checkpoint_paths(args.checkpoint, epoch + 1, args.keep_epochs):
                save_checkpoint(state, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
