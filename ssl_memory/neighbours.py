"""Nearest neighbours of every row of a table of unit vectors among the other rows, skipping its own group.

Similarity is the dot product (the cosine, rows being unit vectors). Row ``j`` is a candidate
neighbour of row ``i`` when ``j != i`` and, if ``groups`` is given, ``groups[j] != groups[i]``:
this lets :class:`~ssl_memory.NeighbourMerger` ask for each entry's nearest entry *outside* its
merged group, so groups can keep growing round after round.

Backends, one class each, all called as ``search(features, k, groups)``:

- :class:`TorchSearch`: exact; chunked matrix product and top-k, any device, memory bounded by
  the chunk (never an N x N matrix).
- :class:`IVFSearch`: approximate, k-means cells, each scanned by one matrix product for all the
  queries that probe it (a self-join); pure torch. The default at ImageNet scale on CPU.
- :class:`FaissFlatSearch`: exact, faiss's flat inner-product index (CPU).
- :class:`FaissIVFSearch`: approximate, faiss's inverted file over k-means cells; scans the
  ``nprobe`` cells nearest to each query.
- :class:`FaissHNSWSearch`: approximate, a navigable small-world graph.

:func:`nearest_neighbours` picks one by name (``"auto"``: see :func:`make_search`).
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from ._validation import check_index_vector, check_non_negative_int, check_positive_int

FAISS_HINT = "install it with `pip install 'ssl_memory[faiss]'` (or `pip install faiss-cpu`)"
BACKENDS = ("auto", "torch", "ivf", "faiss-flat", "faiss-ivf", "faiss-hnsw")
# Groups up to this size are handled by asking faiss for more neighbours (size + k); larger ones by
# searching their members with the group filtered out, one faiss call per group.
_SMALL_GROUP = 64
_FAISS_QUERY_BLOCK = 65536


def faiss_available() -> bool:
    """True when the optional ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"this neighbour search backend needs faiss, which is not installed; {FAISS_HINT}") from error
    return faiss


def _numpy_search(index):
    """The index's own numpy ``search``: importing ``faiss.contrib.torch_utils`` (PML does) swaps in a
    torch-aware wrapper that drops the ``params=`` argument our group exclusion needs."""
    return getattr(index, "search_numpy", index.search)


class NeighbourSearch(ABC):
    """Base class of the backends: the ``k`` most similar admissible rows of every row.

    Returns ``(similarities, indices)``, both (N, k), best first. A row with fewer than ``k``
    admissible neighbours (or, for approximate backends, fewer found) is padded with similarity
    ``-inf`` and index ``-1``.

    Shape:
        - features: (N, D), unit rows; any floating dtype, searched in float32
        - groups: (N,) integer ids, optional
        - output: (N, k) float32 and (N, k) int64, on the features' device
    """

    def __call__(
        self, features: torch.Tensor, k: int = 1, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not features.is_floating_point() or features.dim() != 2:
            raise ValueError(
                f"features must be a 2-D floating-point tensor, got shape {tuple(features.shape)} "
                f"and dtype {features.dtype}"
            )
        check_positive_int("k", k)
        if groups is not None:
            check_index_vector("groups", groups, features.shape[0], features.device)
        x = features.detach().float().contiguous()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features contain NaN or infinite values")
        return self._search(x, k, groups)

    @abstractmethod
    def _search(self, x: torch.Tensor, k: int, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Search float32 contiguous, finite rows; arguments already checked."""


class _Members:
    """Each row's group members: ``order[start[i] : start[i] + size[i]]`` lists the group of row ``i``."""

    def __init__(self, groups: torch.Tensor) -> None:
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        self.order = torch.argsort(inverse, stable=True)
        self.size = counts[inverse]
        self.start = (counts.cumsum(0) - counts)[inverse]

    def pairs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in ``rows``, member) for every member of every row's group, the row itself included."""
        size = self.size[rows]
        position = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), size)
        first = torch.repeat_interleave(size.cumsum(0) - size, size)
        offset = torch.arange(position.numel(), device=rows.device) - first
        return position, self.order[self.start[rows][position] + offset]


class TorchSearch(NeighbourSearch):
    r"""Exact search by chunked matrix product: ``x[rows] @ x.T``, own group set to ``-inf``, then top-k.

    Peak extra memory is one (chunk_size, N) float32 block; the own-group exclusion writes only the
    members of each row's group (a dense comparison is used for a block whose groups are huge).

    Args:
        chunk_size: query rows per block. ``None`` takes as many rows as fit ``2**26`` similarities
            (256 MB), which keeps the matrix product efficient at N = 100,000 (671 rows).

    Example::

        >>> x = F.normalize(torch.randn(1000, 64), dim=1)
        >>> sims, idx = TorchSearch(chunk_size=256)(x, k=1)
    """

    BLOCK_ELEMENTS = 2**26

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size

    def _search(self, x: torch.Tensor, k: int, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        rows_per_block = self.chunk_size or max(1, self.BLOCK_ELEMENTS // n)
        take = min(k, n)
        sims = x.new_full((n, k), -math.inf)
        indices = torch.full((n, k), -1, dtype=torch.long, device=x.device)
        members = _Members(groups) if groups is not None else None
        for start in range(0, n, rows_per_block):
            stop = min(n, start + rows_per_block)
            block = x[start:stop] @ x.T
            self._exclude_(block, torch.arange(start, stop, device=x.device), groups, members)
            if take == 1:
                values, found = block.max(dim=1, keepdim=True)
            else:
                values, found = block.topk(take, dim=1)
            sims[start:stop, :take] = values
            indices[start:stop, :take] = found
        indices[sims == -math.inf] = -1
        return sims, indices

    @staticmethod
    def _exclude_(
        block: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor | None, members: _Members | None
    ) -> None:
        if members is None:
            block[torch.arange(rows.numel(), device=rows.device), rows] = -math.inf
            return
        if int(members.size[rows].sum()) * 8 > block.numel():
            block.masked_fill_(groups[rows].unsqueeze(1) == groups.unsqueeze(0), -math.inf)
            return
        position, member = members.pairs(rows)
        block[position, member] = -math.inf


class _FaissSearch(NeighbourSearch):
    """Builds a faiss index over all rows, searches every row, then filters itself and its group out.

    The first search asks for ``k + 1`` neighbours (the row itself is normally the first). Rows of
    groups up to 64 entries that are left short are searched again for ``size + k`` neighbours;
    rows of larger groups are searched with their group removed by a faiss ID selector.
    """

    def __init__(self) -> None:
        _import_faiss()

    @abstractmethod
    def _index_and_search(self, faiss, data: np.ndarray, k: int):
        """Build the index over ``data`` and search every row of it: ``(index, sims, ids)``."""

    def _params(self, faiss, index, selector):
        return faiss.SearchParameters(sel=selector)

    def _search(self, x: torch.Tensor, k: int, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        data = x.cpu().numpy()
        n = data.shape[0]
        ids_of_group = np.arange(n) if groups is None else groups.cpu().numpy()
        out_sims = np.full((n, k), -np.inf, dtype=np.float32)
        out_ids = np.full((n, k), -1, dtype=np.int64)
        if n > 1:
            index, sims, ids = self._index_and_search(faiss, data, min(n, k + 1))
            rows = np.arange(n)
            found = self._keep(rows, sims, ids, ids_of_group, k, out_sims, out_ids)
            _, inverse, counts = np.unique(ids_of_group, return_inverse=True, return_counts=True)
            size = counts[inverse]
            pending = rows[(found < k) & (size > 1)]
            small = pending[size[pending] <= _SMALL_GROUP]
            if small.size:
                wanted = min(n, int(size[small].max()) + k)
                self._keep(small, *index.search(data[small], wanted), ids_of_group, k, out_sims, out_ids)
            large = pending[size[pending] > _SMALL_GROUP]
            for group in np.unique(ids_of_group[large]):
                queries = large[ids_of_group[large] == group]
                members = np.flatnonzero(ids_of_group == group).astype(np.int64)
                inner = faiss.IDSelectorBatch(members)
                selector = faiss.IDSelectorNot(inner)
                sims, ids = _numpy_search(index)(data[queries], min(k, n), params=self._params(faiss, index, selector))
                self._keep(queries, sims, ids, ids_of_group, k, out_sims, out_ids)
        device = x.device
        return torch.from_numpy(out_sims).to(device), torch.from_numpy(out_ids).to(device)

    @staticmethod
    def _keep(
        rows: np.ndarray,
        sims: np.ndarray,
        ids: np.ndarray,
        group_of: np.ndarray,
        k: int,
        out_sims: np.ndarray,
        out_ids: np.ndarray,
    ) -> np.ndarray:
        """Write each row's first ``k`` admissible results over its previous ones; return how many it got."""
        admissible = (ids >= 0) & (ids != rows[:, None]) & (group_of[np.maximum(ids, 0)] != group_of[rows][:, None])
        rank = np.cumsum(admissible, axis=1)
        which, column = np.nonzero(admissible & (rank <= k))
        out_sims[rows] = -np.inf
        out_ids[rows] = -1
        out_sims[rows[which], rank[which, column] - 1] = sims[which, column]
        out_ids[rows[which], rank[which, column] - 1] = ids[which, column]
        return np.minimum(rank[:, -1], k)


def _search_every_row(index, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty((data.shape[0], k), dtype=np.float32)
    ids = np.empty((data.shape[0], k), dtype=np.int64)
    for start in range(0, data.shape[0], _FAISS_QUERY_BLOCK):
        stop = start + _FAISS_QUERY_BLOCK
        sims[start:stop], ids[start:stop] = index.search(data[start:stop], k)
    return sims, ids


class FaissFlatSearch(_FaissSearch):
    """Exact search with faiss's flat inner-product index (a blocked matrix product on CPU).

    Example::

        >>> sims, idx = FaissFlatSearch()(F.normalize(torch.randn(1000, 64), dim=1))
    """

    def _index_and_search(self, faiss, data: np.ndarray, k: int):
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(data)
        return index, *_search_every_row(index, data, k)


class FaissIVFSearch(_FaissSearch):
    r"""Approximate search with an inverted file (``faiss.IndexIVFFlat``, inner product).

    k-means splits the rows into ``nlist`` cells; each query scans the ``nprobe`` cells whose
    centroids are most similar to it, so a search costs about
    ``N * (nlist + nprobe * N / nlist) * D`` multiply-adds instead of ``N^2 * D``. Every row is both a
    query and an entry: the cell assignment is computed once for both, and queries are scanned cell
    by cell so the cells they read stay in cache.

    Args:
        nlist: number of cells; ``None`` takes the power of two nearest ``4 * sqrt(N)`` (faiss's
            guideline is 4 to 16 sqrt(N)): 4096 cells of about 300 rows for ImageNet's 1.28M; at
            least 1 and at most ``N / 39`` (faiss's minimum of 39 training points per cell).
        nprobe: cells scanned per query; more is slower and finds the true neighbour more often.
            With cells of a few hundred rows, 4 cells (about 1,200 rows of 512 bytes) still fit in a
            core's cache; on the 2-core CPU of ``benchmarks/merger_scale.py`` 8 cells cost three
            times as much as 4, not twice.
        train_per_cell: k-means is trained on ``train_per_cell * nlist`` random rows.
        kmeans_iterations: k-means iterations (faiss's default is 25; 10 is enough for a coarse
            quantiser and 2.5 times cheaper).
        seed: seed of the training sample and of k-means.

    Example::

        >>> search = FaissIVFSearch(nprobe=8)  # slower than the default 4, finds more true neighbours
        >>> sims, idx = search(F.normalize(torch.randn(100_000, 128), dim=1))
    """

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = 4,
        train_per_cell: int = 40,
        kmeans_iterations: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if nlist is not None:
            check_positive_int("nlist", nlist)
        check_positive_int("nprobe", nprobe)
        check_positive_int("train_per_cell", train_per_cell)
        check_positive_int("kmeans_iterations", kmeans_iterations)
        self.nlist, self.nprobe = nlist, nprobe
        self.train_per_cell, self.kmeans_iterations, self.seed = train_per_cell, kmeans_iterations, seed

    def cells(self, num_entries: int) -> int:
        """The number of cells used for ``num_entries`` rows."""
        wanted = self.nlist or 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_entries))))
        return max(1, min(wanted, num_entries // 39))

    def _index_and_search(self, faiss, data: np.ndarray, k: int):
        n, dim = data.shape
        nlist = self.cells(n)
        quantiser = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantiser, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = self.kmeans_iterations
        # Unit centroids: with inner-product assignment, centroids of larger norm would draw in
        # rows far from them and the cells would stop being neighbourhoods.
        index.cp.spherical = True
        index.cp.seed = self.seed
        sample = np.random.default_rng(self.seed).choice(n, min(n, self.train_per_cell * nlist), replace=False)
        index.train(data[np.sort(sample)])
        index.nprobe = min(self.nprobe, nlist)
        # One coarse search gives both each row's own cell (to add it) and the cells it probes as a query.
        cell_sims, cells = quantiser.search(data, index.nprobe)
        home = np.ascontiguousarray(cells[:, 0])
        index.add_core(n, faiss.swig_ptr(data), None, faiss.swig_ptr(home))
        order = np.argsort(home, kind="stable")
        sims = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, _FAISS_QUERY_BLOCK):
            block = order[start : start + _FAISS_QUERY_BLOCK]
            sims[block], ids[block] = index.search_preassigned(data[block], k, cells[block], cell_sims[block])
        return index, sims, ids

    def _params(self, faiss, index, selector):
        return faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)

    def __repr__(self) -> str:
        return f"FaissIVFSearch(nlist={self.nlist}, nprobe={self.nprobe})"


class FaissHNSWSearch(_FaissSearch):
    """Approximate search with a hierarchical navigable small-world graph (``faiss.IndexHNSWFlat``).

    Args:
        m: graph degree; more links, better recall, slower build.
        ef_construction: candidate list size while building.
        ef_search: candidate list size while searching (raised to ``k`` when smaller).

    Example::

        >>> sims, idx = FaissHNSWSearch(m=16)(F.normalize(torch.randn(10_000, 64), dim=1))
    """

    def __init__(self, m: int = 16, ef_construction: int = 40, ef_search: int = 64) -> None:
        super().__init__()
        check_positive_int("m", m)
        check_positive_int("ef_construction", ef_construction)
        check_positive_int("ef_search", ef_search)
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search

    def _index_and_search(self, faiss, data: np.ndarray, k: int):
        index = faiss.IndexHNSWFlat(data.shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        index.add(data)
        return index, *_search_every_row(index, data, k)

    def _params(self, faiss, index, selector):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)

    def __repr__(self) -> str:
        return f"FaissHNSWSearch(m={self.m}, ef_construction={self.ef_construction}, ef_search={self.ef_search})"


_BLOCK_ROWS = 65536  # rows per product against the centroids: a (65,536, nlist) block of similarities


class IVFSearch(NeighbourSearch):
    r"""Approximate search by an inverted file, run as a self-join: one matrix product per cell.

    Spherical k-means splits the rows into ``nlist`` cells; every row is a member of the cell whose
    centroid is most similar to it, and, as a query, scans the members of its ``nprobe`` most
    similar cells (what an IVF index does). Since every row is a query, the scan is turned around:
    for each cell, the queries that probe it are compared with its members in one
    :math:`(q_c, m_c)` product, their own group masked, and each query keeps the best ``k`` of the
    cells it probed. That is :math:`N (\text{nlist} + \text{nprobe} \cdot N / \text{nlist}) D`
    multiply-adds, as for faiss's ``IndexIVFFlat``, but in dense products: at N = 1,281,167 on two
    CPU cores the scan took 4x less time than faiss's (``benchmarks/merger_scale.py``). Pure torch,
    so it runs on any device and needs no faiss.

    Args:
        nlist: number of cells; ``None`` takes the power of two nearest ``4 * sqrt(N)``, at most ``N / 39``.
        nprobe: cells scanned per query; more is slower and finds the true neighbour more often.
        train_per_cell: k-means is trained on ``train_per_cell * nlist`` random rows.
        kmeans_iterations: k-means iterations (cells only have to be neighbourhoods, not optimal).
        seed: seed of the training sample and the initial centroids.

    Example::

        >>> search = IVFSearch(nprobe=8)
        >>> sims, idx = search(F.normalize(torch.randn(500_000, 128), dim=1), k=4)
    """

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = 4,
        train_per_cell: int = 40,
        kmeans_iterations: int = 5,
        seed: int = 0,
    ) -> None:
        if nlist is not None:
            check_positive_int("nlist", nlist)
        check_positive_int("nprobe", nprobe)
        check_positive_int("train_per_cell", train_per_cell)
        check_positive_int("kmeans_iterations", kmeans_iterations)
        check_non_negative_int("seed", seed)
        self.nlist, self.nprobe = nlist, nprobe
        self.train_per_cell, self.kmeans_iterations, self.seed = train_per_cell, kmeans_iterations, seed

    def cells(self, num_rows: int) -> int:
        """The number of cells used for ``num_rows`` rows."""
        wanted = self.nlist or 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_rows))))
        return max(1, min(wanted, num_rows // 39))

    def _search(self, x: torch.Tensor, k: int, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, nlist = x.shape[0], self.cells(x.shape[0])
        nprobe = min(self.nprobe, nlist)
        centroids = self.train(x, nlist)
        probed = nearest_centroids(x, centroids, nprobe)
        found_sims, found_ids = self._join(x, probed, nlist, min(k, n), groups)
        # each query's best k over the cells it probed
        found_sims = found_sims.view(n, -1)
        sims, best = found_sims.topk(min(k, found_sims.shape[1]), dim=1)
        ids = found_ids.view(n, -1).gather(1, best)
        ids[sims == -math.inf] = -1
        if sims.shape[1] < k:
            sims = F.pad(sims, (0, k - sims.shape[1]), value=-math.inf)
            ids = F.pad(ids, (0, k - ids.shape[1]), value=-1)
        return sims, ids

    def train(self, x: torch.Tensor, nlist: int) -> torch.Tensor:
        """Spherical k-means on ``train_per_cell * nlist`` random rows: (nlist, D) unit centroids."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        sample = x[torch.randperm(x.shape[0], generator=gen)[: self.train_per_cell * nlist].to(x.device)]
        centroids = sample[:nlist].clone()
        for _ in range(self.kmeans_iterations):
            nearest = nearest_centroids(sample, centroids, 1).squeeze(1)
            sums = torch.zeros_like(centroids).index_add_(0, nearest, sample)
            filled = torch.bincount(nearest, minlength=nlist).unsqueeze(1) > 0
            centroids = torch.where(filled, F.normalize(sums, dim=1), centroids)  # an empty cell keeps its centroid
        return centroids

    @staticmethod
    def _join(
        x: torch.Tensor, probed: torch.Tensor, nlist: int, k: int, groups: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For every (query, probed cell): the ``k`` most similar members of that cell outside the query's group.

        Returns (N * nprobe, k) similarities and row ids, ``-inf`` / ``-1`` where a cell has fewer.
        """
        nprobe = probed.shape[1]
        members = torch.argsort(probed[:, 0], stable=True)  # each row lives in its nearest cell
        member_ends = torch.bincount(probed[:, 0], minlength=nlist).cumsum(0).tolist()
        pairs = torch.argsort(probed.flatten(), stable=True)  # (query, probe) pairs, by cell probed
        pair_ends = torch.bincount(probed.flatten(), minlength=nlist).cumsum(0).tolist()
        sims = x.new_full((probed.numel(), k), -math.inf)
        ids = torch.full((probed.numel(), k), -1, dtype=torch.long, device=x.device)
        label = groups if groups is not None else torch.arange(x.shape[0], device=x.device)
        member_start = pair_start = 0
        for cell in range(nlist):
            inside = members[member_start : member_ends[cell]]
            scanning = pairs[pair_start : pair_ends[cell]]
            member_start, pair_start = member_ends[cell], pair_ends[cell]
            if inside.numel() == 0 or scanning.numel() == 0:
                continue
            queries = scanning // nprobe
            block = x[queries] @ x[inside].T
            block.masked_fill_(label[queries].unsqueeze(1) == label[inside].unsqueeze(0), -math.inf)
            take = min(k, inside.numel())
            values, found = block.topk(take, dim=1)
            sims[scanning, :take] = values
            ids[scanning, :take] = inside[found]
        return sims, ids

    def __repr__(self) -> str:
        return f"IVFSearch(nlist={self.nlist}, nprobe={self.nprobe})"


def nearest_centroids(x: torch.Tensor, centroids: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` centroids most similar to each row, most similar first: (N, count) indices.

    On CPU with faiss installed, faiss's flat index does it: its BLAS with a fused top-k took half
    the time of torch's product alone on this project's AMD machine (MKL's slower path there).
    """
    if x.device.type == "cpu" and faiss_available():
        faiss = _import_faiss()
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids.numpy())
        return torch.from_numpy(_numpy_search(index)(x.numpy(), count)[1])
    return torch.cat([(x[s : s + _BLOCK_ROWS] @ centroids.T).topk(count, dim=1).indices
                      for s in range(0, x.shape[0], _BLOCK_ROWS)])


def make_search(
    backend: str | NeighbourSearch,
    num_entries: int,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    faiss_threshold: int = 200_000,
) -> NeighbourSearch:
    """The backend object for a name (an instance is returned as is).

    ``"auto"`` on a GPU is :class:`TorchSearch` (exact, and fast at any size this library targets).
    On the CPU it is :class:`IVFSearch` from ``faiss_threshold`` rows on (approximate), and below
    that the exact :class:`FaissFlatSearch` when faiss is installed (it searched 1.8-2.3x faster
    than :class:`TorchSearch` from N = 10,000 to 60,000 on this project's CPU), else :class:`TorchSearch`.
    """
    if isinstance(backend, NeighbourSearch):
        return backend
    if backend == "auto":
        if torch.device(device).type != "cpu":
            backend = "torch"
        elif num_entries >= faiss_threshold:
            backend = "ivf"
        else:
            backend = "faiss-flat" if faiss_available() else "torch"
    if backend == "torch":
        return TorchSearch(chunk_size)
    if backend == "ivf":
        return IVFSearch()
    if backend == "faiss-flat":
        return FaissFlatSearch()
    if backend == "faiss-ivf":
        return FaissIVFSearch()
    if backend == "faiss-hnsw":
        return FaissHNSWSearch()
    raise ValueError(f"backend must be one of {BACKENDS} or a NeighbourSearch instance, got {backend!r}")


def check_backend(backend: str | NeighbourSearch) -> None:
    """Raise now, not at the first search, for an unknown backend or a faiss backend without faiss."""
    if isinstance(backend, NeighbourSearch):
        return
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a NeighbourSearch instance, got {backend!r}")
    if backend.startswith("faiss") and not faiss_available():
        raise ImportError(f"backend {backend!r} needs faiss, which is not installed; {FAISS_HINT}")


def nearest_neighbours(
    features: torch.Tensor,
    k: int = 1,
    groups: torch.Tensor | None = None,
    backend: str | NeighbourSearch = "auto",
    chunk_size: int | None = None,
    faiss_threshold: int = 200_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` most similar other rows of every row, skipping rows of its own group.

    Similarity is the dot product, the cosine for unit rows. Row ``j`` is admissible for row ``i``
    when ``j != i`` and ``groups[j] != groups[i]``.

    Args:
        features: the rows, unit vectors.
        k: neighbours per row.
        groups: optional group id per row; rows sharing an id are never each other's neighbours.
        backend: ``"auto"``, ``"torch"``, ``"ivf"``, ``"faiss-flat"``, ``"faiss-ivf"``, ``"faiss-hnsw"``
            or a configured :class:`NeighbourSearch` (e.g. ``IVFSearch(nprobe=16)``).
        chunk_size: query rows per block of the torch backend.
        faiss_threshold: from this many rows on, ``"auto"`` uses :class:`IVFSearch` on CPU.

    Returns:
        ``(similarities, indices)``, (N, k) each, most similar first; ``-inf`` / ``-1`` where a row
        has fewer than ``k`` admissible neighbours.

    Shape:
        - features: (N, D); groups: (N,)
        - output: (N, k), (N, k)

    Example::

        >>> x = F.normalize(torch.randn(5000, 128), dim=1)
        >>> sims, idx = nearest_neighbours(x, k=1, backend="torch")
    """
    check_backend(backend)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    search = make_search(backend, features.shape[0], features.device, chunk_size, faiss_threshold)
    return search(features, k, groups)
