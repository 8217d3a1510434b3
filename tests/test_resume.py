"""Two epochs in one go equal one epoch, a checkpoint, a new process and a resumed second epoch, bitwise.

The runs are the examples themselves (smoke sizes, CPU, one thread, fixed seeds); the resumed run
starts from the checkpoint the uninterrupted run wrote after its first epoch. The final weights,
the bank and its merge groups (plain_pytorch.py), the queue (moco_drop_in.py), the optimizer state,
every step's loss and the random states must be identical; the same holds under 2-process DDP (ddp.py).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # --standalone: a free port


def run_example(name, *args):
    launcher = TORCHRUN if name == "ddp" else []
    command = [sys.executable, *launcher, f"examples/{name}.py", "--smoke", *args]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if name == "ddp":
        assert "same memory on all 2 ranks" in result.stdout
    return result.stdout


def assert_identical(a, b, where="checkpoint"):
    """Bitwise equality of nested dicts, lists and tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def interrupted_and_uninterrupted(name, tmp_path):
    """Checkpoints after epoch 1 and epoch 2 of one run, and after a new process resumed from epoch 1."""
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    run_example(name, "--epochs", "2", "--keep-epochs", "--checkpoint", str(straight))
    shutil.copy(tmp_path / "straight.epoch1.pt", resumed)  # as if the run had been killed during epoch 2
    out = run_example(name, "--epochs", "2", "--resume", "--checkpoint", str(resumed))
    assert "resumed from" in out
    load = lambda path: torch.load(path, weights_only=True)
    return load(tmp_path / "straight.epoch1.pt"), load(straight), load(resumed)


def test_memory_bank_training_resumes_bitwise(tmp_path):
    after_one, straight, resumed = interrupted_and_uninterrupted("plain_pytorch", tmp_path)
    assert_identical(straight, resumed)
    bank, groups = "memory.features", "memory.groups"
    assert not torch.equal(after_one["criterion"][bank], resumed["criterion"][bank])  # the second epoch did work
    assert (resumed["criterion"][groups] != torch.arange(len(resumed["criterion"][groups]))).any()  # merges happened
    assert len(resumed["history"]) == 2 and all(h["losses"] for h in resumed["history"])


def test_moco_queue_training_resumes_bitwise(tmp_path):
    after_one, straight, resumed = interrupted_and_uninterrupted("moco_drop_in", tmp_path)
    assert_identical(straight, resumed)
    queue = resumed["criterion"]
    assert int(queue["queue.count"]) == queue["queue.slots"].shape[0]  # full, wrapped at least once
    assert not torch.equal(after_one["criterion"]["queue.slots"], queue["queue.slots"])


def test_ddp_training_resumes_bitwise_with_the_same_memory_on_both_ranks(tmp_path):
    """Two processes (gloo): each run ends with every rank holding rank 0's memory and weights (checked
    by ddp.py itself), and the resumed run ends exactly where the uninterrupted one does."""
    after_one, straight, resumed = interrupted_and_uninterrupted("ddp", tmp_path)
    assert_identical(straight, resumed)
    assert len(resumed["rng"]) == 2 and not torch.equal(resumed["rng"][0]["torch"], resumed["rng"][1]["torch"])
    assert not torch.equal(after_one["criterion"]["memory.features"], resumed["criterion"]["memory.features"])


@pytest.mark.parametrize(
    "a, b",
    [
        ({"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([1.0, 2.0 + 2**-20])}),
        ({"x": [0.5, 0.25]}, {"x": [0.5, 0.25000001]}),
        ({"x": torch.tensor([1, 2])}, {"x": torch.tensor([1.0, 2.0])}),
    ],
)
def test_the_comparison_sees_any_difference(a, b):
    with pytest.raises(AssertionError):
        assert_identical(a, b)
