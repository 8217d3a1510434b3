"""Collectives that keep every rank's memory identical under ``torch.distributed``.

Outside an initialised process group (or with a world of one) every function here returns its
input untouched, so single-process code pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(*tensors: torch.Tensor, finite: bool = True) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor's rows from all ranks, in rank order.

    Ranks may hold different numbers of rows (a short last batch); all tensors of one call share
    their row count. ``finite`` is this rank's verdict on its own data: it travels with the row
    counts, so when any rank holds non-finite features every rank raises together instead of one
    rank raising while the others wait in the next collective.

    Args:
        tensors: tensors with the same first dimension on this rank.
        finite: whether this rank's data is fit to be written.

    Returns:
        The gathered tensors, ``sum(rows of each rank)`` rows each.

    Raises:
        ValueError: when some rank reported ``finite=False``.
    """
    if not is_distributed():
        if not finite:
            raise ValueError("features contain NaN or infinite values; the memory was left unchanged")
        return tensors
    world = dist.get_world_size()
    device = tensors[0].device
    header = torch.tensor([tensors[0].shape[0], int(finite)], device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    counts = [int(h[0]) for h in headers]
    bad = [rank for rank, h in enumerate(headers) if not int(h[1])]
    if bad:
        raise ValueError(
            f"features on rank(s) {bad} contain NaN or infinite values; the memory was left unchanged on every rank"
        )
    longest = max(counts)
    gathered = []
    for tensor in tensors:
        # all_gather needs equal shapes: pad to the longest rank, then trim each piece.
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded.contiguous())
        gathered.append(torch.cat([piece[:count] for piece, count in zip(pieces, counts)]))
    return tuple(gathered)


@torch.no_grad()
def broadcast_buffers_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` in place with rank ``src``'s."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def rank() -> int:
    """This process's rank, 0 outside distributed runs."""
    return dist.get_rank() if is_distributed() else 0
