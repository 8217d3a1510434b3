"""QueueLoss: MoCo's InfoNCE of a query against its key and a FIFO queue of past keys."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._state import CheckedLoad
from .._validation import (
    check_features,
    check_index_vector,
    check_positive_number,
    check_values,
    first_failure,
    raise_for_values,
    value_flags,
)
from ..distributed import share_reads
from ..queue import Queue

# id stored with keys enqueued without sample ids: matches no (non-negative) sample id
_NO_ID = -1


class QueueLoss(CheckedLoad):
    r"""MoCo's contrastive loss: each query must pick its own key among the keys of past batches (He et al., 2020).

    With unit :math:`q, k_+` (normalised inside) and the queue's keys :math:`n_1..n_M`,

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_b -\log
            \frac{e^{q_b \cdot k_{+,b} / \tau}}{e^{q_b \cdot k_{+,b} / \tau} + \sum_m e^{q_b \cdot n_m / \tau}
            + \sum_h e^{q_b \cdot h / \tau}},

    that is cross-entropy with target 0 over ``[q.k+, q.queue, q.mixes] / T`` (MoCo's
    ``l_pos``/``l_neg`` concatenation). The key is a target, as from MoCo's momentum encoder: it is
    detached. After the loss the (detached, normalised) keys are enqueued, replacing the oldest.

    - Empty queue (first step): the batch's other keys are the negatives, instead of failing.
    - ``indices`` (dataset ids of the queries' samples, optional): queue entries holding a key of the
      query's own sample (the queue remembers ids) are left out of its negatives, since with a queue
      at least as large as the dataset, or several views per sample, they are false negatives.
    - ``mixer`` (a :class:`~ssl_memory.HardNegativeMixer`): its synthetic negatives :math:`h`, built
      from each query's own hardest negatives, join that query's denominator (no gradient through them).

    The queue is read through :meth:`Queue.similarity` (a copy of the queue when a gradient is
    needed, as MoCo clones it), so writing it in the same forward is safe. Bad input (shapes, a NaN
    query or key, a negative index) raises before anything is enqueued; under ``torch.distributed``
    every rank raises the same :class:`~ssl_memory.distributed.DistributedInputError` and the next
    step works on every rank. The loss is float32 under autocast.

    Gradient accumulation: call the loss with ``update_memory=False`` on each micro-batch and
    :meth:`update_memory` once per optimiser step with all the micro-batches' keys (and indices),
    as in :class:`~ssl_memory.MemoryBankLoss`.

    Args:
        size: queue capacity M.
        dim: embedding width D.
        temperature: :math:`\tau` (0.07 in MoCo v1, 0.2 in v2).
        mixer: optional :class:`~ssl_memory.HardNegativeMixer` (or any object with its ``plan`` and
            ``mixed_logits``).
        checks: check the values of each batch (NaN, negative indices), which costs one device sync a
            step (the host must read the verdict); ``False`` keeps only the checks of shapes, dtypes and
            devices, so a step never waits for the device, and a NaN then reaches the loss and the queue.

    Shape:
        - query: (B, D); key: (B, D); indices: (B,) non-negative integers of any integer dtype, optional
        - output: scalar; :meth:`terms` gives ``"contrastive"`` (B,)

    Example::

        >>> criterion = QueueLoss(size=65536, dim=128, temperature=0.2)
        >>> q = encoder(view_1)
        >>> with torch.no_grad():
        ...     k = momentum_encoder(view_2)
        >>> loss = criterion(q, k)
        >>> loss.backward()
    """

    queue: Queue

    def __init__(
        self, size: int = 65536, dim: int = 128, temperature: float = 0.2, mixer: Any = None, checks: bool = True
    ) -> None:
        super().__init__()
        check_positive_number("temperature", temperature)
        if mixer is not None and not all(callable(getattr(mixer, name, None)) for name in ("plan", "mixed_logits")):
            raise TypeError(f"mixer must be a HardNegativeMixer (plan, mixed_logits), got {type(mixer).__name__}")
        self.queue = Queue(size, dim, labelled=True)
        self.temperature = float(temperature)
        self.mixer = mixer
        self.checks = bool(checks)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, indices: torch.Tensor | None = None, update_memory: bool = True
    ) -> torch.Tensor:
        """The loss of a batch; then, when ``update_memory``, the keys are enqueued.

        Args:
            query: the queries (any scale, any floating dtype).
            key: one key per query, a target (detached).
            indices: the queries' dataset ids, optional (any integer dtype).
            update_memory: enqueue the keys after computing the loss; pass False for the micro-batches
                of gradient accumulation and call :meth:`update_memory` once per optimiser step.
        """
        return self.terms(query, key, indices, update_memory=update_memory)["contrastive"].mean()

    def terms(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        indices: torch.Tensor | None = None,
        update_memory: bool = True,
        *,
        error: Exception | None = None,
    ) -> dict[str, torch.Tensor]:
        """The per-query loss; enqueues the keys when ``update_memory``.

        ``error``: a check the caller's own code failed on this input (a wrapper's): raised here instead
        of computing anything, on every rank together under ``torch.distributed``.
        """
        queue = self.queue
        error = error or first_failure(lambda: self._check(query, key, indices, values=False))
        # the step's one device read (the value checks), shared by the ranks with their row counts
        # and verdicts when the keys are enqueued
        num_flags = 4 * self.checks
        if error is None and self.checks:
            flags = value_flags(query, key, indices=indices)
            values = flags if indices is not None else torch.cat([flags, flags.new_zeros(2)])
        else:
            values = torch.zeros(num_flags, dtype=torch.long, device=queue.slots.device)
        _, counts = share_reads(
            values, query.shape[0] if error is None else 0, error,
            lambda read: raise_for_values("query, key", read), collective=update_memory,
        )

        device = queue.slots.device
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(device.type, enabled=False):
            q = F.normalize(query.to(dtype), dim=1)
            k = F.normalize(key.detach().to(dtype), dim=1)
            scaled = q * (1.0 / self.temperature)  # scaling the (B, D) query spares an op on (B, M)
            positive = (scaled * k).sum(1, keepdim=True)
            if len(queue) > 0:
                negatives, table = queue.similarity(scaled), queue.features
                if indices is not None:
                    own = queue.labels.unsqueeze(0) == indices.long().unsqueeze(1)
                    negatives = negatives.masked_fill(own, float("-inf"))
            else:
                negatives, table = scaled @ k.T, k
                own = torch.eye(k.shape[0], dtype=torch.bool, device=device)
                if indices is not None:
                    own |= indices.unsqueeze(0) == indices.unsqueeze(1)
                negatives = negatives.masked_fill(own, float("-inf"))
            # -inf for a query without negatives; the columns of `negatives` the mixes read
            plan = self.mixer.plan(scaled, table, negatives) if self.mixer is not None else None
            columns = plan["columns"] if plan is not None else negatives.new_zeros((q.shape[0], 0), dtype=torch.long)
            log_sum, read = _LogSumExpAndRead.apply(negatives, columns)
            parts = [positive, log_sum]
            if self.mixer is not None:
                parts.append(self.mixer.mixed_logits(scaled, read, plan))
            # cross-entropy with the key as class 0, without concatenating the (B, M) logits
            contrastive = torch.logsumexp(torch.cat(parts, dim=1), dim=1) - positive.squeeze(1)

        if update_memory:
            self._enqueue(k, indices, counts)
        return {"contrastive": contrastive}

    @torch.no_grad()
    def update_memory(self, key: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Enqueue keys (normalised): what a forward with ``update_memory=True`` does after its loss.

        Shape:
            - key: (B, D); indices: (B,), optional
        """
        error = first_failure(lambda: self._check(key, key, indices, values=self.checks))
        if error is not None:
            self.queue.write(key, indices, gather=True, error=error)  # raises, on every rank
        self._enqueue(F.normalize(key.to(torch.promote_types(key.dtype, torch.float32)), dim=1), indices)

    def _check(self, query: torch.Tensor, key: torch.Tensor, indices: torch.Tensor | None, values: bool) -> None:
        device, dim = self.queue.slots.device, self.queue.dim
        check_features("query", query, dim, device)
        check_features("key", key, dim, device)
        if key.shape[0] != query.shape[0]:
            raise ValueError(f"key must have one row per query: query is {tuple(query.shape)}, key {tuple(key.shape)}")
        if query.shape[0] == 0:
            raise ValueError("query must hold at least one row, got shape (0, D)")
        if indices is not None:
            check_index_vector("indices", indices, query.shape[0], device)
        check_generator = getattr(self.mixer, "check_generator", None)
        if check_generator is not None:  # here, so that every rank raises it before anything is written
            check_generator(device)
        if values:
            check_values("query, key", query, key, indices=indices)

    @torch.compiler.disable
    def _enqueue(
        self, unit_keys: torch.Tensor, indices: torch.Tensor | None, counts: list[int] | None = None
    ) -> None:
        ids = indices if indices is not None else unit_keys.new_full((unit_keys.shape[0],), _NO_ID, dtype=torch.long)
        self.queue.write(unit_keys.detach(), ids, gather=True, error=None, counts=counts)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class _LogSumExpAndRead(torch.autograd.Function):
    r"""``logsumexp(logits, 1)`` and ``logits.gather(1, columns)`` in one node: its backward writes one (B, M) gradient.

    Through autograd, the log-softmax of the concatenated logits, the concatenation, the gather's
    zero-filled (B, M) gradient and the sum of the two gradients would each pass over (B, M), which
    on CPU cost about as much as the (B, D) @ (D, M) product itself (``benchmarks/speed.py``'s
    ``queue`` and ``queue+mochi`` rows time the result). Here the backward is
    :math:`\operatorname{softmax}(\text{logits}) \cdot g_{\text{lse}}` with the read columns'
    gradients added in place. With ``create_graph=True`` it is computed out of place, so that it has
    a derivative of its own.

    Shape:
        - logits: (B, M); columns: (B, C) long
        - output: (B, 1) and (B, C)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_sum = torch.logsumexp(logits, dim=1, keepdim=True)
        ctx.save_for_backward(logits, log_sum, columns)
        return log_sum, logits.gather(1, columns)

    @staticmethod
    def backward(ctx, grad_log_sum: torch.Tensor, grad_read: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, log_sum, columns = ctx.saved_tensors
        # a row whose entries are all -inf has log_sum -inf: a finite stand-in keeps its softmax 0, not NaN
        log_sum = log_sum.clamp(min=torch.finfo(log_sum.dtype).min)
        if torch.is_grad_enabled():
            return torch.exp(logits - log_sum).mul(grad_log_sum).scatter_add(1, columns, grad_read), None
        return torch.sub(logits, log_sum).exp_().mul_(grad_log_sum).scatter_add_(1, columns, grad_read), None
