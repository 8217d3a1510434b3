"""Count the operations of a block of code that make the host wait for the device (a "sync" on a GPU).

On CPU nothing waits, so the count is taken from what runs: the ops whose result the host must read
(``item()``/``int()``/``bool()`` of a tensor, which dispatch ``aten._local_scalar_dense``), the ops
whose output size depends on the values (``unique``, ``nonzero``, ``masked_select``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``bincount``), and ``Tensor.tolist()``,
which copies to the host without dispatching an op on CPU.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {"_local_scalar_dense", "_unique2", "unique_consecutive", "unique_dim", "nonzero", "masked_select",
            "bincount"}


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _SYNCING:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):  # boolean masks are turned into indices: nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as counter: ...``; then ``counter.count`` and ``counter.where`` (op, our file:line)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[tuple[str, str]] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def _record(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack() if "ssl_memory" in f.filename]
        self.where.append((name, f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self._record(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter._record("tolist")
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def summary(counter: SyncCounter) -> dict:
    return dict(collections.Counter(counter.where))
