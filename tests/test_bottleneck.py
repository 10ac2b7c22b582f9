"""A layer of fixed size inside a network whose width grows (issue 12: a ViT built from a config whose
MLP hidden size stays at the config's constant).

Its weight is a vector summed over the width axis like a readout, but its sum feeds the network, where
no output multiplier scales it: under μP the sum grows like √n, so finite training has no width limit
and ``check`` could only fail (measured: gaps 0.10 / 0.15 / 0.09 at widths 64 / 256 / 1024, slope −0.06,
for a 1-layer ViT with a hidden size of 16). The expected growth is measured on finite models here; the
library must refuse to derive a limit for such a model, and derive one when the layer grows with width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl


def _inputs() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


class Bottleneck(nn.Module):
    """A residual MLP block whose hidden size is ``inner`` (fixed) or the width (``inner=None``)."""

    def __init__(self, width: int, inner: int | None = 8) -> None:
        super().__init__()
        hidden = width if inner is None else inner
        self.inp = nn.Linear(4, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(h + self.fc2(torch.tanh(self.fc1(h)))))


def _bottleneck_rms(width: int, seeds: int = 4) -> float:
    """RMS of the fixed layer's pre-activation in finite μP models at ``width`` (seed average)."""
    total = 0.0
    for seed in range(seeds):
        model, _ = tpl.instantiate(Bottleneck, width=width, param="muP", optimizer="sgd", lr=0.1, seed=seed,
                                   example_inputs=(_inputs(),))
        net = model.model
        with torch.no_grad():
            total += float(net.fc1(torch.tanh(net.inp(_inputs()))).square().mean().sqrt())
    return total / seeds


def test_fixed_size_layer_grows_with_width_and_is_refused():
    X = _inputs()
    ratio = _bottleneck_rms(1024) / _bottleneck_rms(64)
    assert 2.5 < ratio < 6.5, ratio  # √16 = 4: no width-independent value to converge to
    verdict = tpl.classify(Bottleneck, param="muP", optimizer="sgd", example_inputs=(X,))
    assert not verdict.stable_at_init and verdict.regime == "unstable"
    assert any("'fc1.weight' is summed over the width axis into the network" in r for r in verdict.reasons)
    limit = tpl.derive(Bottleneck, optimizer="sgd", example_inputs=(X,))
    with pytest.raises(tpl.errors.TplimitsError, match="fc1.weight"):
        limit.train(X, torch.zeros(4, 1), steps=1, particles=64, progress=False)


def _growing(width: int) -> nn.Module:
    return Bottleneck(width, inner=None)


def test_layer_growing_with_width_is_derived():
    X = _inputs()
    make = _growing
    verdict = tpl.classify(make, param="muP", optimizer="sgd", example_inputs=(X,))
    assert verdict.regime == "feature learning", verdict
    trajectory = tpl.derive(make, optimizer="sgd", example_inputs=(X,)).train(
        X, torch.zeros(4, 1), steps=1, particles=64, batches=2, progress=False)
    assert torch.isfinite(trajectory.outputs).all()


class QueryPooling(nn.Module):
    """Attention pooling over positions with a learned query: its scores are a sum over the width axis
    that the model itself divides by the width, so the sum is an average, not a bottleneck."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.query = nn.Parameter(torch.randn(width))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.view(2, 2, 4)))  # [batch, positions, width]
        scores = (h * self.query).sum(-1) / h.shape[-1]
        pooled = (torch.softmax(scores, dim=-1)[..., None] * h).sum(1)
        return self.out(pooled)


def test_sum_renormalized_by_a_width_power_is_not_a_bottleneck():
    X = _inputs()
    verdict = tpl.classify(QueryPooling, param="muP", optimizer="sgd", example_inputs=(X,))
    assert not any("summed over the width axis into the network" in r for r in verdict.reasons), verdict
    fixed = tpl.classify(Bottleneck, param="muP", optimizer="sgd", example_inputs=(X,))
    assert any("summed over the width axis into the network" in r for r in fixed.reasons)
