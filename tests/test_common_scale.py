"""The width of a model's parameters and the batch size of a program's inputs are read by one function
(``common_scale``); a width axis and a batch axis are both a size ``ratio · s`` (``Proportional``) but never equal.
Expected values: the sizes the models are built with."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import tplimits as tpl
from tplimits.core.batch import BatchInt
from tplimits.core.interpret import infer_width
from tplimits.core.ir import Width


def _mlp(width: int, d_in: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_width_and_batch_axes_are_distinct_proportional_sizes():
    assert Width(Fraction(1)) != BatchInt(Fraction(1)) and Width(Fraction(2)) == Width(Fraction(2))
    assert (str(Width(Fraction(1))), str(Width(Fraction(1, 2))), str(BatchInt(Fraction(3)))) == ("n", "1/2n", "3b")
    assert Width(Fraction(4)).size(24) == 96 and BatchInt(Fraction(1, 2)).resolve(6) == 3
    with pytest.raises(ValueError, match="width 3"):
        Width(Fraction(1, 2)).size(3)
    with pytest.raises(tpl.BatchSizeError, match="use a multiple of 2"):
        BatchInt(Fraction(1, 2)).resolve(3)


def test_width_of_a_model_is_read_from_its_parameters():
    prog = tpl.lower(_mlp, example_inputs=(torch.randn(3, 4),))
    assert infer_width(prog, _state(_mlp(40))) == 40
    with pytest.raises(tpl.TplimitsError, match=r"parameter '0.weight' has size 5 along axis 1, which the program "
                                                r"fixes at 4 \(\[n, 4\], n the width\): is this the same architecture"):
        infer_width(prog, _state(_mlp(40, d_in=5)))
    mixed = {**_state(_mlp(40)), "2.weight": torch.zeros(1, 24)}
    with pytest.raises(tpl.TplimitsError, match="disagree on the width"):
        infer_width(prog, mixed)
