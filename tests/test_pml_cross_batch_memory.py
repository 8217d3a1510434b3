"""ssl_memory.pml.CrossBatchMemory side by side with PML's own losses.CrossBatchMemory, the oracle.

Values, gradients and every attribute a PML user can read are compared after each step of the same
inputs fed to both classes; where ours deliberately differs (PML bugs), a brute-force loop is the oracle.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ssl_memory.pml import CrossBatchMemory, dense

DIM, MEMORY = 12, 40

# every loss PML's CrossBatchMemory accepts, with its default arguments
SUPPORTED = {name: (lambda name=name: getattr(losses, name)()) for name in losses.CrossBatchMemory.supported_losses()}

# the losses computed densely here, with the distances and reducers that path covers
DENSE = {
    "ntxent": lambda: losses.NTXentLoss(temperature=0.1),
    # a row of logits may then span more than float32's exponent range: the shift uses the largest negative
    "ntxent_cold": lambda: losses.NTXentLoss(temperature=0.025),
    "ntxent_lp": lambda: losses.NTXentLoss(distance=distances.LpDistance()),
    "supcon": lambda: losses.SupConLoss(),
    "supcon_mean": lambda: losses.SupConLoss(reducer=reducers.MeanReducer()),
    "contrastive": lambda: losses.ContrastiveLoss(),
    "contrastive_xbm": lambda: losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5),
    # nearly every negative inside the margin: the pairs are read from the dense product
    "contrastive_wide": lambda: losses.ContrastiveLoss(neg_margin=1.9),
    "contrastive_cosine": lambda: losses.ContrastiveLoss(
        pos_margin=0.8, neg_margin=0.2, distance=distances.CosineSimilarity()
    ),
    "contrastive_mean": lambda: losses.ContrastiveLoss(reducer=reducers.MeanReducer()),
    "contrastive_sum": lambda: losses.ContrastiveLoss(neg_margin=1.2, reducer=reducers.SumReducer()),
    "contrastive_threshold": lambda: losses.ContrastiveLoss(reducer=reducers.ThresholdReducer(low=0.1, high=1.0)),
    "multi_similarity": lambda: losses.MultiSimilarityLoss(),
    "multi_similarity_lp": lambda: losses.MultiSimilarityLoss(alpha=1, beta=10, base=0.8, distance=distances.LpDistance()),
    "multi_similarity_nonzero": lambda: losses.MultiSimilarityLoss(base=0.2, reducer=reducers.AvgNonZeroReducer()),
    "triplet": lambda: losses.TripletMarginLoss(),
    "triplet_cosine": lambda: losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity()),
    "triplet_mean": lambda: losses.TripletMarginLoss(margin=0.3, reducer=reducers.MeanReducer()),
    "triplet_sum": lambda: losses.TripletMarginLoss(margin=0.1, reducer=reducers.SumReducer(), triplets_per_anchor=5),
}

WITH_MINERS = {
    "ntxent_multi_similarity_miner": (lambda: losses.NTXentLoss(), lambda: miners.MultiSimilarityMiner(0.2)),
    "contrastive_pair_margin_miner": (lambda: losses.ContrastiveLoss(), lambda: miners.PairMarginMiner()),
    "triplet_triplet_miner": (lambda: losses.TripletMarginLoss(), lambda: miners.TripletMarginMiner(0.2)),
}


def batches(num_steps, dtype=torch.float64, masked=False, seed=0, classes=6):
    """Random batches of 2 to 15 rows; with a mask, each enqueues at least one row (PML marks its memory
    full after an empty enqueue, see test_empty_enqueue_leaves_the_memory_alone)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        size = int(torch.randint(2, 16, (), generator=gen))
        embeddings = torch.randn(size, DIM, generator=gen, dtype=dtype)
        labels = torch.randint(0, classes, (size,), generator=gen)
        mask = None
        if masked:
            mask = torch.rand(size, generator=gen) < 0.4
            mask[0] = True
        yield embeddings, labels, mask


def loss_and_grad(criterion, embeddings, labels, mask=None, indices_tuple=None):
    x = embeddings.clone().requires_grad_()
    loss = criterion(x, labels, indices_tuple, mask)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), (x.grad if x.grad is not None else torch.zeros_like(x))


def assert_same_state(ours, theirs):
    """Everything of PML's memory a user can read."""
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert ours.embedding_memory.dtype == theirs.embedding_memory.dtype
    assert torch.equal(ours.label_memory, theirs.label_memory)
    assert ours.label_memory.dtype == theirs.label_memory.dtype
    assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)
    assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)


def assert_side_by_side(ours, theirs, steps, rtol=1e-6, atol=1e-9):
    for embeddings, labels, mask in steps:
        our_loss, our_grad = loss_and_grad(ours, embeddings, labels, mask)
        pml_loss, pml_grad = loss_and_grad(theirs, embeddings, labels, mask)
        # equal_nan: NCALoss scores a query without any same-label row as NaN, in PML too
        torch.testing.assert_close(our_loss, pml_loss, rtol=rtol, atol=atol, equal_nan=True)
        torch.testing.assert_close(our_grad, pml_grad, rtol=rtol, atol=atol, equal_nan=True)
        assert_same_state(ours, theirs)
    assert ours.has_been_filled  # the run wrapped around the memory


def test_every_supported_loss_is_tested():
    assert set(SUPPORTED) == set(losses.CrossBatchMemory.supported_losses())
    assert {type(make()) for make in DENSE.values()} == set(dense.DENSE_LOSSES)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_supported_loss_gives_pmls_values_gradients_and_memory(name, masked):
    ours = CrossBatchMemory(SUPPORTED[name](), DIM, memory_size=MEMORY)
    theirs = losses.CrossBatchMemory(SUPPORTED[name](), DIM, memory_size=MEMORY)
    assert_side_by_side(ours, theirs, batches(20 if masked else 10, masked=masked))


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_losses_give_pmls_values_and_gradients(name, dtype, masked, monkeypatch):
    ours = CrossBatchMemory(DENSE[name](), DIM, memory_size=MEMORY)
    assert dense.supports(ours.loss)

    def pml_pair_path(*args, **kwargs):
        raise AssertionError("the dense path must not call PML's per-pair computation")

    monkeypatch.setattr(ours.loss, "compute_loss", pml_pair_path)
    theirs = losses.CrossBatchMemory(DENSE[name](), DIM, memory_size=MEMORY)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_side_by_side(ours, theirs, batches(20 if masked else 10, dtype=dtype, masked=masked), **tolerance)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("name", list(WITH_MINERS))
def test_a_miner_gets_the_memory_and_pmls_computation_runs(name, masked):
    make_loss, make_miner = WITH_MINERS[name]
    ours = CrossBatchMemory(make_loss(), DIM, memory_size=MEMORY, miner=make_miner())
    theirs = losses.CrossBatchMemory(make_loss(), DIM, memory_size=MEMORY, miner=make_miner())
    assert_side_by_side(ours, theirs, batches(20 if masked else 10, masked=masked))


@pytest.mark.parametrize("name", ["contrastive", "triplet", "multi_similarity"])
def test_the_xbm_losses_stay_dense_at_a_larger_memory(name):
    """A few hundred rows and many positives a row: the closed forms against PML on a realistic fill."""
    memory_size, gen = 300, torch.Generator().manual_seed(11)
    make = DENSE["contrastive_xbm" if name == "contrastive" else name]
    ours, theirs = CrossBatchMemory(make(), DIM, memory_size), losses.CrossBatchMemory(make(), DIM, memory_size)
    for _ in range(5):
        embeddings = torch.randn(64, DIM, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 10, (64,), generator=gen)
        torch.testing.assert_close(loss_and_grad(ours, embeddings, labels), loss_and_grad(theirs, embeddings, labels))
    assert ours.has_been_filled


def brute_force_swap_triplets(anchors, labels, memory, memory_labels, own_slots, margin):
    """TripletMarginLoss(swap=True) by definition, one (a, p, n) at a time; AvgNonZero over the triplets."""
    unit, rows = F.normalize(anchors, dim=1), F.normalize(memory, dim=1)
    violations = []
    for a in range(len(labels)):
        for p in range(len(memory_labels)):
            if memory_labels[p] != labels[a] or p == own_slots[a]:
                continue
            for n in range(len(memory_labels)):
                if memory_labels[n] == labels[a]:
                    continue
                d_ap, d_an, d_pn = (unit[a] - rows[p]).norm(), (unit[a] - rows[n]).norm(), (rows[p] - rows[n]).norm()
                violations.append(F.relu(d_ap - torch.minimum(d_an, d_pn) + margin))
    violations = torch.stack(violations)
    return violations[violations > 0].mean()


def test_triplet_swap_uses_the_positive_negative_distance_between_memory_rows():
    """PML 2.9 reads d(p, n) at row p of the (batch, memory) matrix: an IndexError once memory > batch (#748)."""
    ours = CrossBatchMemory(losses.TripletMarginLoss(margin=0.2, swap=True), DIM, memory_size=25)
    for embeddings, labels, _ in batches(8, classes=3, seed=4):
        x = embeddings.clone().requires_grad_()
        loss = ours(x, labels)
        loss.backward()
        y = embeddings.clone().requires_grad_()
        memory = ours.embedding_memory[: ours.num_filled]  # detached rows: gradients reach the queries only
        memory_labels = ours.label_memory[: ours.num_filled]
        expected = brute_force_swap_triplets(y, labels, memory, memory_labels, ours.curr_batch_idx, 0.2)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(x.grad, y.grad)
    assert ours.has_been_filled


@pytest.mark.parametrize("make", [DENSE["ntxent"], DENSE["contrastive_wide"], SUPPORTED["CircleLoss"]])
def test_two_forwards_before_one_backward(make):
    """Gradient accumulation: the second call overwrites memory rows the first one read, in place;
    backward still sees the rows as the first call read them."""
    gen = torch.Generator().manual_seed(7)
    batches_ = [(torch.randn(6, DIM, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(2)]
    memory_size = 8  # the second batch overwrites 4 of the rows the first one read
    separate = CrossBatchMemory(make(), DIM, memory_size=memory_size)
    grads = [loss_and_grad(separate, *batch)[1] for batch in batches_]
    together = CrossBatchMemory(make(), DIM, memory_size=memory_size)
    inputs = [x.clone().requires_grad_() for x, _ in batches_]
    sum(together(x, labels) for x, (_, labels) in zip(inputs, batches_)).backward()
    for x, grad in zip(inputs, grads):
        torch.testing.assert_close(x.grad, grad)


def test_embedding_memory_holds_exactly_what_was_enqueued():
    """Raw rows, not normalised ones, whatever the loss; labels keep the labels' dtype, as PML's do."""
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    theirs = losses.CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    for embeddings, labels, mask in batches(6, dtype=torch.float32, masked=True, seed=3):
        embeddings, labels = 5 * embeddings, labels.int()
        ours(embeddings, labels, enqueue_mask=mask)
        theirs(embeddings, labels, enqueue_mask=mask)
        assert_same_state(ours, theirs)
        assert torch.equal(ours.embedding_memory[ours.curr_batch_idx], embeddings[mask])
    assert ours.label_memory.dtype == torch.int32


def test_memory_can_be_assigned_and_moved_like_pmls():
    """What PML users (and PML's own tests) do: move the memory themselves, or fill it by hand."""
    ours = CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=MEMORY)
    theirs = losses.CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=MEMORY)
    gen = torch.Generator().manual_seed(5)
    fill, fill_labels = torch.randn(MEMORY, DIM, generator=gen), torch.randint(0, 6, (MEMORY,), generator=gen)
    for criterion in (ours, theirs):
        criterion.embedding_memory = criterion.embedding_memory.to("cpu").type(torch.float64)
        criterion.embedding_memory[:] = fill
        criterion.label_memory = fill_labels.clone()
        criterion.queue_idx, criterion.has_been_filled = 7, True
    assert_same_state_without_batch(ours, theirs)
    assert_side_by_side(ours, theirs, batches(5, seed=6))


def assert_same_state_without_batch(ours, theirs):
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)
    assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)


def test_add_to_memory_and_reset_queue_behave_as_pmls():
    ours = CrossBatchMemory(losses.SupConLoss(), DIM, memory_size=16)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(), DIM, memory_size=16)
    gen = torch.Generator().manual_seed(8)
    for size in (6, 6, 6, 16, 3):  # wraps, then a whole memory at once
        rows, labels = torch.randn(size, DIM, generator=gen), torch.randint(0, 5, (size,), generator=gen)
        ours.add_to_memory(rows, labels, size)
        theirs.add_to_memory(rows, labels, size)
        assert_same_state(ours, theirs)
    ours.reset_queue()
    theirs.reset_queue()
    assert_same_state_without_batch(ours, theirs)
    assert ours.embedding_memory.device == theirs.embedding_memory.device
    assert not ours.embedding_memory.any() and ours.queue_idx == 0 and not ours.has_been_filled
    assert_side_by_side(ours, theirs, batches(6, dtype=torch.float32, seed=9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [DENSE["contrastive"], DENSE["multi_similarity"], DENSE["triplet"], SUPPORTED["CircleLoss"]])
def test_float16_embeddings_give_pmls_dtypes(make):
    """The memory takes the embeddings' float16 and the loss comes back in float16, as PML's; a PML miner
    handed float16 embeddings and ``loss.embedding_memory`` works."""
    ours = CrossBatchMemory(make(), DIM, memory_size=MEMORY)
    theirs = losses.CrossBatchMemory(make(), DIM, memory_size=MEMORY)
    for embeddings, labels, _ in batches(6, dtype=torch.float16, seed=10):
        our_loss, our_grad = loss_and_grad(ours, embeddings, labels)
        pml_loss, pml_grad = loss_and_grad(theirs, embeddings, labels)
        assert our_loss.dtype == pml_loss.dtype == our_grad.dtype == torch.float16
        torch.testing.assert_close(our_loss, pml_loss, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(our_grad, pml_grad, rtol=1e-2, atol=1e-3)
        assert_same_state(ours, theirs)
        a1, p, a2, n = miners.MultiSimilarityMiner()(embeddings, labels, ours.embedding_memory, ours.label_memory)
        assert len(a1) == len(p) and len(a2) == len(n)


def test_float16_ntxent_is_computed_in_float32():
    """PML's "+ tiny" inside NTXent's log caps a pair's loss at -log(6e-5) = 9.7 in float16; ours follows
    the float64 value and returns it in float16."""
    ours = CrossBatchMemory(losses.NTXentLoss(0.1), DIM, memory_size=MEMORY)
    exact = losses.CrossBatchMemory(losses.NTXentLoss(0.1), DIM, memory_size=MEMORY)
    for embeddings, labels, _ in batches(5, dtype=torch.float16, seed=12):
        loss = ours(embeddings, labels)
        assert loss.dtype == torch.float16
        torch.testing.assert_close(loss.double(), exact(embeddings.double(), labels), rtol=2e-3, atol=0)


def pml_run(make, steps):
    theirs = losses.CrossBatchMemory(make(), DIM, memory_size=MEMORY)
    for embeddings, labels, mask in steps:
        theirs(embeddings, labels, enqueue_mask=mask)
    return theirs


def round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("saved_after", [3, 9], ids=["partly_filled", "full"])
def test_a_checkpoint_of_pmls_class_loads_and_continues_as_pml_would(saved_after):
    steps = list(batches(14, seed=13))
    theirs = pml_run(DENSE["supcon"], steps[:saved_after])
    assert theirs.has_been_filled == (saved_after == 9)
    ours = CrossBatchMemory(DENSE["supcon"](), DIM, memory_size=MEMORY)
    ours.load_state_dict(round_trip(theirs.state_dict()))
    if theirs.has_been_filled:  # a PML checkpoint has no pointer: the run that saved it tells
        assert (ours.queue_idx, ours.has_been_filled) == (0, True)
        ours.queue_idx = theirs.queue_idx
    assert_same_state_without_batch(ours, theirs)
    assert_side_by_side(ours, theirs, steps[saved_after:])


def test_a_full_pml_checkpoint_with_its_pointer_at_zero_needs_nothing():
    steps = [(torch.randn(10, DIM, dtype=torch.float64), torch.arange(10) % 3, None) for _ in range(8)]
    theirs = pml_run(DENSE["ntxent"], steps[:4])  # 40 rows: full, the pointer back at 0
    ours = CrossBatchMemory(DENSE["ntxent"](), DIM, memory_size=MEMORY)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state_without_batch(ours, theirs)
    assert_side_by_side(ours, theirs, steps[4:])


def test_our_checkpoint_resumes_pointer_fill_and_warm_up():
    steps = list(batches(14, masked=True, seed=14))
    ours = CrossBatchMemory(DENSE["triplet"](), DIM, memory_size=MEMORY, start_step=2)
    for embeddings, labels, mask in steps[:7]:
        ours(embeddings, labels, enqueue_mask=mask)
    resumed = CrossBatchMemory(DENSE["triplet"](), DIM, memory_size=MEMORY, start_step=2)
    resumed.load_state_dict(round_trip(ours.state_dict()))
    assert (resumed.queue_idx, resumed.has_been_filled, resumed.step) == (ours.queue_idx, ours.has_been_filled, 7)
    for embeddings, labels, mask in steps[7:]:
        assert torch.equal(ours(embeddings, labels, enqueue_mask=mask), resumed(embeddings, labels, enqueue_mask=mask))
    assert torch.equal(ours.embedding_memory, resumed.embedding_memory)
    # PML's class reads the memory of our checkpoint (it has no place for the rest)
    theirs = losses.CrossBatchMemory(DENSE["triplet"](), DIM, memory_size=MEMORY)
    assert theirs.load_state_dict(ours.state_dict(), strict=False).unexpected_keys == ["_extra_state"]
    assert torch.equal(theirs.embedding_memory, ours.embedding_memory.float())  # into its float32 buffer


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
@pytest.mark.parametrize("make", [DENSE["contrastive_xbm"], SUPPORTED["LiftedStructureLoss"]])
def test_warm_up_leaves_the_memory_out_then_starts_it_empty(make, masked):
    """XBM's warm-up (PML #478): for start_step calls the loss is PML's on the batch alone (the queries
    against this batch's keys with a mask), and nothing is enqueued; then it is PML's CrossBatchMemory fed
    from that call on."""
    steps = list(batches(24 if masked else 12, masked=masked, seed=15))
    ours = CrossBatchMemory(make(), DIM, memory_size=MEMORY, start_step=3)
    plain = make()

    def plain_on_the_batch(x, labels, indices_tuple, mask):
        return plain(x, labels) if mask is None else plain(x[~mask], labels[~mask], None, x[mask], labels[mask])

    for embeddings, labels, mask in steps[:3]:
        expected = loss_and_grad(plain_on_the_batch, embeddings, labels, mask)
        torch.testing.assert_close(loss_and_grad(ours, embeddings, labels, mask), expected)
        assert ours.queue_idx == 0 and not ours.embedding_memory.any()
    theirs = losses.CrossBatchMemory(make(), DIM, memory_size=MEMORY)
    assert_side_by_side(ours, theirs, steps[3:])


def test_user_indices_tuple_is_mapped_to_memory_slots():
    ours = CrossBatchMemory(losses.ContrastiveLoss(), DIM, memory_size=MEMORY)
    pair_miner = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    for embeddings, labels, _ in batches(10, dtype=torch.float32):
        mined = pair_miner(embeddings, labels)
        loss = ours(embeddings, labels, indices_tuple=mined)
        memory, memory_labels = ours.embedding_memory[: ours.num_filled], ours.label_memory[: ours.num_filled]
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
        torch.testing.assert_close(loss, expected)


def test_empty_enqueue_leaves_the_memory_alone():
    """PML 2.9 marks its memory full after enqueuing nothing and then scores its unfilled zero rows."""
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(10, DIM), torch.arange(10) % 4)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in ours.state_dict().items()}
    queries, labels = torch.randn(5, DIM), torch.arange(5) % 4
    loss = ours(queries, labels, enqueue_mask=torch.zeros(5, dtype=torch.bool))
    assert state["_extra_state"] == {**ours.state_dict()["_extra_state"], "step": 1}
    assert torch.equal(state["embedding_memory"], ours.embedding_memory)
    memory, memory_labels = ours.embedding_memory[:10], ours.label_memory[:10]
    expected = losses.NTXentLoss()(
        queries, labels, lmu.get_all_pairs_indices(labels, memory_labels), memory, memory_labels
    )
    torch.testing.assert_close(loss, expected)


def test_more_masked_rows_than_memory_keep_the_newest():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=8)
    keys = torch.randn(11, DIM)
    ours(torch.cat([torch.randn(3, DIM), keys]), torch.arange(14), enqueue_mask=torch.arange(14) >= 3)
    assert torch.equal(ours.embedding_memory, keys[3:]) and ours.has_been_filled and ours.queue_idx == 0


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
    criterion = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    with pytest.raises(error, match=match):
        call(criterion)
    assert criterion.step == 0 and criterion.queue_idx == 0


def test_non_finite_embeddings_leave_the_memory_unchanged():
    ours = CrossBatchMemory(losses.NTXentLoss(), DIM, memory_size=MEMORY)
    ours(torch.randn(6, DIM), torch.arange(6))
    memory, extra = ours.embedding_memory.clone(), ours.get_extra_state()
    bad = torch.randn(6, DIM)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ours(bad, torch.arange(6))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ours.add_to_memory(bad, torch.arange(6), 6)
    assert torch.equal(memory, ours.embedding_memory) and extra == ours.get_extra_state()


@pytest.mark.parametrize("kwargs", [{"embedding_size": 0}, {"memory_size": 2.5}, {"start_step": -1}])
def test_bad_sizes_are_named(kwargs):
    arguments = {"embedding_size": DIM, "memory_size": MEMORY, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a"):
        CrossBatchMemory(losses.NTXentLoss(), **arguments)


def test_unsupported_loss_is_rejected_like_pml():
    with pytest.raises(Exception, match="CrossBatchMemory not supported for ArcFaceLoss"):
        CrossBatchMemory(losses.ArcFaceLoss(10, DIM), DIM)


@pytest.mark.parametrize("name", ["ntxent", "contrastive_xbm", "multi_similarity", "triplet"])
def test_autocast_keeps_the_dense_products_in_float32(name):
    """Under CPU autocast (bfloat16) the dense path computes as without it; the loss keeps the embeddings' dtype."""
    ours, plain = CrossBatchMemory(DENSE[name](), DIM, MEMORY), CrossBatchMemory(DENSE[name](), DIM, MEMORY)
    for embeddings, labels, _ in batches(6, dtype=torch.float32, seed=16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(embeddings, labels)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, plain(embeddings, labels))
