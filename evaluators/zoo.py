"""The built-in models of the CIFAR-10, Fashion-MNIST and SST-2 tasks, as plain ``nn.Module``s.

Image models take ``(in_channels, num_classes)`` and work on any input size (they end in global
average pooling); text models take int64 token ids ``(N, L)`` with 0 as padding. Every CNN here is
prunable by :mod:`evaluators.pruning` (torch-pruning couples residual partners and depthwise convs).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


# ---------------------------------------------------------------- small CNN (Fashion-MNIST)


class FashionCNN(nn.Module):
    """A three-conv CNN for 28x28 grayscale images (Fashion-MNIST).

    >>> FashionCNN()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            *_conv_bn(2 * width, 2 * width, 3), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 9, 4 * width),
            nn.ReLU(inplace=True),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv + BN shortcut when the shape changes
    (option B of He et al., 2016).

    >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of ``blocks_per_stage`` basic
    blocks at 16/32/64 channels (``width`` scales them), global average pooling, a linear head.
    Depth = 6 * blocks_per_stage + 2.

    >>> CifarResNet(blocks_per_stage=1)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        stages, channels = [], width
        for index, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-20 for 32x32 images (0.27 M parameters at width 16).

    >>> resnet20()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return CifarResNet(3, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-56 for 32x32 images (0.86 M parameters at width 16).

    >>> resnet56()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return CifarResNet(9, num_classes, in_channels, width)


# ---------------------------------------------------------------- MobileNetV2 (CIFAR)


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual when stride 1 and shapes match.

    >>> InvertedResidual(16, 16, stride=1, expand_ratio=6)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, out_channels, 1)
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs: stride 1 in the stem and the first two
    stages (instead of 2), so 32x32 ends at 4x4. ``width_mult`` scales every layer.

    >>> MobileNetV2Cifar(width_mult=0.25)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    # expand ratio, channels, blocks, first stride
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, last_channels: int = 1280) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult: must be > 0, but got {width_mult}")
        channels = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, channels, 3), nn.ReLU6(inplace=True))]
        for expand_ratio, base, blocks, stride in self.SETTINGS:
            out_channels = _make_divisible(base * width_mult)
            for index in range(blocks):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expand_ratio))
                channels = out_channels
        last = _make_divisible(last_channels * max(1.0, width_mult))
        layers.append(nn.Sequential(*_conv_bn(channels, last, 1), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2Cifar:
    """MobileNetV2 for CIFAR-sized images; ``width_mult`` 0.5 halves every layer but the last conv.

    >>> mobilenetv2_cifar(width_mult=0.25)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return MobileNetV2Cifar(num_classes, in_channels, width_mult)


# ---------------------------------------------------------------- VGG (CIFAR)


class VGGCifar(nn.Module):
    """A small VGG-style network: 3x3 conv + BN + ReLU stacks with max pooling (``"M"`` in
    ``layers``), global average pooling and a two-layer classifier.

    >>> VGGCifar(layers=(8, "M", 16, "M"))(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        layers: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M"),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = in_channels
        for item in layers:
            if item == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                modules += [*_conv_bn(channels, int(item), 3), nn.ReLU(inplace=True)]
                channels = int(item)
        modules.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- text models


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``states`` (N, L, D) where ``mask`` (N, L) is True."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TextLSTM(nn.Module):
    """Embedding, a ``num_layers`` LSTM (optionally bidirectional), mean of its outputs over the
    non-padding tokens, a classifier: one hidden tanh layer of ``head_size`` units (0 = none), then
    a linear output. Token id 0 is padding.

    torch-pruning cannot prune LSTMs, so the hidden head layer is what channel pruning finds here.
    (tanh, not ReLU: with plain SGD at the learning rates an LSTM needs, a ReLU head died.)

    >>> TextLSTM(vocab_size=100)(torch.randint(0, 100, (2, 12))).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        embed_dim: int = 64,
        hidden_size: int = 64,
        num_layers: int = 2,
        bidirectional: bool = False,
        head_size: int = 64,
        dropout: float = 0.2,
        pad_idx: int = 0,
    ) -> None:
        super().__init__()
        self.pad_idx = pad_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        features = hidden_size * (2 if bidirectional else 1)
        head: list[nn.Module] = [nn.Dropout(dropout)]
        if head_size:
            head += [nn.Linear(features, head_size), nn.Tanh(), nn.Dropout(dropout)]
            features = head_size
        self.classifier = nn.Sequential(*head, nn.Linear(features, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        return self.classifier(_masked_mean(states, tokens != self.pad_idx))


class TextTransformer(nn.Module):
    """Embedding plus learned positions, a ``num_layers`` ``nn.TransformerEncoder`` (batch first,
    padding masked), mean over the non-padding tokens, a linear classifier. Token id 0 is padding;
    sequences may be at most ``max_len`` long.

    >>> TextTransformer(vocab_size=100, max_len=16)(torch.randint(0, 100, (2, 12))).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 64,
        num_classes: int = 2,
        embed_dim: int = 64,
        num_heads: int = 4,
        ff_dim: int = 128,
        num_layers: int = 2,
        dropout: float = 0.1,
        pad_idx: int = 0,
    ) -> None:
        super().__init__()
        self.pad_idx = pad_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.max_len = max_len
        self.position = nn.Embedding(max_len, embed_dim)  # learned positions (a module, so torch-pruning sees it)
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, ff_dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.max_len}")
        mask = tokens != self.pad_idx
        x = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        # a row of only padding would give NaN attention; let such rows attend to their first token
        padding = ~mask
        padding[:, 0] = padding[:, 0] & mask.any(1)
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.classifier(_masked_mean(self.norm(x), mask))


# ---------------------------------------------------------------- small ViT (images)


class VisionTransformer(nn.Module):
    """A small ViT (Dosovitskiy et al., 2021): ``patch`` x ``patch`` patches embedded by a strided conv,
    learned positions, a ``num_layers`` ``nn.TransformerEncoder`` (pre-norm, batch first), mean over the
    patches, a linear head. Inputs must be ``image_size`` square.

    >>> VisionTransformer(image_size=8, patch=4, embed_dim=16, num_heads=2, ff_dim=32)(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch: int = 4,
                 embed_dim: int = 64, num_heads: int = 4, ff_dim: int = 128, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size must be a multiple of patch, but got (image_size={image_size}, patch={patch})")
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, embed_dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, ff_dim, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(1))


ZOO_MODELS: dict[str, Callable[..., nn.Module]] = {
    "fashion_cnn": FashionCNN,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "vgg_cifar": VGGCifar,
    "text_lstm": TextLSTM,
    "text_transformer": TextTransformer,
    "vit_tiny": VisionTransformer,
}
