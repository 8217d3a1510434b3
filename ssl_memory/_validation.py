"""Argument checks shared by the memories and losses: each error names the argument and what it got."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def check_features(name: str, features: torch.Tensor, dim: int, device: torch.device) -> None:
    """Raise if ``features`` is not a floating (B, dim) tensor on ``device``."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(features.shape)}")
    if features.device != device:
        raise ValueError(
            f"{name} is on {features.device} but the memory is on {device}; "
            "move the module with .to(device) instead of relying on a silent copy"
        )


def check_index_vector(name: str, values: torch.Tensor, length: int, device: torch.device) -> None:
    """Raise if ``values`` is not an integer vector of ``length`` entries on ``device``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {values.dtype}")
    if values.dim() != 1 or values.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match the features, got {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"{name} is on {values.device} but the memory is on {device}")


def check_range(name: str, values: torch.Tensor, upper: int) -> None:
    """Raise if any entry of ``values`` lies outside ``[0, upper)``."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    _raise_out_of_range(name, int(low), int(high), upper)


def _raise_out_of_range(name: str, low: int, high: int, upper: int | None) -> None:
    if upper is None:
        if low < 0:
            raise ValueError(f"{name} must be non-negative, got a minimum of {low}")
    elif low < 0 or high >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{low}, {high}]")


def value_flags(*features: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
    """The data-dependent checks of one step as a device tensor, not yet read: see :func:`raise_for_values`.

    One flag per tensor of ``features`` (1 when every value is finite), then the minimum and maximum
    of ``indices`` when given and not empty. A caller may read it together with other values of the
    step, in one transfer.
    """
    flags = [torch.isfinite(f).all().to(torch.long) for f in features]
    if indices is not None and indices.numel() > 0:
        flags += list(torch.aminmax(indices.to(torch.long)))
    return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.long)


def raise_for_values(
    features_name: str, values: list[int], indices_name: str = "indices", upper: int | None = None
) -> None:
    """Raise for the flags of :func:`value_flags` once read (``values``, a list of ints)."""
    names = features_name.split(",")
    for name, finite in zip(names, values):
        if not finite:
            raise ValueError(f"{name.strip()} contain NaN or infinite values")
    if len(values) > len(names):
        _raise_out_of_range(indices_name, values[-2], values[-1], upper)


def check_values(
    features_name: str,
    *features: torch.Tensor,
    indices_name: str = "indices",
    indices: torch.Tensor | None = None,
    upper: int | None = None,
) -> None:
    """Raise unless every value of ``features`` is finite and every index lies in ``[0, upper)`` (or >= 0).

    The data-dependent checks of one step, read back from the device in one transfer (one sync).
    ``features_name`` names the tensors, separated by commas when there are several.
    """
    flags = value_flags(*features, indices=indices)
    if flags.numel():
        raise_for_values(features_name, flags.tolist(), indices_name, upper)


def first_failure(check: Callable[[], None]) -> Exception | None:
    """The ``TypeError`` or ``ValueError`` that ``check()`` raises, or None.

    Under ``torch.distributed`` a failed check must travel to the other ranks before it is raised
    (see :func:`ssl_memory.distributed.gather_rows`), so checks are run through this.
    """
    try:
        check()
    except (TypeError, ValueError) as error:
        return error
    return None


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_fraction(name: str, value: float, *, closed_right: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_positive_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_non_negative_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_matrix(name: str, value: torch.Tensor, dim: int | None = None, rows: str = "B", cols: str = "D") -> None:
    """Raise unless ``value`` is a floating (rows, dim) tensor (any width when ``dim`` is None)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != 2 or (dim is not None and value.shape[1] != dim):
        expected = f"({rows}, {dim if dim is not None else cols})"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def loaded_tensor(
    state_dict: dict, prefix: str, name: str, shape: tuple[int, ...], floating: bool
) -> torch.Tensor | None:
    """The tensor ``state_dict[prefix + name]`` if present, after checking its shape and dtype kind.

    For ``_load_from_state_dict`` overrides: a bad state raises before anything is copied, so the
    module is left as it was.
    """
    key = prefix + name
    value = state_dict.get(key)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"state_dict[{key!r}] must have shape {tuple(shape)}, got {tuple(value.shape)}")
    kind_ok = value.is_floating_point() if floating else not (value.is_floating_point() or value.is_complex())
    if not kind_ok or value.dtype == torch.bool:
        kind = "floating-point" if floating else "integer"
        raise ValueError(f"state_dict[{key!r}] must be a {kind} tensor, got dtype {value.dtype}")
    return value


def check_loaded(key: str, ok: bool, problem: str) -> None:
    """Refuse a state whose ``key`` fails a check; ``problem`` says what is wrong with it."""
    if not ok:
        raise ValueError(f"state_dict[{key!r}] {problem}; the module was left unchanged")
