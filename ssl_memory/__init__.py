"""Memories of past embeddings for contrastive and metric learning, as composable PyTorch modules.

The public API is what this module exports; the pytorch-metric-learning layer lives in
:mod:`ssl_memory.pml`, checkpoint helpers in :mod:`ssl_memory.checkpoint`.
"""

from .bank import MemoryBank
from .data import MultiAugCollate, WithIndex
from .distributed import DistributedInputError, MemoryDivergenceError
from .evaluation import knn_accuracy, knn_predict
from .losses import ConsistencyLoss, CrossBatchLoss, MemoryBankLoss, QueueLoss, ShardedMemoryBankLoss
from .merging import MergeReport, NeighbourMerger
from .mixing import HardNegativeMixer
from .neighbours import (
    FaissFlatSearch,
    FaissHNSWSearch,
    FaissIVFSearch,
    IVFSearch,
    NeighbourSearch,
    TorchSearch,
    nearest_neighbours,
)
from .queue import Queue
from .sharded_bank import ShardedMemoryBank

__all__ = [
    # memories
    "MemoryBank",
    "Queue",
    "ShardedMemoryBank",
    # losses and what they use
    "ConsistencyLoss",
    "CrossBatchLoss",
    "HardNegativeMixer",
    "MemoryBankLoss",
    "QueueLoss",
    "ShardedMemoryBankLoss",
    # merging near-duplicates, and the neighbour searches it can use
    "MergeReport",
    "NeighbourMerger",
    "FaissFlatSearch",
    "FaissHNSWSearch",
    "FaissIVFSearch",
    "IVFSearch",
    "NeighbourSearch",
    "TorchSearch",
    "nearest_neighbours",
    # data
    "MultiAugCollate",
    "WithIndex",
    # evaluation
    "RetrievalCalculator",
    "knn_accuracy",
    "knn_predict",
    "retrieval_metrics",
    # errors
    "DistributedInputError",
    "MemoryDivergenceError",
]
__version__ = "0.2.0"


# Loaded at first use: the retrieval metrics import pytorch-metric-learning, scipy and scikit-learn, about
# as long to import as the rest of the package, in every process that imports it (DDP ranks, workers).
def __getattr__(name: str):
    if name in ("RetrievalCalculator", "retrieval_metrics"):
        from . import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
