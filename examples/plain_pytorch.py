"""Self-supervised learning with a memory bank in a plain PyTorch loop: 4 views a sample, consistency, merging.

What ssl_memory adds to the loop: ``WithIndex`` + ``MultiAugCollate`` in the DataLoader, a
``MemoryBankLoss`` (it holds the bank and the ``NeighbourMerger``) in place of the criterion, and a
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

import sys

import helpers
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_memory import MemoryBankLoss, MultiAugCollate, NeighbourMerger, WithIndex
from ssl_memory.checkpoint import restore_rng_state
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None):
    parser = helpers.parser(__doc__, checkpoint="checkpoints/plain_pytorch.pt")
    parser.add_argument("--views", type=int, default=4, help="augmented views of each sample in a batch")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.5, help="bank momentum (weight of the old entry)")
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--merge-warmup", type=int, default=10, help="epochs before the first merge round")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="the merger's ratio test (1 turns it off)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    # a 2-epoch smoke network has no near-duplicates yet: ratio 1 turns the test off so that merging runs
    return helpers.smoke(parser.parse_args(argv), knn_k=20, merge_warmup=1, merge_ratio=1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    helpers.set_threads(args.threads, args.workers)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = helpers.toy_signals(args.num_samples, args.seed)
    loader = DataLoader(
        WithIndex(TensorDataset(train_x)),
        batch_size=args.batch_size,
        shuffle=True,  # the permutation comes from torch's global generator: restored on resume
        num_workers=args.workers,
        collate_fn=MultiAugCollate(helpers.random_view, views=args.views),
    )
    model = helpers.signal_encoder(args.dim, width=8 if args.smoke else 32)
    criterion = MemoryBankLoss(
        num_samples=len(train_x),
        dim=args.dim,
        temperature=args.temperature,
        momentum=args.momentum,
        consistency_weight=args.consistency_weight,
        merger=NeighbourMerger(warmup=args.merge_warmup, ratio=args.merge_ratio),  # a round an epoch after warm-up
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    start, history = 0, []
    if args.resume:
        # the loss's state_dict holds the bank, its merge groups and the merger's schedule
        state = helpers.load(args.checkpoint, model=model, criterion=criterion, optimizer=optimizer)
        restore_rng_state(state["rng"])
        start, history = state["epoch"], state["history"]
        print(f"resumed from {args.checkpoint} after epoch {start}")

    for epoch in range(start, args.epochs):
        losses = []
        for batch in loader:
            loss = criterion(model(batch["views"]), batch["indices"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        accuracy = knn_accuracy(
            helpers.embed(model, test_x), test_y, criterion.memory, train_y, k=args.knn_k, temperature=args.temperature
        )
        groups = criterion.memory.groups
        merged = int((torch.bincount(groups, minlength=len(groups))[groups] > 1).sum())
        history.append({"epoch": epoch + 1, "losses": losses, "knn_accuracy": accuracy, "merged_entries": merged})
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}  "
              f"entries in merged groups {merged}")
        helpers.save(args.checkpoint, epoch + 1, history, args.keep_epochs,
                     model=model, criterion=criterion, optimizer=optimizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
