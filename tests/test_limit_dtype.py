"""The limit's precision: float64 by default on every device, and float32, where asked for, estimates the same limit
over short training (over long training its hat bases lose orthonormality: docs/limit.md). Expected values: the
float64 limit of the same task, on independent Monte Carlo draws."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.limit.runs import limit_dtype


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)


def test_the_default_precision_is_float64_everywhere():
    assert limit_dtype(None, "cpu") is torch.float64
    assert limit_dtype(None, torch.device("cuda:0")) is torch.float64
    assert limit_dtype(torch.float32, "cpu") is torch.float32
    assert limit_dtype(torch.float64, "cuda") is torch.float64
    X, y = _data()
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    assert limit.train(X, y, steps=1, lr=0.5, particles=2**8, progress=False).outputs.dtype == torch.float64


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.02)])
def test_float32_and_float64_limits_agree(optimizer, lr):
    """Independent systems in the two precisions (the random draws differ between them even at one seed) agree
    within standard errors over 5 steps that move the outputs by many standard errors."""
    X, y = _data()
    limit = tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=4)
    options = dict(steps=5, lr=lr, particles=2**13, batches=8, progress=False)
    wide = limit.train(X, y, seed=0, dtype=torch.float64, **options)
    narrow = limit.train(X, y, seed=1, dtype=torch.float32, **options)
    assert narrow.outputs.dtype == torch.float32
    se = (wide.outputs_se.square() + narrow.outputs_se.double().square()).sqrt()
    z = (narrow.outputs.double() - wide.outputs) / se
    assert z.abs().max() < 4.5, z
    assert (wide.outputs[-1] - wide.outputs[0]).abs().max() > 10 * se[-1].max()  # the steps move the outputs
