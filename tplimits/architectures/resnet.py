"""The ``resnet`` architecture: a CIFAR-style residual network whose channel counts scale with width.

* stem: ``conv3x3(in_channels -> width)``, ``BatchNorm2d``, ReLU (``stem_conv``, ``stem_bn``);
* ``stages`` stages of ``blocks`` basic blocks each; stage ``s`` has ``width * 2**s`` channels. The
  first block of every stage ``s > 0`` has stride 2 and a projection shortcut
  (``conv1x1`` stride 2 + ``BatchNorm2d``); every other shortcut is the identity. A basic block is
  ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``;
* global average pooling over height and width, then a linear ``head`` to ``num_classes``.

Convolutions have no bias. Parameter names: ``stem_conv.weight``, ``stem_bn.{weight,bias}``,
``stages.{s}.{b}.{conv1,bn1,conv2,bn2}.*``, ``stages.{s}.{b}.shortcut.{0,1}.*`` (projection
blocks only) and ``head.{weight,bias}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tplimits.plugin import Architecture, ConfigError, hookimpl

DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "image_size": 8,
    "num_classes": 10,
    "stages": 2,
    "blocks": 1,
    "batch": 4,
    "seed": 0,
}


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided
    ``conv1x1 + BatchNorm2d`` projection when the shape changes, the identity otherwise."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    """Stem, ``stages`` stages of ``blocks`` :class:`BasicBlock` s, global average pooling, linear head."""

    def __init__(
        self,
        width: int,
        in_channels: int = 3,
        num_classes: int = 10,
        stages: int = 2,
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if stages < 1 or blocks < 1:
            raise ConfigError(f"resnet needs stages, blocks >= 1, got stages={stages}, blocks={blocks}")
        self.stem_conv = conv3x3(in_channels, width)
        self.stem_bn = nn.BatchNorm2d(width)
        stage_list = []
        c_in = width
        for s in range(stages):
            c_out = width * 2**s
            stage = [BasicBlock(c_in, c_out, stride=1 if s == 0 else 2)]
            stage += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
            stage_list.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.ModuleList(stage_list)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        for stage in self.stages:
            x = stage(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


def build(
    width: int,
    in_channels: int = 3,
    num_classes: int = 10,
    stages: int = 2,
    blocks: int = 1,
    **_: Any,
) -> ResNet:
    """A :class:`ResNet` whose first stage has ``width`` channels."""
    return ResNet(width, in_channels=in_channels, num_classes=num_classes, stages=stages, blocks=blocks)


def example_inputs(
    in_channels: int = 3, image_size: int = 8, batch: int = 4, seed: int = 0, **_: Any
) -> tuple[torch.Tensor]:
    """A ``batch x in_channels x image_size x image_size`` standard normal image batch."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, in_channels, image_size, image_size)
    return (torch.randn(*shape, generator=g, dtype=torch.get_default_dtype()),)


@hookimpl
def tplimits_architectures() -> list[Architecture]:
    return [
        Architecture(
            name="resnet",
            build=build,
            example_inputs=example_inputs,
            trace_widths=(16, 32),
            defaults=dict(DEFAULTS),
            description="CIFAR-style ResNet: conv stem, stages of basic blocks with channels "
            "width * 2**stage, global average pooling, linear head.",
        )
    ]
