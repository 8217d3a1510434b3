"""Encoders of the quality benchmark, one per data set, each ending in a linear projection to ``dim``.

- :class:`SignalCNN`: a small 1D CNN for MNIST-1D (circular padding and global max pooling, so a
  circular shift of the input barely changes the output, as MNIST-1D's digits sit anywhere).
- :class:`DigitCNN`: a small 2D CNN for 28x28 digits (and the 40x40 cluttered ones).
- :class:`ResNet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max pool), written here because
  torchvision is not a dependency.

Each has ``feature_map(x)`` (the last block's output, before global pooling), ``backbone(x)`` (that map
pooled, the features the benchmark evaluates, as is usual since SimCLR: the projection head specialises
in the training task) and ``forward(x) = head(backbone(x))`` (what the losses train). Outputs are not
normalised: the losses normalise, and evaluation normalises.
"""

from __future__ import annotations

import torch
from torch import nn


def _head(width: int, dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
    raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")


class SignalCNN(nn.Module):
    """Small 1D CNN: conv blocks with circular padding, global max pooling, an MLP head.

    Args:
        dim: output width.
        width: channels of the first block (the next ones use 2x and 4x as many).
        head: ``"mlp"`` (two layers, as SimCLR/MoCo v2) or ``"linear"`` (as NPID).

    Shape:
        - input: (B, L)
        - output: (B, dim)

    Example::

        >>> SignalCNN(dim=64)(torch.randn(8, 40)).shape
        torch.Size([8, 64])
    """

    def __init__(self, dim: int = 128, width: int = 32, head: str = "mlp") -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode="circular", bias=False),
                nn.BatchNorm1d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(1, width, 5),
            block(width, 2 * width, 5, stride=2),
            block(2 * width, 2 * width, 3),
            block(2 * width, 4 * width, 3, stride=2),
        )
        self.head = _head(4 * width, dim, head)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output before pooling, (B, 4 * width, ceil(L / 4))."""
        if x.dim() != 2:
            raise ValueError(f"SignalCNN expects signals of shape (B, L), got {tuple(x.shape)}")
        return self.features(x.unsqueeze(1))

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the head, (B, 4 * width): what the benchmark evaluates."""
        return self.feature_map(x).amax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DigitCNN(nn.Module):
    """Small 2D CNN for grey digits: four conv blocks, global average pooling, an MLP head.

    Args:
        dim: output width.
        width: channels of the first block.
        stem_stride: stride of the first block (2 on larger canvases: a quarter of the cost).

    Shape:
        - input: (B, 1, H, W), 28x28 digits or larger canvases
        - output: (B, dim)

    Example::

        >>> DigitCNN(dim=64)(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 64])
    """

    def __init__(self, dim: int = 128, width: int = 32, stem_stride: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        # The fourth block takes the receptive field from 15 to 31 pixels, more than a digit: with three,
        # the pooled features are a bag of stroke pieces (benchmarks/results/sweep/mnist5k-3blocks).
        self.features = nn.Sequential(
            block(1, width, stem_stride),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 2),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True), nn.Linear(4 * width, dim))

    def feature_map(self, x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
        """The output of the first ``blocks`` blocks; by default the last one's before pooling, (B, 4 * width,
        H', W'): 4x4 for 28x28 digits (the first block's is 28x28, the second's 14x14, the third's 7x7)."""
        return self.features[:blocks](x)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the head, (B, 4 * width)."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR variant: 3x3 stem, stride 1, no max pool), then a linear layer.

    This is the encoder of the published CIFAR-10 numbers of NPID and Ye et al. (128-d output).

    Args:
        dim: output width.
        in_channels: input channels.

    Shape:
        - input: (B, in_channels, H, W)
        - output: (B, dim)

    Example::

        >>> ResNet18(dim=128)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """

    def __init__(self, dim: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, dim)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output before pooling, (B, 512, H / 8, W / 8)."""
        return self.layers(self.stem(x))

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 512-d features before the last linear layer."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))
