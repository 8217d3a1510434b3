"""What ``torch.compile`` costs for each loss: the graphs dynamo makes, its graph breaks and the compile time.

Each loss is compiled alone (``dynamo.reset()`` between them) and trained for a few steps on small batches,
as ``tests/test_compile.py`` does: the memory bank loss with a merged group, the MoCo queue loss with
MoCHi mixing on a queue that wraps around, the cross-batch loss past its warm-up. Seconds are the wall
time of those steps, compiling included, beside the same steps in eager mode; the first inductor row also
pays inductor's one-time start in the process, and every inductor row depends on its on-disk cache (the
first command gives it an empty one). Results go to ``--out`` as JSON.

Usage::

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_graphs.py \
        --out benchmarks/results/compile/compile.json
    python benchmarks/compile_graphs.py --backends aot_eager inductor --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402
from ssl_memory import CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, QueueLoss  # noqa: E402

DIM, BATCH = 8, 6  # BATCH samples a step, two views each


def make(name: str) -> tuple[torch.nn.Module, Callable]:
    """A fresh loss and how a step calls it on (embeddings of 2 x BATCH rows, BATCH sample ids)."""
    if name == "bank":
        loss = MemoryBankLoss(30, DIM, temperature=0.1, consistency_weight=0.5)
        loss.memory.groups[[4, 9, 11]] = 4  # a merged group
        return loss, lambda f, e, i: f(e, i)
    if name == "queue+mochi":
        mixer = HardNegativeMixer(4, 4, 2, generator=torch.Generator().manual_seed(2))
        loss = QueueLoss(size=14, dim=DIM, mixer=mixer)  # 14: batches wrap around the ring
        return loss, lambda f, e, i: f(e[:BATCH], e[BATCH:].detach(), i[:BATCH])
    loss = CrossBatchLoss(size=16, dim=DIM, margin=0.2, start_step=1)
    return loss, lambda f, e, i: f(e, i % 4)


def train(name: str, backend: str | None, steps: int) -> dict:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(10, DIM)
    loss, call = make(name)
    fn = loss if backend is None else torch.compile(loss, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(2 * BATCH, 10, generator=gen)
        ids = torch.randint(0, 30, (BATCH,), generator=gen).repeat(2)
        value = call(fn, model(x), ids)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {
        "loss": name,
        "backend": backend or "eager",
        "steps": steps,
        "seconds": round(seconds, 2),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def table(rows: list[dict]) -> str:
    lines = ["| loss | backend | steps | graphs | graph breaks | seconds |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['loss']} | {r['backend']} | {r['steps']} | {r['graphs']} | {r['graph_breaks']} | {r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["bank", "queue+mochi", "cross-batch"])
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the results")
    args = parser.parse_args(argv)
    record = {"command": " ".join(["compile_graphs.py", *argv]), "provenance": provenance()}
    rows = [train(name, backend, args.steps) for name in args.losses for backend in (None, *args.backends)]
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({**record, "settings": settings, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
