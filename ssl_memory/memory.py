"""What a MemoryBank and a Queue share: a table of rows that a loss reads, then overwrites in place.

A loss computes ``query @ table.T`` and, in the same forward, writes the step's rows into the table.
Autograd saves the right operand of that product for the backward, so it must not be the live
table: :meth:`Memory.similarity` multiplies by a private copy when a gradient will be needed (as
MoCo clones its queue). A copy of the (M, D) table costs a few percent of the (B, M) product and
its backward (``benchmarks/speed.py``), and it makes every later write safe: another forward, a
``reset()``, a ``load_state_dict``, a write through ``.data``, gradient accumulation over several
forwards, double backward and ``torch.compile`` all see plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    r"""Each row divided by its norm, without overflow: rows are scaled by their largest entry first.

    ``F.normalize`` squares the entries, so a float64 row of 1e300 (or a float16 row of 300) gives
    inf, then NaN or 0; here :math:`x / \max|x|` has entries in [-1, 1] before its norm is taken. A
    zero row stays zero.

    Shape:
        - rows: (B, D); output: (B, D), same dtype
    """
    peak = rows.abs().amax(dim=1, keepdim=True) if rows.shape[1] else rows.new_zeros(rows.shape[0], 1)
    scaled = rows / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(scaled, dim=1)


class Memory(nn.Module):
    """Base class of :class:`~ssl_memory.MemoryBank` and :class:`~ssl_memory.Queue`.

    A subclass keeps its rows in a (size, dim) buffer, defines ``readable()`` (the rows a loss may
    read, a view of that buffer) and writes only in place, so that ``module.to()`` and DDP never see
    a buffer replaced.
    """

    # Eager under torch.compile: a compiled graph's partitioner may drop a copy made inside it and
    # recompute it in the backward from the table, which the forward's write has changed by then.
    @torch.compiler.disable
    def snapshot(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A private copy of the readable rows in ``dtype``: what a loss may keep for its backward.

        Writes to the memory after this call (the same forward's, another forward's, a ``reset()``)
        cannot reach it.

        Shape:
            - output: (R, dim) with R the number of readable rows.
        """
        return self.readable().to(dtype, copy=True)

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """Dot products of ``query`` with the readable rows; later writes to the memory cannot change its gradient.

        Computed in float32 (or the query's dtype when wider) whatever the storage dtype, with autocast
        off; the rows are a :meth:`snapshot` when a gradient will be needed, read in place otherwise.

        Shape:
            - query: (B, dim)
            - output: (B, R) with R the number of readable rows.
        """
        dtype = torch.promote_types(query.dtype, torch.float32)
        if torch.is_grad_enabled() and query.requires_grad:
            rows = self.snapshot(dtype)
        else:
            rows = self.readable().to(dtype)
        with torch.autocast(query.device.type, enabled=False):
            return query.to(dtype) @ rows.T
