"""The typed plugin API (tplimits.plugin): answers checked at registration by plugin name, a clear error
when the built-ins are missing, parametrization families, callable losses, and non-gradient rules that
one definition drives at finite width and in the limit."""

from __future__ import annotations

import types

import pluggy
import pytest
import torch

import tplimits as tpl
from tests.test_limit_convergence import GPT2Logits
from tplimits import plugin
from tplimits.registry import manager
from tplimits.registry.specs import PROJECT, TplimitsSpec
from tplimits.training.model import parametrized_program


def _plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, answer in hooks.items():
        setattr(module, hook, plugin.hookimpl(lambda answer=answer: answer))
    return module


@pytest.mark.parametrize("hook, answer, expected", [
    ("tplimits_architectures", "mlp", "expected a list of Architecture"),
    ("tplimits_architectures", [object()], "expected Architecture"),
    ("tplimits_optimizers", {"sgd": 1}, "expected a list of UpdateRule"),
    ("tplimits_lowering_rules", {torch.ops.aten.relu: "not a rule"}, "not a callable rule"),
    ("tplimits_lowering_rules", [1, 2], "expected a mapping"),
    ("tplimits_parametrizations", [1.0], "expected Parametrization or ParametrizationFamily"),
    ("tplimits_losses", [lambda out, y: out], "expected Loss"),
])
def test_malformed_answers_are_refused_by_plugin_name(hook, answer, expected):
    bad = _plugin("broken", **{hook: answer})
    with pytest.raises(tpl.PluginError, match=f"plugin 'broken-plugin': its {hook} hook.*{expected}"):
        tpl.register_plugin(bad, name="broken-plugin")
    assert "broken-plugin" not in dict(tpl.plugin_manager().list_name_plugin())
    tpl.lower("mlp", depth=1)  # the registry is intact


def test_missing_builtins_say_why(monkeypatch):
    empty = pluggy.PluginManager(PROJECT)
    empty.add_hookspecs(TplimitsSpec)
    monkeypatch.setattr(manager, "plugin_manager", lambda: empty)
    with pytest.raises(tpl.PluginError, match="entry-point group 'tplimits'.*pip install -e"):
        tpl.lower(lambda w: torch.nn.Linear(3, w), example_inputs=(torch.randn(2, 3),))
    with pytest.raises(tpl.PluginError, match="no architecture is registered at all"):
        tpl.architecture("mlp")


def test_a_plugin_adds_a_parametrization_family():
    def scaled(suffix: str) -> tpl.Parametrization:
        return plugin.Parametrization(f"muPx{suffix}", dict(tpl.parametrization("muP").roles), a_out=1,
                                      a_out_const=float(suffix), attention_power=-1)

    family = plugin.ParametrizationFamily("muPx", scaled, "μP with an output multiplier")
    registered = _plugin("families", tplimits_parametrizations=[family])
    tpl.register_plugin(registered, name="families")
    try:
        p = tpl.parametrization("muPx0.5")
        assert p.name == "muPx0.5" and p.a_out_const == 0.5
        assert tpl.classify("mlp", param="muPx0.5", optimizer="sgd").regime == "feature learning"
        assert tpl.parametrization("UP_0.3").roles["hidden"].a == pytest.approx(0.3)  # the built-in family
    finally:
        tpl.unregister_plugin(registered)
    with pytest.raises(tpl.PluginError, match="no parametrization named 'muPx0.5'"):
        tpl.parametrization("muPx0.5")


def test_a_plain_callable_is_a_loss():
    limit = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=2)
    X, y = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.ones(3, 1)

    def half_mse(out, target):
        return 0.5 * torch.nn.functional.mse_loss(out, target)

    a = limit.train(X, y, steps=2, lr=0.5, loss=half_mse, particles=2**8, batches=2, progress=False)
    b = limit.train(X, y, steps=2, lr=0.25, loss="mse", particles=2**8, batches=2, progress=False)
    torch.testing.assert_close(a.outputs, b.outputs)  # ½·mse at lr 0.5 is mse at lr 0.25
    with pytest.raises(tpl.PluginError, match="loss must be a registered name, a Loss or a callable"):
        limit.train(X, y, steps=1, loss=3, particles=2**8, progress=False)


def _hebbian_signal(R, x, hyper):
    """Q = (R x) xᵀ / n averaged over the batch: a non-gradient rule that is not decorrelation."""
    return R(x), x


HEBBIAN = plugin.UpdateRule(name="hebbian-decay", init_state=lambda g: {}, update=lambda s, g, t, h: (g, s),
                            defaults={}, memoryless=True, stationary=True, homogeneity=1.0, linear=True,
                            needs_activations=True, signal=_hebbian_signal)


def test_a_third_party_non_gradient_rule_trains_at_finite_width_and_in_the_limit():
    """One definition (signal on a MatrixAction) drives the finite optimizer and the limit engine, and the
    limit it gives is the limit of the finite models it drives (expected values from training)."""
    registered = _plugin("hebbian", tplimits_optimizers=[HEBBIAN])
    tpl.register_plugin(registered, name="hebbian")
    try:
        rules = {"*.decorrelation": "hebbian-decay"}
        model, opt = tpl.instantiate("decorrelated-mlp", width=16, param="muP", optimizer="sgd", lr=0.3,
                                     depth=2, d_in=4, update_rules=rules)
        R = model.model.layers[1].decorrelation
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
        inputs = {}
        handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
        R0 = R.detach().clone()
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        handle.remove()
        z = inputs["x"] @ R0.T
        torch.testing.assert_close(R.detach(), R0 - 0.3 * z.T @ inputs["x"] / (5 * 16), rtol=1e-10, atol=1e-12)
        limit = tpl.derive("decorrelated-mlp", optimizer="sgd", depth=2, d_in=4, update_rules=rules)
        X = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
        y = torch.randn(4, 1, generator=torch.Generator().manual_seed(2))
        report = limit.check(X, y, widths=[64, 256, 1024, 4096], seeds=8, steps=4, lr=0.5, particles=2**15,
                             progress=False)
        assert report.passed, report.format()
    finally:
        tpl.unregister_plugin(registered)


def test_a_nonlinear_non_gradient_rule_is_refused_by_the_limit_by_name():
    sign_rule = plugin.UpdateRule(name="sign-hebbian", init_state=lambda g: {},
                                  update=lambda s, g, t, h: (torch.sign(g), s), defaults={}, memoryless=True,
                                  stationary=True, homogeneity=0.0, linear=False, needs_activations=True,
                                  signal=_hebbian_signal)
    limit = tpl.derive("decorrelated-mlp", optimizer="sgd", depth=2, d_in=4,
                       update_rules={"*.decorrelation": sign_rule})
    X, y = torch.randn(3, 4), torch.randn(3, 1)
    with pytest.raises(tpl.TplimitsError, match="'layers.1.decorrelation'.*'sign-hebbian'.*not linear"):
        limit.train(X, y, steps=1, lr=0.1, particles=2**8, progress=False)


def test_mup_sets_the_attention_scale_a_model_passes_to_sdpa():
    """HF GPT-2 passes sdpa its default 1/√d_head itself; μP sets it in the finite model and in the program
    alike, so the instantiated model is the program the limit runs (replayed exactly)."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    fam = tpl.api.family(GPT2Logits, example_inputs=(ids,))
    with pytest.warns(UserWarning, match="given or not"):
        model, _ = tpl.instantiate(fam, width=64, param="muP", optimizer="sgd", lr=0.1)
    program = parametrized_program(fam.program, tpl.parametrization("muP"))
    replayed = program.replay(model.model, ids)
    torch.testing.assert_close(replayed, model(ids), rtol=1e-10, atol=1e-12)
    plain = tpl.api.family(GPT2Logits, example_inputs=(ids,)).model(64, seed=0)
    assert not torch.allclose(model.model(ids) * model.output_scale, plain(ids))


def test_watch_names_its_arguments():
    R = torch.nn.Parameter(torch.eye(3))
    w = torch.nn.Parameter(torch.zeros(3))
    opt = tpl.make_optimizer("sgd", [{"params": [w]}, {"params": [R], "rule": tpl.optimizer("decorrelation")}],
                             lr=0.1)
    with pytest.raises(tpl.ConfigError, match="module must be an nn.Module, got str"):
        opt.watch(R, "layer")
    with pytest.raises(tpl.ConfigError, match="param is not a parameter of this optimizer's groups driven by"):
        opt.watch(w, torch.nn.Linear(3, 3))
    layer = torch.nn.Linear(3, 3)
    opt.watch(R, layer)
    with pytest.raises(ValueError, match="has not run since the last step"):
        opt.step()
    layer(torch.randn(4, 3))
    opt.step()
    assert not torch.equal(R.detach(), torch.eye(3))
