"""Keep memories out of DistributedDataParallel's buffer broadcast.

``DistributedDataParallel(broadcast_buffers=True)`` (its default, and Lightning's) copies rank 0's
buffers of the wrapped module to every rank at every forward. A memory inside that module (a loss
held as an attribute of a LightningModule, say) would be sent in full every step, although every
write already gathers all ranks' rows and leaves the same memory everywhere. DDP skips the names
listed in the wrapped module's ``_ddp_params_and_buffers_to_ignore``; this fills that list.
"""

from __future__ import annotations

from torch import nn


def exclude_from_buffer_broadcast(module: nn.Module, *submodules: nn.Module) -> list[str]:
    """List every buffer of ``submodules`` in DDP's ignore list of ``module``.

    Call it before ``module`` is wrapped (in a LightningModule's ``__init__`` or ``setup()``):
    DDP reads the list when it is built. Only buffers are listed, never parameters, so gradients
    are reduced as before. Use it for modules that keep themselves identical on every rank (the
    memories, losses and mergers of ``ssl_memory``), never for BatchNorm statistics, which only
    the broadcast keeps equal.

    Args:
        module: the module DDP will wrap (a LightningModule under Lightning).
        submodules: modules of ``module`` whose buffers DDP must leave alone.

    Returns:
        The fully qualified buffer names now in the ignore list (those added before included).

    Example::

        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder = encoder
        ...         self.criterion = MemoryBankLoss(num_samples=50_000, dim=128)
        ...         exclude_from_buffer_broadcast(self, self.criterion)
    """
    if not submodules:
        raise ValueError("give the submodules whose buffers DDP must not broadcast, got none")
    prefix_of = {id(sub): name for name, sub in module.named_modules()}
    missing = [type(sub).__name__ for sub in submodules if id(sub) not in prefix_of]
    if missing:
        raise ValueError(f"submodules must be modules of module, got {missing} that are not")
    names = [
        f"{prefix_of[id(sub)]}.{name}" if prefix_of[id(sub)] else name
        for sub in submodules
        for name, _ in sub.named_buffers()
    ]
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    ignored += [name for name in dict.fromkeys(names) if name not in ignored]
    module._ddp_params_and_buffers_to_ignore = ignored
    return ignored
