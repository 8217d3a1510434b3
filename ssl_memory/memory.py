"""What a MemoryBank and a Queue share: a table of embeddings that a loss reads, then overwrites in place.

A loss computes ``query @ table.T`` and, in the same forward, writes the step's rows into the table.
Autograd would normally save ``table`` for the backward of that product, and the in-place write
would then break ``backward()`` ("modified by an inplace operation"). MoCo avoids this by cloning
the whole queue every step, an O(M * D) copy. Here the read is a custom autograd function that
keeps a reference to the table instead, and every write through the memory's API first records the
old values of the rows it overwrites (O(B * D)) for each read still waiting for its backward. The
backward then uses the table as it was read:

    grad_query = G @ table_now + G[:, rows] @ (old_rows - table_now[rows])

so it is exact whatever is written in between, at the cost of a copy of the written rows only.
A write that bypasses the API is detected through the tensor's version counter and raises.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .distributed import broadcast_buffers_, is_distributed


class _Reads:
    """Rows overwritten since one read of a table, with the values that read saw."""

    __slots__ = ("num_rows", "rows", "old", "writes", "__weakref__")

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.rows: list[torch.Tensor] = []
        self.old: list[torch.Tensor] = []
        self.writes = 0

    def record(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        self.writes += 1
        rows = rows[rows < self.num_rows]  # slots filled after the read were never part of it
        if rows.numel():
            self.rows.append(rows)
            self.old.append(table[rows].clone())

    def values_read(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The overwritten rows and, for each, the value it held at the read (its first saved value)."""
        if not self.rows:
            return None
        rows, old = torch.cat(self.rows), torch.cat(self.old)
        unique, inverse = rows.unique(return_inverse=True)
        order = torch.arange(rows.numel(), device=rows.device)
        first = torch.full_like(unique, rows.numel()).scatter_reduce_(0, inverse, order, "amin")
        return unique, old[first]


class _Similarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: torch.Tensor, table: torch.Tensor, reads: _Reads) -> torch.Tensor:
        # The table is kept by reference, not through save_for_backward: later in-place writes are
        # expected and undone in backward from the rows that `reads` recorded.
        ctx.table, ctx.reads, ctx.version = table, reads, table._version
        return query @ table.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, reads = ctx.table, ctx.reads
        if table._version - ctx.version != reads.writes:
            raise RuntimeError(
                "a memory's table was modified in place outside its update()/enqueue() between a loss's "
                "forward and its backward, so the gradient cannot be recovered; write memories only "
                "through their methods"
            )
        grad_query = grad @ table
        patch = reads.values_read(table)
        if patch is not None:
            rows, old = patch
            grad_query = grad_query + grad[:, rows] @ (old - table[rows])
        return grad_query, None, None


class Memory(nn.Module):
    """Base class of the memories: a (size, dim) table read by losses and written in place.

    Subclasses register the table as a buffer named ``table_name``, say which rows are readable,
    and write only through :meth:`_write_rows_`. The first write under ``torch.distributed`` copies rank 0's buffers to
    every rank, so memories that started from different random states agree from then on.
    """

    def __init__(self, table_name: str) -> None:
        super().__init__()
        self._table_name = table_name
        self._readers: weakref.WeakSet[_Reads] = weakref.WeakSet()
        self._synced = False

    @property
    def _table(self) -> torch.Tensor:
        return getattr(self, self._table_name)

    def _num_readable(self) -> int:
        return self._table.shape[0]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """Dot products of ``query`` with the readable rows, safe to backward through after a write.

        Computed in float32 (or the query's dtype when wider) whatever the storage dtype.

        Shape:
            - query: (B, dim)
            - output: (B, R) with R the number of readable rows.
        """
        table = self._table[: self._num_readable()]
        dtype = torch.promote_types(query.dtype, torch.float32)
        query = query.to(dtype)
        with torch.autocast(query.device.type, enabled=False):
            if table.dtype != dtype:
                return query @ table.to(dtype).T  # a private copy: later writes cannot reach it
            if not (torch.is_grad_enabled() and query.requires_grad):
                return query @ table.T
            reads = _Reads(table.shape[0])
            self._readers.add(reads)
            return _Similarity.apply(query, table, reads)

    @torch.no_grad()
    def _write_rows_(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite ``table[rows]`` in one in-place op; ``rows`` must be unique."""
        table = self._table
        for reads in list(self._readers):
            reads.record(table, rows)
        table.index_copy_(0, rows, values.to(table.dtype))

    def _sync_before_first_write(self) -> None:
        if not self._synced and is_distributed():
            broadcast_buffers_(self)
        self._synced = True

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = None  # live autograd reads belong to this process only
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._readers = weakref.WeakSet()
