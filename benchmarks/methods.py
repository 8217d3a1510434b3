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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.quality_settings import MethodSettings
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

    ``merges`` lists one record per merge round: the epoch it ran in (1-based), the merger's report
    and :func:`merge_precision` of the groups right after the round.
    """

    def __init__(
        self,
        encoder: nn.Module,
        labels: torch.Tensor,
        settings: MethodSettings,
        views: int,
        consistency: float = 0.0,
        merge: bool = False,
    ) -> None:
        super().__init__(encoder)
        self.views, self.temperature = views, settings.temperature
        self.consistency, self.consistency_warmup = consistency, settings.consistency_warmup
        merger = None
        if merge:
            merger = NeighbourMerger(
                warmup=settings.merge_warmup, interval=settings.merge_interval, **settings.merge_kwargs
            )
        self.criterion = MemoryBankLoss(
            len(labels),
            settings.dim,
            temperature=settings.temperature,
            momentum=settings.bank_momentum,
            consistency_weight=consistency,
            merger=merger,
        )
        self.labels = labels
        self.epoch = 0
        self.merges: list[dict[str, Any]] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        # Before every entry has been written once the bank is partly random, and asking views to agree
        # on their distribution over random entries only adds noise.
        self.criterion.consistency_weight = self.consistency if epoch >= self.consistency_warmup else 0.0

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(self.encoder(views), indices)
        report = self.criterion.last["merge"]
        if report is not None:
            diagnosis = merge_precision(self.criterion.memory.groups, self.labels)
            self.merges.append({"epoch": self.epoch + 1, "report": dataclasses.asdict(report), **diagnosis})
        return loss

    def log(self) -> dict[str, float]:
        last = self.criterion.last
        out = {"positive_prob": float(last["positive_prob"]), "consistency": float(last["consistency"])}
        if self.criterion.merger is not None:
            out.update(merge_precision(self.criterion.memory.groups, self.labels))
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
) -> Method:
    """The method ``name`` around ``encoder``; ``labels`` (of the training samples) serve only diagnostics."""
    if name in ("npid", "npid-4v", "npid-4v-cons", "full"):
        consistency = settings.consistency if name in ("npid-4v-cons", "full") else 0.0
        views = views_of(name, settings)
        return MemoryBankMethod(encoder, labels, settings, views, consistency, merge=name == "full")
    if name in ("moco", "mochi"):
        return MoCoMethod(encoder, settings, name == "mochi", generator)
    if name == "xbm":
        return CrossBatchMethod(encoder, steps_per_epoch, settings)
    raise ValueError(f"unknown method {name!r}")
