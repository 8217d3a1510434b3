"""The self-supervised methods the quality benchmark compares, each built from the library's public classes.

Every method wraps one encoder and turns a multi-view batch (``MultiAugCollate`` layout: view-major
``views`` and ``indices``) into a loss. All share the encoder, the augmentations and the epochs; they
differ only in how many views a sample gets and in the loss:

============== ====== ==================================================================================
method         views  loss
============== ====== ==================================================================================
npid           1      ``MemoryBankLoss`` (NPID: full softmax over a momentum memory bank)
npid-4v        V      + V views of each sample in the batch (Bulat et al.'s first change)
npid-4v-cons   V      + ``consistency`` between the views, after ``consistency_warmup`` epochs (second change)
full           V      + ``NeighbourMerger`` (third change: merged near-duplicates as positives; the full method)
oracle         V      npid-4v-cons handed the planted duplicate pairs as known groups (needs planted copies)
moco           2      ``QueueLoss`` with a momentum key encoder (MoCo v2, shuffled BN emulated)
mochi          2      the same with a ``HardNegativeMixer`` switched on after a warm-up (MoCHi)
xbm            2      ``CrossBatchLoss`` with dataset indices as labels (views of a sample are positives)
============== ====== ==================================================================================

V is ``MethodSettings.views``. Every memory-bank row runs at the same temperature and bank momentum
(NPID's published 0.07 and 0.5 by default), so that each row differs from the one above it by one
change. Labels never reach a loss: memory-bank methods get them only to
measure, right after each merge round, how often merged entries share a class.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.encoders import DigitCNN
from benchmarks.quality_settings import ORACLE, MethodSettings
from ssl_memory import ConsistencyLoss, CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, NeighbourMerger, QueueLoss


def merge_precision(groups: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """How a bank's merge groups sit with the true classes (for diagnosis only).

    ``precision`` is the share of entries in groups of two or more whose label is their group's most
    common label (None when nothing is merged: there is nothing to be right or wrong about);
    ``merged_entries`` counts those entries and
    ``largest_group`` is the size of the largest group.

    Example::

        >>> merge_precision(torch.tensor([0, 0, 0, 3, 4]), torch.tensor([1, 1, 2, 0, 0]))
        {'precision': 0.6666666666666666, 'merged_entries': 3, 'largest_group': 3}
    """
    groups, labels = groups.cpu(), labels.cpu()
    sizes = torch.bincount(groups, minlength=groups.numel())
    merged = sizes[groups] > 1
    if not bool(merged.any()):
        return {"precision": None, "merged_entries": 0, "largest_group": int(sizes.max())}
    pairs, counts = torch.stack([groups[merged], labels[merged]], 1).unique(dim=0, return_counts=True)
    majority = torch.zeros_like(sizes).scatter_reduce_(0, pairs[:, 0], counts, "amax")
    entries = int(merged.sum())
    return {"precision": int(majority.sum()) / entries, "merged_entries": entries, "largest_group": int(sizes.max())}


def _pairs_within(groups: torch.Tensor, keys: torch.Tensor | None = None) -> int:
    """Pairs of entries in one group (and, given ``keys``, with equal keys): sum of c (c - 1) / 2 over counts c."""
    cells = groups if keys is None else groups * (int(keys.max()) + 1) + keys
    counts = torch.unique(cells, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


@torch.no_grad()
def mutual_nearest(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Each row's nearest other row by cosine; -1 where the two are not each other's nearest."""
    x = F.normalize(x.float(), dim=1)
    nearest = torch.cat([_nearest_block(x, i, chunk) for i in range(0, len(x), chunk)])
    mutual = nearest[nearest] == torch.arange(len(x))
    return nearest.masked_fill(~mutual, -1)


def _nearest_block(x: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    sims = x[start : start + chunk] @ x.T
    rows = torch.arange(sims.shape[0])
    sims[rows, rows + start] = -2.0  # not itself
    return sims.argmax(1)


def planted_metrics(
    groups: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor | None, searched: torch.Tensor | None
) -> dict[str, float | int | None]:
    """How merge groups sit with planted duplicates and classes (for diagnosis only).

    - ``entries_merged``: entries in groups of two or more;
    - ``class_purity``: share of the pairs of entries sharing a group that share their class;
    - ``planted_recall``: share of the planted (original, copy) pairs inside one group;
    - ``reachable_recall``: the same over the planted pairs that are mutual nearest neighbours in
      ``searched`` (what the merger searched at the round; None when not given);
    - ``planted_precision``: share of the pairs sharing a group that are copies of one origin.

    Ratios with nothing to count are None.

    Example::

        >>> groups, labels = torch.tensor([0, 0, 2, 2]), torch.tensor([1, 1, 1, 0])
        >>> found = planted_metrics(groups, labels, torch.tensor([[0, 1]]), None)
        >>> found["class_purity"], found["planted_recall"], found["planted_precision"]
        (0.5, 1.0, 0.5)
    """
    groups, labels = groups.cpu(), labels.cpu()
    sizes = torch.bincount(groups, minlength=groups.numel())
    together = _pairs_within(groups)
    out: dict[str, float | int | None] = {
        "entries_merged": int(sizes[sizes > 1].sum()),
        "class_purity": _pairs_within(groups, labels) / together if together else None,
        "planted_recall": None, "reachable_recall": None, "planted_precision": None,
    }
    if pairs is None or len(pairs) == 0:
        return out
    origin = torch.arange(groups.numel())
    origin[pairs[:, 1]] = pairs[:, 0]
    joined = groups[pairs[:, 0]] == groups[pairs[:, 1]]
    out["planted_recall"] = float(joined.float().mean())
    if searched is not None:
        nearest = mutual_nearest(searched.cpu())
        reachable = nearest[pairs[:, 0]] == pairs[:, 1]
        out["reachable_recall"] = float(joined[reachable].float().mean()) if bool(reachable.any()) else None
    out["planted_precision"] = _pairs_within(groups, origin) / together if together else None
    return out


class Method(nn.Module):
    """A trainable method: ``loss(views, indices)`` for one batch, and hooks around epochs."""

    views: int = 1

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def log(self) -> dict[str, float]:
        """A few numbers worth recording at the end of an epoch."""
        return {}


class MemoryBankMethod(Method):
    """NPID and Bulat et al.'s changes: ``MemoryBankLoss`` with views, consistency and a merger.

    With ``merge`` the method steps a ``NeighbourMerger`` after every loss, handing it (unless
    ``settings.merge_search`` is ``"bank"``) a function that embeds ``inputs``, the unaugmented
    training samples, with the encoder in eval mode: a round then searches those embeddings (or, with
    ``"backbone"``, the features before the projection head; with ``"spatial"``, the encoder's last
    feature map before global pooling, flattened), not the momentum-averaged bank rows.
    With ``known`` pairs (the oracle) they are joined into the bank's groups at the start and no round
    runs. ``merges`` lists one record per merge round: the epoch it ran in (1-based), the merger's
    report, :func:`merge_precision` and :func:`planted_metrics` of the groups right after the round.
    """

    def __init__(
        self,
        encoder: nn.Module,
        labels: torch.Tensor,
        settings: MethodSettings,
        views: int,
        consistency: float = 0.0,
        merge: bool = False,
        inputs: torch.Tensor | None = None,
        planted: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        super().__init__(encoder)
        self.views, self.temperature = views, settings.temperature
        self.consistency, self.consistency_warmup = consistency, settings.consistency_warmup
        self.criterion = MemoryBankLoss(
            len(labels),
            settings.dim,
            temperature=settings.temperature,
            momentum=settings.bank_momentum,
            consistency_weight=consistency,
        )
        self.merger = None
        if merge:
            cap = settings.merge_cap
            if planted is not None and len(planted):  # room for every planted entry, the bound kept above it
                cap = max(cap, min(1.0, 2 * len(planted) / len(labels) + 0.05))
            kwargs = {
                "ratio": settings.merge_ratio,
                "bank_ratio": settings.merge_bank_ratio or None,
                "max_merged_share": cap,
                **settings.merge_kwargs,
            }
            self.merger = NeighbourMerger(warmup=settings.merge_warmup, interval=settings.merge_interval, **kwargs)
        if known is not None:
            NeighbourMerger().add_groups(self.criterion.memory, known)
        self.search = settings.merge_search
        self.inputs, self.planted = inputs, planted
        self.labels = labels
        self.epoch = 0
        self.merges: list[dict[str, Any]] = []
        self.on_round = on_round
        self._searched: torch.Tensor | None = None

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        # Before every entry has been written once the bank is partly random, and asking views to agree
        # on their distribution over random entries only adds noise.
        self.criterion.consistency_weight = self.consistency if epoch >= self.consistency_warmup else 0.0

    @torch.no_grad()
    def embed_inputs(self, features: str = "embedding", batch: int = 1024) -> torch.Tensor:
        """The unaugmented samples through the encoder in eval mode, one row each.

        ``features``: ``"embedding"`` (its output), ``"backbone"`` (up to its head), ``"spatial"`` (its
        last feature map before pooling, flattened) or, for :class:`~benchmarks.encoders.DigitCNN`,
        ``"block1"`` to ``"block3"`` (the feature map after that many blocks, flattened).
        """
        was_training = self.encoder.training
        self.encoder.eval()
        if features.startswith("block"):
            blocks = int(features.removeprefix("block"))

            def fn(x: torch.Tensor) -> torch.Tensor:
                return self.encoder.feature_map(x, blocks).flatten(1)
        else:
            fn = {
                "embedding": self.encoder,
                "backbone": self.encoder.backbone,
                "spatial": lambda x: self.encoder.feature_map(x).flatten(1),
            }[features]
        device = self.criterion.memory.features.device
        x = self.inputs
        out = torch.cat([fn(x[i : i + batch].to(device)).float() for i in range(0, len(x), batch)])
        self.encoder.train(was_training)
        return out

    def clean_embeddings(self) -> torch.Tensor:
        """What a clean round searches: :meth:`embed_inputs` of what ``merge_search`` names (clean: the embedding)."""
        self._searched = self.embed_inputs("embedding" if self.search == "clean" else self.search)
        return self._searched

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(self.encoder(views), indices)
        if self.merger is None:
            return loss
        memory = self.criterion.memory
        clean = self.search != "bank" and self.inputs is not None
        report = self.merger.step(memory, embeddings=self.clean_embeddings if clean else None)
        if report is not None:
            searched = self._searched if clean else memory.features
            diagnosis = {
                **merge_precision(memory.groups, self.labels),
                **planted_metrics(memory.groups, self.labels, self.planted, searched),
            }
            self.merges.append({"epoch": self.epoch + 1, "report": dataclasses.asdict(report), **diagnosis})
            if self.on_round is not None:
                spaces = {"embeddings": self.embed_inputs("embedding")}
                names = ["backbone", "spatial"]
                if isinstance(self.encoder, DigitCNN):  # the digits' replays compare earlier blocks' maps too
                    names += ["block1", "block2", "block3"]
                spaces.update({name: self.embed_inputs(name) for name in names})
                self.on_round(self.epoch + 1, {**spaces, "bank": memory.features})
        return loss

    def log(self) -> dict[str, float]:
        last = self.criterion.last
        out = {"positive_prob": float(last["positive_prob"]), "consistency": float(last["consistency"])}
        if self.merger is not None or self.planted is not None:
            out.update(merge_precision(self.criterion.memory.groups, self.labels))
        if self.planted is not None:
            found = planted_metrics(self.criterion.memory.groups, self.labels, self.planted, None)
            out.update({k: v for k, v in found.items() if k in ("planted_recall", "planted_precision", "class_purity")})
        return out

    @torch.no_grad()
    def views_kl(self, x: torch.Tensor, augment: nn.Module, views: int = 4, batch: int = 256) -> float:
        """Mean pairwise KL between the views' distributions over the bank, at this method's temperature.

        Each sample of ``x`` gets ``views`` augmentations, embedded in eval mode; a view's distribution
        is the softmax of its similarities to the bank divided by the temperature, and the KL is averaged
        over ordered pairs of views and over samples (what the consistency term minimises).
        """
        was_training = self.encoder.training
        self.encoder.eval()
        measure = ConsistencyLoss(temperature=self.temperature)
        bank = self.criterion.memory.features.float()
        total = 0.0
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            rows = torch.cat([augment(chunk) for _ in range(views)]).to(bank.device)  # augmentations run on CPU
            sims = F.normalize(self.encoder(rows).float(), dim=1) @ bank.T
            ids = torch.arange(len(chunk), device=bank.device).repeat(views)
            total += float(measure(sims, ids)) * len(chunk)
        self.encoder.train(was_training)
        return total / len(x)


class MoCoMethod(Method):
    """MoCo v2: a query encoder, a momentum key encoder and ``QueueLoss`` (optionally with MoCHi)."""

    views = 2

    def __init__(self, encoder: nn.Module, settings: MethodSettings, mochi: bool, generator: torch.Generator) -> None:
        super().__init__(encoder)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.settings = settings
        self.mixer = None
        if mochi:
            self.mixer = HardNegativeMixer(
                settings.mochi_hard, settings.mochi_mix, settings.mochi_query_mix, generator=generator
            )
        self.criterion = QueueLoss(settings.queue_size, settings.dim, settings.moco_temperature)
        self.generator = generator

    def on_epoch_start(self, epoch: int) -> None:
        if self.mixer is not None and epoch >= self.settings.mochi_warmup:
            self.criterion.mixer = self.mixer

    @torch.no_grad()
    def _keys(self, views: torch.Tensor) -> torch.Tensor:
        # BN over the whole key batch lets the model match a query to its key through batch statistics;
        # MoCo shuffles the batch across GPUs. Here: shuffle, normalise in separate groups, unshuffle.
        order = torch.randperm(views.shape[0], generator=self.generator).to(views.device)
        groups = min(self.settings.shuffle_groups, max(1, views.shape[0] // 2))
        keys = torch.cat([self.key_encoder(chunk) for chunk in views[order].chunk(groups)])
        return torch.empty_like(keys).index_copy_(0, order, keys)

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        half = views.shape[0] // 2
        self._momentum_update()
        keys = self._keys(views[half:])
        return self.criterion(self.encoder(views[:half]), keys, indices[:half])

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.settings.key_momentum
        for key, query in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            key.mul_(m).add_(query.detach(), alpha=1 - m)


class CrossBatchMethod(Method):
    """XBM's contrastive loss with a cross-batch memory, dataset indices as labels."""

    views = 2

    def __init__(self, encoder: nn.Module, steps_per_epoch: int, settings: MethodSettings) -> None:
        super().__init__(encoder)
        self.criterion = CrossBatchLoss(
            settings.xbm_size,
            settings.dim,
            margin=settings.xbm_margin,
            start_step=settings.xbm_warmup * steps_per_epoch,
        )

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(views), indices)


def views_of(name: str, settings: MethodSettings) -> int:
    """How many views of each sample a batch of method ``name`` holds."""
    return {"npid": 1, "moco": 2, "mochi": 2, "xbm": 2}.get(name, settings.views)


def build_method(
    name: str,
    encoder: nn.Module,
    labels: torch.Tensor,
    steps_per_epoch: int,
    settings: MethodSettings,
    generator: torch.Generator,
    inputs: torch.Tensor | None = None,
    planted: torch.Tensor | None = None,
    on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> Method:
    """The method ``name`` around ``encoder``.

    ``labels`` (of the training samples) and ``planted`` (the (original, copy) pairs planted in them)
    serve only diagnostics, except for the oracle, which is handed ``planted`` as known groups;
    ``inputs`` are the unaugmented training samples a clean merge round embeds; ``on_round(epoch,
    spaces)`` is called after each merge round with the clean samples' embeddings, backbone features and
    flattened last feature maps, and the bank rows, by name (``benchmarks/merge_replay.py`` keeps them).
    """
    if name in ("npid", "npid-4v", "npid-4v-cons", "full", ORACLE):
        if name == ORACLE and (planted is None or len(planted) == 0):
            raise ValueError("the oracle method needs planted duplicates (--plant-duplicates above 0)")
        consistency = settings.consistency if name in ("npid-4v-cons", "full", ORACLE) else 0.0
        views = views_of(name, settings)
        known = planted if name == ORACLE else None
        return MemoryBankMethod(
            encoder, labels, settings, views, consistency, merge=name == "full", inputs=inputs, planted=planted,
            known=known,
            on_round=on_round,
        )
    if name in ("moco", "mochi"):
        return MoCoMethod(encoder, settings, name == "mochi", generator)
    if name == "xbm":
        return CrossBatchMethod(encoder, steps_per_epoch, settings)
    raise ValueError(f"unknown method {name!r}")
