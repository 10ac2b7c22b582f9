"""Sequence-first models (``nn.LSTM`` without ``batch_first``: data ``[time, batch, features]``, outputs ``[time,
batch, e]``) train, check and compare with their examples along axis 1 of the data and of the outputs: training rows,
a step's batch, test examples. Expected values: the same model wrapped to take and return its examples along axis 0
(an independent run of the batch-first path), and finite LSTMs trained by torch at growing widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tplimits.limit.runs import Examples

TIME, EXAMPLES, TESTS = 3, 4, 2

pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes self.*_flat_weights")


class SequenceFirst(nn.Module):
    """An LSTM whose hidden size is the width, on data ``[time, batch, 3]``; outputs ``[time, batch, 1]``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.rnn = nn.LSTM(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.inp(x))[0])


class BatchFirst(nn.Module):
    """The same model on data ``[batch, time, 3]``, outputs ``[batch, time, 1]`` (built with the same seed, it has
    the same parameters)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = SequenceFirst(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.transpose(0, 1)).transpose(0, 1)


def _data(examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TIME, examples, 3, generator=g), torch.randn(TIME, examples, 1, generator=g)


def _derive(make, param: str = "muP") -> tpl.Limit:
    return tpl.derive(make, example_inputs=(torch.randn(TIME, 2, 3) if make is SequenceFirst
                                            else torch.randn(2, TIME, 3),), optimizer="sgd", param=param)


@pytest.mark.parametrize("param", ["muP", "NTP"])
def test_sequence_first_training_equals_the_batch_first_model(param):
    """Minibatches of 2 of 4 examples, 2 test examples: the same trajectory as the batch-first wrapper's, transposed.
    The μ-limit to rounding; the NT limit of the centred model within 4 standard errors (it runs one backward pass
    per output coordinate, in the outputs' order, so the two runs take other Monte Carlo draws)."""
    X, y = _data(EXAMPLES, 0)
    X_test, _ = _data(TESTS, 1)
    options = dict(steps=3, lr=0.5, particles=2**9 if param == "muP" else 2**12, batches=4, batch_size=2,
                   progress=False, center=param == "NTP")
    limit = _derive(SequenceFirst, param)
    assert limit.examples(X) == Examples(1, 1)
    got = limit.train(X, y, X_test=X_test, **options)
    expected = _derive(BatchFirst, param).train(X.transpose(0, 1), y.transpose(0, 1), X_test=X_test.transpose(0, 1),
                                                **options)
    assert got.outputs.shape == (4, TIME, EXAMPLES, 1) and got.test_outputs.shape == (4, TIME, TESTS, 1)
    pairs = ((got.outputs, got.outputs_se, expected.outputs, expected.outputs_se),
             (got.test_outputs, got.test_outputs_se, expected.test_outputs, expected.test_outputs_se))
    for value, value_se, other, other_se in pairs:
        other, other_se = other.transpose(1, 2), other_se.transpose(1, 2)
        if param == "muP":
            torch.testing.assert_close(value, other, rtol=1e-9, atol=1e-12)
        else:
            bound = 4 * (value_se.square() + other_se.square()).sqrt() + 1e-12
            assert ((value - other).abs() <= bound).all(), ((value - other).abs() / bound).max()
    if param == "muP":
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-9, atol=1e-12)
    assert not torch.equal(got.outputs[0], got.outputs[-1])  # it trained


def test_sequence_first_limit_against_training():
    """Expected values from finite sequence-first LSTMs trained by torch at widths 64/256/1024 (8 seeds each) on
    minibatches of 2 examples along axis 1: the gap to the limit shrinks like width^-1/2."""
    X, y = _data(EXAMPLES, 0)
    report = _derive(SequenceFirst).check(X, y, widths=[64, 256, 1024], seeds=8, steps=3, lr=0.5, batch_size=2,
                                          particles=2**14, progress=False)
    assert report.passed, report.format()
    assert -0.7 < report.slope < -0.35, report.format()
    assert report.finite_mean.shape == (3, 4, TIME, EXAMPLES, 1)


def test_sequence_first_compare_finds_no_departure():
    """The fidelity debugger reads the same sequence-first error signal on both sides (finite LSTMs at widths
    128/512, 4 seeds): no program value departs."""
    X, y = _data(EXAMPLES, 0)
    report = _derive(SequenceFirst).compare(X, y, widths=[128, 512], seeds=4, steps=2, lr=0.5, particles=2**11,
                                            batches=4, progress=False)
    assert report.first is None, report.format()


def test_sequence_first_data_of_the_wrong_shape_is_named():
    X, y = _data(EXAMPLES, 0)
    limit = _derive(SequenceFirst)
    with pytest.raises(tpl.TplimitsError, match=r"X has 4 rows but y has 3 \(along axis 1 of X and 1 of y"):
        limit.train(X, y[:, :3], steps=1, particles=2**8, batches=2, progress=False)
    with pytest.raises(tpl.TplimitsError, match="their examples lie along axis 1"):
        limit.train(X, y, X_test=torch.randn(TIME + 1, 2, 3), steps=1, particles=2**8, batches=2, progress=False)
    with pytest.raises(tpl.BatchSizeError, match="examples lie along axis 1 of X and axis 1 of its outputs"):
        limit.kernel(X)


class BatchSpecific(SequenceFirst):
    """The same function, by another graph at an even batch size: its program holds at its own batch size only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.relu(out) - torch.relu(-out) if x.shape[1] % 2 == 0 else out


def test_sequence_first_model_specific_to_its_batch_size_is_refused():
    """Its program records no batch axis: the limit would take time steps for examples, and refuses, naming axis 1."""
    X, y = _data(EXAMPLES, 0)
    limit = tpl.derive(BatchSpecific, example_inputs=(X,), optimizer="sgd")
    assert not limit.family(X).program.batch_generic
    with pytest.raises(tpl.BatchSizeError, match="examples lie along axis 1 of its inputs.*batch-first"):
        limit.train(X, y, steps=1, particles=2**8, batches=2, progress=False)


def test_diagnose_counts_sequence_first_examples_along_their_axis():
    """``diagnose`` pairs inputs with targets along the batch axes the program records: 4 examples against 3
    targets is named (axis 0 holds the time steps, equal on both sides), before any model is trained."""
    X, y = _data(EXAMPLES, 0)
    with pytest.raises(tpl.TplimitsError, match=r"X has 4 rows but y has 3 \(along axis 1 of X and 1 of y"):
        tpl.diagnose(SequenceFirst, X, y[:, :3], widths=[8, 16], steps=1)
