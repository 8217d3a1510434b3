"""Cost of NeighbourMerger's nearest-neighbour search at scale, on CPU.

Parts:
    exact    N = 100,000, D = 128: the exact torch search a merge round runs (each entry's
             ``max_group_size`` = 4 nearest entries, own entry and own merged group excluded) against
             the bare chunked ``x[rows] @ x.T`` + ``topk(5)`` it needs (same row chunks). Target:
             within 1.5x. faiss's exact flat index is timed too.
    approx   N = 1,281,167 (ImageNet-1k's train set), D = 128: the approximate search ``"auto"``
             picks at that size (:class:`~ssl_memory.IVFSearch`), end to end (k-means, cells,
             the cell-by-cell scan, each entry's 4 nearest). Targets: the true nearest neighbour
             (exact search) found for at least 95% of a random sample of the entries whose true
             neighbour is at least as similar as the merger's default floor (0.5), the only ones a
             round can merge (recall over all sampled entries is given too); peak memory under 4 GB.
             Then one full merge round (search, mutual nearest groups, ratio test, caps) with
             ``NeighbourMerger``'s defaults and the same search: target under 30 s. ``--faiss-ivf``
             also times faiss's own IVF scan (``FaissIVFSearch``'s defaults) on the same bank.

Peak memory is the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
of a fresh subprocess that holds the bank and runs the search, read before the recall check; it
includes the bank itself (656 MB at 1.28M x 128 in float32) and the interpreter with torch.

Data: uniformly random unit vectors have no neighbour structure for an index to use (an
approximate index then finds the true neighbour rarely, and the merger's similarity floor would
stop every merge anyway), so the bank is a stand-in for trained embeddings: 1,000 classes, each a
mixture of 10 modes; a sample is ``normalize(mode + noise)`` with the modes spread around their
class centre (``--spread``) and the noise around its mode (``--noise``), both isotropic Gaussians
of the given norm. ``--data random`` measures uniformly random vectors instead.

Examples::

    python benchmarks/merger_scale.py --faiss-ivf --out merger_scale.json          # the README's numbers
    python benchmarks/merger_scale.py --parts approx --noise 2.0 --spread 1.0 --out hard.json  # a harder bank
    python benchmarks/merger_scale.py --quick --out /tmp/merger.json     # small sizes, seconds
    python benchmarks/merger_scale.py --parts approx --nprobe 8 --out ivf8.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402

EXACT_RATIO_TARGET = 1.5
ROUND_SECONDS_TARGET = 30.0
RECALL_TARGET = 0.95
PEAK_MB_TARGET = 4096.0
MERGE_FLOOR = 0.5  # NeighbourMerger's default min_similarity
NEIGHBOURS = 4  # NeighbourMerger's default max_group_size: the neighbours a round searches per entry


def embeddings(n: int, dim: int, kind: str, spread: float, noise: float, seed: int) -> torch.Tensor:
    """``n`` unit rows: a class/mode mixture (``kind="clustered"``) or uniform on the sphere (``"random"``)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    classes, modes = 1000, 10
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1).repeat_interleave(modes, 0)
    centres += spread * torch.randn(classes * modes, dim, generator=gen) / dim**0.5
    which = torch.randint(0, classes * modes, (n,), generator=gen)
    out = torch.randn(n, dim, generator=gen).mul_(noise / dim**0.5).add_(centres[which])
    return F.normalize(out, dim=1)


def merged_groups(n: int, share: float, seed: int) -> torch.Tensor:
    """Group ids where about ``share`` of the entries sit in groups of two or three (as after a few rounds)."""
    gen = torch.Generator().manual_seed(seed + 1)
    groups = torch.arange(n)
    chosen = torch.randperm(n, generator=gen)[: int(share * n)]
    groups[chosen] = chosen[torch.randint(0, max(1, chosen.numel() // 2), (chosen.numel(),), generator=gen)]
    return groups


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bare_search(x: torch.Tensor, rows_per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor: chunked product and top-(k + 1) (the row itself comes first), nothing else."""
    sims, ids = [], []
    for start in range(0, x.shape[0], rows_per_block):
        values, found = (x[start : start + rows_per_block] @ x.T).topk(NEIGHBOURS + 1, dim=1)
        sims.append(values)
        ids.append(found)
    return torch.cat(sims), torch.cat(ids)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def exact_part(args: argparse.Namespace) -> list[dict]:
    from ssl_memory.neighbours import FaissFlatSearch, TorchSearch, faiss_available

    n = args.exact_n
    x = embeddings(n, args.dim, args.data, args.spread, args.noise, args.seed)
    groups = merged_groups(n, 0.1, args.seed)
    search = TorchSearch(args.chunk_size)
    rows = args.chunk_size or max(1, TorchSearch.BLOCK_ELEMENTS // n)
    (floor_sims, floor_ids), floor_s = timed(lambda: bare_search(x, rows))
    (sims, ids), ours_s = timed(lambda: search(x, NEIGHBOURS))
    # The floor's second column is the nearest other row whenever the row itself came first.
    agree = float((ids[:, 0] == floor_ids[:, 1]).float().mean())
    _, grouped_s = timed(lambda: search(x, NEIGHBOURS, groups))
    results = [
        dict(part="exact", case=f"bare matmul + topk({NEIGHBOURS + 1})", n=n, seconds=floor_s, ratio=1.0),
        dict(part="exact", case="TorchSearch, self excluded", n=n, seconds=ours_s, ratio=ours_s / floor_s,
             agreement_with_floor=agree, target=f"ratio <= {EXACT_RATIO_TARGET}",
             met=ours_s / floor_s <= EXACT_RATIO_TARGET),
        dict(part="exact", case="TorchSearch, 10% in merged groups excluded", n=n, seconds=grouped_s,
             ratio=grouped_s / floor_s, target=f"ratio <= {EXACT_RATIO_TARGET}",
             met=grouped_s / floor_s <= EXACT_RATIO_TARGET),
    ]
    if faiss_available():
        _, flat_s = timed(lambda: FaissFlatSearch()(x, NEIGHBOURS))
        results.append(dict(part="exact", case="FaissFlatSearch, self excluded", n=n, seconds=flat_s,
                            ratio=flat_s / floor_s))
    return results


def approx_worker(args: argparse.Namespace) -> dict:
    """Runs in its own process so that its peak resident memory is this part's alone."""
    from ssl_memory import MemoryBank, NeighbourMerger
    from ssl_memory.neighbours import FaissIVFSearch, IVFSearch, faiss_available, make_search

    set_threads(args.threads)
    n = args.approx_n
    x = embeddings(n, args.dim, args.data, args.spread, args.noise, args.seed)
    if args.nlist or args.nprobe:
        search = IVFSearch(nlist=args.nlist, nprobe=args.nprobe or IVFSearch().nprobe)
    else:
        search = make_search("auto", n, "cpu", faiss_threshold=args.faiss_threshold)
    (sims, ids), seconds = timed(lambda: search(x, NEIGHBOURS))
    peak = peak_mb()
    gen = torch.Generator().manual_seed(args.seed + 2)
    sample = torch.randperm(n, generator=gen)[: args.sample]
    hit, true_best = [], []
    for block in sample.split(64):  # exact neighbours of the sample, 64 rows at a time
        scores = x[block] @ x.T
        scores[torch.arange(block.numel()), block] = -float("inf")
        best, _ = scores.max(dim=1)
        # a hit when the found neighbour is as similar as the true one (ties count as found)
        hit.append(sims[block, 0] >= best - 1e-6)
        true_best.append(best)
    hit = torch.cat(hit)
    true_best_all = torch.cat(true_best)
    recall = float(hit.float().mean())
    # Only pairs at or above the merger's similarity floor can ever merge: the recall that matters.
    mergeable = true_best_all >= MERGE_FLOOR
    recall_mergeable = float(hit[mergeable].float().mean()) if mergeable.any() else float("nan")
    def found(neighbours: torch.Tensor) -> torch.Tensor:  # as similar as the true neighbour (ties count)
        return neighbours[sample] >= true_best_all - 1e-6

    name = f"{search!r}" + (f", {search.cells(n)} cells" if hasattr(search, "cells") else "")
    result = dict(part="approx", case=name, n=n, seconds=seconds, recall=recall, peak_mb=peak,
                  recall_mergeable=recall_mergeable, mergeable_share=float(mergeable.float().mean()),
                  mean_nn_similarity=float(sims[:, 0].mean()),
                  target=f"recall >= {RECALL_TARGET} where NN cos >= {MERGE_FLOOR}, peak < {PEAK_MB_TARGET:.0f} MB",
                  met=recall_mergeable >= RECALL_TARGET and peak < PEAK_MB_TARGET)
    del sims, ids
    if args.faiss_ivf and faiss_available():  # the same search by faiss's own IVF scan, for comparison
        other = FaissIVFSearch()
        (other_sims, _), other_seconds = timed(lambda: other(x, NEIGHBOURS))
        hits = found(other_sims[:, 0])
        result["faiss_ivf"] = dict(case=f"{other!r}, {other.cells(n)} cells", seconds=other_seconds,
                                   recall=float(hits.float().mean()),
                                   recall_mergeable=float(hits[mergeable].float().mean()))
        del other_sims
    if not args.no_round:
        bank = MemoryBank(n, args.dim)
        bank.features.copy_(x)
        del x
        merger = NeighbourMerger(backend=search)
        report = merger(bank)
        result["round"] = dict(seconds=report.seconds, pairs_merged=report.pairs_merged,
                               candidate_pairs=report.candidate_pairs, peak_mb=peak_mb())
    return result


def approx_part(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    command = [sys.executable, __file__, "--worker", *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the approximate-search subprocess failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [result]
    if "faiss_ivf" in result:
        other = result.pop("faiss_ivf")
        rows.append(dict(part="approx", n=result["n"], mergeable_share=result["mergeable_share"], **other))
    if "round" in result:
        r = result.pop("round")
        rows.append(dict(part="approx", case=f"merge round ({r['pairs_merged']} of {r['candidate_pairs']} pairs)",
                         n=result["n"], seconds=r["seconds"], peak_mb=r["peak_mb"],
                         target=f"< {ROUND_SECONDS_TARGET:.0f} s", met=r["seconds"] < ROUND_SECONDS_TARGET))
    return rows


def table(rows: list[dict]) -> str:
    header = "| part | case | N | seconds | ratio to floor | recall | recall, NN cos >= 0.5 | peak MB | target | met |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        cells = [
            r["part"], r["case"], f"{r['n']:,}", f"{r['seconds']:.2f}",
            f"{r['ratio']:.2f}" if "ratio" in r else "", f"{r['recall']:.3f}" if "recall" in r else "",
            f"{r['recall_mergeable']:.3f} ({r['mergeable_share']:.0%} of entries)" if "recall_mergeable" in r else "",
            f"{r['peak_mb']:.0f}" if "peak_mb" in r else "", r.get("target", ""),
            {True: "yes", False: "no"}.get(r.get("met"), ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small sizes (N = 5,000 and 50,000): a smoke run")
    parser.add_argument("--parts", nargs="+", choices=["exact", "approx"], default=["exact", "approx"])
    parser.add_argument("--exact-n", type=int, default=100_000)
    parser.add_argument("--approx-n", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--data", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--spread", type=float, default=0.8, help="norm of a mode's offset from its class centre")
    parser.add_argument("--noise", type=float, default=1.0, help="norm of a sample's offset from its mode")
    parser.add_argument("--sample", type=int, default=2000, help="entries checked against exact search")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per block of the torch search")
    parser.add_argument("--nlist", type=int, default=None, help="IVFSearch cells (default: its size rule)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVFSearch cells scanned per query (default 4)")
    parser.add_argument("--faiss-threshold", type=int, default=200_000)
    parser.add_argument("--no-round", action="store_true", help="skip the full merge round after the search")
    parser.add_argument("--faiss-ivf", action="store_true", help="also time FaissIVFSearch's defaults, for comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.exact_n, args.approx_n, args.sample = 5_000, 50_000, 500
        args.faiss_threshold = min(args.faiss_threshold, args.approx_n)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        print(json.dumps(approx_worker(args)))
        return
    set_threads(args.threads)
    rows = []
    if "exact" in args.parts:
        rows += exact_part(args)
    if "approx" in args.parts:
        rows += approx_part(args, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"}
    record = {"command": " ".join(["merger_scale.py", *argv]), "provenance": provenance(), "settings": settings}
    args.out.write_text(json.dumps({**record, "results": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
