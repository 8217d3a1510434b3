"""Collectives that autograd can differentiate, for a loss whose terms are summed across ranks.

Each rank computes the loss of its own rows, from sums that every rank contributes to. With
:math:`J = \\sum_r L_r` the sum of the ranks' losses, a rank's share of a reduced sum feeds every
:math:`L_r`, so its gradient is the sum of the ranks' incoming gradients: the backward of an
all-reduce is an all-reduce, and the backward of gathering every rank's rows is the sum of the
gathered gradients, of which each rank keeps its own rows. Every rank must then call ``backward`` on
its loss, as under DDP: the backward runs these collectives.

Outside an initialised process group (or with a world of one) each function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import gather_rows, is_distributed, rank


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, indices: torch.Tensor, error: Exception | None):
        source = torch.full(indices.shape, rank(), dtype=torch.long, device=indices.device)
        rows, indices, source = gather_rows(rows, indices, source, error=error)
        ctx.own = source == rank()
        ctx.mark_non_differentiable(indices, source)
        return rows, indices, source

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[ctx.own], None, None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks; its gradient is the sum over ranks of the incoming gradients."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over ranks (no gradient: for shifts a log-sum-exp cancels)."""
    if not is_distributed():
        return tensor
    total = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def gather_rows_with_grad(
    rows: torch.Tensor, indices: torch.Tensor, error: Exception | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's ``rows`` and ``indices`` in rank order, the rank each row came from, and a gradient path home.

    :func:`~ssl_memory.distributed.gather_rows` (ranks may hold different numbers of rows; a rank's
    ``error`` becomes a :class:`~ssl_memory.DistributedInputError` on every rank) whose backward
    sums the gradient of the gathered rows over ranks and returns each rank its own rows' share.

    Shape:
        - rows: (B_r, D); indices: (B_r,) on rank r
        - output: (sum_r B_r, D), (sum_r B_r,), (sum_r B_r,)
    """
    if not is_distributed():
        if error is not None:
            raise error
        return rows, indices, torch.zeros_like(indices, dtype=torch.long)
    return _GatherRows.apply(rows, indices, error)
