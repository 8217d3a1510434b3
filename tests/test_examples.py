"""Every example runs in smoke mode as a script, quietly, on the library alone.

ddp.py runs under torchrun with 2 processes in tests/test_resume.py (twice: uninterrupted and resumed), which
checks that both ranks end with the same memory and one random state each in the checkpoint.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_distributed

from ssl_memory import MemoryBank

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["plain_pytorch", "moco_drop_in", "pml_trainer", "ddp"]
# What an example may import besides the standard library: the library, torch, PML and the examples' helper.
ALLOWED = {"ssl_memory", "torch", "pytorch_metric_learning", "helpers"}


def run(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def assert_quiet(result):
    """Nothing a user has to decode: no warning, no traceback, no complaint from a library's logger."""
    assert result.returncode == 0, result.stderr[-3000:]
    for word in ("Warning", "warning", "Traceback", "missing"):
        assert word not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("name", [*SCRIPTS, "helpers"])
def test_examples_import_only_the_library_torch_and_pml(name):
    tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    outside = {module.split(".")[0] for module in imported} - ALLOWED - set(sys.stdlib_module_names)
    assert not outside, f"examples/{name}.py imports {sorted(outside)}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "--threads" in out and "usage:" in out


@pytest.mark.parametrize("name", ["plain_pytorch", "moco_drop_in"])
def test_single_process_example_runs_in_smoke_mode(name, tmp_path):
    result = run(f"examples/{name}.py", "--smoke", "--checkpoint", str(tmp_path / "last.pt"))
    assert_quiet(result)
    assert "epoch 2: loss" in result.stdout
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and all(0.0 <= h["knn_accuracy"] <= 1.0 for h in state["history"])


def test_pml_trainer_runs_in_smoke_mode():
    result = run("examples/pml_trainer.py", "--smoke")
    assert_quiet(result)
    assert "epoch 2: precision_at_1" in result.stdout


def agreement_worker(rank, world_size):
    bank = MemoryBank(8, 3, generator=torch.Generator().manual_seed(0))
    check = example("ddp").same_on_every_rank
    before = check(bank)
    if rank == 1:
        bank.features[3, 0] += 1e-6
    return before, check(bank)


def test_the_ddp_check_sees_a_single_differing_value():
    assert run_distributed(agreement_worker, 2) == [(True, False)] * 2


def test_toy_signals_are_seeded_and_hold_every_class():
    helpers = example("helpers")
    a, b = helpers.toy_signals(500, seed=3), helpers.toy_signals(500, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    train_x, train_y, test_x, test_y = a
    assert train_x.shape == (400, 40) and test_x.shape == (100, 40) and set(train_y.tolist()) == set(range(10))
    assert not torch.equal(helpers.toy_signals(500, seed=4)[0], train_x)


def test_set_threads_leaves_a_core_to_each_loader_worker_and_process():
    helpers = example("helpers")
    before = torch.get_num_threads()
    try:
        cores = helpers.cpu_count()
        assert helpers.set_threads(3) == 3 == torch.get_num_threads()
        assert helpers.set_threads(0, loader_workers=1) == max(1, cores - 1)
        assert helpers.set_threads(0, processes=2) == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)
