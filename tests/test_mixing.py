import pytest
import torch
import torch.nn.functional as F

from ssl_memory import HardNegativeMixer, QueueLoss


def disjoint_setup(num_queries=4, per_query=4, extra=8):
    """Query b is the mean of basis vectors S_b (disjoint sets); the negatives are all basis vectors.

    Its hardest negatives are exactly S_b (similarity 1/2, every other basis vector 0), so anything
    mixed from its own hardest negatives is supported on S_b only.
    """
    dim = num_queries * per_query + extra
    negatives = torch.eye(dim)[torch.randperm(dim, generator=torch.Generator().manual_seed(0))]
    sets = [list(range(b * per_query, (b + 1) * per_query)) for b in range(num_queries)]
    query = torch.zeros(num_queries, dim)
    for b, s in enumerate(sets):
        query[b, s] = 1.0
    return F.normalize(query, dim=1), negatives, sets


def test_each_query_mixes_only_its_own_hardest_negatives():
    query, negatives, sets = disjoint_setup()
    mixer = HardNegativeMixer(num_hard=4, num_mix=50, num_query_mix=30, generator=torch.Generator().manual_seed(1))
    mixes = mixer(query, negatives)
    assert mixes.shape == (4, 80, query.shape[1])
    for b, s in enumerate(sets):
        outside = [c for c in range(query.shape[1]) if c not in s]
        assert mixes[b][:, outside].abs().max() < 1e-6, f"query {b} mixed negatives that are not its own"
        pair = mixes[b, :50, s]
        # i != j: each pair mix has exactly two positive coordinates
        assert ((pair > 1e-6).sum(1) == 2).all()
        assert (pair > -1e-6).all()


def test_query_mixes_weight_the_query_below_one_half():
    query, negatives, sets = disjoint_setup(num_queries=2)
    mixer = HardNegativeMixer(num_hard=4, num_mix=0, num_query_mix=2000, generator=torch.Generator().manual_seed(2))
    mixes = mixer(query, negatives)
    for b, s in enumerate(sets):
        coords = mixes[b][:, s]  # b q + (1 - b) n_j: the n_j coordinate stands out, the other three are equal
        top, rest = coords.max(1).values, coords.min(1).values
        # with q = (1/2, 1/2, 1/2, 1/2) on S_b: ratio r = top / rest = (1 - b/2) / (b/2), so b = 2 / (r + 1)
        weight = 2 / (top / rest + 1)
        assert (weight > 0).all() and (weight <= 0.5 + 1e-6).all()
        assert abs(float(weight.mean()) - 0.25) < 0.02  # U(0, 1/2)


def test_outputs_are_unit_vectors_without_gradient_and_harder_than_random():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(16, 32, generator=gen, requires_grad=True)
    negatives = F.normalize(torch.randn(2000, 32, generator=gen), dim=1)
    mixes = HardNegativeMixer(num_hard=64, num_mix=32, num_query_mix=16, generator=gen)(query, negatives)
    assert not mixes.requires_grad and mixes.grad_fn is None
    torch.testing.assert_close(mixes.norm(dim=2), torch.ones(16, 48))
    q = F.normalize(query.detach(), dim=1)
    mixed_similarity = torch.einsum("bd,bmd->bm", q, mixes)
    random_rows = negatives[torch.randint(0, 2000, (16, 48), generator=gen)]
    random_similarity = torch.einsum("bd,bmd->bm", q, random_rows)
    assert (mixed_similarity.mean(1) > random_similarity.mean(1)).all()
    assert (mixed_similarity[:, 32:].mean(1) > mixed_similarity[:, :32].mean(1)).all()  # query mixes are harder still


def test_given_logits_and_generator_reproduce_the_draws():
    gen = torch.Generator().manual_seed(4)
    query = F.normalize(torch.randn(5, 8, generator=gen), dim=1)
    negatives = F.normalize(torch.randn(100, 8, generator=gen), dim=1)
    first = HardNegativeMixer(10, 7, 3, generator=torch.Generator().manual_seed(5))(query, negatives)
    again = HardNegativeMixer(10, 7, 3, generator=torch.Generator().manual_seed(5))(
        query, negatives, logits=query @ negatives.T / 0.2
    )
    other = HardNegativeMixer(10, 7, 3, generator=torch.Generator().manual_seed(6))(query, negatives)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_fewer_negatives_than_num_hard_uses_what_there_is():
    query, negatives, _ = disjoint_setup(num_queries=1, per_query=2, extra=1)  # 3 negatives
    mixes = HardNegativeMixer(num_hard=1024, num_mix=40, num_query_mix=10, generator=torch.Generator().manual_seed(7))(
        query, negatives
    )
    assert torch.isfinite(mixes).all()
    torch.testing.assert_close(mixes.norm(dim=2), torch.ones(1, 50))
    # with all three as candidates, the third basis vector (similarity 0) takes part in some pair mixes
    assert (mixes[0, :40].abs() > 1e-6).sum(1).eq(2).all()


def test_one_negative_gives_it_back_and_none_gives_zeros():
    query = F.normalize(torch.randn(3, 4), dim=1)
    single = F.normalize(torch.randn(1, 4), dim=1)
    mixes = HardNegativeMixer(8, 5, 2)(query, single)
    torch.testing.assert_close(mixes[:, :5], single.expand(3, 5, 4))
    torch.testing.assert_close(mixes.norm(dim=2), torch.ones(3, 7))
    assert torch.equal(HardNegativeMixer(8, 5, 2)(query, torch.zeros(0, 4)), torch.zeros(3, 7, 4))


def test_masked_entries_are_never_mixed():
    query, negatives, sets = disjoint_setup(num_queries=2)
    logits = query @ negatives.T
    own = negatives[:, sets[0][0]].bool()  # mask query 0's first hardest negative
    logits[0, own] = float("-inf")
    logits[1] = float("-inf")  # query 1 has no negative at all
    mixes = HardNegativeMixer(4, 200, 50, generator=torch.Generator().manual_seed(8))(query, negatives, logits)
    assert mixes[0, :200, sets[0][0]].abs().max() < 1e-6  # pair mixes never use the masked entry
    assert torch.equal(mixes[1], torch.zeros(250, query.shape[1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_hard": 0}, "num_hard"),
        ({"num_mix": -1}, "num_mix"),
        ({"num_query_mix": 1.5}, "num_query_mix"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardNegativeMixer(**kwargs)
    with pytest.raises(TypeError, match="generator"):
        HardNegativeMixer(generator=0)


def test_bad_inputs():
    mixer = HardNegativeMixer(4, 2, 2)
    with pytest.raises(ValueError, match=r"negatives must have shape \(M, 8\), got \(10, 7\)"):
        mixer(torch.randn(3, 8), torch.randn(10, 7))
    with pytest.raises(ValueError, match=r"logits must have shape \(3, 10\), got \(3, 9\)"):
        mixer(torch.randn(3, 8), torch.randn(10, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"logits must have shape \(3, 10\), got \(2, 10\)"):
        mixer(torch.randn(3, 8), torch.randn(10, 8), torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"query must have shape \(B, D\)"):
        mixer(torch.randn(8), torch.randn(10, 8))


def test_similarities_equal_the_mixes_dotted_with_the_query_values_and_gradients():
    gen = torch.Generator().manual_seed(11)
    negatives = F.normalize(torch.randn(40, 6, generator=gen, dtype=torch.float64), dim=1)
    query = (torch.randn(5, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    reference = query.detach().clone().requires_grad_()
    logits = query @ negatives.T
    logits = logits.masked_fill(torch.arange(40) < torch.arange(5).unsqueeze(1) * 3, float("-inf"))  # own samples
    closed = HardNegativeMixer(7, 9, 4, generator=torch.Generator().manual_seed(3)).similarities(query, negatives, logits)
    mixes = HardNegativeMixer(7, 9, 4, generator=torch.Generator().manual_seed(3))(query, negatives, logits)
    direct = (mixes @ reference.unsqueeze(2)).squeeze(2)
    weights = torch.randn(direct.shape, generator=gen, dtype=torch.float64)
    (closed * weights).sum().backward()
    (direct * weights).sum().backward()
    torch.testing.assert_close(closed, direct)
    torch.testing.assert_close(query.grad, reference.grad)


@pytest.mark.parametrize("num_hard, num_mix", [(12, 10), (12, 80), (30, 45)])  # subset pairs; i.i.d. fallback; r=10
def test_similarities_equal_a_plain_loop_over_the_same_draws_from_each_querys_own_negatives(num_hard, num_mix):
    gen = torch.Generator().manual_seed(12)
    num_queries, num_entries, dim, num_query_mix = 6, 50, 8, 7
    negatives = F.normalize(torch.randn(num_entries, dim, generator=gen), dim=1)
    query = (torch.randn(num_queries, dim, generator=gen) * 4).requires_grad_()
    own = torch.randint(0, num_entries, (num_queries,), generator=gen)
    logits = (query @ negatives.T).masked_fill(torch.arange(num_entries) == own.unsqueeze(1), float("-inf"))
    logits = logits.masked_fill((torch.arange(num_entries) < 45) & (torch.arange(num_queries) == 5).unsqueeze(1),
                                float("-inf"))  # query 5 has only 4 or 5 negatives: fewer than the subset
    mixer = HardNegativeMixer(num_hard, num_mix, num_query_mix, generator=torch.Generator().manual_seed(4))
    closed = mixer.similarities(query, negatives, logits)
    mixer.generator.manual_seed(4)
    plan = mixer._draw(query, negatives, logits)

    reference = query.detach().clone().requires_grad_()
    expected = []
    for b in range(num_queries):
        candidates = [c for c in range(num_entries) if c != own[b] and (b != 5 or c >= 45)]
        candidates.sort(key=lambda c: -float(logits[b, c].detach()))
        hardest = set(candidates[:num_hard])
        row = []
        for t in range(num_mix):
            i, j, a = int(plan["i"][b, t]), int(plan["j"][b, t]), float(plan["a"][b, t])
            assert i in hardest and j in hardest and i != j, (b, t, i, j)
            mix = a * negatives[i] + (1 - a) * negatives[j]
            row.append(reference[b] @ (mix / mix.norm()))
        unit = reference[b].detach() / reference[b].detach().norm()
        for t in range(num_query_mix):
            m, w = int(plan["m"][b, t]), float(plan["b"][b, t])
            assert m in hardest and 0 <= w <= 0.5
            mix = w * unit + (1 - w) * negatives[m]
            row.append(reference[b] @ (mix / mix.norm()))
        expected.append(torch.stack(row))
    expected = torch.stack(expected)
    weights = torch.randn(expected.shape, generator=gen)
    (closed * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(closed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(query.grad, reference.grad, atol=1e-5, rtol=1e-5)
    if num_mix <= num_hard * (num_hard - 1) // 2:  # a subset holds num_mix pairs: a query's pairs are distinct
        pairs = (plan["p"] * plan["subset"].shape[1] + plan["q"])[:5].sort(1).values  # query 5 has too few
        assert (pairs[:, 1:] != pairs[:, :-1]).all()


def test_each_pair_mix_is_a_uniform_pair_of_distinct_hardest_entries():
    gen = torch.Generator().manual_seed(13)
    negatives = F.normalize(torch.randn(30, 5, generator=gen), dim=1)
    query = negatives[:1].expand(6000, 5) + 0.0
    logits = query @ negatives.T
    hardest = logits[0].topk(9).indices  # entry 0 itself is among them: a query may mix any entry
    mixer = HardNegativeMixer(9, 3, 0, generator=torch.Generator().manual_seed(5))  # subsets of 3 out of 9
    plan = mixer._draw(query, negatives, logits)
    i, j = plan["i"].flatten(), plan["j"].flatten()
    assert torch.isin(i, hardest).all() and torch.isin(j, hardest).all() and (i != j).all()
    counts = torch.zeros(30, 30).index_put_((torch.minimum(i, j), torch.maximum(i, j)), torch.ones(i.numel()),
                                            accumulate=True)
    counts = counts[counts > 0]
    assert counts.numel() == 36  # every distinct pair of the 9
    expected = i.numel() / 36  # 500
    assert (counts - expected).abs().max() < 0.2 * expected


@pytest.mark.parametrize("masked", [0, 3, 7])
def test_each_query_mix_takes_a_uniform_negative_among_the_available_hardest(masked):
    """`top` is unordered, so masked slots may sit anywhere in it: draws must still be uniform over the rest."""
    gen = torch.Generator().manual_seed(17)
    negatives = F.normalize(torch.randn(12, 5, generator=gen), dim=1)
    query = negatives[:1].expand(4000, 5) + 0.0
    logits = query @ negatives.T
    logits[:, logits[0].topk(masked).indices] = float("-inf")  # the hardest `masked` entries are not negatives
    available = logits[0].isfinite().nonzero().flatten()
    hardest = available[logits[0, available].topk(min(8, len(available))).indices]
    plan = HardNegativeMixer(8, 3, 5, generator=torch.Generator().manual_seed(3))._draw(query, negatives, logits)
    m = plan["m"].flatten()
    assert torch.isin(m, hardest).all()
    counts = torch.bincount(m, minlength=12)[hardest].float()
    expected = m.numel() / len(hardest)
    assert (counts - expected).abs().max() < 0.08 * expected


def test_a_generator_on_another_device_than_the_queries_is_refused_naming_both():
    """torch draws on the queries' device; a generator elsewhere is named before anything is drawn ("meta" stands
    for an accelerator here, where torch would itself accept the CPU generator)."""
    mixer = HardNegativeMixer(4, 2, 1, generator=torch.Generator())
    query, negatives = torch.randn(3, 8, device="meta"), torch.randn(10, 8, device="meta")
    with pytest.raises(ValueError, match=r"generator is on cpu but the queries are on meta.*Generator\(device='meta'\)"):
        mixer(query, negatives)
    HardNegativeMixer(4, 2, 1)(query, negatives)  # without a generator torch's default one for the device draws


def test_the_queue_loss_refuses_its_mixers_generator_on_another_device_in_its_checks():
    """Raised by QueueLoss's input checks, whose verdict every rank shares (tests/test_distributed.py) before anything
    is read or written: on "meta" the queue cannot even be read, so an error from the mixer's draw would be torch's."""
    criterion = QueueLoss(size=8, dim=4, mixer=HardNegativeMixer(4, 2, 1, generator=torch.Generator())).to("meta")
    query = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match="generator is on cpu but the queries are on meta"):
        criterion(query, query)
