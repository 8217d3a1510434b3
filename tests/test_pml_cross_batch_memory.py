"""ssl_memory.pml.CrossBatchMemory against PML's own CrossBatchMemory as the oracle."""

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from ssl_memory.pml import CrossBatchMemory

DIM, MEMORY = 12, 40

DENSE = {
    "ntxent": lambda: losses.NTXentLoss(temperature=0.1),
    "ntxent_default": lambda: losses.NTXentLoss(),
    # a row of logits may then span more than float32's exponent range: the shift uses the largest negative
    "ntxent_cold": lambda: losses.NTXentLoss(temperature=0.025),
    "supcon": lambda: losses.SupConLoss(),
    "contrastive": lambda: losses.ContrastiveLoss(),
    "ntxent_lp": lambda: losses.NTXentLoss(distance=distances.LpDistance()),
    "supcon_mean": lambda: losses.SupConLoss(reducer=reducers.MeanReducer()),
    "contrastive_cosine": lambda: losses.ContrastiveLoss(
        pos_margin=0.8, neg_margin=0.2, distance=distances.CosineSimilarity()
    ),
    "contrastive_mean": lambda: losses.ContrastiveLoss(reducer=reducers.MeanReducer()),
}

FALLBACK = {
    "triplet": (lambda: losses.TripletMarginLoss(), None),
    "multi_similarity": (lambda: losses.MultiSimilarityLoss(), None),
    "ntxent_with_miner": (lambda: losses.NTXentLoss(), lambda: miners.MultiSimilarityMiner(0.2)),
    "contrastive_with_miner": (lambda: losses.ContrastiveLoss(), lambda: miners.PairMarginMiner()),
    "contrastive_sum_reducer": (lambda: losses.ContrastiveLoss(reducer=reducers.SumReducer()), None),
}


def steps(num_steps, dtype, masked, seed=0):
    """Random batches (2 to 15 rows, labels 0-5); with a mask, each enqueues at least one row (PML marks
    its memory full after an empty enqueue, see test_empty_enqueue_leaves_the_memory_alone)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        size = int(torch.randint(2, 16, (), generator=gen))
        embeddings = torch.randn(size, DIM, generator=gen, dtype=dtype)
        labels = torch.randint(0, 6, (size,), generator=gen)
        mask = None
        if masked:
            mask = torch.rand(size, generator=gen) < 0.4
            mask[0] = True
        yield embeddings, labels, mask


def loss_and_grad(criterion, embeddings, labels, mask):
    x = embeddings.clone().requires_grad_()
    loss = criterion(x, labels, enqueue_mask=mask)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), (x.grad if x.grad is not None else torch.zeros_like(x))


def assert_same_as_pml(ours, theirs, dtype, masked, num_steps=20):
    for embeddings, labels, mask in steps(num_steps, dtype, masked):
        our_loss, our_grad = loss_and_grad(ours, embeddings, labels, mask)
        pml_loss, pml_grad = loss_and_grad(theirs, embeddings, labels, mask)
        assert torch.allclose(our_loss, pml_loss, rtol=1e-4, atol=1e-5), (our_loss, pml_loss)
        assert torch.allclose(our_grad, pml_grad, rtol=1e-4, atol=1e-6)
    assert ours.has_been_filled  # the run wrapped around the memory


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_losses_and_gradients_equal_pml(name, dtype, masked, monkeypatch):
    ours = CrossBatchMemory(DENSE[name](), DIM, memory_size=MEMORY)

    def pml_pair_path(*args, **kwargs):
        raise AssertionError("the dense path must not call PML's per-pair computation")

    monkeypatch.setattr(ours.loss, "compute_loss", pml_pair_path)
    theirs = losses.CrossBatchMemory(DENSE[name](), DIM, memory_size=MEMORY)
    assert_same_as_pml(ours, theirs, dtype, masked)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("name", list(FALLBACK))
def test_other_losses_and_miners_fall_back_to_pml(name, masked):
    make_loss, make_miner = FALLBACK[name]
    ours = CrossBatchMemory(make_loss(), DIM, memory_size=MEMORY, miner=make_miner() if make_miner else None)
    theirs = losses.CrossBatchMemory(make_loss(), DIM, memory_size=MEMORY, miner=make_miner() if make_miner else None)
    assert_same_as_pml(ours, theirs, torch.float32, masked, num_steps=12)


def test_moco_recipe_with_unique_labels_matches_pml():
    """PML's documented MoCo recipe: queries and keys share fresh labels, keys are enqueued."""
    ours = CrossBatchMemory(losses.NTXentLoss(0.07), DIM, memory_size=50)
    theirs = losses.CrossBatchMemory(losses.NTXentLoss(0.07), DIM, memory_size=50)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        labels = torch.arange(16) + 1 + int(theirs.label_memory.max())
        assert torch.equal(ours.label_memory.max(), theirs.label_memory.max())
        embeddings = torch.randn(32, DIM, generator=gen)
        mask = torch.arange(32) >= 16
        our_loss, our_grad = loss_and_grad(ours, embeddings, labels.repeat(2), mask)
        pml_loss, pml_grad = loss_and_grad(theirs, embeddings, labels.repeat(2), mask)
        assert torch.allclose(our_loss, pml_loss, rtol=1e-5)
        assert torch.allclose(our_grad, pml_grad, atol=1e-6)
        assert our_grad[16:].abs().sum() == 0  # keys only feed the memory


def test_two_forwards_before_one_backward():
    """Gradient accumulation: the second call overwrites memory rows the first one read, in place and
    without a copy of the memory; backward still sees the rows as the first call read them."""
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, DIM, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]), None) for _ in range(2)]
    memory_size = 8  # the second batch overwrites 4 of the rows the first one read
    separate = CrossBatchMemory(losses.NTXentLoss(0.1), DIM, memory_size=memory_size)
    grads = [loss_and_grad(separate, *batch)[1] for batch in batches]
    together = CrossBatchMemory(losses.NTXentLoss(0.1), DIM, memory_size=memory_size)
    inputs = [batch[0].clone().requires_grad_() for batch in batches]
    sum(together(x, labels) for x, (_, labels, _) in zip(inputs, batches)).backward()
    for x, grad in zip(inputs, grads):
        assert torch.allclose(x.grad, grad, atol=1e-6)


def test_user_indices_tuple_is_mapped_to_memory_slots():
    ours = CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=MEMORY)
    pair_miner = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    for embeddings, labels, _ in steps(10, torch.float32, masked=False):
        mined = pair_miner(embeddings, labels)
        loss = ours(embeddings, labels, indices_tuple=mined)
        memory, memory_labels = ours.queue.features, ours.queue.labels
        slots = ours.curr_batch_idx
        # brute force: every (row, slot) pair with equal/different labels except a row with its own slot
        a1, p, a2, n = [], [], [], []
        for i in range(len(labels)):
            for j in range(len(memory_labels)):
                if labels[i] == memory_labels[j] and j != slots[i]:
                    a1.append(i)
                    p.append(j)
                elif labels[i] != memory_labels[j]:
                    a2.append(i)
                    n.append(j)
        m1, mp, m2, mn = mined
        expected_tuple = tuple(
            torch.cat([torch.tensor(x, dtype=torch.long), y])
            for x, y in zip((a1, p, a2, n), (m1, slots[mp], m2, slots[mn]))
        )
        # the mapped pairs are label-consistent, which PML's unshifted concatenation is not
        assert torch.equal(labels[expected_tuple[0]], memory_labels[expected_tuple[1]])
        assert (labels[expected_tuple[2]] != memory_labels[expected_tuple[3]]).all()
        expected = losses.ContrastiveLoss()(embeddings, labels, expected_tuple, memory, memory_labels)
        assert torch.allclose(loss, expected, rtol=1e-5)


def test_state_survives_a_state_dict_round_trip():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    batches = list(steps(12, torch.float32, masked=True, seed=5))
    for embeddings, labels, mask in batches[:6]:
        ours(embeddings, labels, enqueue_mask=mask)
    resumed = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    resumed.load_state_dict(ours.state_dict())
    assert (resumed.queue_idx, resumed.has_been_filled, len(resumed.queue)) == (
        ours.queue_idx,
        ours.has_been_filled,
        len(ours.queue),
    )
    for embeddings, labels, mask in batches[6:]:
        assert torch.equal(ours(embeddings, labels, enqueue_mask=mask), resumed(embeddings, labels, enqueue_mask=mask))
    assert torch.equal(ours.embedding_memory, resumed.embedding_memory)


def test_pml_attributes_follow_the_queue():
    """TripletMarginLoss does not normalise its reference rows itself, so they are stored as given, like PML."""
    ours = CrossBatchMemory(losses.TripletMarginLoss(), DIM, memory_size=MEMORY)
    theirs = losses.CrossBatchMemory(losses.TripletMarginLoss(), DIM, memory_size=MEMORY)
    assert not ours.unit_rows
    for embeddings, labels, _ in steps(8, torch.float32, masked=False, seed=2):
        ours(embeddings, labels)
        theirs(embeddings, labels)
        assert ours.queue_idx == theirs.queue_idx
        assert ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)
    ours.reset_queue()
    assert len(ours.queue) == 0 and ours.queue_idx == 0 and not ours.has_been_filled


def test_normalising_losses_store_unit_rows():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    embeddings, labels = 3 * torch.randn(10, DIM), torch.arange(10)
    ours(embeddings, labels)
    assert ours.unit_rows
    assert torch.allclose(ours.queue.features, F.normalize(embeddings, dim=1))


def test_memory_follows_the_embeddings_dtype():
    ours = CrossBatchMemory(losses.SupConLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(6, DIM, dtype=torch.float64), torch.arange(6) % 3)
    assert ours.queue.slots.dtype == torch.float64
    ours(torch.randn(6, DIM, dtype=torch.bfloat16), torch.arange(6) % 3)
    assert ours.queue.slots.dtype == torch.float32  # never below float32, unlike PML under AMP


def test_empty_enqueue_leaves_the_memory_alone():
    """PML 2.9 marks its memory full after enqueuing nothing and then scores its unfilled zero rows."""
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(10, DIM), torch.arange(10) % 4)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    queries, labels = torch.randn(5, DIM), torch.arange(5) % 4
    loss = ours(queries, labels, enqueue_mask=torch.zeros(5, dtype=torch.bool))
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    memory, memory_labels = ours.queue.features, ours.queue.labels
    expected = losses.NTXentLoss()(
        queries, labels, lmu.get_all_pairs_indices(labels, memory_labels), memory, memory_labels
    )
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_a_single_row_batch_drops_its_self_pair():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(6, DIM), torch.tensor([0, 0, 1, 1, 2, 2]))
    row, label = torch.randn(1, DIM), torch.tensor([3])
    # label 3 only appears in the row itself: no positive pair is left, so the loss is zero
    assert ours(row, label).item() == 0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda c: c(torch.randn(4, DIM), torch.arange(4).float()), TypeError, "labels must be an integer tensor"),
        (lambda c: c(torch.randn(4, DIM + 1), torch.arange(4)), ValueError, r"embeddings must have shape \(B, 12\)"),
        (lambda c: c(torch.randn(4, DIM), torch.arange(3)), ValueError, r"labels must have shape \(4,\)"),
        (
            lambda c: c(torch.randn(4, DIM), torch.arange(4), enqueue_mask=torch.ones(4)),
            ValueError,
            "enqueue_mask must be a bool tensor",
        ),
        (
            lambda c: c(torch.randn(MEMORY + 1, DIM), torch.arange(MEMORY + 1)),
            ValueError,
            "the batch must fit in the memory",
        ),
        (
            lambda c: c(torch.randn(4, DIM), torch.arange(4), (torch.arange(1),) * 3, torch.ones(4, dtype=torch.bool)),
            ValueError,
            "mutually exclusive",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY))


def test_non_finite_embeddings_leave_the_memory_unchanged():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(6, DIM), torch.arange(6))
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = torch.randn(6, DIM)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ours(bad, torch.arange(6))
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"embedding_size": 0}, {"memory_size": 2.5}])
def test_bad_sizes_are_named(kwargs):
    arguments = {"embedding_size": DIM, "memory_size": MEMORY, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        CrossBatchMemory(losses.NTXentLoss(), **arguments)


def test_unsupported_loss_is_rejected_like_pml():
    with pytest.raises(Exception, match="CrossBatchMemory not supported for ArcFaceLoss"):
        CrossBatchMemory(losses.ArcFaceLoss(10, DIM), DIM)


def rank_steps(rank, num_steps=6):
    """Masked batches of one rank; PML's all_gather needs every rank to hold the same batch size."""
    gen = torch.Generator().manual_seed(rank)
    for step in range(num_steps):
        size = 4 + step % 3
        mask = torch.rand(size, generator=gen) < 0.4
        mask[0] = True
        yield torch.randn(size, DIM, generator=gen), torch.randint(0, 6, (size,), generator=gen), mask


def wrapped_worker(rank, world_size):
    """Each rank scores its own batch through DistributedLossWrapper with ours and with PML's class."""
    results = []
    for make in (CrossBatchMemory, losses.CrossBatchMemory):
        wrapper = DistributedLossWrapper(make(losses.NTXentLoss(0.1), DIM, memory_size=MEMORY))
        values = [wrapper(*batch[:2], enqueue_mask=batch[2]).detach() for batch in rank_steps(rank)]
        results.append(torch.stack(values))
    return results


def test_works_under_distributed_loss_wrapper():
    results = run_distributed(wrapped_worker, 2)
    for ours, theirs in results:
        assert torch.allclose(ours, theirs, rtol=1e-4)
    # the wrapper hands every rank all rows: rank 0 gets the loss of one process on the gathered batch
    reference = CrossBatchMemory(losses.NTXentLoss(0.1), DIM, memory_size=MEMORY)
    for step, (own, other) in enumerate(zip(rank_steps(0), rank_steps(1))):
        embeddings, labels, mask = (torch.cat([a, b]) for a, b in zip(own, other))
        assert torch.allclose(results[0][0][step], 2 * reference(embeddings, labels, enqueue_mask=mask), rtol=1e-4)
