"""PML's ``DistributedLossWrapper``, gathering in rank order with collective input checks, and ``efficient=True``.

PML's wrapper gathers each rank's rows as ``[own rows, the other ranks' in rank order]`` with
``all_gather``, which needs equal batch sizes and identical shapes and dtypes on every rank: a rank
whose input differs aborts inside the backend or falls out of step with the others, and a
CrossBatchMemory enqueues the rows in a different order on every rank (PML #639). Ours first
exchanges every rank's verdict on its own input and what the gather needs (row counts, widths,
dtypes, which optional tensors it holds), raises the same :class:`~ssl_memory.DistributedInputError`
on every rank when any of them failed or they disagree, and only then gathers, in rank order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .._validation import check_matrix, first_failure
from ..distributed import DistributedInputError, gather_rows, is_distributed, raise_together, rank
from .cross_batch_memory import CrossBatchMemory

# dtype codes for the exchanged header: ranks whose tensors differ in dtype cannot be gathered together
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
# what every rank must agree on, after its own verdict and row counts (see _describe)
_AGREED = ("embedding width", "embeddings dtype", "labels", "labels dtype", "enqueue_mask", "ref_emb",
           "ref_emb width", "ref_emb dtype", "ref_labels", "ref_labels dtype")


def _code(tensor: torch.Tensor | None) -> int:
    """-1 for no tensor, else the index of its dtype (len(_DTYPES) for one not listed)."""
    if tensor is None:
        return -1
    return _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else len(_DTYPES)


def _check_vector(name: str, values: torch.Tensor | None, rows: int, integer: bool) -> None:
    if values is None:
        return
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if integer and (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {values.dtype}")
    if values.dim() != 1 or values.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(values.shape)}")


def _describe(embeddings, labels, enqueue_mask, ref_emb, ref_labels) -> list[int]:
    """This rank's header: rows, ref rows, then the values of ``_AGREED``."""
    width = embeddings.shape[1]
    ref_width = ref_emb.shape[1] if ref_emb is not None else -1
    return [
        embeddings.shape[0], ref_emb.shape[0] if ref_emb is not None else 0,
        width, _code(embeddings), int(labels is not None), _code(labels), int(enqueue_mask is not None),
        int(ref_emb is not None), ref_width, _code(ref_emb), int(ref_labels is not None), _code(ref_labels),
    ]


def exchange_verdicts(error: Exception | None, header: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's (verdict, header); raise the same ``DistributedInputError`` on every rank when a check
    failed anywhere or the ranks' ``_AGREED`` values differ. Returns every rank's header (counts first)."""
    size = 2 + len(_AGREED)
    mine = torch.tensor([int(error is None), *(header if error is None else [0] * size)], device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    rows = torch.stack(table).tolist()
    failures = [r for r, row in enumerate(rows) if not row[0]]
    if failures:
        raise_together(failures, error)
    headers = [row[1:] for row in rows]
    for position, name in enumerate(_AGREED, start=2):
        values = [h[position] for h in headers]
        if len(set(values)) > 1:
            shown = [_DTYPES[v] if "dtype" in name and 0 <= v < len(_DTYPES) else v for v in values]
            raise DistributedInputError(
                f"every rank must pass the same {name} (presence 0/1, or dtype); got {shown} on ranks "
                f"0..{len(values) - 1}; nothing was written on any rank"
            )
    return headers


def _gather(tensor: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order, with this rank's own piece in place (it keeps its gradient);
    and where this rank's rows start."""
    start = sum(counts[: rank()])
    others = gather_rows(tensor.detach(), counts=counts)[0]
    return torch.cat([others[:start], tensor, others[start + tensor.shape[0]:]]), start


def _shift(indices_tuple: tuple | None, anchor_offset: int, ref_offset: int) -> tuple | None:
    """An ``indices_tuple`` into this rank's rows, moved to where they sit among every rank's rows."""
    if indices_tuple is None:
        return None
    anchors = (0,) if len(indices_tuple) == 3 else (0, 2)
    return tuple(x + (anchor_offset if i in anchors else ref_offset) for i, x in enumerate(indices_tuple))


class DistributedLossWrapper(pml_distributed.DistributedLossWrapper):
    r"""PML's ``DistributedLossWrapper``, gathering in rank order any batch sizes, with collective checks.

    Same arguments and results as PML's for every loss it accepts, and also:

    - Ranks may hold different numbers of rows (a short last batch).
    - Every rank checks its own input (shapes, dtypes, labels, ``enqueue_mask``, ``ref_emb``) and the
      ranks agree on it before any collective gathers rows: bad or mismatched input on any rank raises
      the same :class:`~ssl_memory.DistributedInputError` on every rank, and no memory is written.
    - Rows are gathered in rank order, so a CrossBatchMemory enqueues the same rows in the same order on
      every rank and holds the same memory (PML's order differs per rank, PML #639). An
      ``indices_tuple`` indexes this rank's rows, as with PML's.
    - ``efficient=True`` works with :class:`~ssl_memory.pml.CrossBatchMemory` (PML #448): every
      rank's rows are enqueued, but only this rank's queries are scored against the memory, and the
      loss returned is this rank's own (not multiplied by the world size). Its gradient equals the
      one ``efficient=False`` gives whenever the loss is a mean over queries or pairs that every rank
      holds equally many of, at 1/world_size of the cost; with PML's own class it raises, since that
      class cannot enqueue rows it does not score.
    - For a plain loss with ``efficient=True`` and ``ref_emb``, no (query i, reference i) pair is
      dropped: the reference rows are not the queries (PML drops them as self-comparisons).
    - Outside a process group it returns the loss itself (PML's raises a TypeError for a CrossBatchMemory).

    Our :class:`~ssl_memory.pml.CrossBatchMemory` needs this wrapper under ``torch.distributed``: it
    refuses a direct call there (PML's own wrapper would hand it rows in each rank's own order).

    Args:
        loss: a PML loss, PML's ``CrossBatchMemory`` or ours.
        efficient: for a plain loss, PML's meaning; for a CrossBatchMemory, see above.

    Example::

        >>> loss_fn = DistributedLossWrapper(CrossBatchMemory(ContrastiveLoss(), 128, 8192), efficient=True)
        >>> loss = loss_fn(embeddings, labels)  # this rank's batch
    """

    def __init__(self, loss: torch.nn.Module, efficient: bool = False) -> None:
        # PML's __init__ refuses efficient=True for any CrossBatchMemory before we could say why
        torch.nn.Module.__init__(self)
        if not isinstance(loss, (BaseMetricLossFunction, PMLCrossBatchMemory)):
            raise TypeError("The input loss must extend BaseMetricLossFunction or CrossBatchMemory")
        if efficient and isinstance(loss, PMLCrossBatchMemory) and not isinstance(loss, CrossBatchMemory):
            raise ValueError(
                "efficient=True with a CrossBatchMemory needs ssl_memory.pml.CrossBatchMemory: it enqueues every "
                "rank's rows but scores only this rank's, which PML's own CrossBatchMemory cannot do"
            )
        self.loss = loss
        self.efficient = efficient

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        enqueue_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = isinstance(self.loss, PMLCrossBatchMemory)
        if not is_distributed():
            if not memory:
                return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
            return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
        error = first_failure(lambda: self._check(embeddings, labels, enqueue_mask, ref_emb, ref_labels, memory))
        header = [] if error is not None else _describe(embeddings, labels, enqueue_mask, ref_emb, ref_labels)
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
        headers = exchange_verdicts(error, header, device)
        counts, ref_counts = [h[0] for h in headers], [h[1] for h in headers]
        if memory:
            return self._cross_batch(embeddings, labels, indices_tuple, enqueue_mask, counts)
        return self._regular(embeddings, labels, indices_tuple, ref_emb, ref_labels, counts, ref_counts)

    def _check(self, embeddings, labels, enqueue_mask, ref_emb, ref_labels, memory: bool) -> None:
        """This rank's verdict on its own input (what the gathers and the loss need)."""
        check_matrix("embeddings", embeddings)
        rows = embeddings.shape[0]
        if memory:
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
            if labels is None:
                raise ValueError("a CrossBatchMemory needs labels, got None")
            _check_vector("labels", labels, rows, integer=True)
            _check_vector("enqueue_mask", enqueue_mask, rows, integer=False)
            if enqueue_mask is not None and enqueue_mask.dtype != torch.bool:
                raise TypeError(f"enqueue_mask must be a bool tensor, got dtype {enqueue_mask.dtype}")
            return
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is only for a CrossBatchMemory")
        _check_vector("labels", labels, rows, integer=False)
        if ref_emb is not None:
            check_matrix("ref_emb", ref_emb, embeddings.shape[1])
        elif ref_labels is not None:
            raise ValueError("ref_labels were given without ref_emb")
        if ref_labels is not None:
            _check_vector("ref_labels", ref_labels, ref_emb.shape[0], integer=False)
        elif ref_emb is not None and labels is not None:
            raise ValueError("ref_emb with labels needs ref_labels, got None")

    def _cross_batch(self, embeddings, labels, indices_tuple, enqueue_mask, counts) -> torch.Tensor:
        device = embeddings.device
        labels = labels.to(device)
        all_emb, offset = _gather(embeddings, counts)
        all_labels = _gather(labels, counts)[0]
        all_mask = None if enqueue_mask is None else _gather(enqueue_mask.to(device), counts)[0]
        world = len(counts)
        if isinstance(self.loss, CrossBatchMemory):
            every_rank = [all_emb.detach(), all_labels, all_mask]
            if self.efficient:
                return self.loss.forward_shared(embeddings, labels, indices_tuple, enqueue_mask, every_rank, offset)
            indices_tuple = _shift(indices_tuple, offset, offset)
            return self.loss.forward_shared(all_emb, all_labels, indices_tuple, all_mask, None, 0) * world
        # PML's own class: the caller's indices point into its own rows
        return self.loss(all_emb, all_labels, _shift(indices_tuple, offset, offset), all_mask) * world

    def _regular(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, counts, ref_counts) -> torch.Tensor:
        device = embeddings.device
        all_emb, offset = _gather(embeddings, counts)
        all_labels = None if labels is None else _gather(labels.to(device), counts)[0]
        all_ref, all_ref_labels, ref_offset = None, None, offset
        if ref_emb is not None:
            all_ref, ref_offset = _gather(ref_emb, ref_counts)
            all_ref_labels = None if ref_labels is None else _gather(ref_labels.to(device), ref_counts)[0]
        world = len(counts)
        if not self.efficient:
            indices_tuple = _shift(indices_tuple, offset, ref_offset)
            return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels) * world
        # this rank's queries against every rank's references (its own rows, or ref_emb)
        references = all_emb if all_ref is None else all_ref
        reference_labels = all_labels if all_ref is None else all_ref_labels
        if indices_tuple is None:
            indices_tuple = lmu.get_all_pairs_indices(labels.to(device), reference_labels)
            if all_ref is None:  # a query's pair with its own row
                indices_tuple = _without_self_pairs(indices_tuple, offset)
        else:
            indices_tuple = _shift(indices_tuple, 0, ref_offset)
        return self.loss(embeddings, labels, indices_tuple, references, reference_labels) * world


def _without_self_pairs(pairs: tuple, offset: int) -> tuple:
    """Drop (query i, reference offset + i) from all-pairs indices."""
    a1, p, a2, n = pairs
    keep_p, keep_n = p != a1 + offset, n != a2 + offset
    return a1[keep_p], p[keep_p], a2[keep_n], n[keep_n]
