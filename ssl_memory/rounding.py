"""Stochastic rounding: how a half-precision memory keeps the small updates that round-to-nearest drops."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def to_storage(values: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    r"""``values`` in the storage ``dtype``: stochastically rounded for bfloat16 and float16, a plain cast otherwise.

    A momentum write moves an entry by :math:`(1 - m)` times its distance to the new embedding. Once that
    step is under half a unit in the last place (ulp), round-to-nearest returns the old value and the
    update is lost: in bfloat16 (8 significant bits) at :math:`m = 0.9`, an entry lags a float32 one by
    about three roundings after 100 small steps. Stochastic rounding picks the representable neighbour
    above or below :math:`x` with probabilities that make the result unbiased,

    .. math::
        \operatorname{round}(x) = \begin{cases} \lceil x \rceil & \text{with probability } (x - \lfloor x \rfloor)
        / (\lceil x \rceil - \lfloor x \rfloor) \\ \lfloor x \rfloor & \text{otherwise,} \end{cases}

    so :math:`\mathbb{E}[\operatorname{round}(x)] = x`: every update moves the entry on average, however
    small. The draws come from a generator seeded with ``seed`` (the memory passes its count of samples
    written), so every rank of a distributed run rounds identically and a resumed run rounds as the
    uninterrupted one would.

    Args:
        values: float32 (or wider) values.
        dtype: the storage dtype.
        seed: seed of this write's draws.

    Shape:
        - values: any; output: same, in ``dtype``.

    Example::

        >>> x = torch.full((10_000,), 1.001)  # between the bfloat16 values 1 and 1.0078
        >>> to_storage(x, torch.bfloat16, seed=0).float().mean()  # about 1.001; round-to-nearest gives 1
    """
    if dtype not in HALF_DTYPES:
        return values.to(dtype)
    nearest = values.to(dtype)
    error = values - nearest.to(values.dtype)  # exact in float32: both are float32 numbers a few ulp apart
    other = torch.nextafter(nearest, torch.where(error > 0, torch.inf, -torch.inf).to(dtype))
    gap = other.to(values.dtype) - nearest.to(values.dtype)
    generator = torch.Generator(device=values.device).manual_seed(seed)
    draws = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    # error / gap is in [0, 1/2]; where error is 0 the gap is never 0 (nextafter moves), so no 0/0
    return torch.where(draws * gap.abs() < error.abs(), other, nearest)
