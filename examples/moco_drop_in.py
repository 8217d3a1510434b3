"""MoCo (a momentum encoder and a queue of keys) with ssl_memory's QueueLoss and MoCHi mixing.

This is a plain MoCo v2 loop. The lines marked ``# ssl_memory`` are all that differ from it: the queue
buffer, the ``l_pos``/``l_neg`` logits, the cross-entropy and ``_dequeue_and_enqueue`` are replaced
by one ``QueueLoss``, which also takes a ``HardNegativeMixer`` (MoCHi), accepts any queue size with
any batch size, leaves the keys of a query's own sample out of its negatives (given the sample
indices) and keeps the queue in its state_dict.

Examples::

    python examples/moco_drop_in.py                   # the full run
    python examples/moco_drop_in.py --smoke           # a few seconds on tiny data
    python examples/moco_drop_in.py --resume          # continue from --checkpoint
"""

from __future__ import annotations

import copy
import sys

import helpers
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_memory import HardNegativeMixer, MultiAugCollate, QueueLoss, WithIndex  # ssl_memory
from ssl_memory.checkpoint import restore_rng_state
from ssl_memory.evaluation import knn_accuracy


def parse_args(argv: list[str] | None = None):
    parser = helpers.parser(__doc__, checkpoint="checkpoints/moco_drop_in.pt")
    parser.add_argument("--queue-size", type=int, default=4096, help="need not be a multiple of the batch size")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--encoder-momentum", type=float, default=0.99, help="of the key encoder")
    parser.add_argument("--num-hard", type=int, default=256, help="MoCHi: hardest negatives mixed (N)")
    parser.add_argument("--num-mix", type=int, default=256, help="MoCHi: pair mixes per query (s)")
    parser.add_argument("--num-query-mix", type=int, default=128, help="MoCHi: query mixes per query (s')")
    parser.add_argument("--mix-from-epoch", type=int, default=5, help="first epoch with MoCHi negatives")
    parser.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    args = parser.parse_args(argv)
    return helpers.smoke(args, knn_k=20, queue_size=100, num_hard=16, num_mix=8, num_query_mix=4, mix_from_epoch=1)


@torch.no_grad()
def momentum_update(encoder_q: torch.nn.Module, encoder_k: torch.nn.Module, momentum: float) -> None:
    for q, k in zip(encoder_q.parameters(), encoder_k.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    helpers.set_threads(args.threads, args.workers)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = helpers.toy_signals(args.num_samples, args.seed)

    encoder_q = helpers.signal_encoder(args.dim, width=8 if args.smoke else 32)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    mixer = HardNegativeMixer(args.num_hard, args.num_mix, args.num_query_mix)  # ssl_memory
    criterion = QueueLoss(args.queue_size, args.dim, args.temperature)  # ssl_memory: replaces the queue buffer
    optimizer = torch.optim.Adam(encoder_q.parameters(), lr=args.lr)
    loader = DataLoader(
        WithIndex(TensorDataset(train_x)),  # ssl_memory: items carry their index
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # as MoCo: BatchNorm cannot train on a last batch of one query
        num_workers=args.workers,
        collate_fn=MultiAugCollate(helpers.random_view, views=2),  # ssl_memory: MoCo's TwoCropsTransform
    )

    start, history = 0, []
    if args.resume:
        # the queue, its pointer and its fill count are buffers of the loss: its state_dict restores them
        modules = {"encoder_q": encoder_q, "encoder_k": encoder_k, "criterion": criterion, "optimizer": optimizer}
        state = helpers.load(args.checkpoint, **modules)
        restore_rng_state(state["rng"])
        start, history = state["epoch"], state["history"]
        print(f"resumed from {args.checkpoint} after epoch {start}")

    for epoch in range(start, args.epochs):
        criterion.mixer = mixer if epoch + 1 >= args.mix_from_epoch else None  # ssl_memory: MoCHi after a warm-up
        losses = []
        for batch in loader:
            x_q, x_k = batch["views"].chunk(2)  # view-major: every sample's first view, then every second view
            indices = batch["indices"].chunk(2)[0]
            q = encoder_q(x_q)
            with torch.no_grad():
                momentum_update(encoder_q, encoder_k, args.encoder_momentum)
                k = encoder_k(x_k)
            loss = criterion(q, k, indices)  # ssl_memory: logits, cross-entropy, enqueue; own keys masked
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        accuracy = knn_accuracy(
            helpers.embed(encoder_q, test_x), test_y, helpers.embed(encoder_q, train_x), train_y, k=args.knn_k,
            temperature=0.1,
        )
        history.append({"epoch": epoch + 1, "losses": losses, "knn_accuracy": accuracy})
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}  kNN accuracy {accuracy:.4f}  "
              f"queue {len(criterion.queue)} keys")
        helpers.save(args.checkpoint, epoch + 1, history, args.keep_epochs,
                     encoder_q=encoder_q, encoder_k=encoder_k, criterion=criterion, optimizer=optimizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
