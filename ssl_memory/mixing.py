"""HardNegativeMixer: synthetic hard negatives mixed from each query's hardest memory entries (MoCHi)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_matrix, check_non_negative_int, check_positive_int

_CHUNK = 64  # queries per block when gathering pair rows: bounds the temporary (chunk, S, D) tensors


class HardNegativeMixer(nn.Module):
    r"""Builds synthetic hard negatives for each query by mixing its hardest negatives (Kalantidis et al., 2020).

    For query :math:`q` (unit), let :math:`n_1..n_K` be its ``num_hard`` negatives of highest
    :math:`q \cdot n`. It returns ``num_mix`` pair mixes and ``num_query_mix`` query mixes

    .. math::
        h = \frac{a\,n_i + (1 - a)\,n_j}{\lVert a\,n_i + (1 - a)\,n_j \rVert},\ i \ne j,\ a \sim U(0, 1);
        \qquad
        h' = \frac{b\,q + (1 - b)\,n_j}{\lVert b\,q + (1 - b)\,n_j \rVert},\ b \sim U(0, \tfrac12),

    with :math:`i, j` drawn uniformly among the query's own K hardest and :math:`q` detached. Everything
    is computed without gradient and batched over queries (one ``topk`` and a few gathers); the caller
    appends :math:`q \cdot h / \tau` to that query's logits only and never stores the mixes.
    :meth:`similarities` gives those dot products directly, from the logits the caller already
    holds, without materialising the (B, S, D) mixes (what :class:`~ssl_memory.QueueLoss` uses).

    Fewer candidates than asked: a query uses the K = min(``num_hard``, available) negatives it has.
    With a single candidate the pair mixes are that negative itself (no distinct pair exists); a query
    with none (an empty memory, or every entry masked) gets all-zero rows, which the caller must
    ignore (:class:`~ssl_memory.QueueLoss` masks their logits).

    Args:
        num_hard: K, the number of hardest negatives each query mixes from.
        num_mix: number of pair mixes per query (MoCHi's s).
        num_query_mix: number of query mixes per query (MoCHi's s').
        generator: a ``torch.Generator`` on the queries' device, for reproducible draws.

    Shape:
        - query: (B, D)
        - negatives: (M, D), unit rows (e.g. ``queue.features``)
        - logits: (B, M), optional: any increasing function of ``query @ negatives.T`` the caller has
          already computed (saves a product); ``-inf`` marks an entry that is not a negative of that
          query (its own sample)
        - output: (B, num_mix + num_query_mix, D), unit rows, pair mixes first

    Example::

        >>> mixer = HardNegativeMixer(num_hard=64, num_mix=32, num_query_mix=16)
        >>> queue = F.normalize(torch.randn(4096, 128), dim=1)
        >>> mixes = mixer(F.normalize(torch.randn(8, 128), dim=1), queue)
        >>> mixes.shape
        torch.Size([8, 48, 128])
    """

    def __init__(
        self,
        num_hard: int = 1024,
        num_mix: int = 1024,
        num_query_mix: int = 512,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_hard", num_hard)
        check_non_negative_int("num_mix", num_mix)
        check_non_negative_int("num_query_mix", num_query_mix)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.num_hard = num_hard
        self.num_mix = num_mix
        self.num_query_mix = num_query_mix
        self.generator = generator

    @torch.no_grad()
    def _draw(self, query: torch.Tensor, negatives: torch.Tensor, logits: torch.Tensor | None) -> dict | None:
        """Each query's hardest negatives and the random draws of its mixes (None when nothing to mix)."""
        check_matrix("query", query)
        check_matrix("negatives", negatives, query.shape[1], rows="M")
        num_queries, num_negatives = query.shape[0], negatives.shape[0]
        if logits is None:
            logits = query @ negatives.to(query.dtype).T
        else:
            check_matrix("logits", logits, num_negatives, rows=str(num_queries))
            if logits.shape[0] != num_queries:
                raise ValueError(f"logits must have shape ({num_queries}, {num_negatives}), got {tuple(logits.shape)}")
        k = min(self.num_hard, num_negatives)
        if k == 0 or self.num_mix + self.num_query_mix == 0 or num_queries == 0:
            return None
        device, dtype = query.device, torch.promote_types(query.dtype, torch.float32)
        top = logits.detach().topk(k, dim=1)  # per query: its own hardest, hardest first
        available = torch.isfinite(top.values).sum(1, keepdim=True)  # masked entries sort last
        pool = available.clamp(min=1)

        def draw(count: int, high: torch.Tensor) -> torch.Tensor:
            """``count`` uniform integers in [0, high) for each query (high is (B, 1))."""
            u = torch.rand(num_queries, count, generator=self.generator, device=device, dtype=torch.float64)
            return torch.minimum((u * high).long(), high - 1)

        def coefficient(count: int, high: float) -> torch.Tensor:
            return torch.rand(num_queries, count, generator=self.generator, device=device, dtype=dtype) * high

        i = draw(self.num_mix, pool)
        j = draw(self.num_mix, (pool - 1).clamp(min=1))
        j = torch.where(pool >= 2, j + (j >= i).long(), i)  # j uniform over the others, i != j
        a = coefficient(self.num_mix, 1.0)
        b = coefficient(self.num_query_mix, 0.5)
        m = draw(self.num_query_mix, pool)
        # positions in each query's own top-k list -> rows of `negatives`
        hardest = top.indices
        return {"i": hardest.gather(1, i), "j": hardest.gather(1, j), "a": a, "m": hardest.gather(1, m), "b": b,
                "empty": available == 0}

    @torch.no_grad()
    def forward(self, query: torch.Tensor, negatives: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        plan = self._draw(query, negatives, logits)
        q = F.normalize(query.detach(), dim=1)
        if plan is None:
            return q.new_zeros(query.shape[0], self.num_mix + self.num_query_mix, q.shape[1])
        rows = lambda positions: negatives[positions].to(q.dtype)  # noqa: E731 - (B, c) -> (B, c, D)
        a, b = plan["a"].unsqueeze(2), plan["b"].unsqueeze(2)
        pair = rows(plan["i"]).mul_(a).add_(rows(plan["j"]).mul_(1 - a))
        with_query = rows(plan["m"]).mul_(1 - b).add_(q.unsqueeze(1) * b)
        mixes = F.normalize(torch.cat([pair, with_query], dim=1), dim=2)
        return mixes.masked_fill_(plan["empty"].unsqueeze(2), 0.0)

    def similarities(self, query: torch.Tensor, negatives: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        r"""``query . h`` for each mix ``h`` that :meth:`forward` would draw, without building the mixes.

        With :math:`L = q \cdot n` the given logits and :math:`\hat q = q / \lVert q \rVert` detached,

        .. math::
            q \cdot h = \frac{a L_i + (1 - a) L_j}{\lVert a n_i + (1 - a) n_j \rVert}, \qquad
            q \cdot h' = \frac{b\, q \cdot \hat q + (1 - b) L_j}
                {\sqrt{b^2 + (1 - b)^2 + 2 b (1 - b)\, \hat q \cdot n_j}},

        so gradients reach ``query`` through ``logits`` and equal the (fixed) mixes, exactly as
        ``query @ h`` would, while only the pair mixes' norms need rows of ``negatives`` (one dot
        product per pair, in chunks of queries) and no (B, S, D) tensor is kept.

        Args:
            query: (B, D), any scale (a query already divided by a temperature is fine).
            negatives: (M, D) unit rows.
            logits: (B, M), ``query @ negatives.T`` carrying the gradient to ``query``; ``-inf`` marks
                entries that are not negatives of that query.

        Shape:
            - output: (B, num_mix + num_query_mix); ``-inf`` for a query without any negative.
        """
        plan = self._draw(query, negatives, logits)
        dtype = torch.promote_types(query.dtype, torch.float32)
        if plan is None:
            return logits.new_full((query.shape[0], self.num_mix + self.num_query_mix), float("-inf"))
        with torch.no_grad():
            scale = query.detach().to(dtype).norm(dim=1, keepdim=True)
            unit = query.detach().to(dtype) / scale
            a, b = plan["a"], plan["b"]
            cosine = torch.cat([
                torch.linalg.vecdot(negatives[i].to(dtype), negatives[j].to(dtype), dim=2)
                for i, j in zip(plan["i"].split(_CHUNK), plan["j"].split(_CHUNK))
            ])
            pair_norm = (a * a + (1 - a) ** 2 + 2 * a * (1 - a) * cosine).clamp_min(1e-12).sqrt()
            query_cosine = logits.detach().gather(1, plan["m"]) / scale
            query_norm = (b * b + (1 - b) ** 2 + 2 * b * (1 - b) * query_cosine).clamp_min(1e-12).sqrt()
        pair = (a * logits.gather(1, plan["i"]) + (1 - a) * logits.gather(1, plan["j"])) / pair_norm
        self_similarity = torch.linalg.vecdot(query.to(dtype), unit, dim=1).unsqueeze(1)  # = |query|, grad unit
        with_query = (b * self_similarity + (1 - b) * logits.gather(1, plan["m"])) / query_norm
        mixed = torch.cat([pair, with_query], dim=1)
        return mixed.masked_fill(plan["empty"], float("-inf"))

    def extra_repr(self) -> str:
        return f"num_hard={self.num_hard}, num_mix={self.num_mix}, num_query_mix={self.num_query_mix}"
