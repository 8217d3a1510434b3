"""ssl_memory.evaluation against brute-force references written as plain loops."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_memory import MemoryBank
from ssl_memory.evaluation import knn_accuracy, knn_predict
from ssl_memory.retrieval import RetrievalCalculator, retrieval_metrics


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def brute_knn_scores(query, gallery, labels, k, temperature, num_classes):
    scores = []
    for q in query.tolist():
        sims = sorted(((cosine(q, g), int(y)) for g, y in zip(gallery.tolist(), labels)), reverse=True)[:k]
        row = [0.0] * num_classes
        for s, y in sims:
            row[y] += math.exp((s - sims[0][0]) / temperature)  # NPID's weights over exp(s_max / T), documented
        scores.append(row)
    return torch.tensor(scores)


def brute_retrieval(query, query_labels, reference, reference_labels, ks, self_excluded):
    """Recall@K, precision@1 and MAP@R (Musgrave et al.) by sorting every reference for every query."""
    recalls, p1, aps = {k: [] for k in ks}, [], []
    for i, q in enumerate(query.tolist()):
        ranked = []
        for j, r in enumerate(reference.tolist()):
            if self_excluded and i == j:
                continue
            ranked.append((cosine(q, r), int(reference_labels[j])))
        ranked.sort(reverse=True)
        hits = [int(y == int(query_labels[i])) for _, y in ranked]
        r_count = sum(hits)
        if r_count == 0:
            continue  # a query with no relevant reference is left out, as PML does
        for k in ks:
            recalls[k].append(float(any(hits[:k])))
        p1.append(float(hits[0]))
        precision_sum, found = 0.0, 0
        for rank, hit in enumerate(hits[:r_count], start=1):
            if hit:
                found += 1
                precision_sum += found / rank
        aps.append(precision_sum / r_count)
    if not p1:
        return None
    mean = lambda v: sum(v) / len(v)
    out = {f"recall@{k}": mean(v) for k, v in recalls.items()}
    out["precision@1"] = mean(p1)
    out["map@r"] = mean(aps)
    return out


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    q=st.integers(1, 12),
    k=st.sampled_from([1, 3, 7, 200]),
    temperature=st.sampled_from([0.07, 0.1, 0.5]),
    chunk=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_knn_predict_matches_brute_force(n, q, k, temperature, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(n, 6, generator=g, dtype=torch.float64)
    query = torch.randn(q, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=g)
    scores = knn_predict(query, gallery, labels, k=k, temperature=temperature, num_classes=4, chunk_size=chunk)
    expected = brute_knn_scores(query, gallery, labels, k, temperature, 4)
    assert scores.shape == (q, 4)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-4)


def test_knn_accuracy_matches_brute_force_and_one_nn():
    g = torch.Generator().manual_seed(0)
    gallery, query = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    labels, query_labels = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    for k in (1, 10, 200):
        expected = brute_knn_scores(query, gallery, labels, k, 0.07, 3).argmax(1)
        accuracy = knn_accuracy(query, query_labels, gallery, labels, k=k)
        assert accuracy == pytest.approx((expected == query_labels).float().mean().item())
    nearest = [max(range(60), key=lambda j: cosine(qr, gallery[j].tolist())) for qr in query.tolist()]
    one_nn = sum(int(labels[j] == y) for j, y in zip(nearest, query_labels)) / 25
    assert knn_accuracy(query, query_labels, gallery, labels, k=1) == pytest.approx(one_nn)


@pytest.mark.parametrize("temperature", [0.005, 0.002])
def test_knn_votes_stay_finite_at_low_temperature(temperature):
    """exp(s / T) overflows float32 below T ~ 0.011; the prediction must still be the heaviest class."""
    g = torch.Generator().manual_seed(3)
    gallery, query = torch.randn(50, 6, generator=g), torch.randn(20, 6, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    scores = knn_predict(query, gallery, labels, k=10, temperature=temperature)
    assert torch.isfinite(scores).all()
    exact = []  # log of the class weights in float64: exp(1 / 0.002) = exp(500) is still finite there
    for q in query.double().tolist():
        sims = sorted(((cosine(q, x), int(y)) for x, y in zip(gallery.double().tolist(), labels)), reverse=True)[:10]
        weights = [0.0] * 4
        for s, y in sims:
            weights[y] += math.exp(s / temperature)
        exact.append(max(range(4), key=lambda c: weights[c]))
    assert scores.argmax(1).tolist() == exact


def test_knn_with_memory_bank_gallery_uses_its_features():
    bank = MemoryBank(30, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(30) % 3
    query = torch.randn(7, 8)
    from_bank = knn_predict(query, bank, labels, k=5)
    from_tensor = knn_predict(query, bank.features.clone(), labels, k=5)
    torch.testing.assert_close(from_bank, from_tensor)
    # a query equal to a bank entry finds it first: 1-NN returns that entry's label
    picked = torch.tensor([4, 11, 29])
    assert knn_accuracy(bank.features[picked] * 3.0, labels[picked], bank, labels, k=1) == 1.0


def test_knn_scale_invariance_and_num_classes():
    g = torch.Generator().manual_seed(2)
    gallery, query = torch.randn(20, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.randint(0, 2, (20,), generator=g)
    a = knn_predict(query, gallery, labels, k=6, num_classes=5)
    b = knn_predict(query * 7.0, gallery * 0.1, labels, k=6, num_classes=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)  # scores reach exp(1/0.07): compare relatively
    assert a.shape == (5, 5) and bool((a[:, 2:] == 0).all())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(5, dtype=torch.long)), ValueError, "dims"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), ValueError,
         "gallery_labels"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5)), TypeError, "integer"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), -torch.ones(5, dtype=torch.long)), ValueError,
         "non-negative"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long), k=0), ValueError,
         "k must"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long), temperature=0.0),
         ValueError, "temperature"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(5, 4), torch.full((5,), 3), num_classes=3), ValueError,
         r"\[0, 3\)"),
        (lambda: knn_predict(torch.randn(3), torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), ValueError, "query"),
        (lambda: knn_predict([[1.0]], torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), TypeError, "query"),
        (lambda: knn_accuracy(torch.randn(3, 4), torch.zeros(2, dtype=torch.long), torch.randn(5, 4),
                              torch.zeros(5, dtype=torch.long)), ValueError, "query_labels"),
        (lambda: retrieval_metrics(torch.randn(1, 4), torch.zeros(1, dtype=torch.long)), ValueError, "reference"),
        (lambda: retrieval_metrics(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), torch.randn(3, 4)), ValueError,
         "together"),
        (lambda: retrieval_metrics(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), recall_ks=()), ValueError,
         "recall_ks"),
        (lambda: retrieval_metrics(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), recall_ks=(0,)), ValueError,
         "recall_ks"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 40), classes=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_retrieval_metrics_match_brute_force_self_retrieval(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    expected = brute_retrieval(x, y, x, y, (1, 2, 4, 8), self_excluded=True)
    if expected is None:  # every class has a single sample: nothing to retrieve
        return
    got = retrieval_metrics(x, y, chunk_size=7)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_retrieval_metrics_with_separate_reference():
    g = torch.Generator().manual_seed(3)
    query, reference = torch.randn(15, 4, generator=g), torch.randn(30, 4, generator=g)
    query_labels, reference_labels = torch.randint(0, 3, (15,), generator=g), torch.randint(0, 3, (30,), generator=g)
    expected = brute_retrieval(query, query_labels, reference, reference_labels, (1, 2, 4, 8), self_excluded=False)
    got = retrieval_metrics(query, query_labels, reference, reference_labels)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_retrieval_without_map_at_r_is_the_same_recall():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 4, (50,), generator=g)
    full, cheap = retrieval_metrics(x, y), retrieval_metrics(x, y, map_at_r=False)
    assert "map@r" not in cheap
    for key, value in cheap.items():
        assert full[key] == pytest.approx(value)


def test_recall_at_k_beyond_the_class_size():
    # two samples a class: PML's "max_bin_count" would search 1 neighbour; Recall@8 needs 8
    x = F.normalize(torch.randn(20, 3, generator=torch.Generator().manual_seed(5)), dim=1)
    y = torch.arange(20) // 2
    expected = brute_retrieval(x, y, x, y, (1, 8), self_excluded=True)
    got = retrieval_metrics(x, y, recall_ks=(1, 8))
    assert got["recall@8"] == pytest.approx(expected["recall@8"])
    assert got["recall@1"] == pytest.approx(expected["recall@1"])


def test_retrieval_calculator_is_a_pml_accuracy_calculator():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = RetrievalCalculator(recall_ks=(1, 2), include=("recall_at_k",), k=2,
                               knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    result = calc.get_accuracy(x, torch.tensor([0, 0, 1, 1]))
    assert result["recall_at_k"] == {1: 1.0, 2: 1.0}
    result = calc.get_accuracy(x, torch.tensor([0, 1, 0, 1]))
    assert result["recall_at_k"][1] == 0.0


def test_non_finite_embeddings_are_refused_by_name():
    gallery, labels = torch.randn(10, 4), torch.arange(10) % 2
    query, query_labels = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    bad = gallery.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"gallery must be finite.*row 7"):
        knn_accuracy(query, query_labels, bad, labels)
    bad_query = query.clone()
    bad_query[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"query must be finite.*row 2"):
        knn_predict(bad_query, gallery, labels)
    with pytest.raises(ValueError, match=r"query must be finite.*row 2"):
        retrieval_metrics(bad_query, query_labels)
    with pytest.raises(ValueError, match=r"reference must be finite.*row 7"):
        retrieval_metrics(query, query_labels, bad, labels)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_label_dtype(dtype):
    g = torch.Generator().manual_seed(4)
    gallery, query = torch.randn(30, 5, generator=g), torch.randn(9, 5, generator=g)
    labels, query_labels = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (9,), generator=g)
    expected = knn_accuracy(query, query_labels, gallery, labels, k=5)
    assert knn_accuracy(query, query_labels.to(dtype), gallery, labels.to(dtype), k=5) == expected
    torch.testing.assert_close(knn_predict(query, gallery, labels.to(dtype), k=5), knn_predict(query, gallery, labels, k=5))
    assert retrieval_metrics(query, query_labels.to(dtype)) == retrieval_metrics(query, query_labels)


def test_huge_label_ids_are_remapped_not_tabled():
    """A class id of 3e9 would need a (Q, 3e9) vote table; the accuracy only needs the distinct ids."""
    g = torch.Generator().manual_seed(5)
    gallery, query = torch.randn(30, 5, generator=g), torch.randn(9, 5, generator=g)
    labels, query_labels = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (9,), generator=g)
    ids = torch.tensor([7, 3_000_000_000, 12])  # not in the order of the small ids: ties must follow the real ids
    expected = (brute_knn_scores(query, gallery, labels, 5, 0.07, 3)[:, ids.argsort()].argmax(1))
    expected = ids.sort().values[expected]
    accuracy = knn_accuracy(query, ids[query_labels], gallery, ids[labels], k=5)
    assert accuracy == pytest.approx((expected == ids[query_labels]).float().mean().item())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: knn_accuracy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(0, 4),
                              torch.zeros(0, dtype=torch.long)), "gallery must hold at least one"),
        (lambda: knn_predict(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
         "gallery must hold at least one"),
        (lambda: retrieval_metrics(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), torch.randn(5, 4),
                                   torch.zeros(5, dtype=torch.long)), "query must hold at least one"),
        (lambda: retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(0, 4),
                                   torch.zeros(0, dtype=torch.long)), "reference"),
    ],
)
def test_empty_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_package_imports_pml_only_when_the_retrieval_metrics_are_used():
    code = (
        "import sys, ssl_memory\n"
        "assert 'pytorch_metric_learning' not in sys.modules, 'imported at import'\n"
        "from ssl_memory import RetrievalCalculator, retrieval_metrics\n"
        "from ssl_memory import retrieval\n"
        "assert (RetrievalCalculator, retrieval_metrics) == (retrieval.RetrievalCalculator, retrieval.retrieval_metrics)\n"
        "assert set(ssl_memory.__all__) - set(dir(ssl_memory)) <= {'RetrievalCalculator', 'retrieval_metrics'}\n"
        "try:\n"
        "    ssl_memory.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["RetrievalCalculator", "retrieval_metrics"])
def test_the_old_path_of_the_retrieval_metrics_still_works_with_a_deprecation_warning(name):
    import ssl_memory.evaluation as evaluation
    import ssl_memory.retrieval as retrieval

    with pytest.warns(DeprecationWarning, match=f"ssl_memory.evaluation.{name} moved to ssl_memory.retrieval"):
        assert getattr(evaluation, name) is getattr(retrieval, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = evaluation.no_such_name
