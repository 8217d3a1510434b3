"""PML miners: the hardest negatives against a reference set, and positives from merged groups."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import BaseMiner

from .._validation import check_range
from ..losses.cross_batch import equal_label_pairs

_TUPLE_TYPES = ("pairs", "triplets")


class HardNegativeMiner(BaseMiner):
    r"""Each anchor's positives and its ``num_negatives`` hardest negatives in a reference set.

    For anchor :math:`a` with label :math:`y_a`, the positives are every reference entry with label
    :math:`y_a` (the anchor itself excluded when the reference set is the batch), and the hardest
    negatives are the ``num_negatives`` entries of another label most similar to :math:`a`
    (highest similarity, or lowest distance for a distance such as ``LpDistance``), hardest first.
    The reference set is ``ref_emb`` (a memory, e.g. inside PML's
    ``CrossBatchMemory``, which passes its memory), or the batch when it is None.

    Returns PML's pair tuple ``(a1, p, a2, n)``: all positive pairs and, per anchor, its hardest
    negatives; or a triplet tuple ``(a, p, n)``: every positive pair with each hardest negative of
    its anchor. Indices of ``a``/``a1``/``a2`` point into ``embeddings``, those of ``p``/``n`` into
    the reference set, as PML losses expect.

    Args:
        num_negatives: negatives kept per anchor (fewer when fewer exist); None keeps them all.
        tuple_type: ``"pairs"`` or ``"triplets"``.
        distance: a PML distance; default ``CosineSimilarity()``.

    Shape:
        - embeddings: (B, D); labels: (B,); ref_emb: (R, D); ref_labels: (R,)
        - output: 4 (pairs) or 3 (triplets) long vectors.

    Example::

        >>> miner = HardNegativeMiner(num_negatives=5)
        >>> loss_fn = pytorch_metric_learning.losses.ContrastiveLoss()
        >>> loss = loss_fn(embeddings, labels, miner(embeddings, labels))
    """

    def __init__(self, num_negatives: int | None = 10, tuple_type: str = "pairs", **kwargs) -> None:
        super().__init__(**kwargs)
        if num_negatives is not None and (
            isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives <= 0
        ):
            raise ValueError(f"num_negatives must be a positive int or None, got {num_negatives!r}")
        if tuple_type not in _TUPLE_TYPES:
            raise ValueError(f"tuple_type must be one of {_TUPLE_TYPES}, got {tuple_type!r}")
        self.num_negatives = num_negatives
        self.tuple_type = tuple_type
        self.add_to_recordable_attributes(list_of_names=["num_negatives"], is_stat=False)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return self._mine_labels(embeddings, labels, ref_emb, ref_labels, ref_labels is labels)

    def _mine_labels(self, embeddings, labels, ref_emb, ref_labels, ref_is_batch):
        if labels is None or ref_labels is None:
            raise ValueError(f"{type(self).__name__} needs labels")
        device = embeddings.device
        rows, cols = equal_label_pairs(labels, ref_labels.to(device))
        pos_keep = rows != cols if ref_is_batch else torch.ones_like(rows, dtype=torch.bool)
        anchors, positives = rows[pos_keep], cols[pos_keep]
        a2, negatives = self._hardest_negatives(embeddings, ref_emb, rows, cols)
        if self.tuple_type == "pairs":
            return anchors, positives, a2, negatives
        return self._triplets(anchors, positives, a2, negatives, embeddings.shape[0])

    def _hardest_negatives(self, embeddings, ref_emb, same_rows, same_cols):
        num_rows, num_ref = embeddings.shape[0], ref_emb.shape[0]
        if self.num_negatives is None or self.num_negatives >= num_ref:
            is_negative = torch.ones(num_rows, num_ref, dtype=torch.bool, device=embeddings.device)
            is_negative[same_rows, same_cols] = False
            return is_negative.nonzero(as_tuple=True)
        matrix = self.distance(embeddings, ref_emb)
        hardest_first = self.distance.is_inverted  # similarities: the largest is the hardest
        excluded = float("-inf") if hardest_first else float("inf")
        matrix = matrix.index_put((same_rows, same_cols), matrix.new_tensor(excluded))
        order = matrix.topk(self.num_negatives, dim=1, largest=hardest_first, sorted=True).indices
        valid = ~torch.isinf(matrix.gather(1, order))
        anchors = torch.arange(num_rows, device=embeddings.device)[:, None].expand_as(order)
        return anchors[valid], order[valid]

    @staticmethod
    def _triplets(anchors, positives, neg_anchors, negatives, num_rows):
        """Every (a, p) with every hardest negative of a, grouped by positive pair."""
        counts = torch.bincount(neg_anchors, minlength=num_rows)
        starts = torch.cumsum(counts, 0) - counts
        per_pair = counts[anchors]
        pair = torch.repeat_interleave(torch.arange(anchors.numel(), device=anchors.device), per_pair)
        offset = torch.arange(pair.numel(), device=anchors.device) - (torch.cumsum(per_pair, 0) - per_pair)[pair]
        return anchors[pair], positives[pair], negatives[starts[anchors[pair]] + offset]

    def extra_repr(self) -> str:
        return f"num_negatives={self.num_negatives}, tuple_type={self.tuple_type!r}"


class MergeGroupMiner(HardNegativeMiner):
    r"""Positives and negatives from the merge groups of a memory bank, for any PML pair or triplet loss.

    Labels are the samples' dataset indices. Each is mapped through ``groups`` (the merged-instance
    id of each sample, which :class:`~ssl_memory.NeighbourMerger` writes into ``MemoryBank.groups``),
    so every entry of a sample's group is a positive and every other sample a negative: the paper's
    nearest-neighbour merging, made available to PML losses. The groups are read at each call, so
    the miner follows the merges as training goes.

    Args:
        memory: a :class:`~ssl_memory.MemoryBank`, a module holding one as ``.memory`` (e.g.
            :class:`~ssl_memory.MemoryBankLoss`), or a (N,) long tensor of group ids.
        num_negatives: negatives kept per anchor, the hardest first; None (default) keeps them all.
        tuple_type: ``"pairs"`` (default) or ``"triplets"``.
        distance: a PML distance used to rank negatives; default ``CosineSimilarity()``.

    Shape:
        - embeddings: (B, D); labels: (B,) dataset indices in [0, N); ref_emb: (R, D); ref_labels: (R,)
        - output: 4 (pairs) or 3 (triplets) long vectors.

    Example::

        >>> criterion = MemoryBankLoss(num_samples=50_000, dim=128, merger=NeighbourMerger())
        >>> miner = MergeGroupMiner(criterion)
        >>> pair_loss = pytorch_metric_learning.losses.ContrastiveLoss()
        >>> loss = pair_loss(embeddings, indices, miner(embeddings, indices))
    """

    def __init__(self, memory, num_negatives: int | None = None, tuple_type: str = "pairs", **kwargs) -> None:
        super().__init__(num_negatives=num_negatives, tuple_type=tuple_type, **kwargs)
        if isinstance(memory, torch.Tensor):
            source = memory
        else:
            source = getattr(memory, "memory", memory)
            if not isinstance(getattr(source, "groups", None), torch.Tensor):
                raise TypeError(
                    "memory must be a MemoryBank, a module with a MemoryBank as .memory, or a tensor of group ids; "
                    f"got {type(memory).__name__}"
                )
        if isinstance(source, torch.Tensor) and (source.dim() != 1 or source.is_floating_point()):
            raise ValueError(
                f"group ids must be a 1-D integer tensor, got {source.dtype} of shape {tuple(source.shape)}"
            )
        # not registered as a submodule: the bank belongs to its loss, and must not be saved or moved twice
        self._source = [source]

    @property
    def groups(self) -> torch.Tensor:
        """The current group id of every sample."""
        source = self._source[0]
        return source if isinstance(source, torch.Tensor) else source.groups

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if labels is None or ref_labels is None:
            raise ValueError("MergeGroupMiner needs labels: the samples' dataset indices")
        groups = self.groups
        ref_is_batch = ref_labels is labels
        check_range("labels", labels, groups.numel())
        check_range("ref_labels", ref_labels, groups.numel())
        group_ids = groups[labels.to(groups.device)].to(embeddings.device)
        ref_group_ids = group_ids if ref_is_batch else groups[ref_labels.to(groups.device)].to(embeddings.device)
        return self._mine_labels(embeddings, group_ids, ref_emb, ref_group_ids, ref_is_batch)
