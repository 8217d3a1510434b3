"""What the quality benchmark writes: results.json (with provenance), results.md, plots, and plain findings.

:func:`summarise` reduces the runs to a mean and standard deviation over seeds; :func:`findings`
states what they show against the goal (the full method at least 5 points above NPID on both
protocols, each of Bulat et al.'s changes adding, learned features above the raw input) in plain
sentences; :func:`write` writes every output and returns their paths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality_run import headline
from benchmarks.quality_settings import ABLATION, BASELINES, Settings

GOAL_POINTS = 5.0
COLUMNS = {"seen": ("knn", "1nn"), "unseen": ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")}
METRIC_NAMES = {"knn": "kNN accuracy", "recall@1": "Recall@1"}
# What the summary keeps of each merge round (mean and standard deviation over seeds).
ROUND_NUMBERS = ("epoch", "precision", "merged_entries", "largest_group")
# ... and, from planted_metrics, what every round records (planted figures None without planted copies).
PLANTED_NUMBERS = ("class_purity", "planted_recall", "reachable_recall", "planted_precision")
# What each row of the ablation adds to the one before it.
CHANGES = {"npid-4v": "views", "npid-4v-cons": "consistency", "full": "merging"}


def _mean_std(values: list[float | None]) -> tuple[float, float] | tuple[None, None]:
    """Mean and standard deviation of the values that are not None (None, None when all are)."""
    t = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    if t.numel() == 0:
        return None, None
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Per protocol and method: mean and standard deviation over seeds of every final number, and the merge rounds."""
    summary: dict[str, Any] = {}
    for protocol in settings.protocols:
        summary[protocol] = {}
        for method in settings.methods:
            mine = [r for r in runs if r["method"] == method and r["protocol"] == protocol]
            if not mine:
                continue
            names = sorted({k for r in mine for k, v in r["final"].items() if isinstance(v, (int, float))})
            row: dict[str, Any] = {k: _mean_std([r["final"][k] for r in mine if k in r["final"]]) for k in names}
            row["seconds"] = _mean_std([r["seconds"] for r in mine])
            row["seeds"] = len(mine)
            rounds = min((len(r.get("merges", [])) for r in mine), default=0)
            if rounds:
                row["merge_rounds"] = [
                    {k: _mean_std([r["merges"][i].get(k) for r in mine]) for k in ROUND_NUMBERS + PLANTED_NUMBERS}
                    for i in range(rounds)
                ]
            summary[protocol][method] = row
    return summary


def _points(rows: dict[str, Any], a: str, b: str, metric: str) -> float:
    return 100 * (rows[b][metric][0] - rows[a][metric][0])


def findings(summary: dict[str, Any], settings: Settings) -> list[str]:
    """What the numbers show, one plain sentence each: the goal, each change, the raw input, merging, consistency."""
    out = []
    for protocol, rows in summary.items():
        metric = headline(protocol)
        name = f"{protocol} classes ({METRIC_NAMES[metric]})"
        if "npid" in rows and "full" in rows:
            gain = _points(rows, "npid", "full", metric)
            verdict = "reached" if gain >= GOAL_POINTS else f"short by {GOAL_POINTS - gain:.1f}"
            goal = f"the goal at full length is +{GOAL_POINTS:.0f}: {verdict}"
            out.append(f"On {name} the full method is {gain:+.1f} points over NPID ({goal}).")
        if all(m in rows for m in ABLATION):
            steps = {CHANGES[b]: _points(rows, a, b, metric) for a, b in zip(ABLATION, ABLATION[1:])}
            listed = ", ".join(f"{change} {value:+.1f}" for change, value in steps.items())
            losers = [change for change, value in steps.items() if value <= 0]
            verdict = "each adds" if not losers else " and ".join(losers) + " not adding"
            out.append(f"On {name}, each change in turn: {listed} points ({verdict}).")
        if "raw" in rows and "full" in rows:
            raw = max(v[0] for k, v in rows["raw"].items() if k in (metric, "1nn"))
            full = rows["full"][metric][0]
            relation = "above" if full > raw else "not above"
            out.append(f"On {name} the full method ({full:.3f}) is {relation} the raw input ({raw:.3f}).")
        merges = rows.get("full", {}).get("merge_rounds")
        if merges:
            # The share of merged entries in their group's majority class: not the planted precision.
            majority = " ".join(_number(r["precision"][0], 2) for r in merges)
            last = merges[-1]
            out.append(
                f"Merging on {protocol} classes: {len(merges)} rounds, majority-class share of the merged entries "
                f"per round {majority} (- where nothing was merged yet); at the end "
                f"{last['merged_entries'][0]:.0f} entries in merged groups, the largest of "
                f"{last['largest_group'][0]:.0f}."
            )
        if merges and merges[-1]["planted_recall"][0] is not None:
            precision = [r["planted_precision"][0] for r in merges if r["planted_precision"][0] is not None]
            last = merges[-1]
            out.append(
                f"Planted duplicates on {protocol} classes, after the last round: planted recall "
                f"{last['planted_recall'][0]:.2f}, reachable recall {_number(last['reachable_recall'][0], 2)}, "
                f"planted precision {_number(last['planted_precision'][0], 2)} (lowest over rounds "
                f"{_number(min(precision, default=None), 2)}), class purity {_number(last['class_purity'][0], 2)}."
            )
        if "oracle" in rows and "npid-4v-cons" in rows:
            gains = {m: _points(rows, "npid-4v-cons", m, metric) for m in ("full", "oracle") if m in rows}
            listed = " and ".join(f"{m} {v:+.1f}" for m, v in gains.items())
            out.append(f"On {name}, over views+consistency: {listed} points.")
        kl = {m: rows[m]["views_kl"][0] for m in ("npid-4v", "npid-4v-cons") if "views_kl" in rows.get(m, {})}
        if len(kl) == 2:
            change = 100 * (kl["npid-4v-cons"] / kl["npid-4v"] - 1) if kl["npid-4v"] > 0 else 0.0
            out.append(
                f"Views' mean pairwise KL on {protocol} classes: {kl['npid-4v']:.3f} without consistency, "
                f"{kl['npid-4v-cons']:.3f} with it ({change:+.0f}%)."
            )
    if len(settings.seeds) == 1:
        out.append("One seed only: a difference of a point or two may be noise (the full benchmark runs 3 seeds).")
    return out


def reading(summary: dict[str, Any], settings: Settings) -> str:
    """The result in one line: the full method against NPID, or the best method, on each protocol."""
    parts = []
    for protocol, rows in summary.items():
        metric = headline(protocol)
        if "npid" in rows and "full" in rows:
            full, npid = rows["full"][metric][0], rows["npid"][metric][0]
            scores = f"{METRIC_NAMES[metric]} {full:.3f} vs {npid:.3f}"
            parts.append(f"{100 * (full - npid):+.1f} points on {protocol} classes ({scores})")
        elif rows:
            best = max(rows, key=lambda m: rows[m][metric][0])
            parts.append(f"{best} is best on {protocol} classes ({METRIC_NAMES[metric]} {rows[best][metric][0]:.3f})")
    seeds = f"{len(settings.seeds)} seed{'s' if len(settings.seeds) > 1 else ''}"
    head = f"After {settings.epochs} epochs on {settings.dataset} ({seeds})"
    if any("npid" in rows and "full" in rows for rows in summary.values()):
        return f"{head}, the full method against NPID: " + "; ".join(parts) + "."
    return f"{head}: " + "; ".join(parts) + "."


def markdown(summary: dict[str, Any], settings: Settings, meta: dict[str, Any]) -> str:
    """results.md: the command, provenance, one table per protocol, the merge rounds and the findings."""
    source = meta["provenance"]
    commit = (source["commit"] or "unknown")[:10] + (" (with uncommitted changes)" if source["dirty"] else "")
    lines = [
        f"# Quality on {settings.dataset}",
        "",
        f"`{meta['command']}`",
        "",
        f"Commit {commit}; ssl_memory {source['ssl_memory']}, torch {source['torch']}, {source['machine']}. "
        f"{len(settings.seeds)} seed(s) ({', '.join(map(str, settings.seeds))}), {settings.epochs} epochs, batch "
        f"{settings.batch_size} samples; mean ± std over seeds; seconds = training time of one run (evaluation "
        f"excluded); whole benchmark {meta['wall_seconds']:.0f} s.",
    ]
    lines += ["", tables(summary)]
    lines += ["", "## Findings", "", *(f"- {line}" for line in meta["findings"])]
    return "\n".join(lines) + "\n"


def tables(summary: dict[str, Any]) -> str:
    """One markdown table per protocol and, for the full method, one row per merge round."""
    lines = []
    for protocol, rows in summary.items():
        cols = COLUMNS[protocol]
        extra = ("views_kl",) if any("views_kl" in r for r in rows.values()) else ()
        lines += [f"## {protocol} classes", "", "| method | " + " | ".join(cols + extra) + " | seconds |"]
        lines.append("|---" * (len(cols) + len(extra) + 2) + "|")
        for method, row in rows.items():
            cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in cols + extra]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['seconds'][0]:.1f} |")
        merges = rows.get("full", {}).get("merge_rounds")
        if merges:
            lines += ["", f"Merge rounds of the full method ({protocol} classes; labels used only to measure):", ""]
            lines += [
                "| round | epoch | entries in merged groups | largest group | class purity | planted recall | "
                "reachable recall | planted precision |",
                "|---" * 8 + "|",
            ]
            for i, r in enumerate(merges, 1):
                planted = " | ".join(_number(r[k][0], 3) for k in PLANTED_NUMBERS)
                lines.append(
                    f"| {i} | {r['epoch'][0]:.0f} | {r['merged_entries'][0]:.0f} | {r['largest_group'][0]:.0f} | "
                    f"{planted} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], settings: Settings, out: Path) -> list[Path]:
    """curves.png (headline metric against epoch), finals.png (final bars) and, when merging ran, merging.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(summary)
    colours = {m: f"C{i}" for i, m in enumerate(settings.methods)}
    written = [out / "curves.png", out / "finals.png"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        metric = headline(protocol)
        for method in summary[protocol]:
            mine = [r for r in runs if r["method"] == method and r["protocol"] == protocol]
            if method in BASELINES:
                value = summary[protocol][method][metric][0]
                ax.axhline(value, color=colours[method], linestyle="--", linewidth=1, label=method)
                continue
            epochs = [h["epoch"] for h in mine[0]["history"] if metric in h]
            curves = torch.tensor([[h[metric] for h in r["history"] if metric in h] for r in mine])
            mean = curves.mean(0)
            std = curves.std(0) if len(mine) > 1 else torch.zeros_like(mean)
            ax.plot(epochs, mean, marker="o", markersize=3, color=colours[method], label=method)
            ax.fill_between(epochs, mean - std, mean + std, color=colours[method], alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_title(f"{settings.dataset}, {protocol} classes")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(written[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        metric = headline(protocol)
        names = list(summary[protocol])
        means = [summary[protocol][m][metric][0] for m in names]
        stds = [summary[protocol][m][metric][1] for m in names]
        ax.bar(range(len(names)), means, yerr=stds, color=[colours[m] for m in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylim(max(0.0, min(means) - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.03))
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_title(f"{settings.dataset}, {protocol} classes: final")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(written[1], dpi=120)
    plt.close(fig)

    merged = [p for p in protocols if summary[p].get("full", {}).get("merge_rounds")]
    if merged:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for i, protocol in enumerate(merged):
            rounds = summary[protocol]["full"]["merge_rounds"]
            epochs = [r["epoch"][0] for r in rounds]
            for k, style in zip(PLANTED_NUMBERS, ("-", "--", ":", "-.")):
                values = [math.nan if r[k][0] is None else r[k][0] for r in rounds]
                if not all(math.isnan(v) for v in values):
                    axes[0].plot(epochs, values, style, marker="o", markersize=3, color=f"C{i}",
                                 label=f"{protocol}: {k.replace('_', ' ')}")
            axes[1].plot(epochs, [r["merged_entries"][0] for r in rounds], marker="o", color=f"C{i}", label=protocol)
        axes[0].set_ylabel("share (pairs of merged entries;\nplanted (original, copy) pairs)")
        axes[1].set_ylabel("entries in merged groups")
        for ax in axes:
            ax.set_xlabel("epoch of the round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{settings.dataset}: merge rounds of the full method")
        fig.tight_layout()
        written.append(out / "merging.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write(runs: list[dict[str, Any]], settings: Settings, out: Path, meta: dict[str, Any]) -> list[Path]:
    """Write results.json, results.md and the plots to ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, settings)
    meta = {**meta, "findings": findings(summary, settings)}
    results = {**meta, "settings": dataclasses.asdict(settings), "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(summary, settings, meta))
    return [out / "results.json", out / "results.md", *plot(runs, summary, settings, out)]


def command_line(argv: list[str] | None, script: str = "benchmarks/quality.py") -> str:
    """The command that reproduces a run, as typed from the repository root."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", script, *args])
