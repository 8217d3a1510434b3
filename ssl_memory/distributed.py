"""Collectives that keep every rank's memory identical under ``torch.distributed``.

Outside an initialised process group (or with a world of one) every function here returns its
input untouched, so single-process code pays nothing.

A memory write gathers every rank's rows in rank order. Each rank's row count travels in a small
header, and so does its *verdict* on its own input: a rank whose input failed a check still takes
part in the gather (with no rows), and then every rank raises the same :class:`DistributedInputError`
before anything is written. A check that fails on one rank therefore never leaves the others waiting
in a collective, and the next step starts with every rank in step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


class DistributedInputError(ValueError):
    """Bad input on some rank(s) of a collective write: raised on every rank, and nothing was written."""


class MemoryDivergenceError(RuntimeError):
    """The ranks' memories (contents or counters) differ where they must be identical: raised on every rank.

    Typical cause: ranks resumed from different checkpoints, or one rank's state loaded partly
    (``strict=False`` without ``samples_written``). Nothing was written when it was raised.
    """


def check_agreement(names: list[str], table: list[list[int]], refused: str = "nothing was written on any rank") -> None:
    """Raise :class:`MemoryDivergenceError` unless every rank's row of ``table`` (one value per name) is equal.

    Every rank calls it with the same gathered ``table``, so all raise together; ``refused`` says what
    was not done.
    """
    differing = [
        (name, [row[i] for row in table]) for i, name in enumerate(names) if len({row[i] for row in table}) > 1
    ]
    if differing:
        detail = "; ".join(f"{name}: {values} on ranks 0..{len(values) - 1}" for name, values in differing)
        raise MemoryDivergenceError(
            f"the ranks' memories have diverged ({detail}); {refused}. Resume every "
            "rank from the same checkpoint (every buffer of the memory, strict=True)"
        )


def _agreed_values(agreed: dict[str, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    if not agreed:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.stack([value.to(device=device, dtype=torch.long).reshape(()) for value in agreed.values()])


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 outside distributed runs."""
    return dist.get_rank() if is_distributed() else 0


def raise_together(failures: list[int], error: Exception | None) -> None:
    """Raise one :class:`DistributedInputError` on every rank, naming the ``failures`` and their reasons.

    Every rank must call it with the same ``failures`` (ranks whose check failed); ``error`` is this
    rank's own exception, or None. The reasons travel with one ``all_gather_object``, which runs only on
    this failure path.
    """
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if error is None else f"{type(error).__name__}: {error}")
    detail = "; ".join(f"rank {r}: {reasons[r]}" for r in failures)
    raise DistributedInputError(
        f"bad input on rank(s) {failures}; nothing was written on any rank ({detail})"
    ) from error


def gather_rows(
    *tensors: torch.Tensor,
    error: Exception | None = None,
    counts: list[int] | None = None,
    agreed: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor's rows from all ranks, in rank order, or raise on every rank together.

    Ranks may hold different numbers of rows (a short last batch); all tensors of one call share
    their row count. ``error`` is this rank's verdict on its own input: a rank that found its input
    bad passes the exception (and tensors of the right dtype and trailing shape, with no rows), and
    every rank then raises :class:`DistributedInputError` instead of one rank raising while the
    others wait.

    Args:
        tensors: tensors with the same first dimension on this rank.
        error: this rank's failed check, or None.
        counts: every rank's row count, when the caller already exchanged them (:func:`share_reads`):
            the header, and its device sync, are then skipped.
        agreed: named integer scalars (counters of the memory) that must be equal on every rank; they
            travel in the header.

    Returns:
        The gathered tensors, ``sum(rows of each rank)`` rows each.

    Raises:
        DistributedInputError: on every rank, when any rank passed an ``error``.
        MemoryDivergenceError: on every rank, when the ``agreed`` values differ.
        The ``error`` itself outside distributed runs.

    Shape:
        - tensors: (B_r, ...) on rank r; output: (sum_r B_r, ...)
    """
    if not is_distributed():
        if error is not None:
            raise error
        return tensors
    world = dist.get_world_size()
    if counts is None:
        device = tensors[0].device
        header = torch.cat([
            torch.tensor([0 if error else tensors[0].shape[0], int(error is None)], device=device),
            _agreed_values(agreed, device),
        ])
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header)
        table = torch.stack(headers).tolist()
        check_agreement(list(agreed or ()), [row[2:] for row in table])
        counts = [row[0] for row in table]
        failures = [r for r, row in enumerate(table) if not row[1]]
        if failures:
            raise_together(failures, error)
    longest = max(counts)
    gathered = []
    for tensor in tensors:
        # all_gather needs equal shapes: pad to the longest rank, then trim each piece.
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        gathered.append(torch.cat([piece[:count] for piece, count in zip(pieces, counts)]))
    return tuple(gathered)


# Eager under torch.compile: a host read and collectives, which dynamo would split into several graphs.
@torch.compiler.disable
def share_reads(
    values: torch.Tensor,
    rows: int,
    error: Exception | None,
    judge: Callable[[list[int]], None],
    collective: bool = True,
    agreed: dict[str, torch.Tensor] | None = None,
) -> tuple[list[int], list[int] | None]:
    """A step's one device read, shared by every rank: its ``values``, every rank's row count and verdict.

    Each rank passes its own values to read (e.g. the flags of :func:`~ssl_memory._validation.value_flags`),
    its row count and its verdict on the shapes (``error``); one ``all_gather`` and one transfer to
    the host give every rank all of them. ``judge(values)`` raises for bad values; it is applied to
    every rank's values on every rank, so all ranks find the same failures and raise the same
    :class:`DistributedInputError` together. Outside distributed runs, or with ``collective=False``
    (a step that writes nothing, so that ranks need not agree), ``error`` or ``judge``'s error is
    raised here. ``values`` must have the same length on every rank (zeros where ``error``). ``agreed``: named
    integer scalars that must be equal on every rank (:class:`MemoryDivergenceError` otherwise), as in
    :func:`gather_rows`.

    Returns:
        This rank's values as a list, and every rank's row count (None outside distributed runs)
        for :func:`gather_rows`.
    """
    if not (collective and is_distributed()):
        if error is not None:
            raise error
        read = values.tolist() if values.numel() else []
        judge(read)
        return read, None
    world = dist.get_world_size()
    extra = _agreed_values(agreed, values.device)
    header = torch.cat([values.new_tensor([int(error is None), 0 if error else rows]), extra, values.long()])
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    table = torch.stack(headers).tolist()
    check_agreement(list(agreed or ()), [row[2 : 2 + extra.numel()] for row in table])
    table = [row[:2] + row[2 + extra.numel() :] for row in table]
    failures, mine = [], error
    for r, (ok, _, *read) in enumerate(table):
        try:
            if not ok:
                raise ValueError("bad input")
            judge(read)
        except (TypeError, ValueError) as caught:
            failures.append(r)
            if r == rank() and mine is None:
                mine = caught
    if failures:
        raise_together(failures, mine)
    return table[rank()][2:], [row[1] for row in table]


def agree(error: Exception | None, device: torch.device | str = "cpu") -> None:
    """Share this rank's verdict on its input with every rank; raise together when any rank failed.

    For a step that writes nothing but must fail on every rank at once (a warm-up step that only
    counts). Outside distributed runs it raises ``error`` itself, if any.
    """
    gather_rows(torch.empty(0, device=device), error=error)


@torch.no_grad()
def broadcast_buffers_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` in place with rank ``src``'s (e.g. BatchNorm statistics)."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)
