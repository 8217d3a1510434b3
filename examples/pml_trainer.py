"""Metric learning with pytorch-metric-learning's own trainer and tester, using ssl_memory's PML parts.

The trainer is PML's ``trainers.MetricLossOnly`` and the evaluation PML's
``testers.GlobalEmbeddingSpaceTester``; the loss is ``ssl_memory.pml.CrossBatchMemory`` (the drop-in
for PML's ``losses.CrossBatchMemory``: same arguments, a queue that survives ``state_dict()``) around a
PML ``ContrastiveLoss`` with XBM's margins, and its miner is ``ssl_memory.pml.HardNegativeMiner``,
which keeps each anchor's hardest negatives in the memory. ``MultiAugCollate`` (two views a sample)
feeds PML's trainer through its ``data_and_label_getter``.

The task is MNIST-1D's unseen-class protocol: train on classes 0-4, retrieve among classes 5-9
(precision@1, R-precision, MAP@R and Recall@K from ``ssl_memory.evaluation.RetrievalCalculator``,
PML's ``AccuracyCalculator`` with Recall@K added, exact kNN without faiss).

Examples::

    python examples/pml_trainer.py                    # the full run
    python examples/pml_trainer.py --smoke            # a few seconds on tiny data
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import OneSignalAugment, SignalCNN, load_mnist1d, seed_everything
from pytorch_metric_learning import losses, samplers, testers, trainers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.inference import CustomKNN
from torch.utils.data import TensorDataset

from benchmarks.datasets import protocol_data
from ssl_memory import MultiAugCollate, WithIndex
from ssl_memory.evaluation import RetrievalCalculator
from ssl_memory.pml import CrossBatchMemory, HardNegativeMiner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64, help="samples a step (two views each)")
    parser.add_argument("--per-class", type=int, default=16, help="samples of each class in a batch (MPerClassSampler)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--memory-size", type=int, default=2048, help="rows of the cross-batch memory")
    parser.add_argument("--num-negatives", type=int, default=64, help="hardest negatives mined per anchor")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 short epochs: a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.batch_size, args.per_class, args.dim = 500, 32, 8, 16
        args.epochs, args.iterations_per_epoch, args.memory_size, args.num_negatives = 2, 5, 128, 8
    return args


def views_and_labels(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's trainer wants ``(data, labels)``; ``MultiAugCollate`` gives a dict."""
    return batch["views"], batch["labels"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    split = protocol_data(load_mnist1d(args.num_samples, seed=args.seed), "unseen")
    train_set = WithIndex(TensorDataset(split.train.x, split.train.y))
    test_set = TensorDataset(split.query.x, split.query.y)

    trunk = SignalCNN(dim=args.dim, width=8 if args.smoke else 32)
    miner = HardNegativeMiner(num_negatives=args.num_negatives)
    loss = CrossBatchMemory(
        losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity()),
        embedding_size=args.dim,
        memory_size=args.memory_size,
        miner=miner,
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=256,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=RetrievalCalculator(
            recall_ks=(1, 2, 4, 8),
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "recall_at_k"),
            k="max_bin_count",
            knn_func=CustomKNN(CosineSimilarity()),
        ),
    )

    def end_of_epoch(trainer: trainers.BaseTrainer) -> bool:
        accuracies = tester.test({"test": test_set}, trainer.epoch, trunk)["test"]
        recall = accuracies["recall_at_k_level0"]
        print(
            f"epoch {trainer.epoch}: precision_at_1 {accuracies['precision_at_1_level0']:.4f}  "
            f"MAP@R {accuracies['mean_average_precision_at_r_level0']:.4f}  "
            f"R@1/2/4/8 {' / '.join(f'{recall[k]:.3f}' for k in (1, 2, 4, 8))}  memory rows {loss.num_filled}"
        )
        return True  # keep training

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={"trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=args.lr)},
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train_set,
        sampler=samplers.MPerClassSampler(
            split.train.y, m=args.per_class, batch_size=args.batch_size, length_before_new_iter=len(split.train.y)
        ),
        collate_fn=MultiAugCollate(OneSignalAugment(), views=2),
        data_and_label_getter=views_and_labels,
        iterations_per_epoch=args.iterations_per_epoch,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.train(num_epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
