"""The Lightning recipe (examples/lightning_bank.py) under a real Trainer: DDP, bf16, accumulation, resume.

The DDP runs launch the example as a user would (2 gloo processes), dump each rank's final memory and
every optimiser step's bank write, and compare both ranks with one process fed the same global batches.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_memory import MemoryBankLoss, NeighbourMerger
from ssl_memory.ddp import exclude_from_buffer_broadcast

pl = pytest.importorskip("pytorch_lightning")

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SAMPLES, SMOKE_EPOCHS = 400, 2  # --smoke: 500 signals, 80% for training; 2 epochs


def example():
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    import lightning_bank

    return lightning_bank


@pytest.fixture
def threads():
    """The example sets torch's threads for its process; give the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def reference(writes: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> MemoryBankLoss:
    """One process, the example's loss and merger (smoke settings), fed every step's rows of all ranks in rank order."""
    criterion = MemoryBankLoss(SMOKE_SAMPLES, 16, temperature=0.1, consistency_weight=1.0,
                               merger=NeighbourMerger(warmup=1, ratio=1.0))
    for step in zip(*writes):
        criterion.update_memory(torch.cat([e for e, _ in step]), torch.cat([i for _, i in step]))
    return criterion


def launch(folder, *options):
    """examples/lightning_bank.py on 2 gloo processes (smoke sizes): checkpoints and each rank's final state in ``folder``."""
    command = [sys.executable, "examples/lightning_bank.py", "--smoke", "--devices", "2", "--strategy", "ddp",
               "--accelerator", "cpu", "--checkpoint-dir", str(folder), "--dump", str(folder), *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory checksums agree on every rank" in result.stdout, result.stdout[-2000:]
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def broadcast_run(tmp_path_factory):
    """One run with the memory left in DDP's buffer broadcast, each epoch's checkpoint kept (two tests read it)."""
    folder = tmp_path_factory.mktemp("broadcast")
    return folder, launch(folder, "--broadcast-memory", "--keep-epochs")


def assert_ranks_hold_the_memory_of_one_process(ranks, broadcast):
    assert ("criterion.memory.features" in ranks[0]["ddp_ignored"]) is not broadcast
    expected = reference([rank["writes"] for rank in ranks])
    for rank in ranks:
        for name, value in expected.state_dict().items():
            assert torch.equal(rank["criterion"][name], value), name
        assert rank["history"] == [vars(report) | {"seconds": rank_report["seconds"]}
                                   for report, rank_report in zip(expected.merger.history, rank["history"])]
    # validation and the sanity check never wrote: each epoch wrote every sample once; one merge round an epoch
    assert int(ranks[0]["criterion"]["memory.samples_written"]) == SMOKE_EPOCHS * SMOKE_SAMPLES
    assert [report["epoch"] for report in ranks[0]["history"]] == [1.0, 2.0]
    assert ranks[0]["history"][-1]["entries_in_merged_groups"] > 0


def test_lightning_ddp_ranks_in_bf16_with_accumulation_hold_the_memory_of_one_process(tmp_path):
    """The memory out of DDP's buffer broadcast (the example's default), bf16-mixed, 2 batches accumulated."""
    ranks = launch(tmp_path, "--precision", "bf16-mixed", "--accumulate-grad-batches", "2")
    assert_ranks_hold_the_memory_of_one_process(ranks, broadcast=False)


def test_lightning_ddp_ranks_with_the_memory_in_the_broadcast_hold_the_memory_of_one_process(broadcast_run):
    assert_ranks_hold_the_memory_of_one_process(broadcast_run[1], broadcast=True)


def test_lightning_resume_continues_as_the_uninterrupted_run(tmp_path, threads):
    lightning_bank = example()
    smoke = ["--smoke", "--checkpoint-dir"]
    lightning_bank.main([*smoke, str(tmp_path / "whole"), "--epochs", "2", "--dump", str(tmp_path / "whole")])
    lightning_bank.main([*smoke, str(tmp_path / "cut"), "--epochs", "1"])
    lightning_bank.main([*smoke, str(tmp_path / "cut"), "--epochs", "2", "--resume", str(tmp_path / "cut/last.ckpt"),
                         "--dump", str(tmp_path / "resumed")])
    whole = torch.load(tmp_path / "whole/rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed/rank0.pt", weights_only=False)
    steps = len(resumed["losses"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"][-steps:]))
    for name, value in whole["criterion"].items():
        torch.testing.assert_close(resumed["criterion"][name], value, rtol=0, atol=1e-6, msg=name)
    assert [r["pairs_merged"] for r in resumed["history"]] == [r["pairs_merged"] for r in whole["history"]]

    # a checkpoint of another bank size is refused by the bank's own check, naming the state
    module = lightning_bank.MemoryBankModule(torch.nn.Linear(40, 16), torch.zeros(300, dtype=torch.long), 16)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 40)))
    with pytest.raises(ValueError, match=r"state_dict\['criterion\.memory\.features'\] must have shape \(300, 16\)"):
        trainer.fit(module, loader, ckpt_path=str(tmp_path / "cut/last.ckpt"))


def test_lightning_helper_lists_exactly_the_memory_buffers_for_ddp_to_skip():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            self.criterion = MemoryBankLoss(10, 4, merger=NeighbourMerger())

    model = Model()
    model._ddp_params_and_buffers_to_ignore = ["encoder.0.weight"]  # a user's own entry stays
    names = exclude_from_buffer_broadcast(model, model.criterion)
    expected = ["criterion." + name for name, _ in model.criterion.named_buffers()]
    assert names == ["encoder.0.weight", *expected] == model._ddp_params_and_buffers_to_ignore
    assert {"criterion.memory.features", "criterion.memory.groups", "criterion.merger.epochs_seen"} <= set(names)
    assert not any(name.startswith("encoder.1") for name in names)  # BatchNorm statistics keep their broadcast
    assert exclude_from_buffer_broadcast(model, model.criterion) == names  # idempotent
    with pytest.raises(ValueError, match="got none"):
        exclude_from_buffer_broadcast(model)
    with pytest.raises(ValueError, match=r"submodules must be modules of module, got \['Linear'\]"):
        exclude_from_buffer_broadcast(model, torch.nn.Linear(2, 2))


def test_lightning_ddp_resume_continues_as_the_uninterrupted_run_on_both_ranks(broadcast_run, tmp_path):
    """2 gloo processes resumed from the checkpoint the uninterrupted run wrote after its first epoch (as if
    killed during the second): each rank's losses and memory are the uninterrupted run's (each rank's RNG
    state travels in the checkpoint)."""
    folder, _ = broadcast_run
    (first_epoch,) = folder.glob("epoch=0-*.ckpt")
    launch(tmp_path, "--broadcast-memory", "--resume", str(first_epoch))
    for rank in range(2):
        whole = torch.load(folder / f"rank{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        steps = len(resumed["losses"])
        assert 0 < steps < len(whole["losses"])
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"][-steps:]))
        for name, value in whole["criterion"].items():
            torch.testing.assert_close(resumed["criterion"][name], value, rtol=0, atol=1e-6, msg=name)
        assert [r["pairs_merged"] for r in resumed["history"]] == [r["pairs_merged"] for r in whole["history"]]
