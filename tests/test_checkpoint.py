import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_memory import MemoryBank, Queue
from ssl_memory.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def draws(generator):
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),  # odd count: leaves a cached Gaussian in numpy's legacy state
        torch.rand(3),
        torch.randn(3, generator=generator),
    )


def assert_same_draws(a, b):
    assert a[:3] == b[:3]
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_rng_state_replays_every_source_through_a_saved_file(tmp_path):
    generator = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn(1)  # a pending cached Gaussian is part of numpy's state
    state = capture_rng_state({"augment": generator})
    first = draws(generator)
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    draws(generator)  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], {"augment": generator})
    assert_same_draws(first, draws(generator))


def test_rng_state_survives_a_new_process(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    np.random.randn(1)
    save_checkpoint(capture_rng_state(), tmp_path / "rng.pt")
    expected = ([random.random()], np.random.rand(2).tolist(), np.random.randn(1).tolist(), torch.rand(2).tolist())
    script = textwrap.dedent(
        f"""
        import random, numpy as np, torch
        from ssl_memory.checkpoint import load_checkpoint, restore_rng_state
        restore_rng_state(load_checkpoint({str(tmp_path / "rng.pt")!r}))
        print(repr(([random.random()], np.random.rand(2).tolist(), np.random.randn(1).tolist(), torch.rand(2).tolist())))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert eval(out.stdout) == expected


def test_restore_names_a_missing_generator_and_changes_nothing():
    state = capture_rng_state()
    torch.rand(1), random.random()
    before = (torch.get_rng_state(), random.getstate())
    with pytest.raises(KeyError, match="'augment' is not in the saved state"):
        restore_rng_state(state, {"augment": torch.Generator()})
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_restore_refuses_cuda_states_without_cuda():
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"CUDA random states for 1 device\(s\) but 0 are visible"):
        restore_rng_state(state)
    assert torch.equal(torch.get_rng_state(), before)


def test_memories_round_trip_exactly(tmp_path):
    bank, queue = MemoryBank(20, 4, generator=torch.Generator().manual_seed(0)), Queue(7, 4)
    bank.update(torch.tensor([1, 2, 1]), torch.randn(3, 4))
    bank.groups[5] = 2
    queue.enqueue(torch.randn(3, 4))
    queue.enqueue(torch.randn(6, 4))  # wrapped: pointer 2, full
    save_checkpoint({"bank": bank.state_dict(), "queue": queue.state_dict()}, tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    bank2, queue2 = MemoryBank(20, 4), Queue(7, 4)
    bank2.load_state_dict(state["bank"])
    queue2.load_state_dict(state["queue"])
    for a, b in zip(
        [*bank.state_dict().values(), *queue.state_dict().values()],
        [*bank2.state_dict().values(), *queue2.state_dict().values()],
    ):
        assert torch.equal(a, b)
    assert int(queue2.pointer) == 2 and queue2.is_full


def test_save_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, str(path))
    assert load_checkpoint(path) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    reference_mode = reference.stat().st_mode & 0o777
    assert path.stat().st_mode & 0o777 == reference_mode  # the umask decides, as for any file


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint({"epoch": 2, "bad": lambda: 0}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_save_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint({}, tmp_path / "missing" / "c.pt")


WRITER = """
import sys, torch
from ssl_memory.checkpoint import save_checkpoint
path, size = sys.argv[1], int(sys.argv[2])
for version in range(1_000_000):
    save_checkpoint({"version": version, "data": torch.full((size,), float(version))}, path)
    print(version, flush=True)
"""


def partial_writes(folder, full_size):
    sizes = []
    for temporary in folder.glob(".last.pt.*.tmp"):
        try:
            sizes.append(temporary.stat().st_size)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return [size for size in sizes if 0 < size < full_size]


def test_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    size = 4_000_000  # 16 MB a checkpoint: long enough to catch a write in progress
    kills_mid_write = 0
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(size)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            writer.stdout.readline()  # one complete checkpoint exists
            full_size = path.stat().st_size
            deadline = time.monotonic() + 30
            while not partial_writes(tmp_path, full_size):
                assert time.monotonic() < deadline, "never saw a checkpoint being written"
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait()
            writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL
        kills_mid_write += bool(partial_writes(tmp_path, full_size))
        state = load_checkpoint(path)
        assert torch.equal(state["data"], torch.full((size,), float(state["version"])))
        for stray in tmp_path.glob(".last.pt.*.tmp"):
            os.unlink(stray)
        if kills_mid_write == 3:
            break
    assert kills_mid_write == 3


@pytest.mark.parametrize("corrupt", ["torch", "generator", "numpy"])
def test_restore_with_a_corrupt_state_changes_nothing(corrupt):
    generator = torch.Generator().manual_seed(3)
    state = capture_rng_state({"augment": generator})
    if corrupt == "torch":
        state["torch"] = torch.zeros(3, dtype=torch.uint8)
    elif corrupt == "generator":
        state["generators"]["augment"] = torch.zeros(3, dtype=torch.uint8)
    else:
        state["numpy"]["key"] = torch.zeros(3, dtype=torch.int64)
    torch.rand(1), random.random(), np.random.rand(), torch.rand(1, generator=generator)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state(legacy=False), generator.get_state())
    with pytest.raises((RuntimeError, ValueError, IndexError)):  # whatever the refusing setter raises
        restore_rng_state(state, {"augment": generator})
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    numpy_after = np.random.get_state(legacy=False)
    assert (numpy_after["state"]["key"] == before[2]["state"]["key"]).all()
    assert numpy_after["state"]["pos"] == before[2]["state"]["pos"]
    assert torch.equal(generator.get_state(), before[3])
