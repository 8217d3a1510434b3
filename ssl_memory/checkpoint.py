"""Checkpoints that survive a crash mid-write, and the random states a bitwise-exact resume needs.

What to save for an exact resume (see ``examples/plain_pytorch.py``):

- ``model.state_dict()`` (weights and BatchNorm statistics);
- **the loss modules'** ``state_dict()``: they hold the memories as buffers (a MemoryBank's
  ``features``, merge ``groups`` and ``samples_written``, a Queue's ``slots``, ``pointer`` and
  ``count``) and the NeighbourMerger's schedule and history, so no memory needs saving on its own;
- ``optimizer.state_dict()`` and any learning-rate scheduler's;
- the epoch (and step) counter;
- the random states: :func:`capture_rng_state` (python ``random``, numpy, torch CPU and CUDA, and any
  ``torch.Generator`` you pass, such as an augmentation's). Under ``torch.distributed`` every rank has
  its own: gather them and restore each rank's.

Data order: a shuffling ``DataLoader`` draws its permutation (and its workers' seeds) from torch's
global generator when its iterator is created, so restoring the random state at an epoch boundary
replays the same batches. A ``DistributedSampler`` shuffles from ``seed + epoch`` (call
``sampler.set_epoch(epoch)``), so saving the epoch is enough. To resume in the middle of an epoch,
also save the step and skip that many batches of the replayed epoch.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["capture_rng_state", "load_checkpoint", "restore_rng_state", "save_checkpoint"]


def _fsync_directory(directory: str) -> None:
    # the rename itself is only durable once the directory entry reaches the disk (POSIX)
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` always holds a complete checkpoint.

    The data goes to a temporary file in the same folder, is flushed and ``fsync``-ed, and then
    replaces ``path`` with ``os.replace``, which is atomic. A process killed at any point leaves
    either the previous checkpoint or the new one at ``path``, never a truncated file (at worst a
    stray ``.<name>.*.tmp`` file next to it). Under ``torch.distributed`` call it on one rank only.

    Args:
        obj: anything ``torch.save`` accepts, typically a dict of state_dicts.
        path: destination file; its folder must exist.

    Example::

        >>> save_checkpoint({"model": model.state_dict(), "epoch": 3}, "last.pt")
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path's folder {directory!r} does not exist")
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as open() does
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def load_checkpoint(path: str | os.PathLike | BinaryIO, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint` (or ``torch.save``).

    ``weights_only=True`` (torch's safe loader) reads state_dicts, numbers, strings and the dict
    returned by :func:`capture_rng_state`; pass ``False`` only for files you trust that hold other
    Python objects.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded (``"cpu"`` by default: move modules afterwards).
        weights_only: use torch's restricted unpickler.
    """
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The states of every random generator a training step may draw from, as plain tensors and numbers.

    The result holds only types that ``torch.load(..., weights_only=True)`` accepts, so it can go
    into a checkpoint as is.

    Args:
        generators: named private generators to include (e.g. ``{"augment": augment.generator}``).

    Returns:
        ``{"python", "numpy", "torch", "cuda", "generators"}``; ``"cuda"`` is a list with one state per
        device, empty when CUDA is not available.

    Example::

        >>> state = capture_rng_state()
        >>> a = torch.rand(3)
        >>> restore_rng_state(state)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            # numpy arrays are not accepted by the weights_only loader: keep the key as a tensor
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: generator.get_state() for name, generator in (generators or {}).items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Set every random generator back to a state returned by :func:`capture_rng_state`.

    Args:
        state: the captured state.
        generators: the same named generators that were captured; each is restored in place.

    Raises:
        KeyError: when ``generators`` names a generator the state does not hold.
        ValueError: when the state holds CUDA states for more devices than are visible.

    All or nothing: when any state is refused, every generator is put back as it was and the error
    is raised.
    """
    # check everything first, so that a failure leaves every generator as it was
    cuda = list(state["cuda"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) > visible:
        raise ValueError(f"state holds CUDA random states for {len(cuda)} device(s) but {visible} are visible")
    saved = state.get("generators", {})
    for name in generators or {}:
        if name not in saved:
            raise KeyError(f"generator {name!r} is not in the saved state (it holds {sorted(saved)})")

    # a corrupt torch, numpy or generator state is only detected by its setter: keep the current
    # states and put them all back if any setter refuses, so a failure leaves every generator as it was
    previous = capture_rng_state(generators)
    try:
        _set_rng_state(state, cuda, saved, generators)
    except BaseException:
        _set_rng_state(previous, previous["cuda"], previous["generators"], generators)
        raise


def _set_rng_state(state: Mapping[str, Any], cuda: list, saved: Mapping[str, Any], generators) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in (generators or {}).items():
        generator.set_state(saved[name])


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; a state that went through another serialiser may come back as lists
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value
