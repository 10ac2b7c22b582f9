"""Per-coordinate pullbacks (a scalar argument of a function whose output is a vector) and their Avg, taken
by the interpreters as one vector-Jacobian product of the whole cotangent, their values formed only when read
(:mod:`tplimits.core.pullback`).

Expected values: torch autograd of the model (finite replay), one autograd gradient per row (the values
themselves), and the path that forms the values as the instruction runs (``eager_pullbacks``): the finite
replay, the μ-limit and the NT limit must give its results to rounding (1e-10 in float64).
"""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from torch import nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tplimits.core.backprop import eager_pullbacks, total_program
from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.pullback import PerCoordinateValue, Pullback
from tplimits.errors import StaleValueError
from tplimits.limit.compare import summaries, watched_values


class Centered(nn.Module):
    """``readout(tanh(g · (h − mean(h))))``, ``h = inp(x)``, a learnable scalar gain ``g``: the gain and the
    mean over width (per input, ``[B, 1]``) are scalars reaching a vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.3))
        self.inp = nn.Linear(3, width)
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.readout(torch.tanh(self.gain * (h - h.mean(-1, keepdim=True))))


class Frozen(Centered):
    """:class:`Centered` with the gain a buffer (the NT limit trains no scalar entering non-linearly): the mean
    alone reaches the vector."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        del self.gain
        self.register_buffer("gain", torch.tensor(1.3))


class Attending(nn.Module):
    """Softmax attention over 4 positions with a learnable temperature and no layer norm: the attention weights
    (``[B, T, T]``, no width axis: 32 entries) reach the values, a vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.inp = nn.Linear(3, width)
        self.key = nn.Linear(width, width, bias=False)
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        weights = torch.softmax(self.temperature * (h @ self.key(h).transpose(-1, -2)) / self.width, -1)
        return self.readout(torch.tanh(weights @ h)).mean(1)


def _inputs(model: type) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3) if model is Attending else (4, 3)
    return torch.randn(*shape, generator=g), torch.randn(shape[0], 1, generator=g)


def _per_coordinate(total: tpl.core.backprop.TotalProgram) -> list[tpl.Nonlin]:
    return [ins for ins in total.program.instructions
            if isinstance(ins, tpl.Nonlin) and isinstance(ins.fn, Pullback) and ins.fn.per_coordinate]


def _replayed(total, model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> FiniteInterpreter:
    interp = FiniteInterpreter.from_model(total.program, model)
    interp.cotangents = (cotangent,)
    interp.run(x)
    return interp


@pytest.mark.parametrize("model", [Centered, Attending])
def test_finite_replay_gradients_are_autograds(model):
    x, _ = _inputs(model)
    total = total_program(tpl.lower(model, example_inputs=(x,), width=16))
    assert _per_coordinate(total)
    torch.manual_seed(1)
    net = model(48)
    out = net(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = dict(net.named_parameters())
    expected = dict(zip(params, torch.autograd.grad((out * cotangent).sum(), list(params.values())), strict=True))
    got = total.gradients_at(net, (x,), (cotangent,))
    assert_close_tree({k: got[k] for k in expected}, expected)
    eager = eager_pullbacks(total).gradients_at(net, (x,), (cotangent,))
    assert_close_tree({k: got[k] for k in expected}, {k: eager[k] for k in expected})


def test_values_formed_when_read_are_the_per_row_gradients():
    """Each row of a deferred value is the gradient, by autograd, of that row's share of ``⟨dy, y⟩`` in the
    scalar argument; forward and reverse mode give them, and the eager path formed the same."""
    x, _ = _inputs(Attending)
    total = total_program(tpl.lower(Attending, example_inputs=(x,), width=16))
    torch.manual_seed(1)
    net = Attending(24)
    cotangent = torch.randn(2, 1, generator=torch.Generator().manual_seed(2))
    lazy = _replayed(total, net, x, cotangent)
    eager = _replayed(eager_pullbacks(total), net, x, cotangent)
    for ins in _per_coordinate(total):
        value = lazy.values[ins.name]
        assert isinstance(value, PerCoordinateValue) and torch.is_tensor(eager.values[ins.name])
        *leaves, dy = value.values
        pull = ins.fn
        x_arg = leaves[pull.leaf].detach().requires_grad_(True)
        y = pull._call(leaves, x_arg)
        rows = [torch.autograd.grad((dy.select(pull.out_width_axis, w) * y.select(pull.out_width_axis, w)).sum(),
                                    x_arg, retain_graph=True)[0] for w in range(y.shape[pull.out_width_axis])]
        expected = torch.stack(rows)
        for mode in ("forward", "reverse"):
            assert_close_tree(pull.per_coordinate_values(leaves, dy, mode), expected)
        assert_close_tree(value.resolve(), expected)
        assert_close_tree(value.resolve(), eager.values[ins.name])
        avg = next(i for i in total.program.instructions if isinstance(i, tpl.Avg) and i.vector == ins.name)
        assert_close_tree(lazy.values[avg.name], eager.values[avg.name])


def test_values_read_after_a_step_are_those_of_the_run():
    """The model's parameters are held as they were when the program ran: an optimizer step on them before the
    values are read changes nothing. A value the program computed, changed in place in the interpreter's values,
    makes the values unformable: reading them raises StaleValueError, never returns values of another state."""
    x, _ = _inputs(Centered)
    total = total_program(tpl.lower(Centered, example_inputs=(x,), width=16))
    torch.manual_seed(1)
    net = Centered(32)
    eager = _replayed(eager_pullbacks(total), net, x, torch.ones(4, 1))
    lazy, unread = (_replayed(total, net, x, torch.ones(4, 1)) for _ in range(2))
    torch.optim.SGD(net.parameters(), lr=0.5).step(closure=lambda: net(x).square().sum().backward())
    names = [ins.name for ins in _per_coordinate(total)]
    for name in names:
        assert_close_tree(lazy.values[name].resolve(), eager.values[name])
    by_mean = next(ins for ins in _per_coordinate(total) if "mean" in ins.name)
    computed = by_mean.args[0].name  # h = inp(x), a value the program computed
    unread.values[computed].add_(1.0)
    with pytest.raises(StaleValueError, match=by_mean.name) as error:
        unread.values[by_mean.name].resolve()
    assert error.value.value == by_mean.name
    watched = [w for w in watched_values(_Setup(total)) if w.name == by_mean.name]
    with pytest.raises(StaleValueError):
        summaries(total.program, watched, unread.values)


@attrs.define
class _Setup:  # what watched_values reads of a limit's setup
    total: object

    @property
    def program(self):
        return self.total.program


def test_readers_get_the_formed_values():
    x, _ = _inputs(Centered)
    prog = tpl.lower(Centered, example_inputs=(x,), width=16)
    total = total_program(prog)
    torch.manual_seed(1)
    net = Centered(32)
    lazy = _replayed(total, net, x, torch.ones(4, 1))
    eager = _replayed(eager_pullbacks(total), net, x, torch.ones(4, 1))
    watched = watched_values(_Setup(total))
    assert_close_tree(summaries(total.program, watched, lazy.values), summaries(total.program, watched, eager.values))


def _eager(limit: tpl.Limit) -> None:
    """Every setup the limit has made: the eager path from now on."""
    for key, setup in list(limit._setups.items()):
        limit._setups[key] = attrs.evolve(setup, total=eager_pullbacks(setup.total))


@pytest.mark.parametrize("model,param,dots", [(Centered, "muP", "stein"), (Centered, "muP", "autograd"),
                                              (Frozen, "NTP", "auto")])
def test_limits_equal_the_eager_path(model, param, dots):
    x, y = _inputs(model)
    limit = tpl.derive(model, optimizer="sgd", param=param)
    options = dict(steps=3, lr=0.5, particles=256, batches=2, progress=False, seed=3, dots=dots)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tpl.SteinBiasWarning)
        new = limit.train(x, y, **options)
        _eager(limit)
        old = limit.train(x, y, **options)
    assert float(new.outputs[-1].abs().max()) > 1e-3 and not torch.equal(new.outputs[0], new.outputs[-1])
    torch.testing.assert_close(new.outputs, old.outputs, rtol=1e-10, atol=1e-12)


def test_transformer_limit_equals_the_eager_path():
    config = dict(n_layers=1, n_heads=2, vocab=16, seq_len=4, batch=2)
    x = tpl.architecture("transformer").example_inputs(**config)[0]
    y = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(1))
    limit = tpl.derive("transformer", optimizer="sgd", **config)
    options = dict(steps=2, lr=0.5, particles=256, batches=2, loss="cross_entropy", progress=False, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = limit.train(x, y, **options)
        _eager(limit)
        old = limit.train(x, y, **options)
    torch.testing.assert_close(new.outputs, old.outputs, rtol=1e-10, atol=1e-12)
