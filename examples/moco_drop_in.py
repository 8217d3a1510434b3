"""MoCo (momentum encoder and a queue of keys) on MNIST-1D, with ssl_memory's QueueLoss and MoCHi mixing.

This is a plain MoCo v2 loop. The lines marked ``# ssl_memory`` are all that differ from it: the queue
buffer, the ``l_pos``/``l_neg`` logits, the cross-entropy and ``_dequeue_and_enqueue`` are replaced
by one ``QueueLoss``, which also takes a ``HardNegativeMixer`` (MoCHi), accepts any queue size with
any batch size, masks the query's own sample in the queue and keeps the queue in its state_dict.

Examples::

    python examples/moco_drop_in.py                   # the full run
    python examples/moco_drop_in.py --smoke           # a few seconds on tiny data
    python examples/moco_drop_in.py --resume          # continue from --checkpoint
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from common import OneSignalAugment, SignalCNN, checkpoint_paths, embed, load_mnist1d, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from ssl_memory import HardNegativeMixer, MultiAugCollate, QueueLoss, WithIndex  # ssl_memory
from ssl_memory.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="total epochs (a resumed run counts the saved ones)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--queue-size", type=int, default=4096, help="need not be a multiple of the batch size")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--encoder-momentum", type=float, default=0.99, help="of the key encoder")
    parser.add_argument("--num-hard", type=int, default=256, help="MoCHi: hardest negatives mixed (N)")
    parser.add_argument("--num-mix", type=int, default=256, help="MoCHi: pair mixes per query (s)")
    parser.add_argument("--num-query-mix", type=int, default=128, help="MoCHi: query mixes per query (s')")
    parser.add_argument("--mix-from-epoch", type=int, default=5, help="first epoch with MoCHi negatives")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples (80%% train)")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="checkpoints/moco_drop_in.pt", help="written after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--keep-epochs", action="store_true", help="also keep each epoch's checkpoint (.epochN.pt)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 epochs: a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.batch_size, args.dim, args.knn_k = 500, 32, 16, 20
        args.queue_size, args.num_hard, args.num_mix, args.num_query_mix = 100, 16, 8, 4
        args.epochs, args.mix_from_epoch = min(args.epochs, 2), 1
    return args


@torch.no_grad()
def momentum_update(encoder_q: torch.nn.Module, encoder_k: torch.nn.Module, momentum: float) -> None:
    for q, k in zip(encoder_q.parameters(), encoder_k.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    data = load_mnist1d(args.num_samples, seed=args.seed)
    train, test = data.train, data.test

    encoder_q = SignalCNN(dim=args.dim, width=8 if args.smoke else 32)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    mixer = HardNegativeMixer(args.num_hard, args.num_mix, args.num_query_mix)  # ssl_memory
    criterion = QueueLoss(args.queue_size, args.dim, args.temperature)  # ssl_memory: replaces the queue buffer
    optimizer = torch.optim.Adam(encoder_q.parameters(), lr=args.lr)
    loader = DataLoader(
        WithIndex(TensorDataset(train.x, train.y)),  # ssl_memory: items carry their index
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=MultiAugCollate(OneSignalAugment(), views=2),  # ssl_memory: MoCo's TwoCropsTransform
    )

    start_epoch, history = 0, []
    if args.resume:
        # the queue, its pointer and its fill count are buffers of the loss: its state_dict restores them
        state = load_checkpoint(args.checkpoint)
        encoder_q.load_state_dict(state["encoder_q"])
        encoder_k.load_state_dict(state["encoder_k"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        criterion.mixer = mixer if epoch + 1 >= args.mix_from_epoch else None  # ssl_memory: MoCHi after a warm-up
        encoder_q.train(), encoder_k.train()
        losses = []
        progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False)
        for batch in progress:
            x_q, x_k = batch["views"].chunk(2)  # view-major: first views, then second views
            q = encoder_q(x_q)
            with torch.no_grad():
                momentum_update(encoder_q, encoder_k, args.encoder_momentum)
                k = encoder_k(x_k)
            loss = criterion(q, k, batch["indices"].chunk(2)[0])  # ssl_memory: logits, cross-entropy, enqueue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}", queue=len(criterion.queue))

        accuracy = knn_accuracy(
            embed(encoder_q, test.x), test.y, embed(encoder_q, train.x), train.y, k=args.knn_k, temperature=0.1
        )
        history.append({"epoch": epoch + 1, "losses": losses, "knn_accuracy": accuracy})
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}")
        if args.checkpoint:
            state = {
                "epoch": epoch + 1,
                "encoder_q": encoder_q.state_dict(),
                "encoder_k": encoder_k.state_dict(),
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
