"""Quality benchmark: self-supervised methods on the seen and unseen protocols, with every ablation.

Run from the repository root::

    python benchmarks/quality.py --quick            # MNIST-1D, every method, 3 seeds, under 10 minutes on 2 CPU cores
    python benchmarks/quality.py                    # the full settings below
    python benchmarks/quality.py --dataset cifar10 --data-root ~/data --device cuda

Protocols (Ye et al., CVPR 2019, as used by Bulat et al., ICASSP 2021; see ``benchmarks/datasets.py``):

- **seen**: train on the train split; weighted kNN (k = 200, T = 0.07, NPID's) of each test sample
  among the train split, reported as accuracy; 1-NN accuracy too.
- **unseen**: train on every sample of the first half of the classes; Recall@1/2/4/8, MAP@R and
  precision@1 by cosine among every sample of the other half (each query's own row left out).

Both evaluate the encoder's pooled features before its projection head (``encoder.backbone``).

Methods (``benchmarks/methods.py``), same encoder, augmentations and epochs: ``raw`` (the inputs
themselves, no learning), ``random`` (the untrained encoder: what the architecture alone gives),
``npid``, ``npid-4v``, ``npid-4v-cons``, ``full`` (+ merging: the full method of Bulat et al.),
``moco``, ``mochi``, ``xbm``.

Full settings for MNIST-1D (the default data set; 10,000 signals generated locally, seed 42):

- encoder ``SignalCNN(width=16, head="linear")``: four conv blocks with circular padding, global max
  pooling to 64 features, a linear layer to the 64-d embedding the losses train (a linear head as in
  NPID: with a two-layer head the bank's nearest neighbours were far less often of one class);
- augmentation ``SignalAugment()`` defaults (time stretch, circular shift, amplitude, shear, noise);
- 30 epochs, 64 samples a batch (times the method's views), Adam with a one-cycle learning rate
  peaking at 1e-3, evaluation every 5 epochs; kNN k = 200, T = 0.07 on the backbone features;
- memory bank: temperature 0.05, momentum 0 (the entry is replaced by the mean of the sample's views),
  4 views, consistency weight 0.3 from epoch 1 (before every entry has been written once the bank is
  partly random), merging from epoch 10, a round every 4 epochs, merging 5% of the mutual-neighbour
  pairs at first, +5% a round, at most 25%, never below cosine 0.5;
- MoCo: 2 views, queue 4,096, temperature 0.2, key momentum 0.99, BN shuffled over 4 groups;
  MoCHi: 256 hardest, 256 + 128 mixes, from epoch 5; XBM: 2 views, memory 4,096, margin 0.5, from epoch 1;
- seeds 0, 1, 2; 2 worker processes of 1 thread each.

``--quick``: 8 epochs, evaluation every 2, merging from epoch 3 with a round every epoch (the same
5 rounds), MoCHi from epoch 2. About 700 CPU-seconds in all: about 6 minutes on 2 free cores.

These settings were tuned on ``--dataset mnist1d-tune`` (the same generator with 10 other, random
templates), never on MNIST-1D's test split or its classes 5-9.

Outputs in ``--out`` (default ``results/quality/<dataset>[-quick]``): ``results.json`` (settings,
every run with its per-epoch history, and the summary), ``results.md`` (tables: mean ± std over
seeds, wall-clock seconds of training), ``curves.png`` (accuracy against epoch per method) and
``finals.png`` (bar chart of the final numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.augment import ImageAugment, SignalAugment  # noqa: E402
from benchmarks.datasets import DATASETS, PROTOCOLS, DataSet, ProtocolData, load, protocol_data  # noqa: E402
from benchmarks.encoders import DigitCNN, ResNet18, SignalCNN  # noqa: E402
from benchmarks.methods import METHODS, MethodSettings, build_method  # noqa: E402
from ssl_memory import MultiAugCollate, WithIndex  # noqa: E402
from ssl_memory.evaluation import knn_accuracy, retrieval_metrics  # noqa: E402

BASELINES = ("raw", "random")
ALL_METHODS = BASELINES + METHODS
ABLATION = ("npid", "npid-4v", "npid-4v-cons", "full")


@dataclasses.dataclass
class Settings:
    """Everything a run depends on; ``results.json`` records it."""

    dataset: str = "mnist1d"
    data_root: str | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    methods: tuple[str, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    width: int = 16
    head: str = "linear"
    eval_every: int = 5
    knn_k: int = 200
    knn_temperature: float = 0.07
    features: str = "backbone"
    device: str = "cpu"
    workers: int = 2
    threads: int = 1
    method: MethodSettings = dataclasses.field(default_factory=MethodSettings)


# Per data set: what differs from the defaults above.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d": {},
    "mnist1d-tune": {},
    "mnist5k": {"width": 32},
    "cifar10": {"epochs": 200, "batch_size": 256, "lr": 1e-3, "workers": 1, "threads": 0},
    "cub200": {"protocols": ("unseen",), "epochs": 100, "batch_size": 128, "lr": 1e-3, "workers": 1, "threads": 0},
}
# What --quick changes (on top of the data set's settings).
QUICK: dict[str, Any] = {"epochs": 8, "eval_every": 2}
QUICK_METHOD: dict[str, Any] = {"merge_warmup": 3, "merge_interval": 1, "mochi_warmup": 2}


def make_encoder(settings: Settings, kind: str, in_channels: int) -> nn.Module:
    dim = settings.method.dim
    if kind == "signal":
        return SignalCNN(dim, settings.width, settings.head)
    if settings.dataset == "mnist5k":
        return DigitCNN(dim, settings.width)
    return ResNet18(dim, in_channels)


def make_augment(settings: Settings, kind: str, generator: torch.Generator) -> nn.Module:
    if kind == "signal":
        return SignalAugment(generator=generator)
    return ImageAugment(flip=0.0 if settings.dataset == "mnist5k" else 0.5, generator=generator)


@torch.no_grad()
def embed(encoder: nn.Module | None, x: torch.Tensor, device: str, features: str = "backbone", batch: int = 1024):
    """Unit-norm evaluation features: the encoder's backbone (or output), or the flattened input without encoder."""
    if encoder is None:
        return F.normalize(x.flatten(1).float(), dim=1)
    was_training = encoder.training
    encoder.eval()
    fn = encoder.backbone if features == "backbone" else encoder
    out = torch.cat([fn(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    encoder.train(was_training)
    return F.normalize(out, dim=1)


def evaluate(encoder: nn.Module | None, data: ProtocolData, settings: Settings, final: bool) -> dict[str, float]:
    """Seen: kNN and 1-NN accuracy. Unseen: Recall@K (and MAP@R, precision@1 when ``final``)."""
    if settings.features == "both":
        out = evaluate(encoder, data, dataclasses.replace(settings, features="backbone"), final)
        if encoder is not None:
            emb = evaluate(encoder, data, dataclasses.replace(settings, features="embedding"), final)
            out.update({"emb_" + k: v for k, v in emb.items()})
        return out
    query = embed(encoder, data.query.x, settings.device, settings.features)
    if data.protocol == "seen":
        gallery = embed(encoder, data.gallery.x, settings.device, settings.features)
        args = (query, data.query.y, gallery, data.gallery.y)
        out = {"knn": knn_accuracy(*args, k=settings.knn_k, temperature=settings.knn_temperature)}
        if final:
            out["1nn"] = knn_accuracy(*args, k=1)
        return out
    return retrieval_metrics(query, data.query.y, map_at_r=final)


def headline(protocol: str) -> str:
    """The metric each protocol is judged by."""
    return "knn" if protocol == "seen" else "recall@1"


_DATA_CACHE: dict[tuple[str, str | None], DataSet] = {}


def _data(settings: Settings) -> DataSet:
    key = (settings.dataset, settings.data_root)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load(settings.dataset, settings.data_root)
    return _DATA_CACHE[key]


def run_job(settings: Settings, method: str, protocol: str, seed: int) -> dict[str, Any]:
    """Train ``method`` with ``seed`` on ``protocol``'s training data; return its history and final metrics."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    dataset = _data(settings)
    data = protocol_data(dataset, protocol)
    record: dict[str, Any] = {"method": method, "protocol": protocol, "seed": seed, "history": [], "seconds": 0.0}
    if method == "raw":
        record["final"] = evaluate(None, data, settings, final=True)
        return record
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = data.train.x
    encoder = make_encoder(settings, dataset.kind, x.shape[1] if x.dim() == 4 else 1).to(settings.device)
    if method == "random":
        record["final"] = evaluate(encoder, data, settings, final=True)
        return record

    views = 1 if method == "npid" else (settings.method.views if method in ABLATION else 2)
    loader = DataLoader(
        WithIndex(TensorDataset(x, data.train.y)),
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,  # BatchNorm needs more than one row; every sample still comes round each epoch on average
        generator=generator,
        collate_fn=MultiAugCollate(nn.Identity(), views=views),
    )
    steps_per_epoch = len(loader)
    model = build_method(method, encoder, len(x), steps_per_epoch, settings.method, generator).to(settings.device)
    assert model.views == views
    augment = make_augment(settings, dataset.kind, generator)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.1
    )
    seconds, cpu = 0.0, 0.0
    for epoch in range(settings.epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.on_epoch_start(epoch)
        total = 0.0
        for batch in loader:
            # augmentation runs on the collated batch: one vectorised call instead of one per view
            inputs = augment(batch["views"]).to(settings.device)
            loss = model.loss(inputs, batch["indices"].to(settings.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            model.after_step()
            total += loss.item()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if not math.isfinite(total):
            raise FloatingPointError(f"{method} (seed {seed}, {protocol}) diverged at epoch {epoch + 1}")
        last = epoch + 1 == settings.epochs
        entry = {"epoch": epoch + 1, "loss": total / steps_per_epoch, **model.log(data.train.y)}
        if last or (epoch + 1) % settings.eval_every == 0:
            entry.update(evaluate(encoder, data, settings, final=last))
        record["history"].append(entry)
    record["seconds"], record["cpu_seconds"] = seconds, cpu
    record["final"] = {k: v for k, v in record["history"][-1].items() if k not in ("epoch", "loss")}
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every final metric and of the training time."""
    summary: dict[str, Any] = {}
    for protocol in settings.protocols:
        summary[protocol] = {}
        for method in settings.methods:
            mine = [r for r in runs if r["method"] == method and r["protocol"] == protocol]
            if not mine:
                continue
            metrics = sorted({k for r in mine for k, v in r["final"].items() if isinstance(v, float)})
            row = {k: _mean_std([r["final"][k] for r in mine]) for k in metrics}
            row["seconds"] = _mean_std([r["seconds"] for r in mine])
            row["cpu_seconds"] = _mean_std([r.get("cpu_seconds", 0.0) for r in mine])
            row["seeds"] = len(mine)
            summary[protocol][method] = row
    return summary


def target_check(summary: dict[str, Any]) -> list[str]:
    """Issue 5's target, stated with the numbers: full beats NPID by 5 points, each change adds, beats raw."""
    lines = []
    for protocol in ("seen", "unseen"):
        rows = summary.get(protocol, {})
        metric = headline(protocol)
        if not all(m in rows for m in ABLATION):
            continue
        means = {m: rows[m][metric][0] for m in ABLATION}
        gain = 100 * (means["full"] - means["npid"])
        steps = [100 * (means[b] - means[a]) for a, b in zip(ABLATION, ABLATION[1:])]
        lines.append(
            f"- {protocol} ({metric}): full - npid = {gain:+.1f} points ({'met' if gain >= 5 else 'NOT met'}: >= 5); "
            f"each change: " + ", ".join(f"{b} {s:+.1f}" for b, s in zip(ABLATION[1:], steps))
            + f" ({'all add' if all(s > 0 for s in steps) else 'NOT all add'})"
        )
        if "raw" in rows:
            raw_best = max(v[0] for k, v in rows["raw"].items() if k in (metric, "1nn"))
            lines.append(
                f"- {protocol}: full {means['full']:.3f} vs raw input {raw_best:.3f} "
                f"({'beats' if means['full'] > raw_best else 'does NOT beat'} the raw input)"
            )
    return lines


def markdown(summary: dict[str, Any], settings: Settings, wall: float) -> str:
    columns = {"seen": ("knn", "1nn"), "unseen": ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")}
    lines = [
        f"# Quality on {settings.dataset}",
        "",
        f"{len(settings.seeds)} seeds ({', '.join(map(str, settings.seeds))}), {settings.epochs} epochs, "
        f"batch {settings.batch_size} samples; mean ± std over seeds; seconds = training wall clock per run "
        f"(evaluation excluded); whole benchmark {wall:.0f} s.",
    ]
    for protocol, rows in summary.items():
        cols = columns[protocol]
        lines += ["", f"## {protocol}", "", "| method | " + " | ".join(cols) + " | seconds |"]
        lines.append("|---" * (len(cols) + 2) + "|")
        for method, row in rows.items():
            cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['seconds'][0]:.1f} |")
    check = target_check(summary)
    if check:
        lines += ["", "## Target (issue 5)", "", *check]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], settings: Settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(summary)
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        metric = headline(protocol)
        for i, method in enumerate(summary[protocol]):
            mine = [r for r in runs if r["method"] == method and r["protocol"] == protocol]
            if method in BASELINES:
                value = summary[protocol][method][metric][0]
                ax.axhline(value, color=f"C{i}", linestyle="--", linewidth=1, label=method)
                continue
            epochs = [h["epoch"] for h in mine[0]["history"] if metric in h]
            curves = torch.tensor([[h[metric] for h in r["history"] if metric in h] for r in mine])
            mean, std = curves.mean(0), curves.std(0) if len(mine) > 1 else torch.zeros(len(epochs))
            ax.plot(epochs, mean, marker="o", markersize=3, color=f"C{i}", label=method)
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel("weighted kNN accuracy" if protocol == "seen" else "Recall@1")
        ax.set_title(f"{settings.dataset}, {protocol} classes")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        metric = headline(protocol)
        names = list(summary[protocol])
        means = [summary[protocol][m][metric][0] for m in names]
        stds = [summary[protocol][m][metric][1] for m in names]
        ax.bar(range(len(names)), means, yerr=stds, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        low = min(means) - 0.05
        ax.set_ylim(max(0.0, low), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.03))
        ax.set_ylabel("weighted kNN accuracy" if protocol == "seen" else "Recall@1")
        ax.set_title(f"{settings.dataset}, {protocol} classes: final")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "finals.png", dpi=120)
    plt.close(fig)


def _worker_init(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _job_cost(settings: Settings, method: str, protocol: str) -> float:
    views = {"raw": 0, "random": 0, "npid": 1, "moco": 2, "mochi": 2, "xbm": 2}.get(method, settings.method.views)
    return views * (1.6 if protocol == "seen" else 1.0)


def run(settings: Settings, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run every (method, protocol, seed), write the outputs to ``out`` and return the results."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    _data(settings)  # fail early (missing folder) and warm the cache before forking
    jobs = [(m, p, s) for p in settings.protocols for m in settings.methods for s in settings.seeds]
    jobs = [j for j in jobs if not (j[0] == "raw" and j[2] != settings.seeds[0])]  # raw does not depend on the seed
    jobs.sort(key=lambda j: -_job_cost(settings, j[0], j[1]))  # longest first balances the workers
    start = time.perf_counter()
    runs = []
    bar = tqdm(total=len(jobs), desc="quality runs", disable=not progress)
    if settings.workers > 1:
        # spawn, not fork: a forked child of a process that already ran OpenMP code can deadlock
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(settings.workers, context, initializer=_worker_init, initargs=(settings.threads,))
        with pool:
            futures = {pool.submit(run_job, settings, *job): job for job in jobs}
            for future in as_completed(futures):
                runs.append(future.result())
                bar.set_postfix_str("/".join(map(str, futures[future])))
                bar.update()
    else:
        for job in jobs:
            runs.append(run_job(settings, *job))
            bar.set_postfix_str("/".join(map(str, job)))
            bar.update()
    bar.close()
    wall = time.perf_counter() - start
    order = {m: i for i, m in enumerate(settings.methods)}
    runs.sort(key=lambda r: (r["protocol"], order[r["method"]], r["seed"]))
    summary = summarise(runs, settings)
    results = {
        "settings": dataclasses.asdict(settings),
        "wall_seconds": wall,
        "machine": {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": settings.threads},
        "summary": summary,
        "target": target_check(summary),
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(summary, settings, wall))
    plot(runs, summary, settings, out)
    return results


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path, bool]:
    """Settings, output folder and whether to show progress, from the command line."""
    defaults = Settings()
    method_defaults = MethodSettings()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Full settings and protocols: see the module docstring (python -c 'import benchmarks.quality as q; "
        "help(q)') or the top of benchmarks/quality.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", default=defaults.dataset, choices=DATASETS)
    parser.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py/ or CUB_200_2011/")
    parser.add_argument("--quick", action="store_true", help=f"fewer epochs: {QUICK}, {QUICK_METHOD}")
    parser.add_argument("--out", default=None, help="output folder (default results/quality/<dataset>[-quick])")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=None)
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default {list(defaults.seeds)}")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {defaults.epochs} (data set dependent)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"samples per batch, default {defaults.batch_size}"
    )
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate, default {defaults.lr}")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--width", type=int, default=None, help="encoder width")
    parser.add_argument("--head", default=None, choices=("mlp", "linear"), help="projection head of the encoder")
    parser.add_argument("--eval-every", type=int, default=None, help="epochs between evaluations for the curves")
    parser.add_argument("--knn-k", type=int, default=None)
    parser.add_argument("--knn-temperature", type=float, default=None)
    parser.add_argument("--features", default=None, choices=("backbone", "embedding", "both"),
                        help="what is evaluated: the pooled backbone features, the output embedding, or both")
    parser.add_argument("--device", default=None, help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (1 for a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    for field in dataclasses.fields(MethodSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(getattr(method_defaults, field.name)), default=None
        )
    args = parser.parse_args(argv)

    values: dict[str, Any] = {"dataset": args.dataset, **DATASET_SETTINGS[args.dataset]}
    if args.quick:
        values.update(QUICK)
    for name in ("data_root", "epochs", "batch_size", "lr", "weight_decay", "width", "head", "eval_every", "knn_k",
                 "knn_temperature", "features", "device", "workers", "threads"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for name in ("protocols", "methods", "seeds"):
        if getattr(args, name) is not None:
            values[name] = tuple(getattr(args, name))
    method = dict(QUICK_METHOD) if args.quick else {}
    fields = dataclasses.fields(MethodSettings)
    method.update({f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None})
    settings = Settings(**values, method=MethodSettings(**method))
    out = Path(args.out) if args.out else Path("results/quality") / (args.dataset + ("-quick" if args.quick else ""))
    return settings, out, not args.no_progress


def main(argv: list[str] | None = None) -> None:
    settings, out, progress = parse_args(argv)
    results = run(settings, out, progress=progress)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, curves.png, finals.png in {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
