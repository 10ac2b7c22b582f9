"""The tracing front end: torch.export first, fx.symbolic_trace as the fallback; dropout is off."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tplimits.core import trace


class Net(nn.Module):
    def __init__(self, width: int, p: float = 0.0):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.ln = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, 2 * width)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.hidden(self.ln(torch.tanh(self.inp(x)))))))


def test_export_is_the_first_choice():
    prog = tpl.lower(Net, example_inputs=(torch.randn(4, 6),), width=16)
    assert prog.tracer == "torch.export"


def test_symbolic_trace_fallback(monkeypatch):
    def refuse(model, inputs):
        raise RuntimeError("export refused for this test")

    monkeypatch.setattr(trace, "export_trace", refuse)
    x = torch.randn(4, 6)
    prog = tpl.lower(Net, example_inputs=(x,), width=16)
    assert prog.tracer == "fx.symbolic_trace"
    for width in (16, 40):
        model = Net(width)
        assert_close_tree(prog.replay(model, x), model(x))
    assert prog.parameters["hidden.weight"].layout == (tpl.Width(2), tpl.Width(1))


def test_dropout_is_off_in_the_program():
    x = torch.randn(5, 6)
    prog = tpl.lower(lambda w: Net(w, p=0.5), example_inputs=(x,), width=16)
    assert any("dropout" in note and "off" in note for note in prog.notes)
    model = Net(24, p=0.5).eval()  # eval mode: dropout is the identity, as in the program
    assert_close_tree(prog.replay(model, x), model(x))


def test_trace_widths_must_differ():
    with pytest.raises(tpl.WidthError, match="same width"):
        trace.compare_traces(None, None, 32, 32)


class InPlace(nn.Module):
    """In-place ops on activations (relu_, mul_, add_): later uses see the mutated tensor."""

    def __init__(self, width: int):
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.a(x)
        g = h * 2
        h.relu_()
        h.mul_(0.5).add_(g)
        return self.out(torch.tanh(self.b(h)) + h)


def test_in_place_activation_ops():
    x = torch.randn(4, 3)
    prog = tpl.lower(InPlace, example_inputs=(x,), width=16)
    for width in (16, 40):
        model = InPlace(width)
        assert_close_tree(prog.replay(model, x), model(x))
