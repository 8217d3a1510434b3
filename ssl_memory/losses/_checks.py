"""Argument checks of the losses' hyper-parameters: each error names the argument and what it got."""

from __future__ import annotations

import math

import torch


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
