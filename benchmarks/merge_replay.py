"""Merge criteria compared on the rounds of one recorded run, with planted near-copies as ground truth.

Run from the repository root::

    python benchmarks/merge_replay.py --dataset mnist1d-tune --out benchmarks/results/merge_replay/mnist1d-tune

One ``full`` run of the quality harness (its settings for the data set, 15% of the training samples
given a planted near-copy, one seed, seen classes or with ``--protocol unseen`` the first half of the
classes) is trained and, at each of its merge rounds, the
encoder's embeddings of the unaugmented samples, its backbone features of them (before the projection
head), its last feature map of them (before global pooling, flattened: ``spatial``; on digits also the maps
after the first one, two and three blocks: ``block1`` to ``block3``) and the bank rows are kept. Each criterion of
:data:`CRITERIA` then replays every round from no groups, a :class:`~ssl_memory.NeighbourMerger` with
the harness's caps and schedule merging the kept tensors: what merges differs, what is searched does
not (merging feeds back into training, which a replay leaves out). Per criterion: the reachable
recall after the last round, the planted recall, the lowest planted precision over the rounds (the
issue's targets are 0.8 and 0.9), the lowest class purity of the merged pairs, the entries merged, and
where the last round's merged pairs lie in the input: whether the pairs counted against precision are
farther apart than the planted copies, or nearer (natural near-duplicates the ground truth does not list).

With ``--plant 0`` the run has no planted copies (``--epochs 80`` on mnist1d-tune, whose rounds start at
epoch 20, and ``--epochs 70`` on mnist5k-val, from epoch 6, give the sixty rounds of issue 18's safety
target): every merged pair is a pair of distinct samples, and the table reports per criterion the
entries merged, the lowest class purity over the rounds, the rounds under 0.95 and the last round's purity.
``--rows`` replays only the criteria whose name contains one of the given strings.

``mnist5k-val`` is mnist5k's train split less the 20% the validation sweep holds out (with ``--protocol
unseen``, the first half of the classes of both parts, i.e. of mnist5k's train split); no test split is read.
Outputs in ``--out``: ``results.json`` (command, commit, settings, every criterion's rounds) and
``results.md`` (the table) and ``pairs.png`` (merged pairs of the harness's criterion, drawn).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality_report  # noqa: E402
from benchmarks.datasets import load, plant_duplicates, protocol_data  # noqa: E402
from benchmarks.methods import planted_metrics  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from benchmarks.quality_run import run_job  # noqa: E402
from benchmarks.quality_settings import MethodSettings, resolve  # noqa: E402
from benchmarks.sweep import validation_split  # noqa: E402
from ssl_memory import MemoryBank, NeighbourMerger  # noqa: E402

# The harness's criterion on signals (quality_settings.SIGNALS), which several rows vary.
SIGNALS_CRITERION: dict[str, Any] = {
    "ratio": 0.87,
    "bank_ratio": 0.8,
    "max_group_size": 3,
    "initial_share": 1,
    "max_share": 1,
    "persistence": 2,
    "immediate_ratio": 0.75,
}

# (name, NeighbourMerger arguments): the embeddings alone at three ratios, with a smaller group cap,
# confirmed by the bank rows, with a larger per-round share and groups of at most 3, pairs passing several
# rounds in a row before they merge, and rounds that search the backbone's features or the flattened last
# feature map instead, the latter also with groups of at most 3 ("search", not a merger argument: which kept
# tensor to search).
CRITERIA: tuple[tuple[str, dict[str, Any]], ...] = (
    ("embeddings, ratio 0.75", {"ratio": 0.75}),
    ("embeddings, ratio 0.8", {"ratio": 0.8}),
    ("embeddings, ratio 0.85", {"ratio": 0.85}),
    ("embeddings, ratio 0.78, groups of at most 3", {"ratio": 0.78, "max_group_size": 3}),
    ("embeddings, ratio 0.8, groups of at most 3", {"ratio": 0.8, "max_group_size": 3}),
    ("embeddings 0.8, confirmed by bank 0.8", {"ratio": 0.8, "bank_ratio": 0.8}),
    ("embeddings 0.85, confirmed by bank 0.75", {"ratio": 0.85, "bank_ratio": 0.75}),
    ("embeddings 0.85, confirmed by bank 0.8", {"ratio": 0.85, "bank_ratio": 0.8}),
    ("embeddings 0.88, confirmed by bank 0.8", {"ratio": 0.88, "bank_ratio": 0.8}),
    ("embeddings 0.85, bank 0.8, share up to 0.5", {"ratio": 0.85, "bank_ratio": 0.8, "max_share": 0.5}),
    ("embeddings 0.85, bank 0.8, groups of at most 3", {"ratio": 0.85, "bank_ratio": 0.8, "max_group_size": 3}),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, share 0.25 then 0.5",
        {
            "ratio": 0.85,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 0.25,
            "share_growth": 0.25,
            "max_share": 0.5,
        },
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, share 0.25 up to 0.75",
        {
            "ratio": 0.85,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 0.25,
            "share_growth": 0.25,
            "max_share": 0.75,
        },
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, share 0.05 growing by 0.05 to 0.5",
        {"ratio": 0.85, "bank_ratio": 0.8, "max_group_size": 3, "max_share": 0.5},
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, share 0.1 growing by 0.1 to 0.5",
        {
            "ratio": 0.85,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 0.1,
            "share_growth": 0.1,
            "max_share": 0.5,
        },
    ),
    (
        "embeddings 0.8, bank 0.8, groups of at most 3, share 0.25 then 0.5",
        {
            "ratio": 0.8,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 0.25,
            "share_growth": 0.25,
            "max_share": 0.5,
        },
    ),
    (
        "embeddings 0.8, bank 0.8, groups of at most 3, share 0.05 growing by 0.05 to 0.5",
        {"ratio": 0.8, "bank_ratio": 0.8, "max_group_size": 3, "max_share": 0.5},
    ),
    (
        "embeddings 0.85, bank 0.8, every passing pair",
        {"ratio": 0.85, "bank_ratio": 0.8, "initial_share": 1.0, "max_share": 1.0},
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, share 0.05 growing by 0.05 to 0.5, 2 rounds in a row",
        {"ratio": 0.85, "bank_ratio": 0.8, "max_group_size": 3, "max_share": 0.5, "persistence": 2},
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, every passing pair, 2 rounds in a row",
        {"ratio": 0.85, "bank_ratio": 0.8, "max_group_size": 3, "initial_share": 1, "max_share": 1, "persistence": 2},
    ),
    (
        "embeddings 0.85, bank 0.8, groups of at most 3, every passing pair, 3 rounds in a row",
        {"ratio": 0.85, "bank_ratio": 0.8, "max_group_size": 3, "initial_share": 1, "max_share": 1, "persistence": 3},
    ),
    (
        "embeddings 0.87, bank 0.8, groups of at most 3, every passing pair, 2 rounds in a row",
        {"ratio": 0.87, "bank_ratio": 0.8, "max_group_size": 3, "initial_share": 1, "max_share": 1, "persistence": 2},
    ),
    *(
        (
            f"embeddings 0.87, bank 0.8, groups of at most 3, every passing pair, 2 rounds in a row, at once under {r}",
            {**SIGNALS_CRITERION, "immediate_ratio": r},
        )
        for r in (0.6, 0.7, 0.75, 0.77, 0.8)
    ),
    # The signals' criterion made safer in early rounds: a floor on the link's cosine, three rounds in a row
    # for every pair not under the immediate ratio, or a later first round (rows for recordings whose rounds start
    # at epoch 10, as the harness's did before 795a43e; on later ones the first recorded round is epoch 20, and
    # epochs 25 and 30 ask whether a still later one spares the first rounds' pair of two classes).
    *((f"signals' criterion from epoch {e}", {**SIGNALS_CRITERION, "from_epoch": e}) for e in (13, 16, 20, 25, 30)),
    *(
        (f"signals' criterion, cosine at least {floor}", {**SIGNALS_CRITERION, "min_similarity": floor})
        for floor in (0.9, 0.95, 0.97)
    ),
    *(
        (f"signals' criterion at ratio {r}, 3 rounds in a row", {**SIGNALS_CRITERION, "ratio": r, "persistence": 3})
        for r in (0.87, 0.9)
    ),
    (
        "embeddings 0.9, bank 0.78, groups of at most 3, every passing pair, 2 rounds in a row",
        {"ratio": 0.9, "bank_ratio": 0.78, "max_group_size": 3, "initial_share": 1, "max_share": 1, "persistence": 2},
    ),
    (
        "embeddings 0.88, bank 0.8, groups of at most 3, share 0.25 growing by 0.25 to 1, 2 rounds in a row",
        {
            "ratio": 0.88,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 0.25,
            "share_growth": 0.25,
            "max_share": 1,
            "persistence": 2,
        },
    ),
    (
        "embeddings 0.9, bank 0.85, groups of at most 3, every passing pair, 3 rounds in a row",
        {"ratio": 0.9, "bank_ratio": 0.85, "max_group_size": 3, "initial_share": 1, "max_share": 1, "persistence": 3},
    ),
    (
        "embeddings 0.9, bank 0.85, groups of at most 3, share 0.05 growing by 0.05 to 0.5, 2 rounds in a row",
        {"ratio": 0.9, "bank_ratio": 0.85, "max_group_size": 3, "max_share": 0.5, "persistence": 2},
    ),
    ("backbone 0.85, confirmed by bank 0.8", {"search": "backbone", "ratio": 0.85, "bank_ratio": 0.8}),
    ("backbone 0.8, confirmed by bank 0.8", {"search": "backbone", "ratio": 0.8, "bank_ratio": 0.8}),
    ("backbone 0.8, confirmed by bank 0.7", {"search": "backbone", "ratio": 0.8, "bank_ratio": 0.7}),
    ("spatial, ratio 0.675", {"search": "spatial", "ratio": 0.675}),
    ("spatial 0.7, confirmed by bank 0.8", {"search": "spatial", "ratio": 0.7, "bank_ratio": 0.8}),
    ("spatial 0.85, confirmed by bank 0.8", {"search": "spatial", "ratio": 0.85, "bank_ratio": 0.8}),
    ("spatial 0.9, confirmed by bank 0.8", {"search": "spatial", "ratio": 0.9, "bank_ratio": 0.8}),
    (
        "spatial 0.9, bank 0.8, groups of at most 3",
        {"search": "spatial", "ratio": 0.9, "bank_ratio": 0.8, "max_group_size": 3},
    ),
    (
        "spatial 0.875, bank 0.825, groups of at most 3",
        {"search": "spatial", "ratio": 0.875, "bank_ratio": 0.825, "max_group_size": 3},
    ),
    (
        "spatial 0.9, bank 0.8, groups of at most 3, 2 rounds in a row",
        {"search": "spatial", "ratio": 0.9, "bank_ratio": 0.8, "max_group_size": 3, "persistence": 2},
    ),
    (
        "spatial 0.9, bank 0.8, groups of at most 3, share 0.05 growing by 0.05 to 0.5, 2 rounds in a row",
        {"search": "spatial", "ratio": 0.9, "bank_ratio": 0.8, "max_group_size": 3, "max_share": 0.5, "persistence": 2},
    ),
    (
        "spatial 0.9, bank 0.8, groups of at most 3, every passing pair, 2 rounds in a row",
        {
            "search": "spatial",
            "ratio": 0.9,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 1,
            "max_share": 1,
            "persistence": 2,
        },
    ),
    (
        "spatial 0.9, bank 0.8, groups of at most 3, every passing pair, 3 rounds in a row",
        {
            "search": "spatial",
            "ratio": 0.9,
            "bank_ratio": 0.8,
            "max_group_size": 3,
            "initial_share": 1,
            "max_share": 1,
            "persistence": 3,
        },
    ),
    # The digits' trade-off: a stricter test or a larger per-round share, one at a time and together.
    *(
        (
            f"spatial {r}, bank {b}, groups of at most 3",
            {"search": "spatial", "ratio": r, "bank_ratio": b, "max_group_size": 3},
        )
        for r, b in ((0.8, 0.75), (0.8, 0.8), (0.85, 0.8))
    ),
    *(
        (
            f"spatial {r}, bank {b}, groups of at most 3, share 0.05 growing by 0.05 to {top}",
            {"search": "spatial", "ratio": r, "bank_ratio": b, "max_group_size": 3, "max_share": top},
        )
        for r, b in ((0.8, 0.75), (0.8, 0.8), (0.85, 0.8), (0.9, 0.8))
        for top in (0.5, 1.0)
    ),
    # Digits: a looser confirmation by the bank, or none, on the last map (does the bank cap unseen recall?).
    *(
        (
            f"spatial {r}, bank {b}, groups of at most 3",
            {"search": "spatial", "ratio": r, "bank_ratio": b, "max_group_size": 3},
        )
        for r, b in (
            (0.8, 0.85),
            (0.85, 0.85),
            (0.9, 0.85),
            (0.8, 0.9),
            (0.85, 0.9),
            (0.75, 0.95),
            (0.8, 0.95),
            (0.675, 0.98),
            (0.7, 0.98),
            (0.7, 0.95),
        )
    ),
    *(
        (f"spatial {r} alone, groups of at most 3", {"search": "spatial", "ratio": r, "max_group_size": 3})
        for r in (0.65, 0.66, 0.675, 0.68, 0.69, 0.7, 0.75, 0.8)
    ),
    *(
        (f"spatial {r} alone, pairs only", {"search": "spatial", "ratio": r, "max_group_size": 2})
        for r in (0.675, 0.7, 0.72, 0.75, 0.76, 0.77, 0.78, 0.8)
    ),
    # Digits: the maps after the first one, two or three of the encoder's four blocks (flattened, before any
    # pooling), nearer the pixels than the last: does a map that keeps more of where each stroke lies tell a copy
    # from a digit written alike better? The digits' criterion on each at several ratios, and with the share
    # grown to 0.5 or 1. Recorded on digits only (MemoryBankMethod.embed_inputs); elsewhere these rows are skipped.
    *(
        (
            f"block {k} map {r}, bank 0.8, groups of at most 3{tail}",
            {"search": f"block{k}", "ratio": r, "bank_ratio": 0.8, "max_group_size": 3, **share},
        )
        for k, ratios in ((3, (0.8, 0.85, 0.9)), (2, (0.8, 0.85, 0.9, 0.95)), (1, (0.9, 0.95)))
        for r in ratios
        for tail, share in (("", {}), *((f", share growing to {top}", {"max_share": top}) for top in (0.5, 1)))
    ),
)
# The kept tensor each of the harness's --merge-search choices searches.
SEARCHED = {"clean": "embeddings", "backbone": "backbone", "spatial": "spatial", "bank": "bank"}
PLANTED = 0.15
# Issue 18's class purity target for runs without planted copies.
PURITY = 0.95


def harness_criterion(method: MethodSettings) -> dict[str, Any]:
    """The quality harness's criterion for ``method``, written as a row of :data:`CRITERIA` writes it."""
    criterion = {"ratio": method.merge_ratio, **method.merge_kwargs}
    if method.merge_bank_ratio:
        criterion["bank_ratio"] = method.merge_bank_ratio
    if method.merge_search != "clean":
        criterion = {"search": SEARCHED[method.merge_search], **criterion}
    return criterion


def record(
    dataset: str, seed: int, protocol: str = "seen", planted: float = PLANTED, epochs: int | None = None
) -> dict[str, Any]:
    """Train ``full`` once; keep each round's searchable tensors (:data:`SEARCHED`), the planted pairs, labels.

    ``protocol="unseen"`` trains on the first half of the classes of the train and test splits together; on
    ``mnist5k-val`` those are the two parts of mnist5k's train split, so no test data is read either way.
    ``planted=0`` records a run without planted copies; ``epochs`` overrides the harness's run length.
    """
    base = "mnist5k" if dataset == "mnist5k-val" else dataset
    options = {"methods": ("full",), "protocols": (protocol,), "seeds": (seed,), "plant_duplicates": planted}
    if epochs is not None:
        options["epochs"] = epochs
    settings = resolve(base, False, options)
    settings = dataclasses.replace(settings, eval_every=settings.epochs)
    data = load(base)
    if dataset == "mnist5k-val":
        data = validation_split(data, 0.2)
    rounds: list[dict[str, Any]] = []

    def keep(epoch: int, spaces: dict[str, torch.Tensor]) -> None:
        rounds.append({"epoch": epoch, **{name: value.clone() for name, value in spaces.items()}})

    run = run_job(settings, ("full", protocol, seed), data, on_round=keep)
    train, pairs = protocol_data(data, protocol).train, torch.zeros(0, 2, dtype=torch.long)
    if planted > 0:
        train, pairs = plant_duplicates(train, planted, data.kind, seed=seed)
    return {
        "settings": settings,
        "rounds": rounds,
        "pairs": pairs,
        "labels": train.y,
        "final": run["final"],
        "input": input_distances(train.x, pairs) if len(pairs) else None,
        "x": train.x,
        "kind": data.kind,
    }


def input_distances(x: torch.Tensor, pairs: torch.Tensor) -> dict[str, float]:
    """How near a copy is to its original in the input itself, against the original's nearest other sample.

    ``copy`` and ``nearest_other``: median Euclidean distances over the planted pairs;
    ``copy_is_nearest``: the share of originals whose nearest sample is their copy.
    """
    flat = x.flatten(1).float()
    originals = flat[pairs[:, 0]]
    d = torch.cdist(originals, flat)
    d[torch.arange(len(pairs)), pairs[:, 0]] = torch.inf  # not itself
    copy = d[torch.arange(len(pairs)), pairs[:, 1]].clone()
    d[torch.arange(len(pairs)), pairs[:, 1]] = torch.inf
    other = d.min(dim=1).values
    return {
        "copy": float(copy.median()),
        "nearest_other": float(other.median()),
        "copy_is_nearest": float((copy < other).float().mean()),
    }


def merged_pairs(groups: torch.Tensor) -> torch.Tensor:
    """Every pair of entries sharing a group, as rows ``(i, j)`` with ``i < j``, shape (P, 2)."""
    sizes = torch.bincount(groups, minlength=groups.numel())
    members = (sizes[groups] > 1).nonzero().squeeze(1)
    i, j = torch.triu_indices(len(members), len(members), 1)
    together = groups[members[i]] == groups[members[j]]
    return torch.stack([members[i[together]], members[j[together]]], dim=1)


def copies_of_one_origin(found: torch.Tensor, pairs: torch.Tensor, n: int) -> torch.Tensor:
    """Whether each row ``(i, j)`` of ``found`` is a planted pair or two copies of one origin, shape (P,)."""
    origin = torch.arange(n)
    origin[pairs[:, 1]] = pairs[:, 0]
    return origin[found[:, 0]] == origin[found[:, 1]]


def merged_input_distances(groups: torch.Tensor, pairs: torch.Tensor, x: torch.Tensor, copy: float) -> dict:
    """How near in the input the merged pairs are: copies of one origin (planted) and the others.

    ``planted`` and ``other``: median Euclidean distances (None when there are none);
    ``other_nearer_than_copy``: the share of the other pairs nearer to each other than ``copy``, the median
    distance of a planted copy to its original (:func:`input_distances`).
    """
    found = merged_pairs(groups.cpu())
    planted = copies_of_one_origin(found, pairs, groups.numel())
    flat = x.flatten(1).float()
    d = (flat[found[:, 0]] - flat[found[:, 1]]).norm(dim=1)
    other = d[~planted]

    def median(values: torch.Tensor) -> float | None:
        return float(values.median()) if len(values) else None

    return {
        "planted": median(d[planted]),
        "other": median(other),
        "other_nearer_than_copy": float((other < copy).float().mean()) if len(other) else None,
    }


def replay(recorded: dict[str, Any], arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """Every recorded round merged again by a merger with the harness's caps and ``arguments``.

    ``arguments["search"]`` names the kept tensor a round searches (default ``"embeddings"``) and
    ``arguments["from_epoch"]`` the first recorded round replayed (a later warm-up); the rest go to
    :class:`~ssl_memory.NeighbourMerger`.
    """
    return replay_with_groups(recorded, arguments)[0]


def replay_with_groups(
    recorded: dict[str, Any], arguments: dict[str, Any]
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """:func:`replay`, and the groups after its last round."""
    method, pairs, labels = recorded["settings"].method, recorded["pairs"], recorded["labels"]
    n = len(labels)
    cap = max(method.merge_cap, min(1.0, 2 * len(pairs) / n + 0.05))  # the harness's cap with planted copies
    arguments = dict(arguments)
    search = arguments.pop("search", "embeddings")
    first = arguments.pop("from_epoch", 0)
    merger = NeighbourMerger(max_merged_share=cap, backend="torch", **arguments)
    bank = MemoryBank(n, recorded["rounds"][0]["bank"].shape[1])
    out = []
    for kept in recorded["rounds"]:
        if kept["epoch"] < first:
            continue
        bank.features.copy_(kept["bank"])
        report = merger.merge(bank, kept[search])
        found = planted_metrics(bank.groups, labels, pairs, F.normalize(kept[search].float(), dim=1))
        out.append({"epoch": kept["epoch"], "pairs_merged": report.pairs_merged, **found})
    if recorded.get("input"):
        out[-1]["input"] = merged_input_distances(bank.groups, pairs, recorded["x"], recorded["input"]["copy"])
    return out, bank.groups.clone()


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    last = rounds[-1]
    precisions = [r["planted_precision"] for r in rounds if r["planted_precision"] is not None]
    purities = [r["class_purity"] for r in rounds if r["class_purity"] is not None]
    return {
        "reachable_recall": last["reachable_recall"],
        "planted_recall": last["planted_recall"],
        "lowest_precision": min(precisions, default=None),
        "last_precision": last["planted_precision"],
        "entries_merged": last["entries_merged"],
        "lowest_class_purity": min(purities, default=None),
        "last_class_purity": last["class_purity"],
        "rounds_under_purity": sum(p < PURITY for p in purities),
        **{f"input_{key}": value for key, value in last.get("input", {}).items()},
    }


def table(results: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    if not results.get("planted_pairs", 1):  # no planted copies: class purity is all there is to measure
        header = ["entries merged, last round", "class purity, lowest", f"rounds under {PURITY}", "class purity, last"]

        def cells(s: dict[str, Any]) -> list[Any]:
            lowest, last = number(s["lowest_class_purity"]), number(s["last_class_purity"])
            return [s["entries_merged"], lowest, s["rounds_under_purity"], last]
    else:
        header = [
            "reachable recall, last round",
            "planted recall",
            "planted precision, lowest",
            "class purity, lowest",
            "entries merged",
            "input distance, merged copies / other merged pairs",
            "other merged pairs nearer than a copy",
        ]

        def cells(s: dict[str, Any]) -> list[Any]:
            distances = f"{number(s.get('input_planted'), 2)} / {number(s.get('input_other'), 2)}"
            recalls = [number(s["reachable_recall"]), number(s["planted_recall"]), number(s["lowest_precision"])]
            return [
                *recalls,
                number(s["lowest_class_purity"]),
                s["entries_merged"],
                distances,
                number(s.get("input_other_nearer_than_copy")),
            ]

    lines = ["| criterion | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for row in results["criteria"]:
        lines.append(f"| {row['name']} | " + " | ".join(map(str, cells(row["summary"]))) + " |")
    return "\n".join(lines)


def pairs_figure(path: Path, groups: torch.Tensor, pairs: torch.Tensor, x: torch.Tensor, kind: str, count: int = 10):
    """A random sample of the merged pairs, planted copies on the first row, the other pairs on the next two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = merged_pairs(groups.cpu())
    planted = copies_of_one_origin(found, pairs, groups.numel())
    gen = torch.Generator().manual_seed(0)
    rows = [("planted copies", found[planted], count), ("other merged pairs", found[~planted], 2 * count)]
    fig, axes = plt.subplots(3, count, figsize=(1.3 * count, 4.2), squeeze=False)
    cells = iter(axes.flat)
    for title, chosen, k in rows:
        chosen = chosen[torch.randperm(len(chosen), generator=gen)[:k]]
        for n, (i, j) in enumerate(chosen.tolist()):
            ax = next(cells)
            if kind == "image":
                ax.imshow(torch.cat([x[i, 0], x[j, 0]], dim=1), cmap="gray", vmin=0, vmax=1)
            else:
                ax.plot(x[i].numpy(), lw=0.8)
                ax.plot(x[j].numpy(), lw=0.8)
            ax.set_title(f"{float((x[i] - x[j]).flatten().norm()):.1f}", fontsize=7)
            if n == 0:
                ax.set_ylabel(title, fontsize=7)
        for _ in range(k - len(chosen)):
            next(cells).axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("merged pairs (title: Euclidean distance in the input)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/merge_replay.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist1d-tune", choices=("mnist1d-tune", "mnist5k-val"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="seen", choices=("seen", "unseen"), help="whose run is recorded")
    parser.add_argument(
        "--plant",
        type=float,
        default=PLANTED,
        help=f"share of the training samples given a planted copy (default {PLANTED}; 0: a run without copies, "
        "whose table reports class purity)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the harness's)")
    parser.add_argument(
        "--rows", nargs="+", default=None, help="replay only the criteria whose name contains one of these"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: results/merge_replay/<dataset>, -unseen appended for that protocol, "
        "-clean for --plant 0)",
    )
    args = parser.parse_args(argv)
    suffix = ("" if args.protocol == "seen" else f"-{args.protocol}") + ("-clean" if args.plant == 0 else "")
    out = Path(args.out or f"results/merge_replay/{args.dataset}{suffix}")
    meta = {"command": quality_report.command_line(argv, "benchmarks/merge_replay.py"), "provenance": provenance()}
    start = time.perf_counter()
    torch.set_num_threads(1)  # the harness's one thread per run, so that replays match its runs
    recorded = record(args.dataset, args.seed, args.protocol, args.plant, args.epochs)
    harness = harness_criterion(recorded["settings"].method)
    criteria, harness_groups = [], None
    for name, arguments in CRITERIA:
        if args.rows and not any(part in name for part in args.rows):
            continue
        if arguments.get("search", "embeddings") not in recorded["rounds"][0]:
            continue  # a space this data set's encoder does not record
        rounds, groups = replay_with_groups(recorded, arguments)
        criteria.append({"name": name, "arguments": arguments, "summary": summary(rounds), "rounds": rounds})
        if arguments == harness:
            harness_groups = groups
    result = {
        **meta,
        "wall_seconds": time.perf_counter() - start,
        "dataset": args.dataset,
        "seed": args.seed,
        "protocol": args.protocol,
        "settings": dataclasses.asdict(recorded["settings"]),
        "rounds": len(recorded["rounds"]),
        "planted_pairs": len(recorded["pairs"]),
        "recorded_run_final": recorded["final"],
        "input_distances": recorded["input"],
        "criteria": criteria,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    near = result["input_distances"]
    header = (
        f"# Merge criteria replayed on {args.dataset}\n\n`{meta['command']}` at commit "
        f"{meta['provenance']['commit'][:7]}{' (dirty)' if meta['provenance']['dirty'] else ''}: the "
        f"{result['rounds']} merge rounds of one `full` run (seed {args.seed}, {args.protocol} classes, "
        f"{result['planted_pairs']} planted pairs), each criterion replayed from no groups.\n\n{table(result)}\n\n"
    )
    if near is None:
        text = header + (
            f"Without planted copies every merged pair is a pair of distinct samples; the class purity of a round is "
            f"the share of the pairs sharing a group after it that share their class (issue 18: at least {PURITY} "
            "in every round).\n"
        )
    else:
        text = header + (
            f"In the input itself, a copy lies at a median distance of {near['copy']:.2f} from its original, whose "
            f"nearest other sample lies at {near['nearest_other']:.2f}; the copy is its original's nearest sample "
            f"for {near['copy_is_nearest']:.0%} of the pairs. The last two columns place the pairs merged by the "
            "last round in the input: the median distance between merged copies and between the other merged "
            "pairs, and the share of the other pairs nearer to each other than a copy's median distance to its "
            "original. `pairs.png` shows a random sample of the pairs the harness's criterion merged.\n"
        )
    (out / "results.md").write_text(text)
    if harness_groups is not None and near is not None:
        pairs_figure(out / "pairs.png", harness_groups, recorded["pairs"], recorded["x"], recorded["kind"])
    print("\n" + text)
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}; took {result['wall_seconds']:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
