"""The ket engine against independent computations: the per-particle formulas of Thm 2.5.2 / 2.5.3
(depth 1, no operators), autograd against Stein dot-kets, and a deep linear network whose limit is
computed exactly in a basis of Gaussians."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.limit.mu import ParticleNetwork


def _network(limit: tpl.Limit, X: torch.Tensor, particles: int, seed: int, steps: int, lr: float,
             dots: str = "stein") -> ParticleNetwork:
    return ParticleNetwork(limit.setup(X), particles, seed, torch.float64, "cpu", dots, lr, steps)


def _engine_outputs(net: ParticleNetwork, X: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    loss = tpl.loss("mse")
    outs = []
    for t in range(steps + 1):
        interp = net.forward((X,))
        out = net.outputs(interp)
        outs.append(out)
        if t < steps:
            net.backward_and_update(interp, loss.error_signal(out, y, torch.arange(len(X))))
    return torch.stack(outs)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_depth_one_matches_theorem_2_5_2(optimizer):
    """f = ⟨v|φ(u ξ)⟩, u ← u − η Q(Σ_a χ_a v φ'(h_a) ξ_a), v ← v − η Q(Σ_a χ_a φ(h_a)), per particle, with Q
    applied by torch.optim on the particle tensors."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(3, 2, generator=g), torch.randn(3, 1, generator=g)
    limit = tpl.derive("mlp", optimizer=optimizer, depth=1, d_in=2, bias=False)
    steps, lr, P = 5, 0.3, 512
    net = _network(limit, X, P, seed=7, steps=steps, lr=lr)
    u = net.tensors["layers.0.weight"].clone().requires_grad_(True)  # [P, d]
    v = net.tensors["readout.weight"][0].clone().requires_grad_(True)  # [P]
    engine = _engine_outputs(net, X, y, steps)[:, :, 0]

    opt = torch.optim.SGD([u, v], lr=lr) if optimizer == "sgd" else torch.optim.Adam([u, v], lr=lr)
    expected = []
    for _ in range(steps + 1):
        h = X @ u.T  # [M, P]
        f = (torch.tanh(h) * v).mean(-1)
        expected.append(f.detach())
        chi = 2 * (f.detach() - y[:, 0]) / len(X)
        dphi = 1 - torch.tanh(h.detach()) ** 2
        u.grad = torch.einsum("a,ap,ad->pd", chi, v.detach() * dphi, X)
        v.grad = torch.einsum("a,ap->p", chi, torch.tanh(h.detach()))
        opt.step()
    torch.testing.assert_close(engine, torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_autograd_and_stein_dots_agree(activation):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)
    limit = tpl.derive("mlp", optimizer="sgd", depth=3, d_in=4, activation=activation)
    runs = {dots: limit.train(X, y, steps=4, lr=1.0, particles=2**13, batches=4, dots=dots, progress=False)
            for dots in ("autograd", "stein")}
    a, s = runs["autograd"], runs["stein"]
    z = (a.outputs - s.outputs).abs() / (a.outputs_se.square() + s.outputs_se.square()).sqrt()
    assert z.max() < 4, z
    assert (a.outputs[-1] - a.outputs[0]).abs().min() > 0.05  # the outputs moved: the comparison has content
    assert a.dots == "autograd" and s.dots == "stein"


class _ClampMLP(torch.nn.Module):
    """A kink whose lowering rule declares no kink points (``clamp``): autograd dots cannot smooth it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hidden = torch.nn.Linear(4, width), torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.inp(x).clamp(min=0.0)).clamp(min=0.0))


def test_autograd_dots_refused_for_undeclared_kinks_and_nonlinear_rules():
    X, y = torch.randn(3, 4), torch.randn(3, 1)
    clamped = tpl.derive(_ClampMLP, example_inputs=(X,), optimizer="sgd")
    with pytest.raises(tpl.TplimitsError, match="clamp.*declared no kinks.*stein"):
        clamped.train(X, y, steps=1, particles=256, dots="autograd", progress=False)
    relu = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4, activation="relu")
    assert relu.train(X, y, steps=1, particles=256, dots="autograd", progress=False).dots == "autograd"
    assert relu.train(X, y, steps=1, particles=256, progress=False).dots == "stein"  # auto: kinks keep Stein
    adam = tpl.derive("mlp", optimizer="adam", depth=2, d_in=4)
    with pytest.raises(tpl.TplimitsError, match="linear update rule"):
        adam.train(X, y, steps=1, particles=256, dots="autograd", progress=False)


def _exact_linear_limit(X: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The μ-limit of a depth-2 linear network f = ⟨v|W u ξ⟩ (μP, SGD, mse) in exact arithmetic.

    Every ket is a linear combination of iid N(0, 1) basis variables, stored as a coefficient vector,
    so ⟨x|y⟩ is a dot product. The initial operator acts on a basis variable b as Ŵ b (a fresh basis
    variable per b, Eq. 2.18) plus the dot term (Eq. 2.19): if b is itself the hat Ŵᵀ c of some c, W
    also maps it back onto c. Wᵀ is the same with the roles exchanged. Updates are the low-rank
    SGD terms ``-η χ |dh⟩⟨x|`` (Eq. 2.21)."""
    M, d = X.shape
    size = 1024
    hat = {"W": {}, "WT": {}}  # basis index -> index of its image under Ŵ / Ŵᵀ
    origin = {"W": {}, "WT": {}}  # image index -> the basis index it came from
    count = [0]

    def fresh() -> int:
        count[0] += 1
        return count[0] - 1

    def ket(index: int) -> torch.Tensor:
        e = torch.zeros(size, dtype=torch.float64)
        e[index] = 1.0
        return e

    def initial(direction: str, x: torch.Tensor) -> torch.Tensor:
        other = "WT" if direction == "W" else "W"
        out = torch.zeros(size, dtype=torch.float64)
        for b in torch.nonzero(x).flatten().tolist():
            if b not in hat[direction]:
                image = fresh()
                hat[direction][b] = image
                origin[direction][image] = b
            out[hat[direction][b]] += x[b]
            if b in origin[other]:  # b = Ŵᵀ c (resp. Ŵ c): the dot term gives back c
                out[origin[other][b]] += x[b]
        return out

    u = [ket(fresh()) for _ in range(d)]  # input weights: N(0, 1/d) per coordinate
    u = [col / d**0.5 for col in u]
    v = ket(fresh())
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []  # ΔW = Σ dh ⟨x|, already times -η χ

    def apply_W(x: torch.Tensor, transpose: bool) -> torch.Tensor:
        out = initial("WT" if transpose else "W", x)
        for dh, xs in updates:
            out = out + (xs * (dh @ x) if transpose else dh * (xs @ x))
        return out

    outputs = []
    for t in range(steps + 1):
        h1 = [sum(X[a, j] * u[j] for j in range(d)) for a in range(M)]
        h2 = [apply_W(h, transpose=False) for h in h1]
        f = torch.stack([v @ h for h in h2])
        outputs.append(f)
        if t == steps:
            break
        chi = 2 * (f - y[:, 0]) / M
        dh1 = [apply_W(chi[a] * v, transpose=True) for a in range(M)]  # χ-weighted backward kets
        new_u = [u[j] - lr * sum(X[a, j] * dh1[a] for a in range(M)) for j in range(d)]
        new_v = v - lr * sum(chi[a] * h2[a] for a in range(M))
        updates.extend((-lr * chi[a] * v, h1[a]) for a in range(M))
        u, v = new_u, new_v
    return torch.stack(outputs)


def test_deep_linear_network_matches_exact_limit():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(2, 3, generator=g), torch.randn(2, 1, generator=g)
    steps, lr = 4, 0.5
    exact = _exact_linear_limit(X, y, steps, lr)
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3, activation="identity", bias=False)
    traj = limit.train(X, y, steps=steps, lr=lr, particles=2**15, batches=4, progress=False)
    z = (traj.outputs[:, :, 0] - exact).abs() / traj.outputs_se[:, :, 0].clamp_min(1e-12)
    assert (exact[-1] - exact[0]).abs().min() > 0.1
    assert z.max() < 4, (traj.outputs[:, :, 0], exact, traj.outputs_se[:, :, 0])
