"""Memories of past embeddings for contrastive and metric learning, as composable PyTorch modules."""

from .bank import MemoryBank
from .data import MultiAugCollate, WithIndex
from .losses import ConsistencyLoss, CrossBatchLoss, MemoryBankLoss, QueueLoss
from .merging import MergeReport, NeighbourMerger
from .mixing import HardNegativeMixer
from .queue import Queue

__all__ = ["MemoryBank", "Queue"]
__all__ += ["ConsistencyLoss", "CrossBatchLoss", "HardNegativeMixer", "MemoryBankLoss", "MultiAugCollate", "QueueLoss"]
__all__ += ["WithIndex"]
__all__ += ["MergeReport", "NeighbourMerger"]
__version__ = "0.1.0"
