"""Validation sweep: the training recipe of an image test bed, chosen on samples held out of its training split.

Run from the repository root::

    python benchmarks/sweep.py --dataset clutter5k --out benchmarks/results/sweep/clutter5k
    python benchmarks/sweep.py --dataset mnist5k --out benchmarks/results/sweep/mnist5k

A share ``--validation`` (20%) of the data set's train split, drawn by a seeded permutation, becomes
the validation queries; the method trains on the rest, and each query is classified by weighted kNN
among the rest's embeddings (the seen protocol's measure). The test split and the unseen classes are
never read.

The sweep trains ``npid-4v-cons`` (NPID with 4 views and consistency, the row every later change
of the quality table builds on) once per recipe, one seed, at the data set's epochs, width and other
settings:

1. the **base** recipe, the harness's settings before the sweep (crop area 0.3-1.0, 64 samples a
   batch, temperature 0.07, learning rate 1e-3), then each value of :data:`AXES` with the others at
   the base: one axis at a time;
2. the best value of each axis together, when that is not already a run of step 1.

Every run evaluates each k of :data:`KNN_K` (the raw pixels too, for reference); the chosen recipe is
the (run, k) with the highest validation kNN accuracy. The temperature applies to the memory-bank rows
only (MoCo, MoCHi and XBM keep their published values); the other chosen values apply to every method
of the quality table.

Outputs in ``--out``: ``results.json`` (command, commit, every run's settings and validation scores,
the choice) and ``results.md`` (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality_report  # noqa: E402
from benchmarks.datasets import DataSet, Split, load, protocol_data  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.quality_run import evaluate, run_tasks  # noqa: E402
from benchmarks.quality_settings import Settings, resolve  # noqa: E402

METHOD = "npid-4v-cons"
# The harness's recipe before the sweep, and the values tried one axis at a time.
BASE: dict[str, Any] = {"crop_min": 0.3, "batch_size": 64, "temperature": 0.07, "lr": 1e-3}
AXES: dict[str, tuple] = {
    "crop_min": (0.3, 0.5, 0.7, 0.85),
    "batch_size": (64, 128, 256),
    "temperature": (0.07, 0.1, 0.2),
    "lr": (1e-3, 3e-3),
}
KNN_K = (10, 20, 50, 100, 200)


def validation_split(data: DataSet, share: float, seed: int = 0) -> DataSet:
    """``data`` with its train split cut in two: the rest trains (``train``), ``share`` of it validates (``test``)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must lie in (0, 1), got {share!r}")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    held = round(share * len(order))
    val, fit = order[:held], order[held:]
    return DataSet(data.name, data.kind, Split(data.train.x[fit], data.train.y[fit]), data.train.subset(val))


def recipe_settings(dataset: str, recipe: dict[str, Any], epochs: int | None) -> Settings:
    """The data set's harness settings with ``recipe`` applied, for one validation run of :data:`METHOD`."""
    options = {"methods": (METHOD,), "protocols": ("seen",), "seeds": (0,), "extra_knn_k": KNN_K, "epochs": epochs}
    settings = resolve(dataset, False, {**options, **recipe})
    return dataclasses.replace(settings, eval_every=settings.epochs)


def one_at_a_time() -> list[dict[str, Any]]:
    """The base recipe, then each other value of each axis with the rest at the base."""
    recipes = [dict(BASE)]
    for axis, values in AXES.items():
        recipes += [{**BASE, axis: v} for v in values if v != BASE[axis]]
    return recipes


def best(record: dict[str, Any]) -> tuple[float, int]:
    """A run's best validation kNN accuracy over :data:`KNN_K`, and its k."""
    return max((record["final"][f"knn@{k}"], k) for k in KNN_K)


def combined(recipes: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each axis at the value whose one-axis run scored best (the base's score counts for the base value)."""
    out = dict(BASE)
    for axis, values in AXES.items():
        scores = {v: best(r)[0] for v in values for rec, r in zip(recipes, records) if rec == {**BASE, axis: v}}
        out[axis] = max(scores, key=scores.get)
    return out


def run(dataset: str, share: float, epochs: int | None, progress: bool) -> dict[str, Any]:
    data = validation_split(load(dataset), share)
    label = lambda recipe: ", ".join(f"{k} {v}" for k, v in recipe.items() if v != BASE[k]) or "base"

    def train(recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tasks = [(recipe_settings(dataset, r, epochs), (METHOD, "seen", 0)) for r in recipes]
        names = {id(s): label(r) for (s, _), r in zip(tasks, recipes)}
        return run_tasks(tasks, data, progress=progress, label=lambda s, job: f"{names[id(s)]:>24}")

    recipes = one_at_a_time()
    records = train(recipes)
    mix = combined(recipes, records)
    if mix not in recipes:
        recipes.append(mix)
        records += train([mix])
    reference = recipe_settings(dataset, BASE, epochs)
    raw = evaluate(None, protocol_data(data, "seen"), reference, final=True)
    scores = [best(r) for r in records]
    chosen = max(range(len(recipes)), key=lambda i: scores[i][0])
    return {
        "dataset": dataset,
        "validation_share": share,
        "method": METHOD,
        "settings": dataclasses.asdict(recipe_settings(dataset, recipes[chosen], epochs)),
        "runs": [
            {
                "recipe": r,
                "label": label(r),
                "validation": {k: rec["final"][f"knn@{k}"] for k in KNN_K},
                "seconds": rec["seconds"],
            }
            for r, rec in zip(recipes, records)
        ],
        "raw_input": {k: raw[f"knn@{k}"] for k in KNN_K},
        "chosen": {**recipes[chosen], "knn_k": scores[chosen][1], "validation_knn": scores[chosen][0]},
    }


def table(result: dict[str, Any]) -> str:
    """The sweep as markdown: one row per recipe, validation kNN accuracy at each k, the choice in bold."""
    chosen = {k: v for k, v in result["chosen"].items() if k in BASE}
    head = "| recipe (changes from the base) | " + " | ".join(f"k={k}" for k in KNN_K) + " | training |"
    lines = [head, "|---|" + "---:|" * (len(KNN_K) + 1)]
    for run in result["runs"]:
        top = max(run["validation"].values())
        cells = [f"**{v:.3f}**" if v == top else f"{v:.3f}" for v in run["validation"].values()]
        name = f"**{run['label']}** (chosen)" if run["recipe"] == chosen else run["label"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {run['seconds']:.0f} s |")
    raw = " | ".join(f"{v:.3f}" for v in result["raw_input"].values())
    return "\n".join(lines + [f"| raw pixels (for reference) | {raw} | |"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="clutter5k", choices=("mnist5k", "clutter5k"))
    parser.add_argument("--validation", type=float, default=0.2, help="share of the train split held out")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each run (default: the data set's)")
    parser.add_argument("--out", default=None, help="output folder (default: results/sweep/<dataset>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = Path(args.out or f"results/sweep/{args.dataset}")
    meta = {"command": quality_report.command_line(argv, "benchmarks/sweep.py"), "provenance": provenance()}
    start = time.perf_counter()
    result = run(args.dataset, args.validation, args.epochs, not args.no_progress)
    result = {**meta, "wall_seconds": time.perf_counter() - start, **result}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    chosen = ", ".join(f"{k} {v}" for k, v in result["chosen"].items())
    text = (
        f"# Validation sweep on {args.dataset}\n\n`{meta['command']}` at commit {meta['provenance']['commit'][:7]}"
        f"{' (dirty)' if meta['provenance']['dirty'] else ''}: {result['method']}, one seed, "
        f"{result['settings']['epochs']} epochs, {100 * args.validation:.0f}% of the train split held out; "
        f"weighted kNN accuracy of the held-out samples.\n\n{table(result)}\n\nChosen: {chosen}.\n"
    )
    (out / "results.md").write_text(text)
    print("\n" + text)
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}; took {result['wall_seconds']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
