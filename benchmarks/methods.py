"""The self-supervised methods the quality benchmark compares, each built from the library's public classes.

Every method wraps one encoder and turns a multi-view batch (``MultiAugCollate`` layout: view-major
``views`` and ``indices``) into a loss. All share the encoder, the augmentations and the epochs; they
differ only in how many views a sample gets and in the loss:

============== ====== ==================================================================================
method         views  loss
============== ====== ==================================================================================
npid           1      ``MemoryBankLoss`` (NPID: full softmax over a momentum memory bank)
npid-4v        V      the same with V views of each sample in the batch (Bulat et al.'s first change)
npid-4v-cons   V      + ``consistency_weight``, on after ``consistency_warmup`` epochs (second change)
full           V      + ``NeighbourMerger`` (third change: merged mutual nearest neighbours; the full method)
moco           2      ``QueueLoss`` with a momentum key encoder (MoCo v2, shuffled BN emulated)
mochi          2      the same with a ``HardNegativeMixer`` switched on after a warm-up (MoCHi)
xbm            2      ``CrossBatchLoss`` with dataset indices as labels (views of a sample are positives)
============== ====== ==================================================================================

V is ``MethodSettings.views`` (4).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ssl_memory import CrossBatchLoss, HardNegativeMixer, MemoryBankLoss, NeighbourMerger, QueueLoss

METHODS = ("npid", "npid-4v", "npid-4v-cons", "full", "moco", "mochi", "xbm")


@dataclass
class MethodSettings:
    """Hyper-parameters of the methods (the benchmark's command line sets them)."""

    dim: int = 64
    views: int = 4
    temperature: float = 0.05
    bank_momentum: float = 0.0
    consistency: float = 0.3
    consistency_warmup: int = 1
    merge_warmup: int = 10
    merge_interval: int = 4
    merge_initial_share: float = 0.05
    merge_share_growth: float = 0.05
    merge_max_share: float = 0.25
    merge_min_similarity: float = 0.5
    queue_size: int = 4096
    moco_temperature: float = 0.2
    key_momentum: float = 0.99
    shuffle_groups: int = 4
    mochi_hard: int = 256
    mochi_mix: int = 256
    mochi_query_mix: int = 128
    mochi_warmup: int = 5
    xbm_size: int = 4096
    xbm_margin: float = 0.5
    xbm_warmup: int = 1


class Method(nn.Module):
    """A trainable method: ``loss(views, indices)`` for one batch, ``on_epoch_start`` / ``after_step`` hooks."""

    views: int = 1

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after each optimiser step."""

    def log(self, labels: torch.Tensor) -> dict[str, float]:
        """A few numbers worth recording at the end of an epoch (``labels`` only serve diagnostics)."""
        return {}


class MemoryBankMethod(Method):
    """NPID and Bulat et al.'s changes: ``MemoryBankLoss`` with views, consistency and a merger."""

    def __init__(
        self,
        encoder: nn.Module,
        num_samples: int,
        steps_per_epoch: int,
        settings: MethodSettings,
        views: int,
        consistency: float,
        merge: bool,
    ) -> None:
        super().__init__(encoder)
        self.views = views
        self.consistency, self.consistency_warmup = consistency, settings.consistency_warmup
        merger = None
        if merge:
            merger = NeighbourMerger(
                warmup=settings.merge_warmup,
                interval=settings.merge_interval,
                initial_share=settings.merge_initial_share,
                share_growth=settings.merge_share_growth,
                max_share=settings.merge_max_share,
                min_similarity=settings.merge_min_similarity,
            )
        self.criterion = MemoryBankLoss(
            num_samples,
            settings.dim,
            temperature=settings.temperature,
            momentum=settings.bank_momentum,
            consistency_weight=consistency,
            merger=merger,
        )

    def on_epoch_start(self, epoch: int) -> None:
        # Before every entry has been written once the bank is partly random, and asking views to agree
        # on their distribution over random entries only adds noise.
        self.criterion.consistency_weight = self.consistency if epoch >= self.consistency_warmup else 0.0

    def loss(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(views), indices)

    def log(self, labels: torch.Tensor) -> dict[str, float]:
        groups = self.criterion.memory.groups.cpu()
        sizes = torch.bincount(groups, minlength=groups.numel())
        merged = sizes[groups] > 1
        # purity: the share of merged entries whose class is their group's most common class (never used to train)
        pairs = torch.stack([groups[merged], labels[merged]], 1)
        _, counts = pairs.unique(dim=0, return_counts=True)
        _, per_group = groups[merged].unique(return_counts=True)
        majority = torch.zeros(groups.numel(), dtype=torch.long).scatter_reduce_(
            0, pairs.unique(dim=0)[:, 0], counts, "amax"
        )
        return {
            "positive_prob": float(self.criterion.last["positive_prob"]),
            "consistency": float(self.criterion.last["consistency"]),
            "merged_share": float(merged.float().mean()),
            "largest_group": int(sizes.max()),
            "merge_purity": float(majority.sum() / per_group.sum()) if merged.any() else 1.0,
        }


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
        order = torch.randperm(views.shape[0], generator=self.generator)
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


def build_method(
    name: str,
    encoder: nn.Module,
    num_samples: int,
    steps_per_epoch: int,
    settings: MethodSettings,
    generator: torch.Generator,
) -> Method:
    """The method ``name`` (one of :data:`METHODS`) around ``encoder``."""
    if name == "npid":
        return MemoryBankMethod(encoder, num_samples, steps_per_epoch, settings, 1, 0.0, False)
    if name == "npid-4v":
        return MemoryBankMethod(encoder, num_samples, steps_per_epoch, settings, settings.views, 0.0, False)
    if name == "npid-4v-cons":
        views, consistency = settings.views, settings.consistency
        return MemoryBankMethod(encoder, num_samples, steps_per_epoch, settings, views, consistency, False)
    if name == "full":
        views, consistency = settings.views, settings.consistency
        return MemoryBankMethod(encoder, num_samples, steps_per_epoch, settings, views, consistency, True)
    if name in ("moco", "mochi"):
        return MoCoMethod(encoder, settings, name == "mochi", generator)
    if name == "xbm":
        return CrossBatchMethod(encoder, steps_per_epoch, settings)
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
