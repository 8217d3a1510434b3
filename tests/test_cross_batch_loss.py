from collections import deque

import pytest
import torch
import torch.nn.functional as F

from ssl_memory import CrossBatchLoss
from ssl_memory.losses.cross_batch import pair_similarities


def xbm_contrastive(anchors, anchor_labels, references, reference_labels, margin):
    """research-xbm's contrastive loss on cosine similarity, one anchor and one pair at a time."""
    per_anchor = []
    for i in range(len(anchors)):
        total = anchors.new_zeros(())
        for j in range(len(references)):
            s = anchors[i] @ references[j]
            if anchor_labels[i] == reference_labels[j]:
                if s < 1 - 1e-5:
                    total = total + (1 - s)
            elif s > margin:
                total = total + s
        per_anchor.append(total)
    return torch.stack(per_anchor)


# margin -1: every negative counts, and the pairs are read from the dense product; 0.8: a few, computed row by row
@pytest.mark.parametrize("margin", [-1.0, 0.1, 0.8])
@pytest.mark.parametrize("start_step", [0, 2])
@pytest.mark.parametrize("checks", [True, False])  # pairs listed after the step's read; unlisted without a read
def test_matches_reference_over_steps(start_step, margin, checks):
    size, dim, weight = 7, 4, 0.5
    criterion = CrossBatchLoss(size, dim, margin=margin, memory_weight=weight, start_step=start_step, checks=checks)
    criterion = criterion.double()
    memory = deque(maxlen=size)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        embeddings = torch.randn(5, dim, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, 3, (5,), generator=gen)
        x, y = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
        terms = criterion.terms(x, labels)
        loss = (terms["batch"] + weight * terms["memory"]).mean()
        loss.backward()  # after the batch was enqueued

        unit = F.normalize(y, dim=1)
        expected_batch = xbm_contrastive(unit, labels, unit, labels, margin)
        if step >= start_step and memory:
            rows = torch.stack([f for f, _ in memory])
            expected_memory = xbm_contrastive(unit, labels, rows, torch.tensor([c for _, c in memory]), margin)
        else:
            expected_memory = torch.zeros(5, dtype=torch.float64)
        (expected_batch + weight * expected_memory).mean().backward()
        torch.testing.assert_close(terms["batch"], expected_batch)
        torch.testing.assert_close(terms["memory"], expected_memory)
        torch.testing.assert_close(x.grad, y.grad)
        if step >= start_step:
            memory.extend(zip(F.normalize(embeddings, dim=1), labels.tolist()))
        assert len(criterion.queue) == len(memory) and int(criterion.step) == step + 1
        if step == 3 and start_step == 0 and margin < 0.5:
            assert terms["memory"].abs().sum() > 0  # the memory term was exercised


def test_forward_weights_memory_term_and_averages_over_anchors():
    criterion = CrossBatchLoss(16, 3, margin=-1.0, memory_weight=2.0)
    first = torch.randn(4, 3)
    criterion(first, torch.tensor([0, 1, 0, 1]))
    x, labels = torch.randn(3, 3), torch.tensor([0, 1, 2])
    terms = criterion.terms(x, labels, update_memory=False)
    loss = criterion(x, labels, update_memory=False)
    torch.testing.assert_close(loss, (terms["batch"] + 2.0 * terms["memory"]).sum() / 3)
    # margin -1: every negative counts, so the memory term of the anchor with the new label 2 is the sum of all similarities
    torch.testing.assert_close(terms["memory"][2], (F.normalize(x[2], dim=0) @ F.normalize(first, dim=1).T).sum())


def test_negative_adds_its_similarity_not_the_excess_over_the_margin():
    criterion = CrossBatchLoss(4, 2, margin=0.5)
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # similarity 0.8
    terms = criterion.terms(a, torch.tensor([0, 1]))
    torch.testing.assert_close(terms["batch"], torch.tensor([0.8, 0.8]))
    terms = criterion.terms(a, torch.tensor([0, 0]), update_memory=False)
    torch.testing.assert_close(terms["batch"], torch.tensor([0.2, 0.2]))  # positives add 1 - s, self skipped


def test_update_memory_false_changes_nothing_and_state_dict_resumes():
    criterion = CrossBatchLoss(6, 3, start_step=1)
    criterion(torch.randn(2, 3), torch.tensor([0, 1]))
    criterion(torch.randn(2, 3), torch.tensor([0, 1]))
    assert set(criterion.state_dict()) >= {"step", "queue.slots", "queue.slot_labels", "queue.pointer", "queue.count"}
    state = {name: value.clone() for name, value in criterion.state_dict().items()}
    criterion(torch.randn(2, 3), torch.tensor([0, 1]), update_memory=False)
    for name, value in criterion.state_dict().items():
        assert torch.equal(value, state[name]), name
    other = CrossBatchLoss(6, 3, start_step=1)
    other.load_state_dict(criterion.state_dict())
    x, labels = torch.randn(3, 3), torch.tensor([1, 0, 1])
    torch.testing.assert_close(other(x, labels), criterion(x, labels))
    assert int(other.step) == 3 and len(other.queue) == 5  # the warm-up call enqueued nothing


def test_gradients_reach_embeddings_only():
    criterion = CrossBatchLoss(8, 3, margin=0.0)
    criterion(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    x = torch.randn(4, 3, requires_grad=True)
    criterion(x, torch.tensor([0, 1, 0, 1])).backward()
    assert x.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in criterion.buffers())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"margin": float("nan")}, "margin"),
        ({"memory_weight": -1.0}, "memory_weight"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 1.5}, "start_step"),
        ({"size": 0}, "size"),
    ],
)
def test_bad_construction(kwargs, match):
    arguments = {"size": 8, "dim": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        CrossBatchLoss(**arguments)


@pytest.mark.parametrize(
    "embeddings, labels, error, match",
    [
        (torch.randn(3, 4), torch.arange(3), ValueError, r"embeddings must have shape \(B, 3\), got \(3, 4\)"),
        (torch.randn(3, 3), torch.arange(2), ValueError, r"labels must have shape \(3,\)"),
        (torch.randn(3, 3), torch.arange(3.0), TypeError, "labels must be an integer tensor"),
        (torch.randn(0, 3), torch.arange(0), ValueError, "at least one row"),
        (torch.full((2, 3), float("nan")), torch.arange(2), ValueError, "NaN"),
    ],
)
def test_bad_inputs(embeddings, labels, error, match):
    criterion = CrossBatchLoss(8, 3)
    with pytest.raises(error, match=match):
        criterion(embeddings, labels)
    assert len(criterion.queue) == 0


def test_pair_similarities_row_by_row_and_from_the_product_agree():
    gen = torch.Generator().manual_seed(3)
    query, reference = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    few = (torch.tensor([0, 2, 5]), torch.tensor([8, 1, 1]))
    many = torch.cartesian_prod(torch.arange(6), torch.arange(9)).T.unbind()  # more than B * R / D pairs
    for rows, cols in (few, many):
        x = query.clone().requires_grad_()
        values = pair_similarities(x, reference, rows, cols)
        (values * torch.arange(len(rows))).sum().backward()
        torch.testing.assert_close(values, (query[rows] * reference[cols]).sum(1))
        torch.testing.assert_close(x.grad, torch.zeros_like(query).index_add(0, rows, torch.arange(len(rows))[:, None] * reference[cols]))
