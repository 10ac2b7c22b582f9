"""The ``decorrelated-mlp`` architecture: an MLP with a decorrelation matrix before every hidden weight.

Each hidden ``width x width`` weight ``W^l`` (``l = 2 .. L``) is preceded by a square decorrelation
matrix ``R^l``, initialised to the identity, so the layer computes

    h^l = W^l (R^l x^{l-1}) + b^l,        x^l = phi(h^l).

The input layer ``W^1`` (``width x d_in``) and the readout carry no decorrelation matrix. At
initialisation (``R = I``) the network computes exactly what the plain ``mlp`` with the same
weights computes, and its parameter names are those of ``mlp`` plus ``layers.{i}.decorrelation``
for ``i = 1 .. L-1``.

``R`` is trained by a non-gradient rule that whitens the layer's input,
``R <- s (I - eta_R C) R`` with ``C`` the correlation of ``z = R x`` estimated on a batch and
``s`` a rescaling that keeps activation norms; for a nontrivial infinite-width limit its rate
scales as ``eta_R = c / width``. That rule belongs to an optimizer plugin, not to this module:
``R`` is an ordinary ``nn.Parameter`` and the forward pass never modifies it (no buffers are
updated in ``forward``), so the model traces and exports like any other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tplimits.architectures.mlp import DEFAULTS, MLP
from tplimits.architectures.mlp import example_inputs as mlp_example_inputs
from tplimits.plugin import Architecture, hookimpl


class DecorrelatedLinear(nn.Linear):
    """``y = W (R x) + b``: an ``nn.Linear`` whose input first passes through a square
    decorrelation matrix ``R`` (parameter ``decorrelation``, initialised to the identity)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.decorrelation = nn.Parameter(
            torch.eye(in_features, dtype=self.weight.dtype, device=self.weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.decorrelation), self.weight, self.bias)


class DecorrelatedMLP(MLP):
    """:class:`tplimits.architectures.mlp.MLP` with :class:`DecorrelatedLinear` for the hidden
    ``width x width`` layers."""

    def __init__(self, width: int, depth: int = 3, activation: str = "tanh", bias: bool = True, d_in: int = 16,
                 d_out: int = 1) -> None:
        super().__init__(width, depth, activation, bias, d_in, d_out, hidden_layer=DecorrelatedLinear)


def build(
    width: int,
    depth: int = 3,
    activation: str = "tanh",
    bias: bool = True,
    d_in: int = 16,
    d_out: int = 1,
    **_: Any,
) -> DecorrelatedMLP:
    """A :class:`DecorrelatedMLP` of hidden width ``width``."""
    return DecorrelatedMLP(width, depth=depth, activation=activation, bias=bias, d_in=d_in, d_out=d_out)


def example_inputs(d_in: int = 16, batch: int = 8, seed: int = 0, **_: Any) -> tuple[torch.Tensor]:
    """A ``batch x d_in`` standard normal input, deterministic in ``seed`` (as for ``mlp``)."""
    return mlp_example_inputs(d_in=d_in, batch=batch, seed=seed)


@hookimpl
def tplimits_architectures() -> list[Architecture]:
    return [
        Architecture(
            name="decorrelated-mlp",
            build=build,
            example_inputs=example_inputs,
            trace_widths=(32, 64),
            defaults=dict(DEFAULTS),
            description="MLP whose hidden weights are preceded by decorrelation matrices R "
            "(identity at init, updated by a non-gradient decorrelation rule).",
            update_rules={"*.decorrelation": "decorrelation"},
        )
    ]
