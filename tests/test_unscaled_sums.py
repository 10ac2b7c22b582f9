"""A sum over the width axis with no width-dependent scale (attention logits ``q·kᵀ`` at ``scale=1``, as T5 computes
them) has no limit: refused by name. Expected behaviour from the finite models themselves: under μP their logits at
initialization grow like √width."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tplimits as tpl
from tplimits.training.classify import unscaled_sums


class Attention(nn.Module):
    """One self-attention layer over 3 tokens; ``scale=None``: sdpa's default 1/√d (which μP sets to 1/d)."""

    def __init__(self, width: int, scale: float | None) -> None:
        super().__init__()
        self.scale = scale
        self.inp = nn.Linear(4, width)
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.out = nn.Linear(width, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.q(h) @ self.k(h).transpose(-1, -2) * (1.0 if self.scale is None else self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), scale=self.scale)
        return self.out(a).mean(dim=1)


def _unscaled(width: int) -> Attention:
    return Attention(width, 1.0)


def _default(width: int) -> Attention:
    return Attention(width, None)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, generator=g), torch.randn(2, 1, generator=g)


def test_finite_logits_at_scale_one_grow_like_the_square_root_of_width():
    X, _ = _data()
    spread = {}
    for width in (64, 1024):
        draws = []
        for seed in range(6):
            model, _ = tpl.instantiate(_unscaled, width=width, param="muP", optimizer="sgd", seed=seed,
                                       example_inputs=(X,))
            with torch.no_grad():
                draws.append(model.model.logits(X).std())
        spread[width] = float(torch.stack(draws).mean())
    assert spread[1024] / spread[64] > 2.5  # √16 = 4


def test_an_unscaled_sum_over_width_is_refused_by_name():
    X, y = _data()
    assert unscaled_sums(tpl.lower(_default, example_inputs=(X,), width=16)) == []
    program = tpl.lower(_unscaled, example_inputs=(X,), width=16)
    (name,) = unscaled_sums(program)
    limit = tpl.derive(_unscaled, example_inputs=(X,), optimizer="sgd")
    with pytest.raises(tpl.TplimitsError, match=rf"%{name} .*grows like √n"):
        limit.train(X, y, steps=1, particles=256, progress=False)
    tpl.derive(_default, example_inputs=(X,), optimizer="sgd").train(X, y, steps=1, particles=256, progress=False)
