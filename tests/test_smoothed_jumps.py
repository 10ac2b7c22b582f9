"""The point mass autograd dots add to the pullback of a kinked function, against closed forms.

For ``x ~ N(μ, 1)`` over ``P`` particles and the pullback ``dy · f'(x)`` of a function whose derivative jumps
by ``s`` at ``c``, ``d/dμ E[dy · f'(x)] = dy · Σ s φ(c − μ)`` (the jump's share of Gaussian mass moves with μ):
per-particle autograd sees zero, the smoothed term recovers it.
"""

from __future__ import annotations

import math

import torch

import tplimits as tpl
from tplimits.core.backprop import Pullback
from tplimits.limit.kets import smoothed_jumps


def _phi(t: float) -> float:
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def _derivative_in_mean(fn, kinks, mu: float, particles: int = 2 ** 16, smoothed: bool = True) -> float:
    """``d/dμ`` of the particle mean of ``fn``'s pullback (cotangent 1) at ``x = μ + z``."""
    z = torch.randn(particles, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    x, dy = m + z, torch.ones(particles, dtype=torch.float64)
    value = torch.func.vjp(fn, x)[1](dy)[0]
    if smoothed:
        value = value + smoothed_jumps(x, dy, kinks, particles)
    (g,) = torch.autograd.grad(value.mean(), m)
    return float(g)


def test_relu_pullback_point_mass():
    for mu in (0.0, 0.7, -1.3):
        got = _derivative_in_mean(torch.relu, ((0.0, 1.0),), mu)
        assert abs(got - _phi(mu)) < 0.02, (mu, got, _phi(mu))
        assert _derivative_in_mean(torch.relu, ((0.0, 1.0),), mu, smoothed=False) == 0.0  # what autograd misses


def test_hardtanh_pullback_two_point_masses():
    fn = torch.nn.functional.hardtanh
    for mu in (0.0, 0.8):
        got = _derivative_in_mean(fn, ((-1.0, 1.0), (1.0, -1.0)), mu)
        want = _phi(-1.0 - mu) - _phi(1.0 - mu)
        assert abs(got - want) < 0.02, (mu, got, want)


def test_value_unchanged():
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(100, dtype=torch.float64)
    assert torch.equal(smoothed_jumps(x, dy, ((0.0, 1.0),), 100), torch.zeros(100, dtype=torch.float64))


def test_relu_rule_declares_its_kink_and_the_pullback_inherits_it():
    relu_op = torch.ops.aten.relu.default
    backward = tpl.total_program(tpl.lower("mlp", depth=2, activation="relu")).program
    relu = [ins for ins in backward if isinstance(ins, tpl.Nonlin) and ins.fn is relu_op]
    pullbacks = [ins for ins in backward if isinstance(ins, tpl.Nonlin) and isinstance(ins.fn, Pullback)
                 and ins.fn.fn is relu_op]
    assert relu and pullbacks and all(ins.kinks == ((0.0, 1.0),) for ins in relu + pullbacks)
    smooth = tpl.total_program(tpl.lower("mlp", depth=2, activation="tanh")).program
    assert not any(ins.kinks for ins in smooth if isinstance(ins, tpl.Nonlin))
