"""Finite-width models under a parametrization: plain training loops, copies, the abcd symmetry,
and the parametrized program replaying them exactly."""

from __future__ import annotations

import copy
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import tplimits as tpl
from tplimits.api import family
from tplimits.training.model import parametrized_program


@pytest.fixture(scope="module")
def mlp():
    return family("mlp", depth=3)


def _train(model, opt, x, y, steps=4):
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        outs.append(out.detach().clone())
        F.mse_loss(out, y).backward()
        opt.step()
    outs.append(model(x).detach().clone())
    return outs


def test_plain_loop_trains(mlp):
    model, opt = tpl.instantiate(mlp, width=64, param="muP", optimizer="adam", lr=5e-2)
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    (x,) = tpl.architecture("mlp").example_inputs()
    y = torch.randn(8, 1)
    outs = _train(model, opt, x, y, steps=40)
    assert F.mse_loss(outs[-1], y) < 0.5 * F.mse_loss(outs[0], y)


def test_deepcopy_and_state_dict(mlp):
    model, opt = tpl.instantiate(mlp, width=32, param="NTP", optimizer="sgd", lr=0.1)
    (x,) = tpl.architecture("mlp").example_inputs()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    other, _ = tpl.instantiate(mlp, width=32, param="NTP", optimizer="sgd", lr=0.1, seed=5)
    assert not torch.allclose(other(x), model(x))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    assert all(not hasattr(p, "infshape") for p in model.parameters())  # nothing patched onto tensors


@pytest.mark.parametrize("name", ["muP", "NTP", "SP"])
def test_parametrized_program_replays_the_model(name):
    for arch in ("mlp", "transformer", "resnet"):
        fam = family(arch)
        model, _ = tpl.instantiate(fam, width=48 if arch != "resnet" else 24, param=name, optimizer="sgd", lr=0.1)
        inputs = tpl.architecture(arch).example_inputs()
        prog = parametrized_program(fam.program, tpl.parametrization(name))
        torch.testing.assert_close(prog.replay(model.model, *inputs), model(*inputs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "signsgd"])
@pytest.mark.parametrize("theta", [Fraction(1, 2), Fraction(-1, 2)])
def test_abcd_symmetry_trains_identically(mlp, optimizer, theta):
    """Eq. (2.5): (a, b, c, d) -> (a+θ, b−θ, c−θ, d+θ) gives the same function at every step and width."""
    base = tpl.parametrization("muP")
    shifted = base.with_overrides(**{
        "layers.1.weight": base.roles["hidden"].shifted(theta),
        "layers.0.weight": base.roles["input"].shifted(theta),
        "readout.weight": base.roles["output"].shifted(theta),
    })
    (x,) = tpl.architecture("mlp").example_inputs()
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(3))
    for width in (32, 96):
        a = _train(*tpl.instantiate(mlp, width=width, param=base, optimizer=optimizer, lr=0.05, seed=1), x, y)
        b = _train(*tpl.instantiate(mlp, width=width, param=shifted, optimizer=optimizer, lr=0.05, seed=1), x, y)
        for fa, fb in zip(a, b, strict=True):
            torch.testing.assert_close(fa, fb, rtol=1e-9, atol=1e-12)


def test_trivial_parametrization_is_plain_torch(mlp):
    """With every exponent 0 and no output multiplier, our SGD/Adam step is torch's, step for step."""
    zero = tpl.Parametrization("zero", {role: tpl.ABCD() for role in ("hidden", "input", "output", "scalar")})
    (x,) = tpl.architecture("mlp").example_inputs()
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(4))
    for name, reference in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        model, opt = tpl.instantiate(mlp, width=40, param=zero, optimizer=name, lr=0.01, seed=2)
        twin = copy.deepcopy(model)
        ours = _train(model, opt, x, y)
        theirs = _train(twin, reference(twin.parameters(), lr=0.01), x, y)
        for fa, fb in zip(ours, theirs, strict=True):
            torch.testing.assert_close(fa, fb, rtol=1e-12, atol=1e-14)


def test_initialization_scales(mlp):
    width = 400
    model, _ = tpl.instantiate(mlp, width=width, param="muP", optimizer="sgd", lr=0.1)
    hidden = model.model.layers[1].weight
    assert abs(hidden.std().item() * width ** 0.5 - 1) < 0.05  # b = 1/2: variance 1/n
    first = model.model.layers[0].weight
    assert abs(first.std().item() * 16 ** 0.5 - 1) < 0.05  # fan-in over the 16 fixed inputs
    readout = model.model.readout.weight
    assert abs(readout.std().item() - 1) < 0.2 and model.output_scale == pytest.approx(1 / width)
    ntp, _ = tpl.instantiate(mlp, width=width, param="NTP", optimizer="sgd", lr=0.1)
    effective = ntp.model.layers[1].weight  # a = 1/2 multiplier on N(0, 1) weights
    assert abs(effective.std().item() * width ** 0.5 - 1) < 0.05
    trained = ntp.model.layers[1].parametrizations.weight.original
    assert abs(trained.std().item() - 1) < 0.05



def test_first_convolution_is_initialized_by_its_fan_in():
    """A first-layer (or depthwise) convolution sums its input channels over the kernel, like a first
    Linear sums its inputs: under μP it starts with variance 1/(C_in·kh·kw), 1/(kh·kw) when depthwise (a
    ViT patch embedding drew N(0, 1) weights: pre-activations √48 times too large)."""

    class Convs(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.patch = torch.nn.Conv2d(3, width, 4, stride=4)
            self.depthwise = torch.nn.Conv2d(width, width, 3, padding=1, groups=width)
            self.out = torch.nn.Linear(width, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.depthwise(self.patch(x)).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    prog = tpl.lower(Convs, example_inputs=(x,))
    assert prog.parameters["patch.weight"].fan_in_axes == (1, 2, 3)
    model, _ = tpl.instantiate(Convs, width=512, param="muP", optimizer="sgd", lr=0.1, example_inputs=(x,))
    patch, depthwise = model.model.patch.weight, model.model.depthwise.weight
    assert abs(patch.std().item() * (3 * 4 * 4) ** 0.5 - 1) < 0.05
    assert abs(depthwise.std().item() * 3 - 1) < 0.05

def test_learning_rate_and_gradient_scales(mlp):
    width = 256
    _, opt = tpl.instantiate(mlp, width=width, param="muP", optimizer="adam", lr=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["layers.1.weight"]["lr_scale"] == pytest.approx(1 / width)  # c = 1
    assert groups["layers.0.weight"]["lr_scale"] == pytest.approx(1.0)
    assert groups["layers.1.weight"]["grad_scale"] == pytest.approx(width)  # d = 1


def test_center_subtracts_initial_function(mlp):
    model, opt = tpl.instantiate(mlp, width=32, param="muP", optimizer="sgd", lr=0.5, center=True)
    (x,) = tpl.architecture("mlp").example_inputs()
    assert model(x).abs().max() == 0
    outs = _train(model, opt, x, torch.ones(8, 1), steps=2)
    assert outs[-1].abs().max() > 0


def test_mup_attention_scale():
    fam = family("transformer")
    model, _ = tpl.instantiate(fam, width=64, param="muP", optimizer="sgd", lr=0.1)
    assert model.attention == (1.0, -1.0)  # 1/d_head instead of sdpa's 1/sqrt(d_head)
    (ids,) = tpl.architecture("transformer").example_inputs()
    plain = copy.deepcopy(model)
    plain.attention = None
    assert not torch.allclose(model(ids), plain(ids))
    explicit = family("transformer", attention="explicit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpl.instantiate(explicit, width=64, param="muP", optimizer="sgd", lr=0.1)
    assert any("kept" in str(w.message) for w in caught)


def test_module_form_needs_its_own_width():
    make = tpl.architecture("mlp").build
    module, base = make(48), make(24)
    (x,) = tpl.architecture("mlp").example_inputs()
    model, _ = tpl.instantiate(module, width=48, base=base, example_inputs=(x,), param="muP", optimizer="sgd")
    assert model.model is module
    with pytest.raises(tpl.TplimitsError, match="width 48"):
        tpl.instantiate(make(48), width=64, base=base, example_inputs=(x,))


def test_mup_warns_when_it_overrides_the_attention_scale():
    with pytest.warns(UserWarning, match="overrides the model's attention scale"):
        tpl.instantiate(family("transformer", n_layers=1), width=32, param="muP", optimizer="sgd", lr=0.1)


def test_decorrelation_matrices_follow_their_rule():
    """R keeps its identity init and moves by R <- s(I - (c/n) C) R (seed 003), computed here by hand
    from the layer input; the other weights train with the chosen optimizer in the same plain loop."""
    width, c = 32, 0.5
    model, opt = tpl.instantiate("decorrelated-mlp", width=width, param="muP", optimizer="sgd", lr=c)
    assert {g["rule"].name for g in opt.param_groups} == {"sgd", "decorrelation"}
    layer = model.model.layers[1]
    R0 = layer.decorrelation.detach().clone()
    assert torch.equal(R0, torch.eye(width))
    inputs = {}
    handle = layer.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0].detach()))
    (x,) = tpl.architecture("decorrelated-mlp").example_inputs()
    W0 = model.model.layers[1].weight.detach().clone()
    opt.zero_grad()
    F.mse_loss(model(x), torch.ones(8, 1)).backward()
    opt.step()
    handle.remove()
    z = inputs["x"] @ R0.T
    C = z.T @ z / z.shape[0]
    R1 = (torch.eye(width) - (c / width) * C) @ R0
    zn = inputs["x"] @ R1.T
    s = torch.sqrt(z.square().sum(-1).mean() / zn.square().sum(-1).mean())
    torch.testing.assert_close(layer.decorrelation.detach(), s * R1, rtol=1e-10, atol=1e-12)
    assert not torch.equal(model.model.layers[1].weight, W0)  # the forward weights trained too


def test_normalized_updates(mlp):
    """Eq. 2.54: with update normalization every step of a parameter has Frobenius norm lr·n^{-c}."""
    width, lr = 64, 0.01
    param = tpl.parametrization("muP-normalized")
    model, opt = tpl.instantiate(mlp, width=width, param=param, optimizer="adam", lr=lr)
    hidden = model.model.layers[1].weight
    before = hidden.detach().clone()
    (x,) = tpl.architecture("mlp").example_inputs()
    opt.zero_grad()
    F.mse_loss(model(x), torch.ones(8, 1)).backward()
    opt.step()
    c = param.roles["hidden"].c
    assert (hidden.detach() - before).norm().item() == pytest.approx(lr * width ** -float(c), rel=1e-9)


@pytest.mark.parametrize("name,exponent", [("muP", 0.0), ("NTP", -0.5)])
def test_rule_rate_follows_the_parametrization(name, exponent):
    """The decorrelation rule's own rate c/n is the maximal update; NTP scales it by n^-1/2 (r = 1/2)."""
    width = 64
    _, opt = tpl.instantiate("decorrelated-mlp", width=width, param=name, optimizer="sgd", lr=0.1)
    groups = [g for g in opt.param_groups if g["rule"].name == "decorrelation"]
    assert groups and all(g["lr_scale"] == pytest.approx(width ** exponent) for g in groups)
