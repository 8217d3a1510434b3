"""Replicated against sharded memory bank at ImageNet-1k scale: memory per rank and step time, side by side.

W gloo ranks on CPU each run the same training step (the loss's forward and backward on a batch of
embeddings, then the bank write) with

- ``replicated``: :class:`~ssl_memory.MemoryBankLoss`, every rank holding all N entries and scoring
  its own rows against them;
- ``sharded``: :class:`~ssl_memory.ShardedMemoryBankLoss`, every rank holding about N / W entries
  and scoring every rank's rows against them.

For each storage dtype and layout, a fresh group of processes builds the loss, runs ``--warmup``
steps, then times ``--steps`` steps (barrier before and after each, so a step's time is the slowest
rank's). Reported per layout: the bank's bytes per rank (its buffers: rows, merge groups,
counters), those bytes per entry the rank holds (the sharded bank's replicated merge groups add
8 B x W to each), the peak resident set size of each rank's process (bank, step buffers,
interpreter and torch), and the median step time; the ratios sharded / replicated sit beside them.
The embeddings are random unit vectors with ``--views`` views per sample (consistency on,
pairwise), so the times count every collective of a real step.

Examples::

    python benchmarks/sharded_scale.py --out sharded_scale.json       # N = 1,281,167, D = 128, 2 ranks
    python benchmarks/sharded_scale.py --entries 100000 --steps 3     # a quick check, about a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402
from ssl_memory import MemoryBank, MemoryBankLoss, ShardedMemoryBank, ShardedMemoryBankLoss  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(layout: str, entries: int, dim: int, dtype: torch.dtype) -> torch.nn.Module:
    settings = {"temperature": 0.07, "consistency_weight": 1.0}
    if layout == "replicated":
        return MemoryBankLoss(memory=MemoryBank(entries, dim, dtype=dtype), **settings)
    return ShardedMemoryBankLoss(memory=ShardedMemoryBank(entries, dim, dtype=dtype), **settings)


def rank_worker(rank: int, world: int, port: int, config: dict, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(config["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    try:
        entries, dim, batch, views = config["entries"], config["dim"], config["batch"], config["views"]
        criterion = build(config["layout"], entries, dim, DTYPES[config["dtype"]])
        bank_bytes = sum(buffer.nbytes for buffer in criterion.memory.buffers())
        memory = criterion.memory
        rows = memory.shard.num_entries if isinstance(memory, ShardedMemoryBank) else memory.num_entries
        generator = torch.Generator().manual_seed(rank)
        times = []
        for step in range(config["warmup"] + config["steps"]):
            samples = torch.randint(0, entries, (batch,), generator=generator)
            embeddings = torch.randn(views * batch, dim, generator=generator).requires_grad_()
            dist.barrier()
            start = time.perf_counter()
            criterion(embeddings, samples.repeat(views)).backward()
            dist.barrier()
            if step >= config["warmup"]:
                times.append(time.perf_counter() - start)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        result = {"bank_bytes": bank_bytes, "rows": rows, "peak_rss_mb": peak_mb, "step_seconds": times}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


def run_layout(config: dict) -> list[dict]:
    """One fresh group of processes for one layout and dtype: each rank's figures, in rank order."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(rank_worker, args=(config["world"], port, config, out_dir), nprocs=config["world"])
        ranks = []
        for rank in range(config["world"]):
            with open(os.path.join(out_dir, f"{rank}.json")) as file:
                ranks.append(json.load(file))
        return ranks


def summarise(ranks: list[dict]) -> dict:
    bank = max(rank["bank_bytes"] for rank in ranks)
    steps = [max(times) for times in zip(*(rank["step_seconds"] for rank in ranks))]  # barrier-bounded anyway
    return {
        "bank_mb_per_rank": bank / 2**20,
        "bytes_per_held_entry": bank / max(rank["rows"] for rank in ranks),
        "peak_rss_mb_per_rank": max(rank["peak_rss_mb"] for rank in ranks),
        "step_seconds": statistics.median(steps),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_281_167, help="N (default: ImageNet-1k's train set)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("dtypes", "out")}
    rows = []
    for dtype in args.dtypes:
        figures = {}
        for layout in ("replicated", "sharded"):
            figures[layout] = summarise(run_layout({**settings, "layout": layout, "dtype": dtype}))
        replicated, sharded = figures["replicated"], figures["sharded"]
        rows.append({
            "dtype": dtype,
            **{f"{layout}_{key}": value for layout, values in figures.items() for key, value in values.items()},
            "bank_memory_ratio": sharded["bank_mb_per_rank"] / replicated["bank_mb_per_rank"],
            "peak_rss_ratio": sharded["peak_rss_mb_per_rank"] / replicated["peak_rss_mb_per_rank"],
            "step_time_ratio": sharded["step_seconds"] / replicated["step_seconds"],
        })
    print(f"N = {args.entries:,}, D = {args.dim}, {args.world} gloo ranks, {args.batch} samples x {args.views} views "
          f"per rank, {args.threads} thread(s) per rank")
    print(f"{'dtype':<9} {'layout':<11} {'bank MB/rank':>12} {'B/held':>8} {'peak RSS MB':>12} {'step s':>8}")
    for row in rows:
        for layout in ("replicated", "sharded"):
            print(f"{row['dtype']:<9} {layout:<11} {row[f'{layout}_bank_mb_per_rank']:>12.1f} "
                  f"{row[f'{layout}_bytes_per_held_entry']:>8.1f} {row[f'{layout}_peak_rss_mb_per_rank']:>12.0f} "
                  f"{row[f'{layout}_step_seconds']:>8.3f}")
        print(f"{row['dtype']:<9} {'ratio':<11} {row['bank_memory_ratio']:>12.3f} {'':>8} "
              f"{row['peak_rss_ratio']:>12.3f} {row['step_time_ratio']:>8.3f}")
    record = {"command": " ".join(["sharded_scale.py", *(argv or sys.argv[1:])]), "provenance": provenance(),
              "settings": settings, "dtypes": args.dtypes, "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
