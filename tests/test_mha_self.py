"""``nn.MultiheadAttention`` self-attention (one packed ``in_proj_weight`` [3n, n] for q, k and v) under μP.

The packed weight is one hidden matrix whose three blocks all have fan-in n, so the finite models draw and
train q, k and v exactly as three separate matrices; μP's 1/d_head attention scale reaches them by scaling
the query rows inside the forward. In eval mode without gradients torch would run fused kernels with
1/√d_head built in (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``); the
finite models must compute the program there too. Expected values come from the models' own forward
(replay of the parametrized program), attention written out by hand, and finite training at growing widths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tplimits.core.interpret import FiniteInterpreter
from tplimits.training.model import AttentionScale, parametrized_program

pytestmark = pytest.mark.filterwarnings("ignore:muP")


class _SelfAttention(nn.Module):
    """An input Linear, self-attention over 4 positions (``nn.MultiheadAttention`` or an encoder layer), a
    Linear readout."""

    def __init__(self, width: int, kind: str = "mha") -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(5, width)
        if kind == "mha":
            self.layer = nn.MultiheadAttention(width, 2, batch_first=True)
        else:
            self.layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.layer(h, h, h, need_weights=False)[0] if self.kind == "mha" else self.layer(h)
        return self.out(h)


def _inputs() -> torch.Tensor:
    return torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["mha", "encoder-layer"])
def test_self_attention_computes_the_parametrized_program_in_train_and_eval_mode(kind):
    """Train mode, and eval mode without gradients (where torch's fast path would take over), both equal the
    replay of the program the limit evaluates; the fast path without μP's scale differs from it."""
    x = _inputs()

    def make(width: int) -> _SelfAttention:
        return _SelfAttention(width, kind)

    limit = tpl.derive(make, example_inputs=(x,), optimizer="sgd")
    program = parametrized_program(limit.family(x).program, limit.param)
    model, _ = tpl.instantiate(make, width=64, example_inputs=(x,), optimizer="sgd", lr=0.1)
    replayed = FiniteInterpreter.from_model(program, model.model).run(x)
    assert_close_tree(model(x), replayed)
    model.eval()
    with torch.no_grad():
        assert_close_tree(model(x), replayed)
        fast = model.model(x) * model.output_scale  # the user's module alone: torch's fused kernel, 1/√d_head
    assert (fast - replayed).abs().max() > 1e-3 * replayed.abs().max()


def _by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_weight: torch.Tensor,
             out_bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention of ``x`` [B, T, E] with logits scaled by 1/d_head (μP), written out."""
    q, k, v = (x @ weight.T + bias).chunk(3, dim=-1)
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]  # [B, heads, T, d_head]
    d_head = split[0].shape[-1]
    probs = torch.softmax(split[0] @ split[1].transpose(-1, -2) / d_head, dim=-1)
    return (probs @ split[2]).transpose(1, 2).flatten(2) @ out_weight.T + out_bias


def test_fused_multihead_kernel_gets_the_scale():
    """Called under the mode, torch's fused kernel computes attention with logits scaled by 1/d_head."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, generator=g)
    weight, bias = torch.randn(24, 8, generator=g) / 3, torch.randn(24, generator=g)
    out_weight, out_bias = torch.randn(8, 8, generator=g) / 3, torch.randn(8, generator=g)
    with torch.no_grad(), AttentionScale(1.0, -1.0):
        got, _ = torch._native_multi_head_attention(x, x, x, 8, 2, weight, bias, out_weight, out_bias, None, False)
    expected = _by_hand(x, weight, bias, out_weight, out_bias, 2)
    torch.testing.assert_close(got, expected)
    unscaled = _by_hand(x, weight * torch.cat([torch.full((8, 1), math.sqrt(4))] + [torch.ones(16, 1)]),
                        bias * torch.cat([torch.full((8,), math.sqrt(4)), torch.ones(16)]), out_weight, out_bias, 2)
    assert (unscaled - expected).abs().max() > 1e-2  # sdpa's 1/√d_head would differ


def test_fused_encoder_layer_kernel_gets_the_scale():
    """Called under the mode, torch's fused encoder-layer kernel equals the layer's own (unfused) forward with
    the same scale, which the first test holds to the program."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    attn, lin1, lin2 = layer.self_attn, layer.linear1, layer.linear2
    args = (x, 8, 2, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, False,
            False, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
            lin1.weight, lin1.bias, lin2.weight, lin2.bias, None)
    with torch.no_grad():
        with AttentionScale(1.0, -1.0):
            fused = torch._transformer_encoder_layer_fwd(*args)
            unfused = layer.train()(x)
        plain = torch._transformer_encoder_layer_fwd(*args)
    torch.testing.assert_close(fused, unfused)
    assert (plain - fused).abs().max() > 1e-3


def test_self_attention_passes_check():
    """μP, SGD lr 0.3, centered, cross-entropy, 3 steps; widths 64/256/1024 × 8 seeds against 2^15 particles
    (about 25 s loaded)."""
    x = _inputs()
    y = torch.randint(0, 3, (2, 4), generator=torch.Generator().manual_seed(1))
    limit = tpl.derive(_SelfAttention, example_inputs=(x,), optimizer="sgd")
    report = limit.check(x, y, widths=[64, 256, 1024], seeds=8, steps=3, lr=0.3, loss="cross_entropy",
                         particles=2**15, center=True, progress=False)
    assert report.passed, report.format()
    assert report.slope <= -0.4 and report.mean_gap[-1] <= 3 * report.mean_gap_se[-1]
