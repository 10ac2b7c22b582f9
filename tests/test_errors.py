"""Every error path: the exception type and what its message names (node, op, source line, option)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tplimits as tpl

HERE = Path(__file__).name


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def lower_error(make, exc, x=None, width=16):
    """Lower ``make`` and return the message of the ``exc`` it must raise."""
    x = _x(3, 4) if x is None else x
    with pytest.raises(exc) as info:
        tpl.lower(make, example_inputs=(x,), width=width)
    return str(info.value)


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(4, width)
        self.out = nn.Linear(width, 2)

    def hidden(self, x):
        return torch.tanh(self.inp(x))


# ------------------------------------------------------------------------------ NotRepresentable


class MaxNet(Net):
    def forward(self, x):
        return self.hidden(x).max(-1).values


class AmaxNet(Net):
    def forward(self, x):
        return self.hidden(x).amax(-1)


class ArgmaxNet(Net):
    def forward(self, x):
        return self.hidden(x).argmax(-1).to(x.dtype)


class SortNet(Net):
    def forward(self, x):
        return self.out(self.hidden(x).sort(-1).values)


class TopkNet(Net):
    def forward(self, x):
        return self.hidden(x).topk(3, dim=-1).values


class SelectNet(Net):
    def forward(self, x):
        return self.hidden(x)[:, 0]


class IndexNet(Net):
    def forward(self, x):
        return self.hidden(x)[:, torch.tensor([0, 2])]


class IndexSelectNet(Net):
    def forward(self, x):
        return self.hidden(x).index_select(1, torch.tensor([0, 2]))


class OuterNet(Net):
    def forward(self, x):
        h, g = self.inp(x), self.hidden(x)
        return (h[:, :, None] * g[:, None, :]).mean((1, 2))


class SquaredWeight(Net):
    def __init__(self, width):
        super().__init__(width)
        self.w = nn.Parameter(torch.randn(width, width))

    def forward(self, x):
        return self.out(F.linear(self.hidden(x), self.w ** 2))


class WeightProduct(Net):
    def __init__(self, width):
        super().__init__(width)
        self.w1 = nn.Parameter(torch.randn(width, width))
        self.w2 = nn.Parameter(torch.randn(width, width))

    def forward(self, x):
        return self.out(F.linear(self.hidden(x), self.w1 @ self.w2))


class SoftmaxNet(Net):
    def forward(self, x):
        return self.out(torch.softmax(self.inp(x), dim=-1))


class PadByWidth(Net):
    def forward(self, x):
        return torch.constant_pad_nd(self.hidden(x), (0, self.width)).mean(-1)


NOT_REPRESENTABLE = [
    (MaxNet, "aten.max", ".max(-1).values", "over the width axis"),
    (AmaxNet, "aten.amax", ".amax(-1)", "over the width axis"),
    (ArgmaxNet, "aten.argmax", ".argmax(-1)", "over the width axis"),
    (SortNet, "aten.sort", ".sort(-1)", "over the width axis"),
    (TopkNet, "aten.topk", ".topk(3, dim=-1)", "over the width axis"),
    (SelectNet, "aten.select", "[:, 0]", "single coordinate"),
    (IndexNet, "aten.index", "[:, torch.tensor([0, 2])]", "indexing along the width axis"),
    (IndexSelectNet, "aten.index_select", ".index_select(1", "along the width axis"),
    (OuterNet, "aten.mul", "h[:, :, None] * g[:, None, :]", "2 width axes"),
    (SquaredWeight, "aten.pow", "self.w ** 2", "weight matrix"),
    (WeightProduct, "aten.matmul", "self.w1 @ self.w2", "two weight matrices"),
    (SoftmaxNet, "aten.softmax", "torch.softmax(self.inp(x), dim=-1)", "over the width axis"),
    (PadByWidth, "aten.constant_pad_nd", "constant_pad_nd(", "padding the width axis"),
]


@pytest.mark.parametrize(("cls", "op", "code", "what"),
                         [pytest.param(*row, id=row[0].__name__) for row in NOT_REPRESENTABLE])
def test_not_representable(cls, op, code, what):
    msg = lower_error(cls, tpl.NotRepresentable)
    assert op in msg
    assert what in msg
    assert HERE in msg and "in forward" in msg
    assert code in msg
    assert "no Tensor Program counterpart" in msg


def test_not_representable_names_the_node():
    msg = lower_error(AmaxNet, tpl.NotRepresentable)
    assert "node 'amax'" in msg


class FPadByWidth(Net):
    def forward(self, x):
        return F.pad(self.hidden(x), (0, self.width)).mean(-1)


def test_f_pad_width_axis_by_width():
    msg = lower_error(FPadByWidth, tpl.NotRepresentable)
    assert "padding the width axis" in msg


class PadConstant(Net):
    def forward(self, x):
        return F.pad(self.hidden(x), (1, 1)).mean(-1)


def test_pad_width_axis_by_constant_is_not_proportional():
    msg = lower_error(PadConstant, tpl.WidthError)
    assert "'pad'" in msg
    assert "size 18 at width 16" in msg


# ------------------------------------------------------------------------------ UnsupportedOperation


class BesselNet(Net):
    def forward(self, x):
        return self.out(torch.special.bessel_j0(self.inp(x)))


class FftNet(Net):
    def forward(self, x):
        return torch.fft.fft(self.inp(x)).abs().mean(-1)


@pytest.mark.parametrize(("cls", "packet", "code"), [
    (BesselNet, torch.ops.aten.special_bessel_j0, "torch.special.bessel_j0("),
    (FftNet, torch.ops.aten.fft_fft, "torch.fft.fft("),
], ids=["bessel_j0", "fft"])
def test_op_without_rule(cls, packet, code):
    rules = tpl.lowering_rules()
    assert packet not in rules
    assert all(getattr(packet, o) not in rules for o in packet.overloads())
    msg = lower_error(cls, tpl.UnsupportedOperation)
    assert f"aten.{packet.__name__}" in msg
    assert "no lowering rule" in msg
    assert "tplimits_lowering_rules" in msg and "register_plugin" in msg
    assert HERE in msg and code in msg


# ------------------------------------------------------------------------------ TraceError


class DataDependent(Net):
    def forward(self, x):
        h = self.inp(x)
        if h.sum() > 0:
            h = torch.tanh(h)
        return self.out(h)


def test_data_dependent_control_flow():
    msg = lower_error(DataDependent, tpl.TraceError)
    assert "DataDependent" in msg
    assert "torch.export" in msg and "symbolic_trace" in msg
    assert "control flow" in msg


class WidthDependent(Net):
    def forward(self, x):
        h = self.inp(x)
        if self.width > 20:
            h = h * 2
        return self.out(torch.tanh(h))


def test_width_dependent_control_flow():
    msg = lower_error(WidthDependent, tpl.TraceError)
    assert "16 and 32" in msg
    assert "aten.mul" in msg and "aten.tanh" in msg
    assert "control flow depends on width" in msg


class BufferUpdate(Net):
    def __init__(self, width):
        super().__init__(width)
        self.register_buffer("R", torch.eye(width))

    def forward(self, x):
        h = self.hidden(x) @ self.R
        with torch.no_grad():
            self.R.mul_(0.9)
        return self.out(h)


class ParameterUpdate(Net):
    def __init__(self, width):
        super().__init__(width)
        self.R = nn.Parameter(torch.eye(width))

    def forward(self, x):
        h = self.hidden(x)
        with torch.no_grad():
            self.R.sub_(0.1 * (h.T @ h) / h.shape[0])
        return self.out(h @ self.R)


@pytest.mark.parametrize("cls", [BufferUpdate, ParameterUpdate], ids=["buffer", "parameter"])
def test_state_updated_inside_forward(cls):
    msg = lower_error(cls, tpl.TraceError)
    assert "changes 'R'" in msg
    assert cls.__name__ in msg


# ------------------------------------------------------------------------------ WidthError


class Quadratic(Net):
    def __init__(self, width):
        super().__init__(width)
        self.big = nn.Linear(4, width * width)

    def forward(self, x):
        return self.out(self.hidden(x)) + self.big(x).mean(-1, keepdim=True)


class OffByOne(Net):
    def __init__(self, width):
        super().__init__(width)
        self.extra = nn.Linear(4, width + 1)

    def forward(self, x):
        return self.out(self.hidden(x)) + self.extra(x).mean(-1, keepdim=True)


class QuadraticActivation(Net):
    def forward(self, x):
        h = self.hidden(x)
        return (h[:, :, None] * h[:, None, :]).reshape(3, -1).mean(-1)


@pytest.mark.parametrize(("cls", "where", "sizes"), [
    (Quadratic, "big_weight", "size 256 at width 16 and 1024 at width 32"),
    (OffByOne, "extra_weight", "size 17 at width 16 and 33 at width 32"),
    (QuadraticActivation, "'reshape'", "size 256 at width 16 and 1024 at width 32"),
], ids=["width^2 parameter", "width+1 parameter", "width^2 activation"])
def test_size_not_proportional_to_width(cls, where, sizes):
    msg = lower_error(cls, tpl.WidthError)
    assert where in msg
    assert sizes in msg
    assert "in proportion to width" in msg


def test_base_with_two_scale_factors():
    with pytest.raises(tpl.WidthError, match="one common factor"):
        tpl.lower(Quadratic(32), base=Quadratic(16), example_inputs=(_x(3, 4),))


def test_base_at_the_same_width():
    with pytest.raises(tpl.WidthError, match="identical parameter shapes"):
        tpl.lower(Net(16), base=Net(16), example_inputs=(_x(3, 4),))


class Recurrent(Net):
    """Takes a hidden state, so its example inputs only fit one width."""

    def __init__(self, width):
        super().__init__(width)
        self.rec = nn.Linear(width, width)

    def forward(self, x, state):
        return self.out(torch.tanh(self.inp(x) + self.rec(state)))


@pytest.mark.parametrize("state_width", [16, 32])
def test_example_inputs_depending_on_width(state_width):
    with pytest.raises(tpl.TplimitsError, match="input"):
        tpl.lower(Recurrent, example_inputs=(_x(3, 4), _x(3, state_width)), width=16)


# ------------------------------------------------------------------------------ front end


def test_module_without_base():
    with pytest.raises(tpl.TplimitsError, match="base="):
        tpl.lower(Net(16), example_inputs=(_x(3, 4),))


def test_module_without_example_inputs():
    with pytest.raises(tpl.TplimitsError, match="example_inputs="):
        tpl.lower(Net(32), base=Net(16))


def test_callable_without_example_inputs():
    with pytest.raises(tpl.TplimitsError, match="example_inputs="):
        tpl.lower(Net)


def test_options_for_a_module():
    with pytest.raises(tpl.TplimitsError, match="only apply to registered architectures"):
        tpl.lower(Net(32), base=Net(16), example_inputs=(_x(3, 4),), depth=2)


def test_not_a_model():
    with pytest.raises(tpl.TplimitsError, match="cannot lower 'int'"):
        tpl.lower(3)


def test_unknown_architecture():
    with pytest.raises(tpl.PluginError) as info:
        tpl.lower("no-such-net")
    msg = str(info.value)
    assert "'no-such-net'" in msg
    for name in ("mlp", "resnet", "transformer", "decorrelated-mlp"):
        assert f"'{name}'" in msg


def test_unknown_option():
    with pytest.raises(tpl.TplimitsError) as info:
        tpl.lower("mlp", bogus=1)
    msg = str(info.value)
    assert "'bogus'" in msg and "'mlp'" in msg and "'depth'" in msg


def test_error_hierarchy():
    for exc in (tpl.NotRepresentable, tpl.UnsupportedOperation):
        assert issubclass(exc, tpl.LoweringError)
    for exc in (tpl.LoweringError, tpl.TraceError, tpl.WidthError, tpl.PluginError):
        assert issubclass(exc, tpl.TplimitsError)
