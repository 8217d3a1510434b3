"""Every search backend against a plain Python loop over all pairs, on small inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_memory import neighbours
from ssl_memory.neighbours import (
    FaissFlatSearch,
    FaissHNSWSearch,
    FaissIVFSearch,
    IVFSearch,
    TorchSearch,
    make_search,
    nearest_neighbours,
)

needs_faiss = pytest.mark.skipif(not neighbours.faiss_available(), reason="faiss is not installed")


def reference(features, k, groups=None):
    """The k most similar admissible rows of each row, by a Python loop; padded with (-inf, -1)."""
    n = features.shape[0]
    sims = features.double() @ features.double().T
    out_sims, out_ids = [], []
    for i in range(n):
        admissible = [j for j in range(n) if j != i and (groups is None or groups[j] != groups[i])]
        best = sorted(admissible, key=lambda j: -float(sims[i, j]))[:k]
        out_ids.append(best + [-1] * (k - len(best)))
        out_sims.append([float(sims[i, j]) for j in best] + [-math.inf] * (k - len(best)))
    return torch.tensor(out_sims), torch.tensor(out_ids)


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# Approximate backends made exhaustive on small inputs (every cell probed, a wide graph search).
BACKENDS = {
    "torch": lambda: TorchSearch(),
    "torch-chunk-7": lambda: TorchSearch(chunk_size=7),
    "ivf": lambda: IVFSearch(nlist=4, nprobe=4),
    "faiss-flat": lambda: FaissFlatSearch(),
    "faiss-ivf": lambda: FaissIVFSearch(nlist=4, nprobe=4),
    "faiss-hnsw": lambda: FaissHNSWSearch(m=16, ef_construction=200, ef_search=400),
}
ALL = [pytest.param(name, marks=needs_faiss) if name.startswith("faiss") else name for name in BACKENDS]


def assert_matches(result, expected):
    sims, ids = result
    ref_sims, ref_ids = expected
    assert sims.dtype == torch.float32 and ids.dtype == torch.long
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(sims, ref_sims.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k", [1, 3])
def test_backend_matches_brute_force_without_groups(backend, k):
    x = unit(200, 8, seed=k)
    assert_matches(BACKENDS[backend]()(x, k), reference(x, k))


@pytest.mark.parametrize("backend", ALL)
def test_backend_skips_own_group_small_and_large(backend):
    """Groups of 2-5 members and one of 90 (above the faiss backends' 64, searched through an ID selector)."""
    x = unit(300, 8, seed=1)
    groups = torch.arange(300)
    groups[:90] = 5
    groups[100:200] = 100 + torch.randint(0, 30, (100,), generator=torch.Generator().manual_seed(2))
    assert_matches(BACKENDS[backend]()(x, 2, groups), reference(x, 2, groups))


@pytest.mark.parametrize("backend", ALL)
def test_rows_with_too_few_admissible_neighbours_are_padded(backend):
    """Six rows in two groups of three: each row has exactly three admissible rows."""
    x = unit(6, 4, seed=3)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    sims, ids = BACKENDS[backend]()(x, 5, groups)
    assert_matches((sims, ids), reference(x, 5, groups))
    assert (ids[:, 3:] == -1).all() and (sims[:, 3:] == -math.inf).all()


@pytest.mark.parametrize("backend", ["torch", "ivf", pytest.param("faiss-flat", marks=needs_faiss)])
def test_single_row_and_all_one_group_have_no_neighbours(backend):
    for x, groups in ((unit(1, 4, 0), None), (unit(5, 4, 0), torch.zeros(5, dtype=torch.long))):
        sims, ids = BACKENDS[backend]()(x, 2, groups)
        assert (ids == -1).all() and (sims == -math.inf).all()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    d=st.integers(1, 6),
    k=st.integers(1, 4),
    num_groups=st.integers(1, 40),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_torch_search_matches_brute_force(n, d, k, num_groups, chunk, seed):
    x = unit(n, d, seed)
    groups = torch.randint(0, num_groups, (n,), generator=torch.Generator().manual_seed(seed + 1))
    expected = reference(x, k, groups)
    sims, ids = TorchSearch(chunk_size=chunk)(x, k, groups)
    # Ties between equal similarities may be broken either way: compare similarities, and the
    # indices only where the similarity is unique in the row.
    torch.testing.assert_close(sims, expected[0].float(), rtol=0, atol=1e-5)
    picked = (x.double() @ x.double().T).gather(1, ids.clamp(min=0))
    torch.testing.assert_close(picked[ids >= 0].float(), sims[ids >= 0], rtol=0, atol=1e-5)
    assert torch.equal(ids == -1, expected[1] == -1)
    assert not (groups[ids.clamp(min=0)] == groups.unsqueeze(1))[ids >= 0].any()


def test_low_precision_rows_are_searched_in_float32():
    x = unit(50, 8, seed=4).to(torch.bfloat16)
    assert_matches(TorchSearch()(x, 2), reference(x.float(), 2))


def test_dense_exclusion_path_for_huge_groups():
    """Most rows in one group: the torch backend compares ids densely instead of listing members."""
    x = unit(120, 6, seed=5)
    groups = torch.zeros(120, dtype=torch.long)
    groups[100:] = torch.arange(1, 21)
    assert_matches(TorchSearch(chunk_size=10)(x, 2, groups), reference(x, 2, groups))


@needs_faiss
def test_auto_searches_exactly_with_faiss_below_the_threshold_and_with_ivf_from_it(monkeypatch):
    assert isinstance(make_search("auto", 1000, "cpu", faiss_threshold=2000), FaissFlatSearch)
    assert isinstance(make_search("auto", 2000, "cpu", faiss_threshold=2000), IVFSearch)
    assert isinstance(make_search("auto", 2000, "meta", faiss_threshold=2000), TorchSearch)  # not the CPU
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    assert isinstance(make_search("auto", 1000, "cpu", faiss_threshold=2000), TorchSearch)
    assert isinstance(make_search("auto", 2000, "cpu", faiss_threshold=2000), IVFSearch)


def test_ivf_without_faiss_gives_the_same_neighbours(monkeypatch):
    """Its cells come from faiss's flat index when installed, from torch products otherwise."""
    x = unit(300, 8, seed=4)
    groups = torch.arange(300) // 3
    with_faiss = IVFSearch(nlist=6, nprobe=6)(x, 3, groups)
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    assert_matches(IVFSearch(nlist=6, nprobe=6)(x, 3, groups), with_faiss)
    assert_matches(with_faiss, reference(x, 3, groups))


def test_ivf_probing_a_few_cells_finds_the_neighbour_of_clustered_rows():
    """Rows in 40 tight clusters, 64 cells, 4 probed: each row's true nearest neighbour is found."""
    gen = torch.Generator().manual_seed(9)
    centres = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    x = F.normalize(centres.repeat_interleave(100, 0) + 0.05 * torch.randn(4000, 16, generator=gen), dim=1)
    sims, ids = IVFSearch(nlist=64, nprobe=4)(x, 1)
    exact = TorchSearch()(x, 1)
    assert (ids == exact[1]).float().mean() >= 0.99
    torch.testing.assert_close(sims, exact[0])  # wherever it differs, it found an equally similar row


@needs_faiss
def test_configured_backend_instance_is_used_as_given():
    search = FaissIVFSearch(nlist=2, nprobe=2)
    assert make_search(search, 10) is search
    x = unit(100, 4, seed=6)
    assert_matches(nearest_neighbours(x, 2, backend=search), reference(x, 2))


@needs_faiss
def test_ivf_cells_follow_the_size_rule():
    search = FaissIVFSearch()
    assert search.cells(1_281_167) == 4096
    assert search.cells(100_000) == 1024
    assert search.cells(100) == 2  # at least 39 training rows per cell
    assert FaissIVFSearch(nlist=7).cells(10_000) == 7


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_missing_faiss_raises_an_import_error_naming_the_extra(monkeypatch, backend):
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match=r"ssl_memory\[faiss\]"):
        nearest_neighbours(unit(10, 4, 0), backend=backend)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match="faiss-cpu"):
        FaissFlatSearch()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: nearest_neighbours(unit(5, 3, 0), backend="annoy"), ValueError, "backend must be one of"),
        (lambda: nearest_neighbours([[1.0, 0.0]]), TypeError, "features must be a torch.Tensor"),
        (lambda: nearest_neighbours(torch.ones(5)), ValueError, r"2-D floating-point tensor, got shape \(5,\)"),
        (lambda: nearest_neighbours(torch.ones(5, 2, dtype=torch.long)), ValueError, "dtype torch.int64"),
        (lambda: nearest_neighbours(unit(5, 3, 0), k=0), ValueError, "k must be a positive int, got 0"),
        (lambda: nearest_neighbours(torch.full((4, 2), math.nan)), ValueError, "NaN or infinite"),
        (lambda: nearest_neighbours(unit(5, 3, 0), groups=torch.zeros(4, dtype=torch.long)), ValueError, r"groups must have shape \(5,\)"),
        (lambda: nearest_neighbours(unit(5, 3, 0), groups=torch.zeros(5)), TypeError, "groups must be an integer tensor"),
        (lambda: TorchSearch(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (lambda: FaissIVFSearch(nprobe=0), ValueError, "nprobe must be a positive int"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_faiss_group_exclusion_survives_faiss_torch_contrib():
    # PML imports faiss.contrib.torch_utils, which wraps Index.search and drops its params= argument
    pytest.importorskip("faiss")
    import faiss.contrib.torch_utils  # noqa: F401

    from ssl_memory.neighbours import _SMALL_GROUP, nearest_neighbours

    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(3 * _SMALL_GROUP, 8, generator=gen), dim=1)
    groups = torch.arange(features.shape[0])
    groups[: 2 * _SMALL_GROUP] = 0  # one large group: the per-group exclusion path
    sims, ids = nearest_neighbours(features, k=1, groups=groups, backend="faiss-flat")
    expected, _ = nearest_neighbours(features, k=1, groups=groups, backend="torch")
    assert (groups[ids[:, 0]] != groups).all()
    torch.testing.assert_close(sims, expected)
