"""What DDP's buffer broadcast costs a memory bank held inside the wrapped module (Lightning's layout).

Two gloo processes on the CPU each train a small encoder with a ``MemoryBankLoss`` of N entries held as
an attribute of the wrapped module, as a LightningModule holds its loss. Two DDP wrappings of the same
module are timed side by side, alternating step by step in one run:

- ``broadcast``: DDP's default (``broadcast_buffers=True``, which Lightning keeps): rank 0's bank is
  sent to every rank before every forward;
- ``excluded``: the loss's buffers listed by ``ssl_memory.ddp.exclude_from_buffer_broadcast``; the bank
  stays identical on every rank through its own gathered writes.

A step is forward (encoder + loss + bank write) + backward + optimiser step, for B samples x V views
a rank. Output: the median step time of each and their ratio, the bytes the broadcast sends a step,
and a check that both end with the same bank on both ranks. Results go to ``--out`` as JSON.

Example::

    python benchmarks/ddp_broadcast.py --out benchmarks/results/ddp_broadcast/ddp_broadcast.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402
from ssl_memory import MemoryBankLoss  # noqa: E402
from ssl_memory.ddp import exclude_from_buffer_broadcast  # noqa: E402


class Model(nn.Module):
    """An encoder and the loss that holds the bank, in one module: what DDP wraps under Lightning."""

    def __init__(self, num_entries: int, dim: int, width: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, dim))
        self.criterion = MemoryBankLoss(num_entries, dim, consistency_weight=1.0)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(x), indices)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    template = Model(args.entries, args.dim, args.width)
    models = {}
    for name in ("broadcast", "excluded"):
        model = Model(args.entries, args.dim, args.width)
        model.load_state_dict(template.state_dict())
        if name == "excluded":
            exclude_from_buffer_broadcast(model, model.criterion)
        models[name] = (DistributedDataParallel(model), torch.optim.SGD(model.parameters(), lr=0.01))
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch * args.views, args.width, generator=g)
        indices = torch.randint(0, args.entries, (args.batch,), generator=g).repeat_interleave(args.views)
        for name, (model, optimizer) in models.items():
            dist.barrier()
            start = time.perf_counter()
            loss = model(x, indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dist.barrier()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    same = []
    for model, _ in models.values():
        bank = model.module.criterion.memory.features
        reference = bank.clone()
        dist.broadcast(reference, 0)
        same.append(bool(torch.equal(reference, bank)))
    if rank == 0:
        buffers = models["broadcast"][0].module.criterion.state_dict().values()
        queue.put({
            "median_seconds": {name: statistics.median(values) for name, values in times.items()},
            "same_bank_on_every_rank": dict(zip(models, same)),
            "broadcast_bytes_per_step": sum(b.numel() * b.element_size() for b in buffers),
        })
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=65_536, help="bank size N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="samples a rank a step")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="input width of the encoder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--out", default=None, help="a JSON file for the results")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(worker, args=(args.world, args.port, args, queue), nprocs=args.world, start_method="spawn")
    result = queue.get()
    seconds = result["median_seconds"]
    result["ratio_broadcast_to_excluded"] = seconds["broadcast"] / seconds["excluded"]
    result = {"command": "python benchmarks/ddp_broadcast.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "provenance": provenance(), "settings": vars(args), **result}
    print(f"N = {args.entries}, D = {args.dim}, {args.world} gloo ranks, {args.batch} x {args.views} views a rank: "
          f"step {seconds['broadcast'] * 1e3:.1f} ms with the broadcast, {seconds['excluded'] * 1e3:.1f} ms without "
          f"({result['ratio_broadcast_to_excluded']:.2f}x); broadcast {result['broadcast_bytes_per_step'] / 2**20:.1f} "
          f"MiB a step; same bank on every rank: {result['same_bank_on_every_rank']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
