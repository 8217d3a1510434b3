"""A few steps of PML's own MetricLossOnly trainer with our losses and miners, evaluated by PML's tester."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, testers, trainers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import nn
from torch.utils.data import TensorDataset

from ssl_memory import MemoryBank, pml

CLASSES, PER_CLASS, INPUT, DIM = 4, 24, 16, 8

# PML's trainer formats its (grad-carrying) total loss for the progress bar
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")


def blobs(seed):
    """Gaussian blobs, classes interleaved so that every sequential batch holds all classes."""
    gen = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(CLASSES, INPUT, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(CLASSES).repeat(PER_CLASS)
    return centers[labels] + torch.randn(len(labels), INPUT, generator=gen), labels


def new_trunk():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUT, 32), nn.ReLU(), nn.Linear(32, DIM))


def train(loss_fn, labels_for_training, mining_funcs=None, epochs=4):
    x, _ = blobs(seed=1)
    trunk = new_trunk()
    history = []
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.05)},
        batch_size=16,
        loss_funcs={"metric_loss": loss_fn},
        mining_funcs=mining_funcs or {},
        dataset=TensorDataset(x, labels_for_training),
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: history.append(float(t.losses["metric_loss"].detach())),
    )
    trainer.train(num_epochs=epochs)
    return trunk, history


def evaluate(trunk):
    """PML's tester (kNN without faiss), checked against a brute-force leave-one-out precision@1."""
    x, labels = blobs(seed=2)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calculator, dataloader_num_workers=0, data_device=torch.device("cpu")
    )
    accuracies = tester.test({"val": TensorDataset(x, labels)}, 1, trunk)["val"]
    with torch.no_grad():
        embeddings = F.normalize(trunk(x), dim=1)
    similarity = (embeddings @ embeddings.T).fill_diagonal_(float("-inf"))
    expected = (labels[similarity.argmax(1)] == labels).double().mean().item()
    assert accuracies["precision_at_1_level0"] == pytest.approx(expected)
    return accuracies["mean_average_precision_at_r_level0"]


@pytest.fixture(scope="module")
def untrained():
    """MAP@R of the initial trunk (precision@1 is already above 0.9 on these blobs; MAP@R is not)."""
    return evaluate(new_trunk())


def test_memory_bank_loss_in_metric_loss_only(untrained):
    """Labels are dataset indices; the bank learns every sample and the loss falls across epochs."""
    loss_fn = pml.PMLMemoryBankLoss(num_samples=CLASSES * PER_CLASS, dim=DIM, temperature=0.1)
    initial = loss_fn.memory.features.clone()
    trunk, history = train(loss_fn, torch.arange(CLASSES * PER_CLASS))
    assert (loss_fn.memory.features != initial).any(1).all()
    per_epoch = len(history) // 4
    assert sum(history[-per_epoch:]) < sum(history[:per_epoch])
    assert evaluate(trunk) > untrained + 0.1


def test_cross_batch_memory_with_our_miners_in_metric_loss_only(untrained):
    """Our CrossBatchMemory mines the memory with HardNegativeMiner, and the trainer's tuple miner adds batch tuples."""
    loss_fn = pml.CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=48, miner=pml.HardNegativeMiner(4))
    _, labels = blobs(seed=1)
    trunk, history = train(loss_fn, labels, {"tuple_miner": pml.HardNegativeMiner(2, tuple_type="triplets")})
    assert loss_fn.has_been_filled and all(torch.isfinite(torch.tensor(history)))
    assert evaluate(trunk) > max(untrained + 0.2, 0.95)


def test_merge_group_miner_turns_instance_labels_into_group_positives(untrained):
    """With each class merged into one group, a PML pair loss on dataset indices learns the classes."""
    _, labels = blobs(seed=1)
    bank = MemoryBank(len(labels), DIM)
    bank.groups.copy_(labels)  # group id = class (ids need only be equal within a group)
    trunk, _ = train(losses.ContrastiveLoss(), torch.arange(len(labels)), {"tuple_miner": pml.MergeGroupMiner(bank)})
    assert evaluate(trunk) > max(untrained + 0.2, 0.95)
