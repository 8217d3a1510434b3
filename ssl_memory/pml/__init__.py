"""pytorch-metric-learning compatibility: a fast CrossBatchMemory, miners, and our losses behind PML's API.

Import it as a subpackage (it needs ``pytorch-metric-learning``)::

    from ssl_memory.pml import CrossBatchMemory, HardNegativeMiner, MemoryBankLoss
"""

from .cross_batch_memory import CrossBatchMemory
from .losses import CrossBatchLoss, MemoryBankLoss, QueueLoss
from .miners import HardNegativeMiner, MergeGroupMiner

__all__ = ["CrossBatchLoss", "CrossBatchMemory", "HardNegativeMiner", "MemoryBankLoss", "MergeGroupMiner", "QueueLoss"]
