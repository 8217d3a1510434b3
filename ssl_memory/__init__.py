"""Memories of past embeddings for contrastive and metric learning, as composable PyTorch modules."""

from .bank import MemoryBank
from .memory import Memory
from .queue import Queue

__all__ = ["Memory", "MemoryBank", "Queue"]
__version__ = "0.1.0"
