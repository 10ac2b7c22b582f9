"""Parameter classification and width detection, asserted on models whose answer is known."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tplimits as tpl
from tplimits.core.trace import fit_width_power, infer_widths


def test_transformer_classification():
    prog = tpl.lower("transformer", n_layers=2, tied=False)
    params = prog.parameters
    for layer in range(2):
        block = f"blocks.{layer}"
        for name in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc_in", "mlp.fc_out"):
            assert params[f"{block}.{name}.weight"].kind == "matrix", name
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.q.bias", "mlp.fc_in.bias"):
            assert params[f"{block}.{name}"].kind == "vector", name
    assert params["tok_emb.weight"].kind == "vector"
    assert params["pos_emb.weight"].kind == "vector"
    assert params["head.weight"].kind == "vector"
    fc_in = params["blocks.0.mlp.fc_in.weight"]
    assert fc_in.layout == (tpl.Width(4), tpl.Width(1)) and fc_in.ratios == (4, 1)
    assert fc_in.width_axes == (0, 1) and fc_in.fan_in_axes == (1,)
    assert params["head.weight"].width_axes == (1,) and params["head.weight"].fixed_axes == (0,)


def test_tied_readout_is_one_vector_used_twice():
    params = tpl.lower("transformer", tied=True).parameters
    assert "head.weight" not in params
    assert len(params["tok_emb.weight"].uses) == 2


class ScalarGainNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.out(torch.tanh(self.gain * self.hidden(torch.relu(self.inp(x)))))


def test_scalar_vector_matrix_kinds():
    prog = tpl.lower(ScalarGainNet, example_inputs=(torch.randn(4, 6),), width=16)
    kinds = {name: info.kind for name, info in prog.parameters.items()}
    assert kinds == {
        "inp.weight": "vector", "inp.bias": "vector", "hidden.weight": "matrix", "hidden.bias": "vector",
        "out.weight": "vector", "out.bias": "scalar", "gain": "scalar",
    }
    assert prog.parameters["out.weight"].fan_in_axes == (1,)
    assert prog.parameters["inp.weight"].fan_in_axes == (1,)


def test_decorrelation_matrices_are_matrices():
    params = tpl.lower("decorrelated-mlp", depth=3).parameters
    decorrelation = [name for name in params if "decorrelation" in name]
    assert len(decorrelation) == 2
    assert all(params[name].kind == "matrix" for name in decorrelation)


def test_resnet_conv_kinds():
    params = tpl.lower("resnet", stages=2).parameters
    stem = next(name for name in params if name.startswith("stem") and name.endswith("conv.weight"))
    assert params[stem].kind == "vector"  # 3 input channels are fixed
    convs = [info for name, info in params.items() if "conv" in name and info.kind == "matrix"]
    assert convs and all(info.fixed_axes == (2, 3) for info in convs if len(info.layout) == 4)
    assert any(info.ratios == (2, 2) for info in convs), "the second stage runs at 2n channels"


# -- width detection ------------------------------------------------------------------------------


class Scaled(nn.Module):
    """Forward multiplies by width-dependent constants the way users write them."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(4, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x)) * (1 / math.sqrt(self.width))
        h = torch.tanh(self.hidden(h) * (3.0 / self.width))
        return self.out(h)


def test_width_constants_become_explicit_powers():
    prog = tpl.lower(Scaled, example_inputs=(torch.randn(3, 4),), width=16)
    powers = {(round(c.coef, 12), c.power) for c in _width_constants(prog)}
    assert (1.0, Fraction(-1, 2)) in powers
    assert (3.0, Fraction(-1)) in powers
    assert "n^-1/2" in prog.format() and "3·n^-1" in prog.format()
    model = Scaled(80)
    x = torch.randn(5, 4)
    torch.testing.assert_close(prog.replay(model, x), model(x), rtol=1e-12, atol=0)


def _width_constants(prog):
    found = []

    def walk(x):
        if isinstance(x, tpl.WidthPower):
            found.append(x)
        elif isinstance(x, list | tuple):
            for y in x:
                walk(y)

    for ins in prog:
        walk(getattr(ins, "args", ()))
    return found


def test_sdpa_default_scale_recorded_as_width_power():
    prog = tpl.lower("transformer", n_heads=4)
    consts = _width_constants(prog)
    # d_head = n/4, sdpa's default 1/sqrt(d_head) = 2 n^-1/2
    assert any(c.power == Fraction(-1, 2) and math.isclose(c.coef, 2.0) for c in consts)


def test_fit_width_power():
    c = fit_width_power(0.125, 0.0883883476483184, 64, 128, "here")
    assert c.power == Fraction(-1, 2) and math.isclose(c.coef, 1.0)
    assert math.isclose(c.resolve(256), 1 / 16)
    with pytest.raises(tpl.WidthError, match="not coef·n"):
        fit_width_power(1 + 1 / 64, 1 + 1 / 128, 64, 128, "here")
    with pytest.raises(tpl.WidthError, match="not a power"):
        fit_width_power(1.0, -1.0, 64, 128, "here")


class Wide(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(self.down(F.gelu(self.up(self.inp(x)))))


def test_base_form_infers_width_and_ratios():
    model, base = Wide(96), Wide(32)
    assert infer_widths(model, base) == (96, 32)
    prog = tpl.lower(model, base=base, example_inputs=(torch.randn(2, 3),))
    assert prog.width == 96
    assert prog.parameters["up.weight"].shape == (384, 96)
    assert prog.parameters["up.weight"].ratios == (4, 1)
    other = Wide(40)
    x = torch.randn(6, 3)
    torch.testing.assert_close(prog.replay(other, x), other(x), rtol=1e-12, atol=0)


def test_base_with_mismatched_scaling_is_refused():
    class Odd(nn.Module):
        def __init__(self, a: int, b: int):
            super().__init__()
            self.first = nn.Linear(3, a)
            self.second = nn.Linear(a, b)

        def forward(self, x):
            return self.second(self.first(x)).sum(-1)

    with pytest.raises(tpl.WidthError, match="common factor"):
        tpl.lower(Odd(64, 64), base=Odd(32, 16), example_inputs=(torch.randn(2, 3),))
