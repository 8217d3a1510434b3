"""HardNegativeMixer: synthetic hard negatives mixed from each query's hardest memory entries (MoCHi)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_matrix, check_non_negative_int, check_positive_int


class HardNegativeMixer(nn.Module):
    r"""Builds synthetic hard negatives for each query by mixing its hardest negatives (Kalantidis et al., 2020).

    For query :math:`q` (unit), let :math:`n_1..n_K` be its ``num_hard`` negatives of highest
    :math:`q \cdot n`. It returns ``num_mix`` pair mixes and ``num_query_mix`` query mixes

    .. math::
        h = \frac{a\,n_i + (1 - a)\,n_j}{\lVert a\,n_i + (1 - a)\,n_j \rVert},\ i \ne j,\ a \sim U(0, 1);
        \qquad
        h' = \frac{b\,q + (1 - b)\,n_j}{\lVert b\,q + (1 - b)\,n_j \rVert},\ b \sim U(0, \tfrac12),

    with :math:`q` detached. Each mix uses a query's own hardest negatives only. Everything is computed
    without gradient and batched over queries (one ``topk`` and a few gathers); the caller appends
    :math:`q \cdot h / \tau` to that query's logits only and never stores the mixes.
    :meth:`similarities` gives those dot products directly, from the logits the caller already
    holds, without materialising the (B, S, D) mixes (what :class:`~ssl_memory.QueueLoss` uses).

    The draw. :math:`j` of a query mix is uniform over the K hardest (i.i.d.). A pair mix needs the
    norm of :math:`a n_i + (1-a) n_j`, hence :math:`n_i \cdot n_j`: drawing the ``num_mix`` pairs
    i.i.d. over all K hardest, as MoCHi does, reads 2 x ``num_mix`` rows of D floats per query, which
    at B = 256, s = 1024 is 268 MB of scattered reads a step and cost 6-50x MoCo's whole step on CPU
    (``benchmarks/speed.py``, ``plain-mochi``). Instead each query draws a uniform random subset of
    r of its K hardest, the smallest r with :math:`r(r-1)/2 \ge` ``num_mix``, and takes ``num_mix``
    distinct pairs of that subset (all of them when there are exactly ``num_mix``); their dot products
    come from one small (r, r) Gram matrix per query (46 rows for s = 1024). Every pair mix is still
    a uniformly drawn pair of distinct entries among the query's K hardest (the subset is uniform and
    in random order), and a query's pair mixes are distinct pairs; what changes is that its mixes are
    not independent of each other (they share the subset's r entries). When fewer than r entries are
    available, the pairs are drawn i.i.d. among them (:math:`i \ne j`).

    Fewer candidates than asked: a query uses the K = min(``num_hard``, available) negatives it has.
    With a single candidate the pair mixes are that negative itself (no distinct pair exists); a query
    with none (an empty memory, or every entry masked) gets all-zero rows, which the caller must
    ignore (:class:`~ssl_memory.QueueLoss` masks their logits).

    Args:
        num_hard: K, the number of hardest negatives each query mixes from.
        num_mix: number of pair mixes per query (MoCHi's s).
        num_query_mix: number of query mixes per query (MoCHi's s').
        generator: a ``torch.Generator`` on the queries' device, for reproducible draws (one on another
            device raises ``ValueError``).

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

    def subset_size(self, available: int) -> int:
        """r: the smallest subset with ``num_mix`` distinct pairs, at most ``available`` (and at least 1)."""
        r = max(2, math.ceil((1 + math.sqrt(1 + 8 * self.num_mix)) / 2))
        return max(1, min(r, available))

    def check_generator(self, device: torch.device | str) -> None:
        """Raise ``ValueError`` unless ``generator`` (if any) draws on ``device``'s type, the queries' device."""
        if self.generator is not None and self.generator.device.type != torch.device(device).type:
            raise ValueError(
                f"generator is on {self.generator.device} but the queries are on {device}: the mixer draws on the "
                f"queries' device, so pass a torch.Generator(device={torch.device(device).type!r})"
            )

    # Eager under torch.compile: dynamo cannot pass a torch.Generator to its graph, and would break at each draw.
    @torch.no_grad()
    @torch.compiler.disable
    def _draw(self, query: torch.Tensor, negatives: torch.Tensor, logits: torch.Tensor | None) -> dict | None:
        """Each query's hardest negatives and the random draws of its mixes (None when nothing to mix).

        Returns rows of ``negatives``: ``subset`` (B, r), the pair mixes' ``i``, ``j`` (B, num_mix)
        and the query mixes' ``m`` (B, num_query_mix); ``p``, ``q`` are the pairs' positions in
        ``subset``; ``a``, ``b`` the coefficients; ``empty`` (B, 1) marks queries with no negative.
        """
        check_matrix("query", query)
        check_matrix("negatives", negatives, query.shape[1], rows="M")
        self.check_generator(query.device)
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
        # per query: its own K hardest, in no particular order (sorting them costs a third of the topk on CPU)
        top = logits.detach().topk(k, dim=1, sorted=False)
        finite = torch.isfinite(top.values)  # masked entries (-inf) are among them when fewer are available
        available = finite.sum(1, keepdim=True)
        pool = available.clamp(min=1)

        def uniform(count: int, high: torch.Tensor) -> torch.Tensor:
            """``count`` uniform integers in [0, high) for each query (high is (B, 1))."""
            u = torch.rand(num_queries, count, generator=self.generator, device=device, dtype=torch.float64)
            return torch.minimum((u * high).long(), high - 1)

        def coefficient(count: int, high: float) -> torch.Tensor:
            return torch.rand(num_queries, count, generator=self.generator, device=device, dtype=dtype) * high

        # a uniform random r-subset of each query's available hardest, in random order
        r = self.subset_size(k)
        scores = torch.rand(num_queries, k, generator=self.generator, device=device)
        scores.masked_fill_(~finite, -1.0)
        subset = top.indices.gather(1, scores.topk(r, dim=1).indices)
        # distinct pairs of the subset when it is full; otherwise i.i.d. pairs (i != j) of what there is
        held = pool.clamp(max=r)
        p = uniform(self.num_mix, held)
        q = uniform(self.num_mix, (held - 1).clamp(min=1))
        q = torch.where(held >= 2, q + (q >= p).long(), p)
        if r * (r - 1) // 2 >= self.num_mix:
            fixed = torch.triu_indices(r, r, 1, device=device)[:, : self.num_mix]
            full = held == r
            p, q = torch.where(full, fixed[0], p), torch.where(full, fixed[1], q)
        a = coefficient(self.num_mix, 1.0)
        b = coefficient(self.num_query_mix, 0.5)
        # The query mixes' negatives, each uniform over the available hardest: a draw landing on a masked
        # slot of `top` (unordered, so the slots do not say where the available ones are) is redrawn
        # from the subset, itself a uniform draw of the available ones.
        slot = uniform(self.num_query_mix, torch.full_like(pool, k))
        redrawn = subset.gather(1, uniform(self.num_query_mix, held))
        m = torch.where(finite.gather(1, slot), top.indices.gather(1, slot), redrawn)
        return {"subset": subset, "p": p, "q": q, "i": subset.gather(1, p), "j": subset.gather(1, q), "a": a,
                "m": m, "b": b, "empty": available == 0}

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
            q \cdot h = \frac{a L_i + (1 - a) L_j}{\sqrt{a^2 + (1 - a)^2 + 2 a (1 - a)\, n_i \cdot n_j}}, \qquad
            q \cdot h' = \frac{b\, q \cdot \hat q + (1 - b) L_j}
                {\sqrt{b^2 + (1 - b)^2 + 2 b (1 - b)\, \hat q \cdot n_j}},

        so gradients reach ``query`` through ``logits`` and equal the (fixed) mixes, exactly as
        ``query @ h`` would. The :math:`n_i \cdot n_j` come from each query's (r, r) Gram matrix of
        its drawn subset (see the class), so no (B, S, D) tensor is built. It is :meth:`plan`, then
        :meth:`mixed_logits` on the columns of ``logits`` the plan names.

        Args:
            query: (B, D), any scale (a query already divided by a temperature is fine).
            negatives: (M, D) unit rows.
            logits: (B, M), ``query @ negatives.T`` carrying the gradient to ``query``; ``-inf`` marks
                entries that are not negatives of that query.

        Shape:
            - output: (B, num_mix + num_query_mix); ``-inf`` for a query without any negative.
        """
        plan = self.plan(query, negatives, logits)
        read = logits.gather(1, plan["columns"]) if plan is not None else None
        return self.mixed_logits(query, read, plan)

    @torch.no_grad()
    def plan(self, query: torch.Tensor, negatives: torch.Tensor, logits: torch.Tensor) -> dict | None:
        """The draws of :meth:`similarities` and what they need besides the logits; None when nothing is mixed.

        ``plan["columns"]`` (B, r + num_query_mix) are the entries of each query's logits the mixes
        read: a caller that reads them itself (``QueueLoss`` does, fused with its log-sum-exp, so that
        the backward writes the (B, M) gradient once) passes them to :meth:`mixed_logits`.
        """
        plan = self._draw(query, negatives, logits)
        if plan is None:
            return None
        subset, a = plan["subset"], plan["a"]
        rows = negatives[subset].to(torch.promote_types(query.dtype, torch.float32))  # (B, r, D)
        gram = torch.bmm(rows, rows.transpose(1, 2)).flatten(1)
        cosine = gram.gather(1, plan["p"] * subset.shape[1] + plan["q"])
        plan["pair_norm"] = (a * a + (1 - a) ** 2 + 2 * a * (1 - a) * cosine).clamp_min(1e-12).sqrt()
        plan["columns"] = torch.cat([subset, plan["m"]], dim=1)
        return plan

    def mixed_logits(self, query: torch.Tensor, read: torch.Tensor | None, plan: dict | None) -> torch.Tensor:
        """The mixes' logits from ``read = logits.gather(1, plan["columns"])``, differentiable in both inputs.

        Shape:
            - query: (B, D); read: (B, r + num_query_mix)
            - output: (B, num_mix + num_query_mix); ``-inf`` for a query without any negative (all of
              them when ``plan`` is None)
        """
        if plan is None:
            return query.new_full((query.shape[0], self.num_mix + self.num_query_mix), float("-inf"))
        dtype = torch.promote_types(query.dtype, torch.float32)
        subset, p, q, a, b = plan["subset"], plan["p"], plan["q"], plan["a"], plan["b"]
        held, mixed_in = read[:, : subset.shape[1]], read[:, subset.shape[1] :]
        with torch.no_grad():
            scale = query.detach().to(dtype).norm(dim=1, keepdim=True)
            unit = query.detach().to(dtype) / scale
            query_cosine = mixed_in.detach() / scale
            query_norm = (b * b + (1 - b) ** 2 + 2 * b * (1 - b) * query_cosine).clamp_min(1e-12).sqrt()
        pair = (a * held.gather(1, p) + (1 - a) * held.gather(1, q)) / plan["pair_norm"]
        self_similarity = torch.linalg.vecdot(query.to(dtype), unit, dim=1).unsqueeze(1)  # = |query|, grad unit
        with_query = (b * self_similarity + (1 - b) * mixed_in) / query_norm
        mixed = torch.cat([pair, with_query], dim=1)
        return mixed.masked_fill(plan["empty"], float("-inf"))

    def extra_repr(self) -> str:
        return f"num_hard={self.num_hard}, num_mix={self.num_mix}, num_query_mix={self.num_query_mix}"
