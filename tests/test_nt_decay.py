"""The NT limit under decoupled weight decay (Thm 2.10.3, Eq. 2.50) against independent computations: the
homogeneity of a bias-free relu network (``F(cθ) = c³F(θ)``, its tangents ``c²`` times), the kernel recursion
that follows from it, and finite-width NTP training at growing widths. Expected values never come from the
engine's dynamics.

Under weight decay the centered outputs of a finite network, ``F(θ_t) − F(θ_0)``, contain
``F((1 − λ)^t θ_0) − F(θ_0)``: a Gaussian process draw that does not shrink with width, so a seed's distance
to the seed-averaged limit cannot shrink either. The comparisons with training therefore use a network whose
initial function is zero at every scale of its parameters (a zero-initialized, bias-free hidden layer), where
that term vanishes and the limit is deterministic; the term itself is checked on the homogeneous network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tplimits as tpl


def _data(d_in: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, 1, generator=g)


def _homogeneous(decay: float) -> tpl.Limit:
    """A bias-free relu MLP under NTP: three weight layers, so ``F(cθ) = c³ F(θ)`` and ``∂F/∂θ(cθ) = c² ∂F/∂θ(θ)``
    particle by particle."""
    return tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=3, activation="relu", bias=False,
                      weight_decay=decay)


def test_the_initial_function_and_features_decay_with_their_parameters():
    """lr = 0: only the decay acts, ``f_t = (1 − λ)^{3t} f_0`` and the last features' kernel ``(1 − λ)^{4t}`` times
    its initial value (the same particle system at every step)."""
    X, y = _data(3, 4)
    decay = 0.1
    traj = _homogeneous(decay).train(X, y, steps=3, lr=0.0, particles=512, batches=1, dots="stein",
                                     kernels=["relu_1"], progress=False)
    c = (1 - decay) ** torch.arange(4, dtype=torch.float64)
    assert torch.allclose(traj.outputs, c[:, None, None] ** 3 * traj.outputs[0], rtol=1e-10, atol=1e-12)
    features = traj.kernels["relu_1"]
    assert torch.allclose(features, c[:, None, None] ** 4 * features[0], rtol=1e-10, atol=1e-12)
    assert traj.outputs[0].abs().min() > 1e-3  # a function that could have failed to decay


def test_sgd_with_weight_decay_follows_the_decayed_kernel_recursion():
    """Centered SGD with decay on the homogeneous network, one particle system: with its kernel ``K`` and initial
    outputs ``f_0`` (the same system, read without training), ``f_t = (c_t³ − 1) f_0 − lr c_t² K A_t`` with
    ``A_{t+1} = (1 − λ) A_t + c_t² χ_t`` (the accumulated update decays; the tangents shrink by ``c_t²``)."""
    X, y = _data(3, 4)
    decay, lr, steps, particles = 0.1, 0.3, 4, 512
    limit = _homogeneous(decay)
    options = dict(particles=particles, batches=1, dots="stein", progress=False)
    traj = limit.train(X, y, steps=steps, lr=lr, center=True, **options)
    f0 = limit.train(X, y, steps=0, lr=lr, **options).outputs[0].reshape(-1)
    K = limit.kernel(X, particles=particles, batches=1, dots="stein", path="monte carlo").value
    loss, rows = tpl.loss("mse"), torch.arange(4)
    c = (1 - decay) ** torch.arange(steps + 1, dtype=torch.float64)
    f, A, expected = torch.zeros(4), torch.zeros(4), [torch.zeros(4)]
    for t in range(steps):
        chi = loss.error_signal(f.reshape(4, 1), y, rows).reshape(-1)
        A = (1 - decay) * A + c[t] ** 2 * chi
        f = (c[t + 1] ** 3 - 1) * f0 - lr * c[t + 1] ** 2 * (K @ A)
        expected.append(f)
    expected = torch.stack(expected).reshape(steps + 1, 4, 1)
    assert torch.allclose(traj.outputs, expected, rtol=1e-8, atol=1e-10), (traj.outputs - expected).abs().max()
    without = _homogeneous(0.0).train(X, y, steps=steps, lr=lr, center=True, **options)
    assert (without.outputs - traj.outputs).abs().max() > 0.05  # the decay is visible at this size


class ZeroHidden(nn.Module):
    """An MLP whose bias-free hidden layer starts at zero: ``F(cθ_0) = 0`` for every ``c``, so the centered
    outputs under weight decay are deterministic in the limit, and the hidden matrix is what trains (its
    gradient ``v ⊗ tanh(W₁ξ + b₁)`` is not zero; the readout's is)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.hidden = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 1, bias=False)
        nn.init.zeros_(self.hidden.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adamw", 0.05)])
def test_weight_decay_agrees_with_ntp_training(optimizer, lr):
    X, y = _data(4, 6)
    limit = tpl.derive(ZeroHidden, optimizer=optimizer, param="NTP", example_inputs=(X,), weight_decay=0.05)
    traj = limit.train(X, y, steps=6, lr=lr, particles=2**13, batches=8, center=True, progress=False)
    report = limit.check(X, y, widths=[64, 256, 1024], seeds=6, steps=6, lr=lr, center=True, trajectory=traj,
                         progress=False)
    assert report.passed, report.format()
    plain = tpl.derive(ZeroHidden, optimizer=optimizer, param="NTP", example_inputs=(X,)).train(
        X, y, steps=6, lr=lr, particles=2**13, batches=8, center=True, progress=False)
    se = (traj.outputs_se.square() + plain.outputs_se.square()).sqrt()[-1]
    assert ((traj.outputs[-1] - plain.outputs[-1]).abs() > 5 * se).all()  # the decay moved every output
