"""The losses: one file each."""

from .consistency import ConsistencyLoss
from .cross_batch import CrossBatchLoss
from .memory_bank import MemoryBankLoss
from .queue import QueueLoss
from .sharded import ShardedMemoryBankLoss

__all__ = ["ConsistencyLoss", "CrossBatchLoss", "MemoryBankLoss", "QueueLoss", "ShardedMemoryBankLoss"]
