import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_memory import ConsistencyLoss
from ssl_memory.losses.consistency import consistency_from_log_probs, view_layout


def reference_consistency(logits, indices, temperature, mode):
    """The definition, one sample and one pair of views at a time."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    per_sample = []
    for sample in sorted(set(indices.tolist())):
        rows = [r for r in range(len(indices)) if indices[r] == sample]
        if len(rows) < 2:
            continue
        if mode == "pairwise":
            kls = [(log_p[k].exp() * (log_p[k] - log_p[j])).sum() for k in rows for j in rows if k != j]
        else:
            mean = torch.stack([log_p[v].exp() for v in rows]).mean(0).detach()
            kls = [(mean * (mean.log() - log_p[v])).sum() for v in rows]
        per_sample.append(torch.stack(kls).mean())
    return torch.stack(per_sample).mean()


def with_layout(logits, indices, temperature, mode):
    """The path MemoryBankLoss takes when its checks have read the views' layout on the host."""
    log_probs = torch.log_softmax(logits / temperature, dim=1)
    return consistency_from_log_probs(log_probs, indices, mode, view_layout(indices).tolist())


def compare(logits, indices, temperature, mode):
    ref_in = logits.clone().requires_grad_()
    ref = reference_consistency(ref_in, indices, temperature, mode)
    ref.backward()
    for loss in (ConsistencyLoss(temperature, mode), lambda x, i: with_layout(x, i, temperature, mode)):
        ours_in = logits.clone().requires_grad_()
        ours = loss(ours_in, indices)
        ours.backward()
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pairwise", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_matches_definition_with_one_two_and_four_views(mode, temperature):
    gen = torch.Generator().manual_seed(0)
    # sample 7 has 4 views, 3 has 2, 11 and 5 have one each; rows in no particular order
    indices = torch.tensor([7, 3, 11, 7, 3, 7, 5, 7])
    logits = torch.randn(8, 50, generator=gen, dtype=torch.float64) * 3
    compare(logits, indices, temperature, mode)


def test_float32_matches_definition():
    gen = torch.Generator().manual_seed(1)
    indices = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    logits = torch.randn(12, 300, generator=gen)
    compare(logits, indices, 0.5, "pairwise")
    compare(logits, indices, 0.5, "mean")


@settings(max_examples=30, deadline=None)
@given(
    views=st.lists(st.integers(1, 4), min_size=1, max_size=6).filter(lambda v: max(v) > 1),
    mode=st.sampled_from(["pairwise", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_any_grouping_matches_definition(views, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.cat([torch.full((v,), 100 + s) for s, v in enumerate(views)])
    indices = indices[torch.randperm(len(indices), generator=gen)]
    logits = torch.randn(len(indices), 20, generator=gen, dtype=torch.float64) * 2
    compare(logits, indices, 0.7, mode)


def test_identical_views_give_zero():
    logits = torch.randn(3, 10).repeat(2, 1)
    loss = ConsistencyLoss()(logits, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert abs(float(loss)) < 1e-5


@pytest.mark.parametrize("mode", ["pairwise", "mean"])
@pytest.mark.parametrize("layout", [False, True])
def test_single_views_only_give_a_connected_zero(mode, layout):
    logits = torch.randn(4, 10, requires_grad=True)
    indices = torch.tensor([3, 1, 2, 0])
    loss = with_layout(logits, indices, 1.0, mode) if layout else ConsistencyLoss(mode=mode)(logits, indices)
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 10))


def test_mean_mode_holds_the_mean_fixed():
    # with Pbar fixed, the gradient of view v is (P_v - Pbar) / (V * S): zero when all views agree with Pbar
    logits = torch.randn(2, 6, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    ConsistencyLoss(mode="mean")(x, torch.tensor([0, 0])).backward()
    p = logits.softmax(1)
    torch.testing.assert_close(x.grad, (p - p.mean(0)) / 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"mode": "sym"}, "consistency_mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyLoss(**kwargs)


def test_bad_inputs():
    criterion = ConsistencyLoss()
    with pytest.raises(ValueError, match=r"logits must have shape \(R, N\), got \(5,\)"):
        criterion(torch.randn(5), torch.arange(5))
    with pytest.raises(ValueError, match=r"indices must have shape \(5,\)"):
        criterion(torch.randn(5, 3), torch.arange(4))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        criterion(torch.randn(5, 3), torch.arange(5.0))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        criterion(torch.ones(5, 3, dtype=torch.long), torch.arange(5))


@pytest.mark.parametrize("mode", ["pairwise", "mean"])
@pytest.mark.parametrize(
    "indices",
    [
        torch.tensor([7, 2, 9, 7, 2, 9, 7, 2, 9]),  # view-major, as MultiAugCollate returns (reshape path with a layout)
        torch.tensor([7, 7, 7, 2, 2, 2, 9, 9, 9]),  # sample-major: same samples, general path
        torch.tensor([2, 7, 9, 7, 2, 9, 9, 7, 2]),  # blocks in different orders: general path
    ],
)
def test_every_row_layout_matches_definition(indices, mode):
    logits = torch.randn(len(indices), 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    compare(logits, indices, 0.5, mode)


@pytest.mark.parametrize("mode", ["pairwise", "mean"])
def test_float64_stays_float64_on_both_paths(mode):
    # a tolerance of 1e-5 would not see a float32 weight in a float64 loss: compare the two paths at 1e-12
    indices = torch.tensor([5, 3, 9]).repeat(4)
    log_probs = torch.log_softmax(torch.randn(12, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 1)
    listed = consistency_from_log_probs(log_probs, indices, mode, view_layout(indices).tolist())
    unlisted = consistency_from_log_probs(log_probs, indices, mode)
    assert listed.dtype == unlisted.dtype == torch.float64
    torch.testing.assert_close(listed, unlisted, atol=1e-12, rtol=1e-12)


def test_double_backward_is_refused_not_wrong():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    loss = ConsistencyLoss(0.5)(logits, torch.arange(6) % 3)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss, logits, create_graph=True)
    (grad,) = torch.autograd.grad(loss, logits)  # first order still works
    assert torch.isfinite(grad).all()

