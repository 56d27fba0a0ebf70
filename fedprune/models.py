"""CIFAR-sized CNNs (input ``(B, 3, 32, 32)``, output logits ``(B, num_classes)``).

All models use activation *modules* (never functional or in-place activations)
and non in-place residual additions so that torch-pruning's
``DependencyGraph`` can trace them.  Look models up by name with
:func:`get_model`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("seed_cnn", "resnet20", "mobilenetv2")


# --------------------------------------------------------------------------- #
# SeedCNN (reference notebook network)
# --------------------------------------------------------------------------- #
def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=False),
    ]


class SeedCNN(nn.Module):
    """The reference notebook's 4-conv network (2,080,010 parameters for 10 classes).

    Spatial sizes: 32 -> 16 -> 8 -> 4 after the three max-pools; the last conv
    outputs ``(B, 512, 4, 4)``, adaptive-pooled to ``(B, 512, 2, 2)`` = 2048 features.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),
            *_conv_bn_relu(128, 256),
            nn.MaxPool2d(2),
            *_conv_bn_relu(256, 512),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2048, 256),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --------------------------------------------------------------------------- #
# ResNet-20 (He et al. 2016, CIFAR variant)
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    The shortcut is the identity, or a 1x1 conv + BN (option B) when the stride
    or channel count changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages x 3 BasicBlocks with 16/32/64 channels (~0.27M params).

    Spatial sizes: 32 (stage 1) -> 16 (stage 2) -> 8 (stage 3) -> global avg pool.
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


# --------------------------------------------------------------------------- #
# MobileNetV2 (CIFAR variant)
# --------------------------------------------------------------------------- #
def _make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing >10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=False),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (if t > 1) -> 3x3 depthwise -> 1x1 linear project.

    Uses a residual connection when ``stride == 1`` and ``in_ch == out_ch``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn_relu6(in_ch, hidden, 1)
        layers += _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


#: (expansion t, output channels c, repeats n, first stride s); CIFAR strides.
MOBILENETV2_CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 1 on CIFAR (2 on ImageNet)
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (stride-1 stem, stride-1 24-channel stage).

    Spatial sizes: 32 -> 32 (stem, 16, 24 stages) -> 16 -> 8 -> 4 -> global avg pool.
    Channels are scaled by ``width_mult`` and rounded to multiples of 8; the
    last 1x1 conv has 1280 channels (scaled only when ``width_mult > 1``).
    """

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = list(_conv_bn_relu6(3, in_ch, 3, stride=1))
        for t, c, n, s in MOBILENETV2_CIFAR_CONFIG:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers += _conv_bn_relu6(in_ch, last_ch, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(last_ch, num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --------------------------------------------------------------------------- #
# Initialisation and registry
# --------------------------------------------------------------------------- #
def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero BN, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": SeedCNN,
    "resnet20": ResNet20,
    "mobilenetv2": MobileNetV2,
}


def _options_of(factory: Callable[..., nn.Module]) -> list[str]:
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("self", "num_classes")]


def get_model(name: str, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) for ``num_classes`` classes.

    Extra keyword options are model specific (e.g. ``width_mult`` for
    ``"mobilenetv2"``); unknown options raise :class:`TypeError`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    factory = _REGISTRY[name]
    allowed = _options_of(factory)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"model {name!r} does not accept option(s) {unknown}; "
            f"allowed options: {allowed or 'none'}"
        )
    return factory(num_classes=num_classes, **kwargs)
