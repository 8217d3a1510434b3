"""Every example runs in smoke mode as a script, ddp.py under torchrun with 2 processes (resume included)."""

import importlib
import os
import re
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # --standalone: a free port


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "usage:" in out


@pytest.mark.parametrize("name", ["plain_pytorch", "moco_drop_in"])
def test_single_process_example_runs_in_smoke_mode(name, tmp_path):
    result = run(f"examples/{name}.py", "--smoke", "--checkpoint", str(tmp_path / "last.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2: loss" in result.stdout
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and all(0.0 <= h["knn_accuracy"] <= 1.0 for h in state["history"])


def test_pml_trainer_runs_in_smoke_mode():
    result = run("examples/pml_trainer.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision_at_1" in result.stdout


def test_ddp_runs_under_torchrun_with_the_same_memory_on_both_ranks(tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    result = run(*TORCHRUN, "examples/ddp.py", "--smoke", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same memory on all 2 ranks" in result.stdout
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2  # one random state per rank


def agreement_worker(rank, world_size):
    bank = MemoryBank(8, 3, generator=torch.Generator().manual_seed(0))
    check = example("ddp").same_on_every_rank
    before = check(bank)
    if rank == 1:
        bank.features[3, 0] += 1e-6
    return before, check(bank)


def test_the_ddp_check_sees_a_single_differing_value():
    assert run_distributed(agreement_worker, 2) == [(True, False)] * 2


def readme_section_blocks():
    text = (EXAMPLES.parent / "README.md").read_text().split("## Drop into your trainer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)\n```", text, flags=re.S)


def stand_ins():
    """Tiny stand-ins for what the README's snippets take from the reader's own trainer."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 128)
    encoder_q, encoder_k = torch.nn.Linear(8, 128), torch.nn.Linear(8, 128)

    def momentum_update(q, k, m=0.99):
        with torch.no_grad():
            for a, b in zip(q.parameters(), k.parameters()):
                b.mul_(m).add_(a, alpha=1 - m)

    return {
        "torch": torch,
        "DataLoader": torch.utils.data.DataLoader,
        "dataset": torch.utils.data.TensorDataset(torch.randn(600, 8)),
        "augment": lambda x: x + 0.1 * torch.randn_like(x),
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "encoder_q": encoder_q,
        "encoder_k": encoder_k,
        "momentum_update": momentum_update,
        "x_q": torch.randn(16, 8),
        "x_k": torch.randn(16, 8),
        "embeddings": torch.randn(32, 128, requires_grad=True),
        "labels": torch.arange(32) % 4,
    }


def test_readme_section_has_three_snippets_that_run():
    blocks = readme_section_blocks()
    assert len(blocks) == 3
    for block in blocks:
        namespace = stand_ins()
        exec(compile(block, "README.md", "exec"), namespace)
        loss = namespace["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss)
