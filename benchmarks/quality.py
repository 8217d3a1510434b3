"""Quality benchmark: self-supervised methods on seen and unseen classes, with Bulat et al.'s changes one at a time.

Run from the repository root::

    python benchmarks/quality.py --quick     # NPID against the full method, 1 seed, 15% planted copies
    python benchmarks/quality.py --methods npid-4v-cons full oracle --plant-duplicates 0.15   # what merging buys
    python benchmarks/quality.py             # every method, 3 seeds, 30 epochs
    python benchmarks/quality.py --dataset mnist5k --out benchmarks/results/quality/mnist5k

Protocols (Ye et al., CVPR 2019, as used by Bulat et al., ICASSP 2021; ``benchmarks/datasets.py``):

- **seen classes**: train on the train split; weighted kNN (NPID's) of each test sample among the
  train split, reported as accuracy; 1-NN accuracy too.
- **unseen classes**: train on every sample of the first half of the classes; Recall@1/2/4/8, MAP@R
  and precision@1 by cosine among every sample of the other half (each query's own row left out).

Both evaluate the encoder's pooled features before its projection head.

Methods (``benchmarks/methods.py``; same encoder, augmentations, batch and epochs): ``raw`` (the
inputs themselves), ``random`` (the untrained encoder), ``npid`` (NPID at its published temperature
0.07 and bank momentum 0.5), ``npid-4v``, ``npid-4v-cons``, ``full`` (Bulat et al.'s views,
consistency and merging, added in turn to that NPID), ``moco``, ``mochi``, ``xbm``; on planted
data only, ``oracle`` (npid-4v-cons handed the planted pairs as known merge groups: the ceiling of
what merging buys). Besides accuracy each memory-bank run records, for diagnosis only, for every
merge round: the entries merged, the largest group, the class purity (share of pairs of entries
sharing a group that share their class) and, with
``--plant-duplicates``, the planted recall (share of the planted (original, copy) pairs inside one
group), the reachable recall (the same over the planted pairs that are mutual nearest neighbours in
what the round searched) and the planted precision (share of the pairs sharing a group that are
copies of one origin); and the views' mean pairwise KL at the end.

``--plant-duplicates F`` appends one near-copy of a random F of the training samples of each
protocol (``benchmarks/datasets.py``'s ``perturb``: a shift of up to half a pixel or one sample, brightness
x0.9-1.1, noise, a small erased patch); the seen protocol's gallery stays the original train split.
The full method's rounds search the encoder's embeddings of the unaugmented training samples
(``--merge-search clean``; on mnist5k ``spatial``, its last feature map of them before global pooling,
flattened; ``backbone``, the pooled features before the projection head) with the ratio test at
``--merge-ratio`` 0.85, each pair confirmed in the bank rows at ``--merge-bank-ratio`` 0.8 (on MNIST-1D:
ratio 0.87, groups of at most 3, every pair that has passed two rounds in a row and at once one under 0.75;
on mnist5k: from epoch 6, ratio 0.9, groups of at most 3); with planted copies the merged-share cap is raised
to their share of the entries plus 0.05.

Settings were tuned on ``--dataset mnist1d-tune`` (MNIST-1D's generator with 10 other, random
templates), never on MNIST-1D's test split or its classes 5-9. The image test beds' recipes (crop,
batch, temperature, learning rate, kNN k) were chosen by ``benchmarks/sweep.py`` on a validation
split held out of their train split.

Outputs in ``--out`` (default ``results/quality/<dataset>[-quick]``, under the current folder):
``results.json`` (the command, git commit, versions, every setting, every run with its per-epoch
history and merge rounds, the summary and the findings), ``results.md`` (tables of mean ± std over
seeds and the findings), ``curves.png``, ``finals.png`` and, when merging ran, ``merging.png``.

Every setting, its default, and what each data set and ``--quick`` change (generated from
``benchmarks/quality_settings.py``):
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality_report, quality_run  # noqa: E402
from benchmarks.datasets import DATASETS  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.quality_settings import Settings, add_arguments, describe, layers, resolve  # noqa: E402

__doc__ += describe()


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path, bool]:
    """Settings, output folder and whether to show progress, from the command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description=__doc__.split("\n\n")[0],
        epilog=layers(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="NPID against the full method, 1 seed, a few epochs")
    parser.add_argument("--out", default=None, help="output folder (default: results/quality/<dataset>[-quick])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished run)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    dataset = args.dataset or Settings().dataset
    if dataset not in DATASETS:
        parser.error(f"unknown data set {dataset!r}")
    options = {k: v for k, v in vars(args).items() if k not in ("quick", "out", "no_progress")}
    settings = resolve(dataset, args.quick, options)
    out = Path(args.out) if args.out else Path("results/quality") / (dataset + ("-quick" if args.quick else ""))
    return settings, out, not args.no_progress


def main(argv: list[str] | None = None) -> int:
    settings, out, progress = parse_args(argv)
    meta = {"command": quality_report.command_line(argv), "provenance": provenance()}
    print(quality_run.plan(settings, out))
    start = time.perf_counter()
    runs = quality_run.run_all(settings, progress=progress)
    meta["wall_seconds"] = time.perf_counter() - start
    paths = quality_report.write(runs, settings, out, meta)
    summary = quality_report.summarise(runs, settings)
    print()
    print(quality_report.tables(summary))
    print(quality_report.reading(summary, settings))
    for line in quality_report.findings(summary, settings):
        print(f"- {line}")
    cpu = sum(run.get("cpu_seconds", 0.0) for run in runs)
    print(f"\nWrote {', '.join(str(p) for p in paths)}.")
    print(f"Took {meta['wall_seconds']:.0f} s, of which {cpu:.0f} CPU-seconds of training.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
