"""A frozen parameter (``requires_grad=False``) is held fixed, as the model's own training would: lowered as a
buffer, never drawn by the parametrization nor trained, by the finite optimizer and by either limit.

Expected values: the same model with that tensor registered as a buffer (an independent path through the
lowering: torch.export reports it as a buffer, not a parameter)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tplimits as tpl
from tplimits.errors import NotRepresentable
from tplimits.training.instantiate import instantiate_family


class Gained(nn.Module):
    """``readout(tanh(g · (h − mean h)))`` with a gain ``g`` that a learnable scalar would make curved (refused
    by the NT limit), frozen here, or a buffer (``as_buffer``)."""

    def __init__(self, width: int, as_buffer: bool = False) -> None:
        super().__init__()
        if as_buffer:
            self.register_buffer("gain", torch.tensor(1.3))
        else:
            self.gain = nn.Parameter(torch.tensor(1.3), requires_grad=False)
        self.inp = nn.Linear(3, width)
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.readout(torch.tanh(self.gain * (h - h.mean(-1, keepdim=True))))


def _buffered(width: int) -> Gained:
    return Gained(width, as_buffer=True)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


@pytest.mark.parametrize("param", ["muP", "NTP"])
def test_a_frozen_parameter_trains_as_a_buffer(param):
    x, y = _data()
    options = dict(steps=3, lr=0.5, particles=256, batches=2, progress=False, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tpl.SteinBiasWarning)
        frozen = tpl.derive(Gained, optimizer="sgd", param=param)
        buffered = tpl.derive(_buffered, optimizer="sgd", param=param)
        got, expected = frozen.train(x, y, **options), buffered.train(x, y, **options)
    assert not frozen.family(x).program.parameters["gain"].trainable
    assert not torch.equal(got.outputs[0], got.outputs[-1])  # the rest trains
    torch.testing.assert_close(got.outputs, expected.outputs, rtol=1e-12, atol=1e-14)


def test_the_finite_optimizer_leaves_a_frozen_parameter_alone():
    x, y = _data()
    limit = tpl.derive(Gained, optimizer="sgd", param="muP")
    model, opt = instantiate_family(limit.family(x), width=32, param=limit.param, rule=limit.rule, lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["model.gain"], before["model.gain"])
    assert not torch.equal(after["model.inp.weight"], before["model.inp.weight"])


class RandomFeatures(nn.Module):
    """A hidden matrix frozen at its random initialization: width-sized and random."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hidden, self.readout = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 1)
        self.hidden.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def test_a_frozen_random_matrix_is_refused_by_name():
    x, y = _data()
    limit = tpl.derive(RandomFeatures, optimizer="sgd", param="muP")
    with pytest.raises(NotRepresentable, match=r"'hidden.weight' is frozen \(requires_grad=False\)"):
        limit.train(x, y, steps=1, lr=0.5, particles=64, progress=False)


class Spare(nn.Module):
    """A frozen parameter the forward never reads."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.readout = nn.Linear(3, width), nn.Linear(width, 1)
        self.spare = nn.Parameter(torch.zeros(width), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(self.inp(x)))


def test_a_frozen_parameter_the_forward_never_reads_is_no_sign_of_another_architecture():
    x, _ = _data()
    family = tpl.derive(Spare, optimizer="sgd", param="muP").family(x)
    model = family.model(96, seed=0)  # checked against the program at a width it was not lowered at
    assert model.spare.shape == (96,)
