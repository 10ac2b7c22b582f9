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
from tplimits.limit.draws import LAW_SEEDS, LAW_WIDTH_RATIO, DeclaredLaw, ModuleLaw
from tplimits.limit.runs import batch_schedule
from tplimits.training.instantiate import instantiate_family


class Gained(nn.Module):
    """``readout(tanh(g · W x))`` with a learnable scalar gain ``g ~ N(1, 1/4)``: Θ(1) under μP. Drawn first
    (``early``), the same seed draws the same gain at every width; drawn after the layers, another one."""

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
    X, _ = data

    class Constant(Gained):
        def __init__(self, width: int) -> None:
            super().__init__(width)
            self.gain = nn.Parameter(torch.tensor(1.5))

    setup = tpl.derive(Constant, optimizer="sgd", param="muP").setup(X)
    assert setup.draws == {} and setup.initial["gain"].value == 1.5


def test_a_law_that_is_the_same_at_every_width_is_drawn_from_the_model(data):
    """A gain drawn after the layers: the same seed draws another value at another width, but the law is
    the same (N(1, 1/4)), so every system draws its own from the model at the lowered width."""
    X, _ = data
    law = tpl.derive(_late, optimizer="sgd", param="muP").setup(X).draws["gain"]
    assert isinstance(law, ModuleLaw)
    gains = torch.stack([law.sample(seed, 1024) for seed in range(200)])
    assert abs(float(gains.mean()) - 1.0) < 4 * 0.5 / math.sqrt(200)
    assert abs(float(gains.std()) - 0.5) < 4 * 0.5 / math.sqrt(2 * 200)


def test_a_spread_that_vanishes_with_width_has_its_mean_as_limit(data):
    """``nn.Linear``'s one-entry readout bias is drawn from U(±1/√width): its limit is the constant 0 (to the
    error of the mean of the draws), the same in every system."""
    X, _ = data
    setup = tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=3).setup(X)
    assert "readout.bias" not in setup.draws
    initial = setup.initial["readout.bias"]
    wide = LAW_WIDTH_RATIO * setup.program.width
    assert initial.kind == "fixed" and abs(float(initial.value)) < 4 / math.sqrt(3 * wide * LAW_SEEDS)  # U(±a): a/√3


class _Hot(Gained):
    """A temperature drawn from U(0, √width / 4): its law grows with width, the limit has none."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.gain = nn.Parameter(torch.rand(()) * math.sqrt(width) / 4)


def test_random_scalar_of_unknown_law_is_refused_by_name(data):
    X, _ = data
    with pytest.raises(UnknownInitLaw, match="'gain'") as error:
        tpl.derive(_Hot, optimizer="sgd", param="muP").setup(X)
    assert error.value.parameter == "gain"


def test_shared_draws_check_the_limit_given_one_draw(data):
    """Each seed keeps its own Θ(1) gain at every width, so its gap to the mixture does not shrink and ``check``
    cannot pass; with ``shared_draws=True`` every finite seed and every system take one draw of the gain, and the
    finite models converge to the limit given that draw (slope ≤ −0.4, within 3 standard errors)."""
    X, y = data
    limit = tpl.derive(Gained, optimizer="sgd", param="muP")
    options = dict(widths=[64, 256, 1024], seeds=6, steps=3, lr=1.0, particles=2**12, batches=4, progress=False)
    mixed = limit.check(X, y, **options)
    shared = limit.check(X, y, shared_draws=True, **options)
    print(mixed.format(), shared.format(), sep="\n\n")
    assert mixed.mixture == ("gain",) and not mixed.passed and "shared_draws=True" in mixed.format()
    assert mixed.raw_slope > -0.3
    assert shared.passed and shared.mixture == ()
    assert shared.limit.identity["draw_seed"] == "0"
    assert float(shared.limit.outputs_se.max()) < 0.7 * float(mixed.limit.outputs_se.max())  # no spread of draws


def test_shared_draws_give_finite_models_the_limits_draw(data):
    """The gain (the model's own law) is the same tensor on both sides; the readout bias the parametrization
    redraws is the limit's standard normals at the finite model's own scale (μP's N(0, 1): the same numbers)."""
    from tplimits.limit.check import finite_steps

    X, y = data
    gained = tpl.derive(Gained, optimizer="sgd", param="muP")
    law = gained.setup(X).draws["gain"]
    mlp = tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=3, d_out=2)
    bias = mlp.setup(X).draws["readout.bias"]
    schedule = batch_schedule(len(X), None, 1, 0)
    for seed in (0, 1):
        _, model, _ = next(finite_steps(gained, X, y, len(X), 64, seed, 1, 0.1, "mse", schedule, torch.float64,
                                        center=True, draw_seed=3))
        assert torch.equal(model.model.gain.detach(), law.sample(3, 64).to(torch.float64))
        assert torch.equal(model.initial.gain.detach(), model.model.gain.detach())
        _, model, _ = next(finite_steps(mlp, X, y.repeat(1, 2), len(X), 32, seed, 1, 0.1, "mse", schedule,
                                        torch.float64, draw_seed=3))
        assert torch.allclose(model.model.readout.bias.detach(), bias.sample(3, 1024).to(torch.float64))
