"""Run a function in several CPU processes joined by a gloo process group, and collect what each returns.

Every run has a deadline: a rank stuck in a collective (the failure these tests exist to catch) makes
the test fail within seconds instead of hanging CI, and every process is killed.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_SECONDS = 120  # generous for 2 busy cores; a healthy run takes a few seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=DEADLINE_SECONDS)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        del result
    finally:
        # Free everything that holds the group (or tensors of its pending work) while Python still
        # runs, so that destroying it joins gloo's worker threads now. Left to interpreter exit, a
        # worker thread can release a tensor after finalisation began and abort the process
        # ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, deadline: float = DEADLINE_SECONDS) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result, in rank order.

    ``fn`` must be importable (defined at module level) and return something ``torch.save`` can store.
    Raises ``TimeoutError`` (after killing every process) when the ranks have not all finished within
    ``deadline`` seconds, and re-raises a rank's exception.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(world_size, _free_port(), fn, args, out_dir), nprocs=world_size, join=False
        )
        stop = time.monotonic() + deadline
        while not context.join(timeout=0.5):
            if time.monotonic() > stop:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"the {world_size} ranks did not finish within {deadline} s (a rank hangs)")
        return [torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]
