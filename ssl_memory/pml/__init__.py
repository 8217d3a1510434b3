"""pytorch-metric-learning compatibility: a faithful, fast CrossBatchMemory, its distributed wrapper, miners,
and our memory losses behind PML's loss API.

Import it as a subpackage (it needs ``pytorch-metric-learning``)::

    from ssl_memory.pml import CrossBatchMemory, DistributedLossWrapper, HardNegativeMiner
"""

from .cross_batch_memory import CrossBatchMemory
from .distributed import DistributedLossWrapper
from .losses import PMLMemoryBankLoss, PMLQueueLoss
from .miners import HardNegativeMiner, MergeGroupMiner

__all__ = [
    "CrossBatchMemory",
    "DistributedLossWrapper",
    "HardNegativeMiner",
    "MergeGroupMiner",
    "PMLMemoryBankLoss",
    "PMLQueueLoss",
]
