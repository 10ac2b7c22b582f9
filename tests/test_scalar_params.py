"""Fixed-size parameters initialized at random: the limit draws them anew in every particle system, from the
law the finite models draw them from (tplimits.limit.draws)."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from torch import nn

import tplimits as tpl
from tplimits.errors import UnknownInitLaw
from tplimits.limit.check import finite_outputs
from tplimits.limit.draws import DeclaredLaw, ModuleLaw
from tplimits.limit.runs import batch_schedule
from tplimits.training.instantiate import instantiate_family


class Gained(nn.Module):
    """``readout(tanh(g · W x))`` with a learnable scalar gain ``g ~ N(1, 1/4)``: Θ(1) under μP. Drawn first
    (``early``) its law is the same at every width; drawn after the layers, the same seed gives another draw
    at another width."""

    def __init__(self, width: int, early: bool = True) -> None:
        super().__init__()
        if early:
            self.gain = nn.Parameter(1.0 + 0.5 * torch.randn(()))
        self.inp = nn.Linear(3, width)
        self.readout = nn.Linear(width, 1, bias=False)
        if not early:
            self.gain = nn.Parameter(1.0 + 0.5 * torch.randn(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(self.gain * self.inp(x)))


def _late(width: int) -> Gained:
    return Gained(width, early=False)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


def test_random_gain_limit_is_the_mixture_finite_training_averages(data):
    """The seed mean of finite training (width 256, 48 seeds, each its own gain) against the limit's mean over
    16 systems, each with its own gain; the limit that keeps one gain for every system (the reference
    model's, as the engine did before) is far outside the same standard errors."""
    X, y = data
    limit = tpl.derive(Gained, optimizer="sgd", param="muP")
    setup = limit.setup(X)
    assert isinstance(setup.draws["gain"], ModuleLaw)
    steps, lr = 3, 1.0
    schedule = batch_schedule(len(X), None, steps, 0)
    runs = torch.stack([finite_outputs(limit, X, y, len(X), 256, seed, steps, lr, "mse", schedule, torch.float64)
                        for seed in range(48)])
    finite, finite_se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))

    def z(traj: tpl.Trajectory) -> float:  # the RMS gap over steps and outputs, in combined standard errors
        gap = (traj.outputs - finite).square().mean().sqrt()
        return float(gap / (traj.outputs_se.square() + finite_se.square()).mean().sqrt())

    mixed = limit.train(X, y, steps=steps, lr=lr, particles=2**12, batches=16, progress=False)
    print(f"limit's mean over systems {z(mixed):.2f} standard errors from finite training")
    assert z(mixed) < 3
    limit._setups[(tuple(X.shape), X.dtype)] = attrs.evolve(setup, draws={})  # one gain for every system
    single = limit.train(X, y, steps=steps, lr=lr, particles=2**12, batches=16, progress=False)
    print(f"one gain for every system: {z(single):.2f} standard errors")
    assert z(single) > 4


def test_fixed_size_random_tensor_the_parametrization_redraws(data):
    """A readout bias of two entries is redrawn by the parametrization (μP's scalar role: N(0, 1)); every
    particle system draws its own from that law, as the finite models do."""
    X, _ = data
    limit = tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=3, d_out=2)
    law = limit.setup(X).draws["readout.bias"]
    assert isinstance(law, DeclaredLaw)
    limit_draws = torch.stack([law.sample(seed, 1024) for seed in range(200)])
    fam = limit.family(X)
    finite_draws = torch.stack([instantiate_family(fam, width=32, param=limit.param, rule=limit.rule, lr=0.1,
                                                   seed=seed)[0].model.readout.bias.detach() for seed in range(200)])
    for draws in (limit_draws, finite_draws):
        assert abs(float(draws.mean())) < 4 / math.sqrt(draws.numel())
        assert abs(float(draws.std()) - 1.0) < 4 / math.sqrt(2 * draws.numel())
    assert not torch.equal(limit_draws[0], limit_draws[1])


def test_deterministic_fixed_size_values_are_kept(data):
    """A constant gain, and μP's one-entry readout bias (behind the output multiplier 1/n: its value does not
    enter the limit), are not drawn."""
    X, _ = data

    class Constant(Gained):
        def __init__(self, width: int) -> None:
            super().__init__(width)
            self.gain = nn.Parameter(torch.tensor(1.5))

    setup = tpl.derive(Constant, optimizer="sgd", param="muP").setup(X)
    assert setup.draws == {} and setup.initial["gain"].value == 1.5
    assert tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=3).setup(X).draws == {}


def test_random_scalar_of_unknown_law_is_refused_by_name(data):
    X, _ = data
    with pytest.raises(UnknownInitLaw, match="'gain'") as error:
        tpl.derive(_late, optimizer="sgd", param="muP").setup(X)
    assert error.value.parameter == "gain"
