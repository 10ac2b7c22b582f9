"""The ``mlp`` architecture: a fully connected network with ``depth`` hidden layers.

``x -> phi(W^1 x + b^1) -> phi(W^2 . + b^2) -> ... -> phi(W^L . + b^L) -> readout``, where
``W^1`` is ``width x d_in``, ``W^2 .. W^L`` are ``width x width`` and the readout is
``d_out x width``. Parameter names: ``layers.{i}.weight``, ``layers.{i}.bias`` (``i = 0 .. L-1``)
and ``readout.weight``, ``readout.bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tplimits.plugin import Architecture, ConfigError, hookimpl


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "identity": _identity,
}

DEFAULTS: dict[str, Any] = {
    "depth": 3,
    "activation": "tanh",
    "bias": True,
    "d_in": 16,
    "d_out": 1,
    "batch": 8,
    "seed": 0,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity called ``name``; a ``ConfigError`` listing the known ones otherwise."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known activations: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_depth(depth: int) -> int:
    """Validate the number of hidden layers."""
    if int(depth) != depth or depth < 1:
        raise ConfigError(f"depth must be a positive integer (number of hidden layers), got {depth!r}")
    return int(depth)


class MLP(nn.Module):
    """``depth`` hidden layers of size ``width`` with nonlinearity ``activation``, followed by a linear
    readout. The first layer is an ``nn.Linear``; the ``width x width`` ones are built by
    ``hidden_layer(in_features, out_features, bias=...)`` (``nn.Linear`` by default)."""

    def __init__(
        self,
        width: int,
        depth: int = 3,
        activation: str = "tanh",
        bias: bool = True,
        d_in: int = 16,
        d_out: int = 1,
        hidden_layer: Callable[..., nn.Module] = nn.Linear,
    ) -> None:
        super().__init__()
        depth = check_depth(depth)
        self.activation = activation
        self.phi = activation_fn(activation)
        layers = [nn.Linear(d_in, width, bias=bias)] + [hidden_layer(width, width, bias=bias) for _ in range(depth - 1)]
        self.layers = nn.ModuleList(layers)
        self.readout = nn.Linear(width, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.phi(layer(x))
        return self.readout(x)


def build(
    width: int,
    depth: int = 3,
    activation: str = "tanh",
    bias: bool = True,
    d_in: int = 16,
    d_out: int = 1,
    **_: Any,
) -> MLP:
    """An :class:`MLP` of hidden width ``width``."""
    return MLP(width, depth=depth, activation=activation, bias=bias, d_in=d_in, d_out=d_out)


def example_inputs(d_in: int = 16, batch: int = 8, seed: int = 0, **_: Any) -> tuple[torch.Tensor]:
    """A ``batch x d_in`` standard normal input, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, d_in, generator=g, dtype=torch.get_default_dtype()),)


@hookimpl
def tplimits_architectures() -> list[Architecture]:
    return [
        Architecture(
            name="mlp",
            build=build,
            example_inputs=example_inputs,
            trace_widths=(32, 64),
            defaults=dict(DEFAULTS),
            description="Fully connected network: depth hidden layers of size width, elementwise "
            "activation, linear readout.",
        )
    ]
