"""Metric learning with pytorch-metric-learning's own trainer and tester, using ssl_memory's PML parts.

The trainer is PML's ``trainers.MetricLossOnly`` and the evaluation PML's
``testers.GlobalEmbeddingSpaceTester``; the loss is ``ssl_memory.pml.CrossBatchMemory`` (the drop-in
for PML's ``losses.CrossBatchMemory``: same arguments, a queue that survives ``state_dict()``) around a
PML ``ContrastiveLoss`` with XBM's margins, and its miner is ``ssl_memory.pml.HardNegativeMiner``,
which keeps each anchor's hardest negatives in the memory. ``MultiAugCollate`` (two views a sample)
feeds PML's trainer through its ``data_and_label_getter``.

The task is retrieval of unseen classes: train on classes 0-4 of the toy signals, retrieve among
classes 5-9 (precision@1, MAP@R and Recall@K from ``ssl_memory.evaluation.RetrievalCalculator``,
PML's ``AccuracyCalculator`` with Recall@K added, exact kNN without faiss).

Examples::

    python examples/pml_trainer.py                    # the full run
    python examples/pml_trainer.py --smoke            # a few seconds on tiny data
"""

from __future__ import annotations

import sys
import warnings

import helpers
import torch
from pytorch_metric_learning import losses, samplers, testers, trainers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.inference import CustomKNN
from torch.utils.data import TensorDataset

from ssl_memory import MultiAugCollate, WithIndex
from ssl_memory.pml import CrossBatchMemory, HardNegativeMiner
from ssl_memory.retrieval import RetrievalCalculator

# PML's trainer formats its loss tensor for its progress bar, which makes torch warn; nothing is wrong
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


def parse_args(argv: list[str] | None = None):
    parser = helpers.parser(__doc__, epochs=10, batch_size=64)
    parser.add_argument("--iterations-per-epoch", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=16, help="samples of each class in a batch (MPerClassSampler)")
    parser.add_argument("--memory-size", type=int, default=2048, help="rows of the cross-batch memory")
    parser.add_argument("--num-negatives", type=int, default=64, help="hardest negatives mined per anchor")
    args = parser.parse_args(argv)
    return helpers.smoke(args, per_class=8, iterations_per_epoch=5, memory_size=128, num_negatives=8)


def views_and_labels(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's trainer wants ``(data, labels)``; ``MultiAugCollate`` gives a dict."""
    return batch["views"], batch["labels"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    helpers.set_threads(args.threads, args.workers)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = helpers.toy_signals(args.num_samples, args.seed)
    x, y = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    seen = y < 5  # train on classes 0-4, retrieve among classes 5-9
    train_set = WithIndex(TensorDataset(x[seen], y[seen]))
    test_set = TensorDataset(x[~seen], y[~seen])

    encoder = helpers.signal_encoder(args.dim, width=8 if args.smoke else 32)
    trunk, embedder = encoder[0], encoder[1]  # PML's split: pooled features, then the projection
    loss = CrossBatchMemory(
        losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity()),
        embedding_size=args.dim,
        memory_size=args.memory_size,
        miner=HardNegativeMiner(num_negatives=args.num_negatives),
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=256,
        dataloader_num_workers=args.workers,
        data_device=torch.device("cpu"),
        accuracy_calculator=RetrievalCalculator(
            recall_ks=(1, 2, 4, 8),
            include=("precision_at_1", "mean_average_precision_at_r", "recall_at_k"),
            k="max_bin_count",
            knn_func=CustomKNN(CosineSimilarity()),
        ),
    )

    def end_of_epoch(trainer: trainers.BaseTrainer) -> bool:
        accuracies = tester.test({"test": test_set}, trainer.epoch, trunk, embedder)["test"]
        recall = accuracies["recall_at_k_level0"]
        print(
            f"epoch {trainer.epoch}: precision_at_1 {accuracies['precision_at_1_level0']:.4f}  "
            f"MAP@R {accuracies['mean_average_precision_at_r_level0']:.4f}  "
            f"R@1/2/4/8 {' / '.join(f'{recall[k]:.3f}' for k in (1, 2, 4, 8))}  memory rows {loss.num_filled}"
        )
        return True  # keep training

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=args.lr),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=args.lr),
        },
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train_set,
        sampler=samplers.MPerClassSampler(
            y[seen], m=args.per_class, batch_size=args.batch_size, length_before_new_iter=int(seen.sum())
        ),
        collate_fn=MultiAugCollate(helpers.random_view, views=2),
        data_and_label_getter=views_and_labels,
        iterations_per_epoch=args.iterations_per_epoch,
        dataloader_num_workers=args.workers,
        data_device=torch.device("cpu"),
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.train(num_epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
