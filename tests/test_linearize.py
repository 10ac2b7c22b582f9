"""``tpl.linearize``: the first-order Taylor model in the parameters, trained by the model's own optimizer.

Independent references: a model linear in its parameters is its own linearization (so both train
identically); the first update of the linearized model is the model's first update (the gradient at
the expansion point is the model's); ``J δ`` against central finite differences of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tplimits as tpl
from tplimits.errors import ConfigError, TplimitsError


def _train(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int) -> list[torch.Tensor]:
    outputs = []
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        with torch.no_grad():
            outputs.append(model(x).clone())
    return outputs


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_model_linear_in_its_parameters_is_its_own_linearization(rule):
    """Random features (a frozen tanh layer) and a trained linear readout: f is linear in what is trained."""
    torch.manual_seed(0)
    features = nn.Linear(3, 16)
    features.requires_grad_(False)
    model = nn.Sequential(features, nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    lin = tpl.linearize(model)
    opt = tpl.make_optimizer(rule, model.parameters(), lr=0.05)
    lin_opt = lin.optimizer_like(opt)
    assert lin.names == ("2.weight", "2.bias")  # the frozen layer is part of the function, not of δ
    for got, want in zip(_train(lin, lin_opt, x, y, 6), _train(model, opt, x, y, 6), strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def _first_update_matches(model: nn.Module, opt: torch.optim.Optimizer, inputs: tuple, loss) -> float:
    """max |δ₁ − (θ₁ − θ₀)| over parameters after one step of each model, relative to the update's size."""
    lin = tpl.linearize(model)
    lin_opt = lin.optimizer_like(opt)
    with torch.no_grad():
        assert float(loss(lin(*inputs))) == pytest.approx(float(loss(model(*inputs))), rel=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for m, o in ((model, opt), (lin, lin_opt)):
        o.zero_grad()
        loss(m(*inputs)).backward()
        o.step()
    size = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)
    assert size > 0
    return max(float((p.detach() - before[n] - lin.displacement(n).detach()).abs().max())
               for n, p in model.named_parameters() if n in before) / size


@pytest.mark.parametrize(("arch", "param", "rule", "config"), [
    ("mlp", "NTP", "sgd", {"depth": 2, "d_in": 4, "d_out": 2}),
    ("mlp", "muP", "adam", {"depth": 3, "d_in": 4, "d_out": 2}),
    ("resnet", "muP", "sgd", {}),
    ("transformer", "NTP", "sgd", {"n_layers": 1, "n_heads": 2, "vocab": 7, "seq_len": 4, "batch": 2}),
])
def test_first_step_of_the_linearization_is_the_models_first_step(arch, param, rule, config):
    """Same param groups (lr, abcd multipliers' lr_scale and grad_scale): the first displacement equals the
    model's first update to 1e-10, on every built-in family. (Adam's first step is ``lr·g/(|g|+ε)``: on the
    transformer, gradient entries near ε amplify the rounding of the two equal gradients to ~1e-9.)"""
    model, opt = tpl.instantiate(arch, width=32, param=param, optimizer=rule, lr=0.05, **config)
    inputs = tpl.architecture(arch).example_inputs(**config)
    target = torch.randn(model(*inputs).shape, generator=torch.Generator().manual_seed(1))
    assert _first_update_matches(model, opt, inputs, lambda out: ((out - target) ** 2).mean()) <= 1e-10


def test_tangent_is_the_finite_difference_of_the_model():
    model, _ = tpl.instantiate("mlp", width=48, param="muP", optimizer="sgd", depth=3, d_in=4, d_out=1)
    lin = tpl.linearize(model)
    x = torch.randn(5, 4)
    direction = [torch.randn_like(d) for d in lin.delta]
    h = 1e-5
    with torch.no_grad():
        for d, v in zip(lin.delta, direction, strict=True):
            d.copy_(v)
        tangent = lin(x) - model(x)  # J v
        params = dict(model.named_parameters())
        for name, v in zip(lin.names, direction, strict=True):
            params[name].add_(h * v)
        plus = model(x)
        for name, v in zip(lin.names, direction, strict=True):
            params[name].sub_(2 * h * v)
        minus = model(x)
    assert torch.allclose(tangent, (plus - minus) / (2 * h), rtol=1e-7, atol=1e-9)


def test_gpt2_from_a_config_with_tied_embeddings():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    target = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    err = _first_update_matches(model, opt, (ids,), lambda out: ((out.logits - target) ** 2).mean())
    assert err <= 1e-10


def test_bad_uses_are_named():
    with pytest.raises(TplimitsError, match="nn.Module"):
        tpl.linearize(lambda x: x)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(TplimitsError, match="no trainable parameter"):
        tpl.linearize(frozen)
    model, opt = tpl.instantiate("mlp", width=16, param="muP", optimizer="adam", weight_decay=0.1, d_in=3)
    lin = tpl.linearize(model)
    with pytest.raises(ConfigError, match="weight_decay"):
        lin.optimizer_like(opt)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="not trainable parameters of the linearized model"):
        lin.optimizer_like(other)
    with pytest.raises(TplimitsError, match="no trained parameter 'nope'"):
        lin.displacement("nope")
