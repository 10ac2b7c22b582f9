"""Recurrent networks (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells unrolled by hand): the width is the
hidden size and the recurrent weight is shared by every time step.

Expected values come from the models themselves: replay against the forward, the total program against
``torch.autograd``, and the μ-limit against finite-width training at growing widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tests.test_backprop import _check as check_gradients
from tplimits.limit.runs import default_dtype

# torch.export warns that nn.RNNBase's cached ``_flat_weights`` list is assigned during export; the
# parameters themselves are lifted as usual.
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes self.*_flat_weights")


class _Sequence(nn.Module):
    """A recurrent layer over a sequence of 3 steps, read out by a Linear on every step's output plus the
    average of the last layer's final hidden state."""

    def __init__(self, width: int, kind: str, batch_first: bool = True, **options) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, width, batch_first=batch_first, **options)
        features = options.get("proj_size") or width  # with a projection the outputs are W_hr h
        self.out = nn.Linear(features * (2 if options.get("bidirectional") else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, final = self.rnn(x)
        h = final[0] if isinstance(final, tuple) else final
        average = h[-1].mean(-1, keepdim=True)
        return self.out(outputs) + (average[:, None] if self.rnn.batch_first else average[None])


class _Cells(nn.Module):
    """A cell unrolled by hand over the sequence (the hidden state starts at zero)."""

    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.cell = getattr(nn, kind)(3, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.out(state[0] if isinstance(state, tuple) else state)


CASES = {
    "lstm": lambda width: _Sequence(width, "LSTM"),
    "lstm-2-layers-bidirectional": lambda width: _Sequence(width, "LSTM", num_layers=2, bidirectional=True),
    "lstm-projection-half-width": lambda width: _Sequence(width, "LSTM", proj_size=width // 2),
    "lstm-projection-fixed-bidirectional-no-bias": lambda width: _Sequence(width, "LSTM", proj_size=2,
                                                                          bidirectional=True, bias=False),
    "gru": lambda width: _Sequence(width, "GRU"),
    "gru-no-bias-time-first": lambda width: _Sequence(width, "GRU", bias=False, batch_first=False),
    "rnn-tanh": lambda width: _Sequence(width, "RNN"),
    "rnn-relu-2-layers": lambda width: _Sequence(width, "RNN", nonlinearity="relu", num_layers=2),
    "lstm-cell": lambda width: _Cells(width, "LSTMCell"),
    "gru-cell": lambda width: _Cells(width, "GRUCell"),
    "rnn-cell": lambda width: _Cells(width, "RNNCell"),
}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, 2, generator=g)


@pytest.mark.parametrize("name", CASES)
def test_recurrent_lowers_replays_and_matches_autograd(name):
    make = CASES[name]
    x, _ = _data()
    prog = tpl.lower(make, example_inputs=(x,), width=16)
    shared = [ins for ins in prog if isinstance(ins, tpl.MatMul)]
    if "projection-fixed" not in name:  # there W_hh is [4n, 2], a vector read out of a fixed-size state
        assert len({ins.matrix for ins in shared}) < len(shared), "the recurrent weight is used once per step"
    for width in (16, 40):
        torch.manual_seed(width)
        model = make(width)
        assert_close_tree(prog.replay(model, x), model(x))
        check_gradients(prog, model, (x,))


@pytest.mark.parametrize("name", ["lstm-2-layers-bidirectional", "gru", "rnn-relu-2-layers", "lstm-cell"])
def test_recurrent_mu_limit_runs(name):
    x, y = _data(1)
    if name == "lstm-cell":
        y = y[:, 0]
    limit = tpl.derive(CASES[name], example_inputs=(x,), optimizer="sgd")
    trajectory = limit.train(x, y, steps=3, lr=0.5, particles=2**9, batches=2, progress=False)
    assert trajectory.outputs.shape == (4, *y.shape)
    assert torch.isfinite(trajectory.outputs).all() and torch.isfinite(trajectory.loss).all()
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss


class _LastStep(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, width, batch_first=True)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def test_lstm_mu_limit_against_training_sgd():
    """Expected values from finite LSTMs trained at widths 64/256/1024 (8 seeds); 12-36 s on the loaded machine."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 3, generator=g), torch.randn(4, 1, generator=g)
    limit = tpl.derive(_LastStep, example_inputs=(x,), optimizer="sgd")
    report = limit.check(x, y, widths=[64, 256, 1024], seeds=8, steps=3, lr=0.5, particles=2**14, progress=False)
    assert report.passed, report.format()


@pytest.mark.slow
def test_lstm_mu_limit_against_training_adam():
    """As above under Adam; 70-90 s loaded (measured: slope -0.46, 1.4 standard errors)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 3, generator=g), torch.randn(4, 1, generator=g)
    limit = tpl.derive(_LastStep, example_inputs=(x,), optimizer="adam")
    report = limit.check(x, y, widths=[64, 256, 1024], seeds=8, steps=3, lr=0.02, particles=2**13, progress=False)
    assert report.passed, report.format()


@pytest.mark.slow
def test_lstm_nt_limit_against_training():
    """The NT limit (NTP) of the same LSTM against centred NTP training at widths 128/512/2048 (6 seeds); about
    2 min loaded (measured: slope -0.43, 0.27 standard errors; at 64/256/1024 the gap is still pre-asymptotic)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 3, generator=g), torch.randn(4, 1, generator=g)
    limit = tpl.derive(_LastStep, example_inputs=(x,), param="NTP", optimizer="sgd")
    assert limit.regime(x) == "operator"
    report = limit.check(x, y, widths=[128, 512, 2048], seeds=6, steps=3, lr=0.5, particles=2**14, center=True,
                         progress=False)
    assert report.passed, report.format()


def test_lstm_projection_mu_limit_against_training():
    """``proj_size = width/2``: the projection W_hr is one more hidden matrix, and the recurrent weight W_hh
    [4n, n/2] one too. Expected values from finite LSTMs trained at widths 64/256/1024 (8 seeds)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 3, generator=g), torch.randn(4, 3, 2, generator=g)
    limit = tpl.derive(CASES["lstm-projection-half-width"], example_inputs=(x,), optimizer="sgd")
    report = limit.check(x, y, widths=[64, 256, 1024], seeds=8, steps=3, lr=0.5, particles=2**14, progress=False)
    assert report.passed, report.format()


def test_lstm_projection_to_a_fixed_size_has_no_mu_limit():
    """A projection to 2 coordinates is a bottleneck: W_hr sums over the width axis into the recurrence, not
    into an output, so the state grows like n^{1/2} at initialization under μP; the limit names the weight."""
    x, y = _data()
    limit = tpl.derive(CASES["lstm-projection-fixed-bidirectional-no-bias"], example_inputs=(x,), optimizer="sgd")
    with pytest.raises(tpl.TplimitsError, match="'rnn.weight_hr_l0' is summed over the width axis"):
        limit.train(x, y, steps=1, lr=0.5, particles=2**8, batches=2, progress=False)


def test_a_zero_state_traced_in_float32_follows_the_limits_dtype():
    """nn.LSTM builds its zero initial state with the dtype in force when traced; the float64 limit of a
    model traced under float32 must equal the one of the same model traced under float64."""
    x, y = _data(2)
    runs = []
    for dtype in (torch.float32, torch.float64):
        with default_dtype(dtype):  # a user's session at torch's default float32, and one at float64
            limit = tpl.derive(CASES["lstm"], example_inputs=(x.to(dtype),), optimizer="sgd")
            runs.append(limit.train(x, y, steps=2, lr=0.5, particles=2**8, batches=2, seed=3, progress=False))
    assert runs[0].outputs.dtype == torch.float64
    torch.testing.assert_close(runs[0].outputs, runs[1].outputs, rtol=1e-12, atol=1e-12)
