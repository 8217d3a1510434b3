from collections import deque

import pytest
import torch
import torch.nn.functional as F

from ssl_memory import HardNegativeMixer, QueueLoss


def moco_loss(q, k, queue_columns, temperature, extra_negatives=None):
    """MoCo's computation: l_pos / l_neg concatenation with a (D, K) queue, cross-entropy on index 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue_columns.clone().detach())
    parts = [l_pos, l_neg]
    if extra_negatives is not None:
        parts.append(torch.einsum("nc,nmc->nm", q, extra_negatives))
    logits = torch.cat(parts, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long), reduction="none")


def in_batch_loss(q, k, temperature):
    """Empty queue: for query i the negatives are the other keys k_j, j != i."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(len(q)):
        others = [j for j in range(len(k)) if j != i]
        logits = torch.cat([(q[i] @ k[i]).reshape(1), q[i] @ k[others].T]) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses)


def test_matches_moco_over_steps_with_wrapping_queue():
    size, dim, temperature, batch = 10, 5, 0.2, 4  # size is not a multiple of the batch
    criterion = QueueLoss(size, dim, temperature).double()
    ring = deque(maxlen=size)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        q = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        k = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        x, y = q.clone().requires_grad_(), q.clone().requires_grad_()
        ours = criterion.terms(x, k)["contrastive"]
        ours.mean().backward()  # after the keys were enqueued
        if step == 0:
            expected = in_batch_loss(y, k, temperature)
        else:
            expected = moco_loss(y, k, torch.stack(list(ring)).T, temperature)
        expected.mean().backward()
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)
        ring.extend(F.normalize(k, dim=1))
        assert len(criterion.queue) == len(ring)
        assert sorted(map(tuple, criterion.queue.features.tolist())) == sorted(
            map(tuple, torch.stack(list(ring)).tolist())
        )


def test_float32_forward_is_moco_and_keys_carry_no_gradient():
    criterion = QueueLoss(64, 8, 0.07)
    criterion.queue.enqueue(F.normalize(torch.randn(40, 8), dim=1), torch.full((40,), -1))
    queue_columns = criterion.queue.features.clone().T
    q, k = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    loss = criterion(q, k)
    torch.testing.assert_close(loss, moco_loss(q, k, queue_columns, 0.07).mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert q.grad is not None and k.grad is None
    assert not any(b.requires_grad for b in criterion.buffers())


def test_enqueues_normalised_keys_with_ids_and_update_memory_false_does_not():
    criterion = QueueLoss(8, 3, 0.5)
    k = torch.randn(3, 3) * 5
    criterion(torch.randn(3, 3), k, indices=torch.tensor([4, 5, 6]))
    torch.testing.assert_close(criterion.queue.features, F.normalize(k, dim=1))
    assert criterion.queue.labels.tolist() == [4, 5, 6]
    criterion(torch.randn(2, 3), torch.randn(2, 3))
    assert criterion.queue.labels.tolist() == [4, 5, 6, -1, -1]
    state = {name: value.clone() for name, value in criterion.state_dict().items()}
    criterion(torch.randn(2, 3), torch.randn(2, 3), update_memory=False)
    for name, value in criterion.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_indices_mask_the_queries_own_sample_in_the_queue():
    dim, temperature = 4, 0.3
    criterion = QueueLoss(16, dim, temperature).double()
    gen = torch.Generator().manual_seed(3)
    stored = F.normalize(torch.randn(9, dim, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 7])
    criterion.queue.enqueue(stored, ids)
    q = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    indices = torch.tensor([1, 7, 9])
    ours = criterion.terms(q, k, indices)["contrastive"]
    expected = []
    for b in range(3):
        keep = [m for m in range(9) if ids[m] != indices[b]]
        expected.append(moco_loss(q[b : b + 1], k[b : b + 1], stored[keep].T, temperature)[0])
    torch.testing.assert_close(ours, torch.stack(expected))


def test_empty_queue_masks_duplicates_of_the_same_sample_in_the_batch():
    criterion = QueueLoss(16, 4, 0.5).double()
    q, k = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    ours = criterion.terms(q, k, torch.tensor([0, 1, 0, 2]))["contrastive"]
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    negatives = {0: [1, 3], 1: [0, 2, 3], 2: [1, 3], 3: [0, 1, 2]}
    for i, others in negatives.items():
        logits = torch.cat([(qn[i] @ kn[i]).reshape(1), qn[i] @ kn[others].T]) / 0.5
        torch.testing.assert_close(ours[i], torch.logsumexp(logits, 0) - logits[0])


def test_single_query_on_empty_queue_is_zero_not_nan():
    query = torch.randn(1, 3, requires_grad=True)
    loss = QueueLoss(4, 3)(query, torch.randn(1, 3))
    assert float(loss.detach()) == 0.0
    loss.backward()  # its only negative is masked: the log-sum-exp of nothing must not turn the gradient NaN
    assert torch.equal(query.grad, torch.zeros(1, 3))


def test_mixer_negatives_are_appended_to_each_querys_logits():
    dim, temperature = 6, 0.2
    gen = torch.Generator().manual_seed(4)
    criterion = QueueLoss(
        32, dim, temperature, mixer=HardNegativeMixer(8, 5, 3, generator=torch.Generator().manual_seed(9))
    )
    criterion = criterion.double()
    stored = F.normalize(torch.randn(20, dim, generator=gen, dtype=torch.float64), dim=1)
    criterion.queue.enqueue(stored, torch.arange(20))
    q = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    x, y = q.clone().requires_grad_(), q.clone().requires_grad_()
    ours = criterion.terms(x, k)["contrastive"]
    mixes = HardNegativeMixer(8, 5, 3, generator=torch.Generator().manual_seed(9))(F.normalize(q, dim=1), stored)
    expected = moco_loss(y, k, stored.T, temperature, extra_negatives=mixes)
    ours.mean().backward()
    expected.mean().backward()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(x.grad, y.grad)
    assert ours.gt(moco_loss(q, k, stored.T, temperature)).all()  # extra negatives only add to the denominator


def test_mixer_with_query_whose_negatives_are_all_masked_ignores_its_mixes():
    criterion = QueueLoss(8, 3, 0.5, mixer=HardNegativeMixer(4, 2, 2)).double()
    criterion.queue.enqueue(F.normalize(torch.randn(2, 3, dtype=torch.float64), dim=1), torch.tensor([5, 5]))
    q, k = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x = q.clone().requires_grad_()
    ours = criterion.terms(x, k, torch.tensor([5, 6]))["contrastive"]
    assert float(ours[0]) == 0.0  # nothing but its positive
    assert torch.isfinite(ours).all() and ours[1] > 0
    ours.sum().backward()
    assert torch.equal(x.grad[0], torch.zeros(3)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("with_mixer", [False, True])
def test_double_backward_matches_plain_autograd(with_mixer):
    # a gradient penalty differentiates the loss's backward: the fused log-sum-exp must have its own derivative
    dim, temperature = 5, 0.3
    gen = torch.Generator().manual_seed(6)
    mixer = HardNegativeMixer(6, 4, 3, generator=torch.Generator().manual_seed(1)) if with_mixer else None
    criterion = QueueLoss(16, dim, temperature, mixer=mixer).double()
    stored = F.normalize(torch.randn(12, dim, generator=gen, dtype=torch.float64), dim=1)
    criterion.queue.enqueue(stored, torch.arange(12))
    q = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    x, y = q.clone().requires_grad_(), q.clone().requires_grad_()
    ours = criterion.terms(x, k, update_memory=False)["contrastive"].sum()
    (grad,) = torch.autograd.grad(ours, x, create_graph=True)
    grad.square().sum().backward()
    mixes = None
    if with_mixer:
        mixes = HardNegativeMixer(6, 4, 3, generator=torch.Generator().manual_seed(1))(F.normalize(q, dim=1), stored)
    expected = moco_loss(y, k, stored.T, temperature, extra_negatives=mixes).sum()
    (expected_grad,) = torch.autograd.grad(expected, y, create_graph=True)
    expected_grad.square().sum().backward()
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize(
    "query, key, indices, error, match",
    [
        (torch.randn(3, 5), torch.randn(3, 4), None, ValueError, r"query must have shape \(B, 4\), got \(3, 5\)"),
        (torch.randn(3, 4), torch.randn(2, 4), None, ValueError, "key must have one row per query"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.arange(2), ValueError, r"indices must have shape \(3,\)"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, -1, 2]), ValueError, "non-negative"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.arange(3.0), TypeError, "integer"),
        (torch.randn(0, 4), torch.randn(0, 4), None, ValueError, "at least one row"),
        (torch.randn(3, 4), torch.full((3, 4), float("nan")), None, ValueError, "key contain NaN"),
        (torch.randn(3, 4).index_fill(0, torch.tensor([1]), float("inf")), torch.randn(3, 4), None, ValueError, "query contain NaN"),
    ],
)
def test_bad_inputs_raise_and_leave_queue_untouched(query, key, indices, error, match):
    criterion = QueueLoss(8, 4)
    criterion.queue.enqueue(torch.randn(2, 4), torch.arange(2))
    state = {name: value.clone() for name, value in criterion.state_dict().items()}
    with pytest.raises(error, match=match):
        criterion(query, key, indices)
    for name, value in criterion.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"size": 0}, ValueError, "size"),
        ({"mixer": 3}, TypeError, "mixer"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        QueueLoss(**kwargs)


def test_fused_log_sum_exp_and_read_match_autograd_and_stay_finite_on_an_empty_row():
    from ssl_memory.losses.queue import _LogSumExpAndRead

    logits = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits[1] = float("-inf")  # a row with no entry at all
    columns = torch.tensor([[0, 3, 3], [1, 2, 6], [6, 5, 0]])
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    log_sum, read = _LogSumExpAndRead.apply(x, columns)
    (torch.cat([log_sum, read], 1).nan_to_num(neginf=0.0) * weights).sum().backward()
    expected = torch.cat([torch.logsumexp(y, 1, keepdim=True), y.gather(1, columns)], 1)
    (expected.nan_to_num(neginf=0.0) * weights).sum().backward()
    torch.testing.assert_close(log_sum, expected[:, :1])
    torch.testing.assert_close(read, expected[:, 1:])
    torch.testing.assert_close(x.grad[[0, 2]], y.grad[[0, 2]])
    assert torch.equal(x.grad[1], torch.zeros(7))  # autograd's own gradient there is NaN
