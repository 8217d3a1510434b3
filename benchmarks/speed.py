"""Speed and peak memory of one training step of each memory loss, as ratios to the bare floor.

One step is forward + backward + memory update for B queries of width D against a memory of M entries.
The floor is the plain MoCo computation written by hand: normalise, ``l_pos = (q * k).sum(1)``,
``l_neg = q @ queue.T``, cross-entropy on ``cat([l_pos, l_neg]) / T``, backward, then an in-place
enqueue of the keys. Every case runs in its own subprocess under a time limit and an address-space
limit, so a case that would hang or exhaust memory is reported as ``timeout`` / ``out of memory``.

Cases:
    floor               the bare computation above
    queue               ssl_memory.QueueLoss
    queue+mochi         QueueLoss with HardNegativeMixer(1024, 1024, 512)
    plain-mochi         MoCHi written plainly, as in the paper: the floor plus top-1024 hardest, 1024 pair
                        mixes and 512 query mixes (i.i.d. draws) materialised, normalised and appended
    bank                ssl_memory.MemoryBankLoss, one view (NPID)
    bank+views          MemoryBankLoss, B/4 samples x 4 views, pairwise consistency, 10% of entries merged
    bank+views-nosync   the same with checks=False: no host read, so the views' layout is not known
    cross-batch         ssl_memory.CrossBatchLoss (XBM), B/4 classes x 4
    cross-batch-nosync  the same with checks=False: no host read, so the pairs are not listed
    ours-cbm-moco       ssl_memory.pml.CrossBatchMemory(NTXentLoss(0.07)) in PML's MoCo recipe (enqueue_mask)
    pml-cbm-moco        PML's losses.CrossBatchMemory, same recipe
    ours-cbm-xbm        ssl_memory.pml.CrossBatchMemory(ContrastiveLoss(1, 0.5)), B/4 classes x 4
    pml-cbm-xbm         PML's losses.CrossBatchMemory, same recipe (research-xbm's margins)
    ours-cbm-triplet    ssl_memory.pml.CrossBatchMemory(TripletMarginLoss()), B/4 classes x 4 (every triplet)
    pml-cbm-triplet     PML's losses.CrossBatchMemory, same loss
    ours-cbm-ms         ssl_memory.pml.CrossBatchMemory(MultiSimilarityLoss()), B/4 classes x 4
    pml-cbm-ms          PML's losses.CrossBatchMemory, same loss

The XBM cases fill the memory with 1,000 labels, so each query has about M/1,000 positives in it.

Outputs in ``--out``: ``speed.json`` (every measurement), ``speed.md`` (a table of seconds, ratios to
the floor and peak memory) and ``speed.png`` (time against M, log-log).

Examples::

    python benchmarks/speed.py                     # the README's table: M = 4096, 16384, 65536 on CPU
    python benchmarks/speed.py --quick             # small M, a few steps: a smoke run
    python benchmarks/speed.py --device cuda       # on a GPU
    python benchmarks/speed.py --cases floor queue+mochi plain-mochi --out /tmp/speed   # some cases only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402

TEMPERATURE = 0.07
SLOW_STEP_SECONDS = 2.0
VIEWS = 4
CASES = (
    "floor",
    "queue",
    "queue+mochi",
    "plain-mochi",
    "bank",
    "bank+views",
    "bank+views-nosync",
    "cross-batch",
    "cross-batch-nosync",
    "ours-cbm-moco",
    "pml-cbm-moco",
    "ours-cbm-xbm",
    "pml-cbm-xbm",
    "ours-cbm-triplet",
    "pml-cbm-triplet",
    "ours-cbm-ms",
    "pml-cbm-ms",
)
OURS = tuple(case for case in CASES if case != "floor" and not case.startswith(("pml-", "plain-")))
MOCHI = (1024, 1024, 512)  # N hardest, s pair mixes, s' query mixes (MoCHi's ImageNet setting)
XBM_LOSSES = {  # PML's XBM recipe (research-xbm's margins), and the two other losses of the XBM paper
    "xbm": lambda losses: losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5),
    "triplet": lambda losses: losses.TripletMarginLoss(),
    "ms": lambda losses: losses.MultiSimilarityLoss(),
}


def _our_pml():
    from ssl_memory import pml

    return pml


def _unit(rows: int, dim: int, device: str, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=gen), dim=1).to(device)


def plain_mochi_logits(
    q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, num_hard: int, num_mix: int, num_query_mix: int
) -> torch.Tensor:
    """MoCHi's synthetic negatives as the paper writes them: built, normalised, then multiplied by q."""
    batch = q.shape[0]
    with torch.no_grad():
        hardest = l_neg.topk(num_hard, dim=1).indices  # (B, N) rows of the queue
        pick = lambda count: hardest.gather(1, torch.randint(num_hard, (batch, count), device=q.device))  # noqa: E731
        a = torch.rand(batch, num_mix, 1, device=q.device)
        pair = a * queue[pick(num_mix)] + (1 - a) * queue[pick(num_mix)]
        b = torch.rand(batch, num_query_mix, 1, device=q.device) / 2
        with_query = b * q.detach().unsqueeze(1) + (1 - b) * queue[pick(num_query_mix)]
        mixes = F.normalize(torch.cat([pair, with_query], dim=1), dim=2)
    return torch.einsum("bd,bsd->bs", q, mixes)


def build_step(case: str, size: int, batch: int, dim: int, device: str) -> Callable[[], None]:
    """Return a function running one training step of ``case``; inputs are made once, up front."""
    from pytorch_metric_learning import losses as pml_losses

    import ssl_memory

    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    keys = _unit(batch, dim, device, gen)
    class_labels = torch.arange(batch, device=device) // VIEWS  # B/4 classes (or samples) x 4

    def filled(memory_module, enqueue):
        """Fill a memory completely before timing, so every case reads M entries."""
        for start in range(0, size, batch):
            enqueue(memory_module, _unit(min(batch, size - start), dim, device, gen), start)
        return memory_module

    def backward(loss: torch.Tensor) -> None:
        embeddings.grad = None
        loss.backward()

    if case in ("floor", "plain-mochi"):
        queue = _unit(size, dim, device, gen)
        pointer = [0]
        target = torch.zeros(batch, dtype=torch.long, device=device)
        mochi = case == "plain-mochi"

        def step():
            q = F.normalize(embeddings, dim=1)
            l_neg = q @ queue.T
            parts = [(q * keys).sum(1, keepdim=True), l_neg]
            if mochi:
                parts.append(plain_mochi_logits(q, queue, l_neg, *MOCHI))
            backward(F.cross_entropy(torch.cat(parts, dim=1) / TEMPERATURE, target))
            with torch.no_grad():
                rows = (pointer[0] + torch.arange(batch, device=device)) % size
                queue[rows] = keys
                pointer[0] = (pointer[0] + batch) % size

        return step

    if case in ("queue", "queue+mochi"):
        mixer = ssl_memory.HardNegativeMixer(*MOCHI) if case == "queue+mochi" else None
        criterion = ssl_memory.QueueLoss(size, dim, temperature=TEMPERATURE, mixer=mixer).to(device)
        filled(criterion.queue, lambda m, rows, start: m.enqueue(rows, torch.arange(rows.shape[0]) + start + size))
        return lambda: backward(criterion(embeddings, keys))

    checks = not case.endswith("-nosync")
    if case in ("bank", "bank+views", "bank+views-nosync"):
        views = case.startswith("bank+views")
        criterion = ssl_memory.MemoryBankLoss(
            size, dim, temperature=TEMPERATURE, consistency_weight=1.0 if views else 0.0, checks=checks
        ).to(device)
        if views:  # 10% of the entries merged, in pairs named after their smaller member
            pairs = torch.randperm(size, generator=gen)[: size // 20 * 2].view(-1, 2)
            groups = torch.arange(size)
            groups[pairs.flatten()] = pairs.min(1).values.repeat_interleave(2)
            criterion.memory.groups.copy_(groups)
            samples = torch.randperm(size, generator=gen)[: batch // VIEWS]
            indices = samples.repeat(VIEWS).to(device)  # view-major, as MultiAugCollate returns
        else:
            indices = torch.randperm(size, generator=gen)[:batch].to(device)
        return lambda: backward(criterion(embeddings, indices))

    if case.startswith("cross-batch"):
        criterion = ssl_memory.CrossBatchLoss(size, dim, checks=checks).to(device)
        filled(criterion.queue, lambda m, rows, start: m.enqueue(rows, (torch.arange(rows.shape[0]) + start) % 1000))
        return lambda: backward(criterion(embeddings, class_labels))

    if case.endswith("cbm-moco"):
        # PML's MoCo recipe: queries and keys in one call, only the keys enqueued, key i positive for query i.
        owner = _our_pml() if case.startswith("ours") else pml_losses
        criterion = owner.CrossBatchMemory(pml_losses.NTXentLoss(TEMPERATURE), dim, memory_size=size).to(device)
        labels = torch.arange(batch, device=device).repeat(2)
        mask = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(device)
        fill = _unit(size, dim, device, gen)
        for start in range(0, size, batch):  # fill through the public API, with labels unseen by the timed steps
            chunk = fill[start : start + batch]
            criterion(chunk, torch.arange(chunk.shape[0], device=device) + batch + start,
                      enqueue_mask=torch.ones(chunk.shape[0], dtype=torch.bool, device=device))
        return lambda: backward(criterion(torch.cat([embeddings, keys]), labels, enqueue_mask=mask))

    if case.split("-cbm-")[-1] in XBM_LOSSES:
        owner = _our_pml() if case.startswith("ours") else pml_losses
        loss = XBM_LOSSES[case.split("-cbm-")[-1]](pml_losses)
        criterion = owner.CrossBatchMemory(loss, dim, memory_size=size).to(device)
        # both classes expose PML's memory attributes: fill them as a PML user would
        criterion.embedding_memory = _unit(size, dim, device, gen)
        criterion.label_memory = torch.arange(size, device=device) % 1000
        criterion.has_been_filled = True
        return lambda: backward(criterion(embeddings, class_labels))

    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(case: str, size: int, batch: int, dim: int, device: str, warmup: int, repeats: int) -> dict:
    """Time one case in this process: median seconds a step and peak memory (see the README for which)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step = build_step(case, size, batch, dim, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_memory_mb(device)
    seconds = []
    i = 0
    while i < warmup + repeats:
        sync()
        start = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - start
        if i == 0 and elapsed > SLOW_STEP_SECONDS:  # PML's cases: a few steps tell enough
            warmup, repeats = 0, min(repeats, 3)
        if i >= warmup:
            seconds.append(elapsed)
        i += 1
    return {
        "seconds": statistics.median(seconds),
        "peak_mb": _peak_memory_mb(device),
        "setup_peak_mb": baseline,
        "steps": len(seconds),
    }


def run_case(args: argparse.Namespace, case: str, size: int) -> dict:
    """Run one case in a subprocess under the time and address-space limits."""
    command = [
        sys.executable, __file__, "--worker", case, "--sizes", str(size), "--batch", str(args.batch),
        "--dim", str(args.dim), "--device", args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]
    limit = int(args.memory_limit_gb * 2**30)

    def limit_memory():
        if not args.device.startswith("cuda"):  # CUDA maps far more address space than it uses
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    record = {"case": case, "size": size}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.time_limit, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return {**record, "status": "ok", **json.loads(lines[-1])}
    out_of_memory = any(s in done.stderr for s in ("can't allocate memory", "CUDA out of memory", "MemoryError"))
    out_of_memory = out_of_memory or done.returncode in (-9, 137)
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
    return {**record, "status": "out of memory" if out_of_memory else "error", "error": error}


def _milliseconds(seconds: float) -> str:
    """Three significant digits below 100 ms (a GPU step takes well under one), whole ms above."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def markdown(results: list[dict], sizes: list[int]) -> str:
    floor = {r["size"]: r["seconds"] for r in results if r["case"] == "floor" and r["status"] == "ok"}
    header = "| case | " + " | ".join(f"M = {m:,}" for m in sizes) + " |"
    lines = [header, "|---" * (len(sizes) + 1) + "|"]
    for case in dict.fromkeys(r["case"] for r in results):
        cells = []
        for m in sizes:
            r = next((r for r in results if r["case"] == case and r["size"] == m), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                ratio = f"{r['seconds'] / floor[m]:.2f}x" if m in floor else "?"
                cells.append(f"{_milliseconds(r['seconds'])} ms ({ratio}), {r['peak_mb']:.0f} MB")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for case in dict.fromkeys(r["case"] for r in results):
        points = sorted((r["size"], r["seconds"]) for r in results if r["case"] == case and r["status"] == "ok")
        if points:
            style = "-" if case in OURS else ("k--" if case == "floor" else ":")
            ax.plot(*zip(*points), style, marker="o", label=case)
    ax.set(xscale="log", yscale="log", xlabel="memory size M", ylabel="seconds per step (median)")
    ax.set_title("forward + backward + memory update, B = 256, D = 128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds per case, setup included")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space limit per case (CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed")
    parser.add_argument("--quick", action="store_true", help="M in {1024, 4096}, 3 timed steps: a smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.warmup, args.repeats, args.time_limit = [1024, 4096], 1, 3, 120.0

    if args.worker:
        print(json.dumps(measure(args.worker, args.sizes[0], args.batch, args.dim, args.device, args.warmup,
                                 args.repeats)))
        return []

    from tqdm import tqdm

    results = []
    # PML's cases grow fastest: run them last at each size so a slow one never delays ours.
    jobs = [(case, m) for m in args.sizes for case in args.cases]
    for case, m in tqdm(jobs, desc="speed", unit="case"):
        results.append(run_case(args, case, m))
        tqdm.write(json.dumps(results[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "batch": args.batch, "dim": args.dim, "threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "provenance": provenance()}
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, args.sizes)
    (args.out / "speed.md").write_text(table + "\n")
    plot(results, args.out / "speed.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
