"""Higher-order ops that torch.export emits for ordinary Python: ``@torch.no_grad()`` forwards, autocast
regions, ``torch.cond``. Their bodies are inlined; replay must reproduce the model to 1e-10 and the total
program must reproduce autograd, which cuts gradients at a grad-disabled region's outputs and at
``.detach()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._higher_order_ops.while_loop import while_loop

import tplimits as tpl
from tests.conftest import assert_close_tree
from tests.test_backprop import _check as check_gradients


class _Phases(nn.Module):
    """A rotary-style table computed under ``@torch.no_grad()`` inside an autocast-disabled block."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.arange(4.0) / 4, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):
            return torch.cos(self.freq * x.shape[-1]), torch.sin(self.freq)


class _Regions(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)
        self.phases = _Phases()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.phases(x)
        h = torch.tanh(self.inp(x * cos + sin))
        with torch.no_grad():  # a gate computed from activations: autograd does not differentiate through it
            gate = torch.sigmoid(self.hidden(h)).mean(-1, keepdim=True)
        return self.out(torch.tanh(self.hidden(h)) * gate)


def test_no_grad_and_autocast_regions_replay_and_match_autograd():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    prog = tpl.lower(_Regions, example_inputs=(x,), width=32)
    cut = [ins for ins in prog if isinstance(ins, tpl.Nonlin) and not ins.differentiable]
    assert len(cut) == 3, prog.format()  # cos, sin and the gate leave grad-disabled regions
    for width in (32, 48):
        torch.manual_seed(width)
        model = _Regions(width)
        assert_close_tree(prog.replay(model, x), model(x))
        check_gradients(prog, model, (x,))


class _Detached(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h.detach() + 0.5 * h)


def test_detach_cuts_gradients_and_keeps_the_limit_running():
    """``.detach()`` is the identity in value but stops backpropagation, in the program as in autograd."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    prog = tpl.lower(_Detached, example_inputs=(x,), width=32)
    assert "(no gradient)" in prog.format()
    for width in (32, 48):
        torch.manual_seed(width)
        model = _Detached(width)
        assert_close_tree(prog.replay(model, x), model(x))
        check_gradients(prog, model, (x,))
    limit = tpl.derive(_Detached, example_inputs=(x,), optimizer="sgd")
    trajectory = limit.train(x, torch.randn(5, 3, generator=torch.Generator().manual_seed(3)), steps=2, lr=0.5,
                             particles=2**9, batches=2, progress=False)
    assert torch.isfinite(trajectory.outputs).all() and trajectory.loss[-1] < trajectory.loss[0]


class _Autocast(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.inp(x))
        return self.out(h)


def test_enabled_autocast_is_refused_by_name():
    x = torch.randn(5, 4)
    where_and_what = r"test_higher_order\.py:\d+.*enabled torch.autocast region \(mixed precision"
    with pytest.raises(tpl.UnsupportedOperation, match=where_and_what):
        tpl.lower(_Autocast, example_inputs=(x,))


class _Cond(nn.Module):
    def __init__(self, width: int, fixed: bool) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicate = torch.ones(()) < 0 if self.fixed else x.sum() > 0
        h = torch.cond(predicate, torch.tanh, torch.sin, (self.inp(x),))
        return self.out(h)


def test_cond_with_a_traced_predicate_takes_its_branch():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    prog = tpl.lower(lambda width: _Cond(width, True), example_inputs=(x,), width=32)
    assert any(isinstance(ins, tpl.Nonlin) and ins.fn is torch.ops.aten.sin.default for ins in prog)
    assert not any(isinstance(ins, tpl.Nonlin) and ins.fn is torch.ops.aten.tanh.default for ins in prog)
    model = _Cond(48, True)
    assert_close_tree(prog.replay(model, x), model(x))


def test_cond_on_data_and_unknown_higher_order_ops_are_named_errors():
    x = torch.randn(5, 4)
    with pytest.raises(tpl.UnsupportedOperation, match=r"node 'cond'.*test_higher_order\.py.*predicate computed"):
        tpl.lower(lambda width: _Cond(width, False), example_inputs=(x,))

    class Loop(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, h = while_loop(lambda i, t: i < 3, lambda i, t: (i + 1, torch.tanh(t)),
                              (torch.zeros((), dtype=torch.int64), self.inp(x)))
            return self.out(h)

    with pytest.raises(tpl.UnsupportedOperation, match=r"no lowering rule for op while_loop"):
        tpl.lower(Loop, example_inputs=(x,))

