"""The library on a CUDA device: the results of CPU, and no host sync where README promises none.

Nothing else in the suite runs on a GPU. Each training case of ``tests/test_syncs.py`` runs on CPU and on
the device from the same seeds and inputs: losses, input gradients and every buffer of the state must
agree; ``torch.cuda.set_sync_debug_mode`` checks the sync counts test_syncs.py takes on CPU; the merger,
autocast, half-precision banks, the PML layer and the evaluation are compared with CPU too.

CPU and CUDA kernels may differ in the last bits of a float (summation order, atomics), so floats compare
within ``TOL``, integers (pointers, labels, groups, counts) exactly. The mixer draws with a generator on the
queries' device (a CPU one fails there), and CUDA's draws differ from CPU's for one seed: the comparison
replays a CPU generator's draws on the device; the device generator is checked on what it must not change.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from state_helpers import assert_unchanged, snapshot
from test_merging import bank_with, clustered, merged_groups, merger
from test_syncs import BATCH, DIM, EXPECTED, SIZE, make_case

from ssl_memory import HardNegativeMixer, MemoryBank, MemoryBankLoss, pml
from ssl_memory.evaluation import knn_accuracy, knn_predict
from ssl_memory.neighbours import FaissFlatSearch, TorchSearch, make_search
from ssl_memory.retrieval import retrieval_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is available)")

DEVICE = torch.device("cuda")
CPU = torch.device("cpu")
TOL = dict(atol=1e-5, rtol=1e-4)
SYNC_MESSAGE = "synchronizing CUDA operation"  # what set_sync_debug_mode warns or raises with
AUTO_THRESHOLD = 1  # below every bank here: "auto" would search approximately on CPU, never on a GPU


def assert_same(actual, expected):
    """``actual`` (device) equals ``expected`` (CPU): tensors, or lists and dicts of them (a ``state_dict``)."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        actual, expected = [actual[key] for key in expected], list(expected.values())
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    elif isinstance(expected, torch.Tensor):
        tolerance = TOL if expected.is_floating_point() else dict(atol=0, rtol=0)
        torch.testing.assert_close(actual.cpu(), expected, **tolerance)
    else:
        assert actual == expected


# ---------------------------------------------------------------- training steps
def build(case, checks, device, seed=0):
    """``test_syncs.make_case`` on ``device``, with a step that returns its loss."""
    criterion, embeddings, inputs = make_case(case, checks, seed, device)

    def step():
        embeddings.grad = None
        loss = criterion(*inputs)
        loss.backward()
        return loss.detach()

    return criterion, embeddings, step


def trajectory(criterion, embeddings, step, steps=5):
    """The losses and input gradients of ``steps`` steps, then the criterion's state."""
    losses, grads = [], []
    for _ in range(steps):
        losses.append(step())
        grads.append(embeddings.grad.clone())
    return losses, grads, criterion.state_dict()


def replay_cpu_draws(mixer, seed=0):
    """Make ``mixer`` use the draws of a CPU mixer seeded with ``seed``, made from CPU copies of its inputs."""
    twin = HardNegativeMixer(mixer.num_hard, mixer.num_mix, mixer.num_query_mix, torch.Generator().manual_seed(seed))

    def draw(query, negatives, logits):
        plan = twin._draw(query.cpu(), negatives.cpu(), None if logits is None else logits.cpu())
        return None if plan is None else {key: value.to(query.device) for key, value in plan.items()}

    mixer._draw = draw


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_training_steps_on_the_device_equal_those_on_cpu(case, checks):
    expected = trajectory(*build(case, checks, CPU))
    criterion, embeddings, step = build(case, checks, DEVICE)
    if getattr(criterion, "mixer", None) is not None:  # the device generator's draws differ: replay CPU's
        replay_cpu_draws(criterion.mixer)
    assert_same(trajectory(criterion, embeddings, step), expected)


def test_the_mixer_draws_with_its_generator_on_the_device_and_leaves_the_queue_alone():
    criterion, embeddings, step = build("queue+mixer", True, DEVICE)
    losses, grads, state = trajectory(criterion, embeddings, step)
    assert all(bool(torch.isfinite(x).all()) for x in losses + grads)
    assert_same(state, trajectory(*build("queue+mixer", True, CPU))[2])  # the mixes never reach the queue
    mixes = criterion.mixer(F.normalize(embeddings.detach(), dim=1), criterion.queue.features)
    assert mixes.shape == (BATCH, 6 + 3, DIM) and mixes.device.type == DEVICE.type
    torch.testing.assert_close(mixes.norm(dim=2), torch.ones(BATCH, 9, device=DEVICE))
    if DEVICE.type != "cpu":  # a generator on CPU cannot draw on the device: refused before the queue is written
        criterion.mixer.generator = torch.Generator().manual_seed(0)
        before = snapshot(criterion)
        with pytest.raises(ValueError, match="generator is on cpu but the queries are on cuda"):
            step()
        assert_unchanged(criterion, before)
        with pytest.raises(ValueError, match="generator is on cpu"):
            criterion.mixer(F.normalize(embeddings.detach(), dim=1), criterion.queue.features)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch.cuda.set_sync_debug_mode is a CUDA facility")
@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_host_syncs_per_step_on_the_device_are_those_of_test_syncs(case, checks):
    """checks=False: no sync at all (debug mode "error"); checks=True: the counted ones, as warnings."""
    _, _, step = build(case, checks, DEVICE)
    for _ in range(5):  # warm-up: memories filled, host copies of counters re-read after the move
        step()
    torch.cuda.synchronize()
    try:
        if checks:
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            syncs = [str(w.message) for w in caught if SYNC_MESSAGE in str(w.message)]
            assert len(syncs) == EXPECTED[case][0], syncs
        else:
            assert EXPECTED[case][1] == 0
            torch.cuda.set_sync_debug_mode("error")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- merging
def planted(noise=0.001):
    """test_merging's planted rows (4 classes, 3 pairs and 2 triples), bank rows near them, the planted sets."""
    x, _, sets = clustered(num=4, per=50, pairs=3, triples=2)
    rows = F.normalize(x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), dim=1)
    return x, rows, sorted(sets)


def merge_rounds(bank, embeddings=None, rounds=2, **kwargs):
    """``rounds`` rounds on ``bank`` (exact search unless told, every passing pair at once): groups, reports."""
    merging = merger(max_merged_share=1.0, **kwargs)
    return bank.groups, [merging.merge(bank, embeddings) for _ in range(rounds)]


def assert_same_reports(actual, expected):
    """Equal counts; the weakest similarity within float32 rounding; the wall time ignored."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a, e = dataclasses.asdict(a), dataclasses.asdict(e)
        assert a.pop("weakest_similarity") == pytest.approx(e.pop("weakest_similarity"), rel=1e-5, nan_ok=True)
        del a["seconds"], e["seconds"]
        assert a == e


@pytest.mark.parametrize("case", ["bank", "bank-auto", "embeddings", "embeddings-bank-on-cpu"])
def test_merge_rounds_on_the_device_equal_exact_ones_on_cpu(case):
    """The bank's rows searched, or embeddings on the device confirmed by the bank (on the device, or on CPU)."""
    backend, bank_on = ("auto" if "auto" in case else "torch"), (CPU if case.endswith("cpu") else DEVICE)
    # "auto" on a GPU is TorchSearch whatever the bank's size (on CPU, faiss's flat index is exact too)
    exact = TorchSearch if DEVICE.type == "cuda" else (TorchSearch, FaissFlatSearch)
    assert isinstance(make_search(backend, 200, DEVICE, faiss_threshold=AUTO_THRESHOLD), exact)
    x, rows, sets = planted()
    searched, confirm = (x, dict(bank_ratio=0.8)) if case.startswith("embeddings") else (None, {})
    groups, reports = merge_rounds(bank_with(rows), searched, **confirm)
    on_device = None if searched is None else searched.to(DEVICE)
    got, got_reports = merge_rounds(
        bank_with(rows).to(bank_on), on_device, backend=backend, faiss_threshold=AUTO_THRESHOLD, **confirm
    )
    assert got.device.type == bank_on.type and merged_groups(groups) == sets
    assert_same(got, groups)
    assert_same_reports(got_reports, reports)


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_bank_loss_under_bfloat16_autocast_on_the_device(dtype):
    """test_autocast's MemoryBankLoss case on the device, with a float32 or a bfloat16 bank."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(DIM, DIM).to(DEVICE)
    x, indices = torch.randn(BATCH, DIM, device=DEVICE), torch.arange(BATCH, device=DEVICE) % 6
    bank = MemoryBank(20, DIM, dtype=dtype, device=DEVICE)
    criterion = MemoryBankLoss(memory=bank, temperature=0.1, consistency_weight=0.5)
    twin = copy.deepcopy(criterion)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        embeddings = layer(x)
        assert embeddings.dtype == torch.bfloat16
        loss = criterion(embeddings, indices)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    torch.testing.assert_close(loss, twin(embeddings.float(), indices))
    loss.backward()
    assert bool(torch.isfinite(layer.weight.grad).all())
    features = criterion.memory.features
    assert features.dtype == dtype and bool(torch.isfinite(features).all())
    # unit rows within a storage ulp (float32: a few ulp of the norm's own rounding); the twin wrote the same
    # rows with the same seeded rounding, its views summed by CUDA's index_add_ in another order
    ulp = max(torch.finfo(dtype).eps, 1e-6)
    assert float((features.float().norm(dim=1) - 1).abs().max()) < ulp
    torch.testing.assert_close(features.float(), twin.memory.features.float(), atol=ulp, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_bank_on_the_device_keeps_small_steps_by_stochastic_rounding(dtype):
    """test_half_precision's small momentum steps, the roundings drawn by the device's generator."""
    gen = torch.Generator().manual_seed(0)
    start = F.normalize(torch.randn(128, 32, generator=gen), dim=1).to(dtype).float()
    target = F.normalize(start + 0.001 * torch.randn(128, 32, generator=gen), dim=1).to(DEVICE)
    banks = [MemoryBank(128, 32, 0.9, dtype=d, device=DEVICE) for d in (torch.float32, dtype)]
    for bank in banks:
        bank.features.copy_(start)
    for _ in range(100):
        for bank in banks:
            bank.update(torch.arange(128, device=DEVICE), target)
    reference, half = (bank.features.float().cpu() for bank in banks)
    moved, half_moved = reference - start, half - start
    assert abs(float((half_moved * moved).sum() / (moved * moved).sum()) - 1) < 0.02
    assert float((half - reference).abs().max()) < torch.finfo(dtype).eps


# ---------------------------------------------------------------- the PML layer
PML = {
    "memory-bank": lambda: pml.PMLMemoryBankLoss(SIZE, DIM, consistency_weight=0.7),
    "queue": lambda: pml.PMLQueueLoss(20, DIM, temperature=0.2),
    "xbm-contrastive": lambda: pml.CrossBatchMemory(pml_losses.ContrastiveLoss(1, 0.5), DIM, memory_size=40),
    "xbm-ntxent": lambda: pml.CrossBatchMemory(pml_losses.NTXentLoss(0.1), DIM, memory_size=40),
    "xbm-mined": lambda: pml.CrossBatchMemory(
        pml_losses.TripletMarginLoss(), DIM, memory_size=40, miner=pml.HardNegativeMiner(3, "triplets")
    ),
}


def pml_steps(name, device, steps=4):
    """Losses and input gradients of ``steps`` calls of ``PML[name]`` on ``device``, then its state."""
    loss_fn, out = PML[name]().to(device), []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(12, DIM, generator=gen).to(device).requires_grad_()
        labels = torch.randint(0, 6, (12,), generator=gen).to(device)  # classes, sample ids or dataset indices
        keys = {"ref_emb": torch.randn(12, DIM, generator=gen).to(device)} if name == "queue" else {}
        loss = loss_fn(x, labels, **keys)
        loss.backward()
        out += [loss.detach(), x.grad]
    return out, loss_fn.state_dict()


@pytest.mark.parametrize("name", list(PML))
def test_pml_losses_on_the_device_equal_cpu(name):
    assert_same(pml_steps(name, DEVICE), pml_steps(name, CPU))


@pytest.mark.parametrize("tuple_type", ["pairs", "triplets"])
def test_pml_miners_on_the_device_mine_what_they_mine_on_cpu(tuple_type):
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(10, DIM, generator=gen), torch.randint(0, 8, (10,), generator=gen)]
    inputs += [torch.randn(25, DIM, generator=gen), torch.randint(0, 8, (25,), generator=gen)]
    bank = MemoryBank(SIZE, DIM)
    bank.groups[[1, 2]], bank.groups[[5, 6, 7]] = 1, 5
    for make in (lambda b: pml.HardNegativeMiner(3, tuple_type), lambda b: pml.MergeGroupMiner(b, 3, tuple_type)):
        expected = make(bank)(*inputs)
        got = make(copy.deepcopy(bank).to(DEVICE))(*(x.to(DEVICE) for x in inputs))
        assert_same(list(got), list(expected))


# ---------------------------------------------------------------- evaluation
def test_evaluation_on_the_device_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 5
    data = torch.randn(5, 16, generator=gen)[labels] + 1.2 * torch.randn(200, 16, generator=gen)
    cpu = (data[:60], labels[:60], data[60:], labels[60:])
    query, query_labels, gallery, gallery_labels = on_device = tuple(x.to(DEVICE) for x in cpu)
    bank = MemoryBank(140, 16).to(DEVICE)
    bank.features.copy_(F.normalize(gallery, dim=1))
    accuracy = knn_accuracy(*cpu, k=20, chunk_size=16)
    assert 0.3 < accuracy < 1.0  # neither chance nor a trivial split
    assert knn_accuracy(*on_device, k=20, chunk_size=16) == accuracy
    assert knn_accuracy(query, query_labels, bank, gallery_labels, k=20) == accuracy
    assert_same(knn_predict(query, gallery, gallery_labels, k=20), knn_predict(cpu[0], cpu[2], cpu[3], k=20))
    assert retrieval_metrics(*on_device, chunk_size=16) == pytest.approx(retrieval_metrics(*cpu), rel=1e-6)
    assert retrieval_metrics(query, query_labels) == pytest.approx(retrieval_metrics(*cpu[:2]), rel=1e-6)
