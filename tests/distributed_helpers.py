"""Run a function in several CPU processes joined by a gloo process group, and collect what each returns.

The processes of each world size are started once and kept for the whole test session: starting
them (a fresh interpreter importing torch and PML per rank) costs several times what most of these
tests compute. Every call still runs under a deadline: a rank stuck in a collective (the failure
these tests exist to catch) makes the test fail within the deadline instead of hanging CI. A call
that times out or raises on any rank retires its processes (their collectives may be out of step),
and the next call starts fresh ones.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_SECONDS = 120  # generous for 2 busy cores; a healthy run takes a few seconds
_STOP = None  # the task that ends a worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=DEADLINE_SECONDS)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        while (task := tasks.get()) is not _STOP:
            fn, args = task
            try:
                result = fn(rank, world_size, *args)
                buffer = io.BytesIO()
                torch.save(result, buffer)
                del result
                results.put((rank, True, buffer.getvalue()))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
            gc.collect()
    finally:
        # Free everything that holds the group (or tensors of its pending work) while Python still
        # runs, so that destroying it joins gloo's worker threads now. Left to interpreter exit, a
        # worker thread can release a tensor after finalisation began and abort the process
        # ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


class _World:
    """``world_size`` started processes in one process group, running one task at a time."""

    def __init__(self, world_size: int) -> None:
        context = mp.get_context("spawn")
        self.tasks = [context.SimpleQueue() for _ in range(world_size)]
        self.results = context.Queue()
        port = _free_port()
        self.processes = [
            context.Process(target=_serve, args=(rank, world_size, port, self.tasks[rank], self.results), daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, args: tuple, deadline: float) -> list:
        for tasks in self.tasks:
            tasks.put((fn, args))
        stop = time.monotonic() + deadline
        outcomes = {}
        while len(outcomes) < len(self.tasks):
            try:
                rank, ok, payload = self.results.get(timeout=max(0.1, min(1.0, stop - time.monotonic())))
            except queue.Empty:
                dead = [p.pid for p in self.processes if not p.is_alive()]
                if dead or time.monotonic() > stop:
                    self.kill()
                    what = f"process(es) {dead} died" if dead else "a rank hangs"
                    raise TimeoutError(f"the {len(self.tasks)} ranks did not finish within {deadline} s ({what})") from None
                continue
            outcomes[rank] = (ok, payload)
            if not ok:  # the other ranks may now wait in a collective forever: give them a moment, then retire all
                stop = min(stop, time.monotonic() + 10)
        failures = {rank: payload for rank, (ok, payload) in outcomes.items() if not ok}
        if failures:
            self.kill()
            rank = min(failures)
            raise RuntimeError(f"rank {rank} raised:\n{failures[rank]}")
        return [torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(len(self.tasks))]

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(_STOP)
        for process in self.processes:
            process.join(timeout=20)
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        _worlds.pop(len(self.tasks), None)


_worlds: dict[int, _World] = {}


@atexit.register
def _close_all() -> None:
    for world in list(_worlds.values()):
        world.close()


def run_distributed(fn, world_size: int, *args, deadline: float = DEADLINE_SECONDS) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result, in rank order.

    ``fn`` must be importable (defined at module level) and return something ``torch.save`` can store.
    Raises ``TimeoutError`` (after killing every process) when the ranks have not all finished within
    ``deadline`` seconds, and ``RuntimeError`` with the traceback of the lowest rank that raised.
    """
    world = _worlds.get(world_size)
    if world is None:
        world = _worlds[world_size] = _World(world_size)
    return world.run(fn, args, deadline)
