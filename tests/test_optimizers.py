"""Optimizer plugins: update rules against torch.optim step for step, against hand-derived formulas
(Eq. Adam, Eq. SignSGD, Lion), abcd scalings (Remark 2.2.6), Eqs. 2.50 and 2.54, the registry, and the
non-gradient decorrelation rule."""

from __future__ import annotations

import copy
import importlib.metadata
import math
import pickle
import types

import pytest
import torch
from torch import nn

import tplimits
from tests.conftest import assert_close_tree
from tplimits import TplimitsOptimizer, UpdateRule, list_optimizers, make_optimizer, optimizer
from tplimits.errors import PluginError
from tplimits.optimizers import record_inputs

BUILTINS = ["sgd", "momentum", "signsgd", "lion", "adam", "adamw", "rmsprop", "adagrad", "adamax", "decorrelation"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)


def loss_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def run(make_opt, steps: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Parameters after each of ``steps`` full-batch steps of an MLP (fresh model from ``seed``)."""
    model = mlp(seed)
    opt = make_opt(model.parameters())
    x, y = data()
    trajectory = []
    for _ in range(steps):
        loss_step(model, opt, x, y)
        trajectory.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return trajectory


def gradient_sequence(steps: int = 3, shape=(4, 3), seed: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


LR = 0.05
WD = 0.1
TORCH_CASES = {
    "sgd": ("sgd", {}, lambda p: torch.optim.SGD(p, lr=LR)),
    "sgd-weight-decay": ("sgd", {"weight_decay": LR * WD}, lambda p: torch.optim.SGD(p, lr=LR, weight_decay=WD)),
    "momentum": ("momentum", {"momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)),
    "momentum-dampening": (
        "momentum",
        {"momentum": 0.8, "dampening": 0.3},
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.8, dampening=0.3),
    ),
    "nesterov": (
        "momentum",
        {"momentum": 0.9, "nesterov": True},
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True),
    ),
    "adam": ("adam", {}, lambda p: torch.optim.Adam(p, lr=LR)),
    "adam-betas-eps": (
        "adam",
        {"betas": (0.8, 0.95), "eps": 1e-3},
        lambda p: torch.optim.Adam(p, lr=LR, betas=(0.8, 0.95), eps=1e-3),
    ),
    "adamw": ("adamw", {"weight_decay": LR * WD}, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD)),
    "rmsprop": ("rmsprop", {}, lambda p: torch.optim.RMSprop(p, lr=LR)),
    "rmsprop-alpha": (
        "rmsprop",
        {"alpha": 0.9, "eps": 1e-4},
        lambda p: torch.optim.RMSprop(p, lr=LR, alpha=0.9, eps=1e-4),
    ),
    "adagrad": ("adagrad", {}, lambda p: torch.optim.Adagrad(p, lr=LR)),
    "adagrad-decay-init": (
        "adagrad",
        {"lr_decay": 0.1, "initial_accumulator_value": 0.2},
        lambda p: torch.optim.Adagrad(p, lr=LR, lr_decay=0.1, initial_accumulator_value=0.2),
    ),
    "adamax": ("adamax", {}, lambda p: torch.optim.Adamax(p, lr=LR)),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_step_for_step(case):
    name, options, torch_opt = TORCH_CASES[case]
    ours = run(lambda p: make_optimizer(name, p, lr=LR, **options))
    ref = run(torch_opt)
    assert not torch.equal(ref[-1]["0.weight"], mlp()[0].weight.detach())
    for got, want in zip(ours, ref, strict=True):
        assert_close_tree(got, want, rtol=1e-12)


def test_adamw_defaults_match_torch_defaults():
    ours = run(lambda p: make_optimizer("adamw", p, lr=1e-3))
    ref = run(lambda p: torch.optim.AdamW(p, lr=1e-3))
    for got, want in zip(ours, ref, strict=True):
        assert_close_tree(got, want, rtol=1e-12)
    assert optimizer("adamw").option_defaults["weight_decay"] == 1e-3 * 1e-2


def test_paper_adam_closed_form():
    """Eq. (Adam) of Tensor Programs IVb, eps inside the square root, written out as sums."""
    beta1, beta2, eps = 0.8, 0.9, 0.3
    gs = [torch.tensor([1.0, -2.0, 0.0, 0.5]), torch.tensor([0.5, 1.0, 0.0, -0.5]), torch.tensor([-1.0, 3.0, 0.0, 0.1])]
    rule = optimizer("adam")
    hyper = {"betas": (beta1, beta2), "eps": eps, "eps_inside": True}
    for t in range(3):
        m = sum((1 - beta1) * beta1 ** (t - s) * gs[s] for s in range(t + 1)) / (1 - beta1 ** (t + 1))
        v = sum((1 - beta2) * beta2 ** (t - s) * gs[s] ** 2 for s in range(t + 1)) / (1 - beta2 ** (t + 1))
        want = m / torch.sqrt(v + eps**2)
        assert_close_tree(rule.Q(gs[: t + 1], hyper), want, rtol=1e-14)
    w = nn.Parameter(torch.zeros(4))
    opt = make_optimizer("adam", [w], lr=0.1, **hyper)
    for g in gs:
        w.grad = g.clone()
        opt.step()
    want = -0.1 * sum(rule.Q(gs[: t + 1], hyper) for t in range(3))
    assert_close_tree(w.detach(), want, rtol=1e-14)
    torch_form = rule.Q(gs, {"betas": (beta1, beta2), "eps": eps})
    assert (torch_form - rule.Q(gs, hyper)).abs().max() > 1e-3


def test_signsgd_by_hand():
    g = torch.tensor([3.0, -4.0, 0.0, 1e-9, 1e200])
    eps = 1e-8
    want = torch.tensor(
        [3 / math.sqrt(9 + eps**2), -4 / math.sqrt(16 + eps**2), 0.0, 1e-9 / math.sqrt(1e-18 + 1e-16), 1.0]
    )
    rule = optimizer("signsgd")
    assert_close_tree(rule.Q([g], {"eps": eps}), want, rtol=1e-14)
    assert torch.equal(rule.Q([g], {"eps": 0.0}), torch.tensor([1.0, -1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(rule.Q([torch.ones(5), g], {"eps": 0.0}), rule.Q([g], {"eps": 0.0}))


def test_lion_by_hand():
    """beta1 = 0.9, beta2 = 0.99, m_0 = 0:
    t=0: c = 0.1 g0 -> sign(g0) = [1, -1, 1];  m1 = 0.01 g0 = [0.01, -0.01, 0.02]
    t=1: c = 0.9 m1 + 0.1 g1 = [0.004, 0.041, 0.008] -> [1, 1, 1];  m2 = 0.99 m1 + 0.01 g1 = [0.0094, -0.0049, 0.0188]
    t=2: c = 0.9 m2 + 0.1 g2 = [-0.00154, -0.00241, -0.00308] -> [-1, -1, -1];  m3 = [0.008306, -0.004651, 0.016612]
    """
    gs = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-0.05, 0.5, -0.1]), torch.tensor([-0.1, 0.02, -0.2])]
    rule = optimizer("lion")
    assert rule.defaults["betas"] == (0.9, 0.99)
    expected_q = [[1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]
    for t in range(3):
        assert torch.equal(rule.Q(gs[: t + 1]), torch.tensor(expected_q[t]))
    w = nn.Parameter(torch.zeros(3))
    opt = make_optimizer("lion", [w], lr=0.1)
    for g in gs:
        w.grad = g.clone()
        opt.step()
    assert_close_tree(w.detach(), torch.tensor([-0.1, 0.1, -0.1]), rtol=1e-15)
    assert_close_tree(opt.state[w]["q_state"]["exp_avg"], torch.tensor([0.008306, -0.004651, 0.016612]), rtol=1e-12)


@pytest.mark.parametrize("eps_inside", [False, True])
def test_remark_2_2_6_adam_eps_and_grad_scale(eps_inside):
    s, eps = 100.0, 1e-2
    scaled = run(lambda p: make_optimizer("adam", p, lr=LR, grad_scale=s, eps=eps, eps_inside=eps_inside))
    moved_eps = run(lambda p: make_optimizer("adam", p, lr=LR, eps=eps / s, eps_inside=eps_inside))
    unscaled = run(lambda p: make_optimizer("adam", p, lr=LR, eps=eps, eps_inside=eps_inside))
    for got, want in zip(scaled, moved_eps, strict=True):
        assert_close_tree(got, want, rtol=1e-12)
    assert (scaled[-1]["0.weight"] - unscaled[-1]["0.weight"]).abs().max() > 1e-4


def test_remark_2_2_6_scale_invariance_without_eps():
    assert optimizer("adam").homogeneity_for({"eps": 0.0}) == 0
    assert optimizer("adam").homogeneity_for() is None
    scaled = run(lambda p: make_optimizer("adam", p, lr=LR, grad_scale=1e3, eps=0.0))
    plain = run(lambda p: make_optimizer("adam", p, lr=LR, eps=0.0))
    for got, want in zip(scaled, plain, strict=True):
        assert_close_tree(got, want, rtol=1e-12)


def _first_update(grad_scale: float = 1.0, rule: str = "sgd", **options) -> dict[str, torch.Tensor]:
    model = mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(rule, model.parameters(), lr=LR, grad_scale=grad_scale, **options)
    loss_step(model, opt, *data())
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}


def test_sgd_update_is_linear_in_grad_scale_and_lr_scale():
    base = _first_update()
    assert_close_tree(_first_update(grad_scale=7.0), {k: 7.0 * v for k, v in base.items()}, rtol=1e-13)
    assert_close_tree(_first_update(lr_scale=0.25), {k: 0.25 * v for k, v in base.items()}, rtol=1e-13)
    adam = _first_update(rule="adam")
    assert_close_tree(_first_update(rule="adam", lr_scale=0.25), {k: 0.25 * v for k, v in adam.items()}, rtol=1e-13)


def _homogeneity_cases():
    cases = [(name, {}) for name in BUILTINS]
    cases += [("signsgd", {"eps": 0.0}), ("adam", {"eps": 0.0}), ("adam", {"eps": 0.0, "eps_inside": True}),
              ("rmsprop", {"eps": 0.0}), ("adagrad", {"eps": 0.0}), ("adamax", {"eps": 0.0})]
    return cases


@pytest.mark.parametrize(("name", "hyper"), _homogeneity_cases())
def test_homogeneity_flag_matches_numerics(name, hyper):
    rule = optimizer(name)
    gs = gradient_sequence()
    k = rule.homogeneity_for(hyper)
    if k is not None:
        for s in (1e-3, 10.0):
            assert_close_tree(rule.Q([s * g for g in gs], hyper), s**k * rule.Q(gs, hyper), rtol=1e-12)
    else:
        s = 1e-12
        q_scaled, q = rule.Q([s * g for g in gs], hyper), rule.Q(gs, hyper)
        for degree in (0, 1):
            assert ((q_scaled - s**degree * q).abs().max() / (s**degree * q).abs().max()) > 1e-3


FLAGS = {  # memoryless, stationary, linear
    "sgd": (True, True, True),
    "momentum": (False, False, True),
    "signsgd": (True, True, False),
    "lion": (False, False, False),
    "adam": (False, False, False),
    "adamw": (False, False, False),
    "rmsprop": (False, False, False),
    "adagrad": (False, False, False),
    "adamax": (False, False, False),
    "decorrelation": (True, True, True),
}


@pytest.mark.parametrize("name", BUILTINS)
def test_flags_match_definitions(name):
    rule = optimizer(name)
    assert (rule.memoryless, rule.stationary, rule.linear) == FLAGS[name]
    gs, hs = gradient_sequence(seed=3), gradient_sequence(seed=4)
    last = rule.Q(gs)
    memoryless = torch.allclose(rule.Q([*hs[:-1], gs[-1]]), last, rtol=1e-12, atol=0)
    stationary = memoryless and torch.allclose(rule.Q(gs[-1:]), last, rtol=1e-12, atol=0)
    linear = torch.allclose(
        rule.Q([2 * g - 3 * h for g, h in zip(gs, hs, strict=True)]), 2 * last - 3 * rule.Q(hs), rtol=1e-12, atol=1e-14
    )
    assert (memoryless, stationary, linear) == FLAGS[name]


def test_decoupled_weight_decay_eq_2_50():
    """w_1 = (1 - lambda) w_0 - eta lr_scale g_0: lambda is multiplied by neither lr nor lr_scale."""
    model = mlp()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer("sgd", model.parameters(), lr=LR, lr_scale=0.5, weight_decay=0.2)
    loss_step(model, opt, *data())
    want = {k: 0.8 * w0[k] - LR * 0.5 * p.grad for k, p in model.named_parameters()}
    assert_close_tree(dict(model.named_parameters()), want, rtol=1e-14)


def test_normalization_eq_2_54():
    for lr_scale in (1.0, 0.1):
        update = _first_update(rule="adam", normalize=True, lr_scale=lr_scale)
        for delta in update.values():
            assert math.isclose(torch.linalg.vector_norm(delta).item(), LR * lr_scale, rel_tol=1e-12)


def test_clipping_eq_2_54():
    """nu = min(||Q||, theta): below the threshold the update is normalized, above it divided by theta."""
    q = torch.tensor([[3.0, 4.0]])
    for theta, want_q in ((10.0, q / 5.0), (2.0, q / 2.0)):
        w = nn.Parameter(torch.zeros(1, 2))
        w.grad = q.clone()
        make_optimizer("sgd", [w], lr=LR, lr_scale=0.5, clip=theta).step()
        assert_close_tree(w.detach(), -LR * 0.5 * want_q, rtol=1e-15)
    w = nn.Parameter(torch.ones(1, 2))
    w.grad = torch.zeros(1, 2)
    make_optimizer("sgd", [w], lr=LR, normalize=True).step()
    assert torch.equal(w.detach(), torch.ones(1, 2))


def test_param_groups_carry_their_own_scales():
    model = mlp()
    groups = [{"params": model[0].parameters(), "lr_scale": 0.5, "grad_scale": 4.0},
              {"params": [*model[2].parameters(), *model[4].parameters()]}]
    opt = make_optimizer("sgd", groups, lr=LR)
    before = model[0].weight.detach().clone()
    loss_step(model, opt, *data())
    assert_close_tree(model[0].weight.detach() - before, -LR * 0.5 * 4.0 * model[0].weight.grad, rtol=1e-13)
    assert opt.param_groups[1]["lr_scale"] == 1.0


def test_closure_zero_grad_and_none_grads():
    model, (x, y) = mlp(), data()
    opt = make_optimizer("adam", model.parameters(), lr=LR)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0
    ref = run(lambda p: make_optimizer("adam", p, lr=LR), steps=1)[0]
    assert_close_tree(dict(model.named_parameters()), ref, rtol=1e-14)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    frozen = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    assert_close_tree(dict(model.named_parameters()), frozen, rtol=0)
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_state_dict_round_trip_continues_identically():
    x, y = data()
    model = mlp()
    opt = make_optimizer("adam", model.parameters(), lr=LR, betas=(0.8, 0.9))
    for _ in range(3):
        loss_step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
    assert saved_opt["rule"] == "adam"
    for _ in range(3):
        loss_step(model, opt, x, y)

    resumed = mlp(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = make_optimizer("adam", resumed.parameters(), lr=1.0)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == LR and resumed_opt.param_groups[0]["betas"] == (0.8, 0.9)
    for _ in range(3):
        loss_step(resumed, resumed_opt, x, y)
    assert_close_tree(dict(resumed.named_parameters()), dict(model.named_parameters()), rtol=0)
    with pytest.raises(PluginError, match="'adam'.*'sgd'"):
        make_optimizer("sgd", mlp().parameters(), lr=LR).load_state_dict(saved_opt)


def test_deepcopy_trains_identically_and_independently():
    x, y = data()
    model = mlp()
    opt = make_optimizer("momentum", model.parameters(), lr=LR)
    loss_step(model, opt, x, y)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.rule is opt.rule and opt2.param_groups[0]["params"][0] is model2[0].weight
    for _ in range(2):
        loss_step(model, opt, x, y)
        loss_step(model2, opt2, x, y)
    assert_close_tree(dict(model2.named_parameters()), dict(model.named_parameters()), rtol=0)
    assert opt2.state[model2[0].weight]["step"] == 3
    model3, opt3 = pickle.loads(pickle.dumps((model, make_optimizer("adam", model.parameters(), lr=LR))))
    assert opt3.rule.homogeneity_for({"eps": 0.0}) == 0 and opt3.param_groups[0]["params"][0] is model3[0].weight


def test_bad_options_are_rejected():
    params = mlp().parameters()
    with pytest.raises(TypeError, match="beta.*hyperparameters: \\['betas', 'eps', 'eps_inside'\\]"):
        make_optimizer("adam", params, lr=LR, beta=(0.9, 0.9))
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer("sgd", mlp().parameters(), lr=LR, weight_decay=2.0)
    with pytest.raises(ValueError, match="grad_scale"):
        make_optimizer("sgd", mlp().parameters(), lr=LR, grad_scale=0.0)
    with pytest.raises(ValueError, match="activations"):
        make_optimizer("sgd", mlp().parameters(), lr=LR).step(activations={})


def test_registry_lists_builtins_from_entry_points():
    assert set(BUILTINS) <= set(list_optimizers())
    assert tplimits.list_optimizers() == list_optimizers()
    modules = {ep.value for ep in importlib.metadata.entry_points(group="tplimits")}
    for name in BUILTINS:
        assert optimizer(name).__class__ is UpdateRule
        assert optimizer(name).update.__module__ in modules
    with pytest.raises(PluginError, match=r"'nadam'.*known: \['adagrad', 'adam'"):
        optimizer("nadam")
    with pytest.raises(PluginError, match="nadam"):
        make_optimizer("nadam", mlp().parameters(), lr=LR)


def _third_party_plugin() -> types.ModuleType:
    def init_state(g):
        return {"previous": torch.zeros_like(g)}

    def update(state, g, t, hyper):
        return g + hyper["rho"] * state["previous"], {"previous": g}

    rule = UpdateRule(name="lookback", init_state=init_state, update=update, defaults={"rho": 0.5},
                      memoryless=False, stationary=False, homogeneity=1.0, linear=True,
                      description="Q_t = g_t + rho g_{t-1}")
    plugin = types.ModuleType("lookback_plugin")
    plugin.tplimits_optimizers = tplimits.hookimpl(lambda: [rule])
    return plugin


def test_third_party_rule_registers_and_drives_an_optimizer():
    plugin = _third_party_plugin()
    assert "lookback" not in list_optimizers()
    tplimits.register_plugin(plugin, name="lookback-plugin")
    try:
        assert "lookback" in tplimits.list_optimizers()
        w = nn.Parameter(torch.zeros(2))
        opt = make_optimizer("lookback", [w], lr=1.0, rho=0.25)
        for g in (torch.tensor([1.0, 2.0]), torch.tensor([4.0, -4.0])):
            w.grad = g
            opt.step()
        assert torch.equal(w.detach(), -torch.tensor([1.0 + 4.0 + 0.25, 2.0 - 4.0 + 0.5]))
    finally:
        tplimits.unregister_plugin(plugin)
    assert "lookback" not in list_optimizers()


def test_later_registration_overrides_a_builtin():
    doubled = UpdateRule(name="sgd", init_state=lambda g: {}, update=lambda s, g, t, h: (2 * g, s), defaults={},
                         memoryless=True, stationary=True, homogeneity=1.0, linear=True)
    plugin = types.ModuleType("override_sgd")
    plugin.tplimits_optimizers = tplimits.hookimpl(lambda: [doubled])
    tplimits.register_plugin(plugin, name="override-sgd")
    try:
        assert optimizer("sgd") is doubled
    finally:
        tplimits.unregister_plugin(plugin)
    assert optimizer("sgd") is not doubled


def test_malformed_rules_are_rejected():
    with pytest.raises(PluginError, match="clash"):
        UpdateRule(name="bad", init_state=dict, update=None, defaults={"lr": 1.0}, memoryless=True,
                   stationary=True, homogeneity=1.0, linear=True)
    with pytest.raises(PluginError, match="stationary requires memoryless"):
        UpdateRule(name="bad", init_state=dict, update=None, defaults={}, memoryless=False,
                   stationary=True, homogeneity=1.0, linear=True)


def _decorrelation_step_by_hand(R: torch.Tensor, x: torch.Tensor, c: float) -> torch.Tensor:
    n, batch = R.shape[0], x.shape[0]
    zs = [R @ x[b] for b in range(batch)]
    C = sum(torch.outer(z, z) for z in zs) / batch
    R_unscaled = (torch.eye(n) - (c / n) * C) @ R
    before = sum(float(z @ z) for z in zs) / batch
    after = sum(float((R_unscaled @ x[b]) @ (R_unscaled @ x[b])) for b in range(batch)) / batch
    return math.sqrt(before / after) * R_unscaled


def test_decorrelation_by_hand():
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    R0 = torch.eye(3) + torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, -0.2], [0.05, 0.0, 0.0]])
    R = nn.Parameter(R0.clone())
    opt = make_optimizer("decorrelation", [R], lr=0.6)
    R.grad = torch.ones(3, 3)
    opt.step(activations={R: x})
    want = _decorrelation_step_by_hand(R0, x, 0.6)
    assert_close_tree(R.detach(), want, rtol=1e-13)
    mean_sq = lambda M: (x @ M.T).square().sum(-1).mean()
    assert math.isclose(mean_sq(R.detach()), mean_sq(R0), rel_tol=1e-13)
    opt.step(activations={R: x})
    assert_close_tree(R.detach(), _decorrelation_step_by_hand(want, x, 0.6), rtol=1e-13)
    opt.step(activations={})
    assert opt.state[R]["step"] == 2


def test_decorrelation_rate_scales_as_c_over_n():
    """Duplicating every input coordinate k times (width k n) gives exactly the duplicated trajectory of
    z = R x: the effect of a step does not depend on width because the rate is c / n."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen) @ torch.randn(4, 4, generator=gen)
    outputs = {}
    for k in (1, 2, 4):
        x = base.repeat_interleave(k, dim=1)
        R = nn.Parameter(torch.eye(4 * k))
        opt = make_optimizer("decorrelation", [R], lr=0.5)
        for _ in range(3):
            opt.step(activations={R: x})
        outputs[k] = (x @ R.detach().T)[:, ::k]
    assert_close_tree(outputs[2], outputs[1], rtol=1e-12)
    assert_close_tree(outputs[4], outputs[1], rtol=1e-12)
    assert not torch.allclose(outputs[1], base)


def test_decorrelation_decorrelates_and_keeps_norm():
    gen = torch.Generator().manual_seed(1)
    n = 64
    shared = torch.randn(256, 1, generator=gen)
    x = shared * torch.randn(1, n, generator=gen) + 0.5 * torch.randn(256, n, generator=gen)

    def off_diagonal(M):
        z = x @ M.T
        C = z.T @ z / len(z)
        return (C - torch.diag(torch.diag(C))).square().sum().sqrt() / C.diagonal().sum()

    R = nn.Parameter(torch.eye(n))
    opt = make_optimizer("decorrelation", [R], lr=0.5)
    start = off_diagonal(torch.eye(n))
    for _ in range(20):
        opt.step(activations={R: x})
    assert off_diagonal(R.detach()) < 0.5 * start
    assert math.isclose((x @ R.detach().T).square().sum(-1).mean(), x.square().sum(-1).mean(), rel_tol=1e-12)


def test_decorrelation_needs_activations_of_its_own_params():
    R = nn.Parameter(torch.eye(3))
    opt = make_optimizer("decorrelation", [R], lr=0.1)
    with pytest.raises(ValueError, match="activations=\\{param: x\\}"):
        opt.step()
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        opt.step(activations={torch.eye(3): torch.ones(2, 3)})


def test_decorrelated_mlp_with_recorded_inputs():
    model = tplimits.architecture("decorrelated-mlp").build(16, depth=3)
    layers = [layer for layer in model.layers if hasattr(layer, "decorrelation")]
    decorrelation = [layer.decorrelation for layer in layers]
    weights = [p for p in model.parameters() if all(p is not R for R in decorrelation)]
    adam = make_optimizer("adam", weights, lr=1e-2)
    decor = make_optimizer("decorrelation", decorrelation, lr=0.5)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 1, generator=gen)
    for _ in range(2):
        adam.zero_grad()
        with record_inputs({layer.decorrelation: layer for layer in layers}) as inputs:
            nn.functional.mse_loss(model(x), y).backward()
        before = {R: (inputs[R] @ R.detach().T).square().sum(-1).mean() for R in decorrelation}
        adam.step()
        decor.step(activations=inputs)
        for R in decorrelation:
            after = (inputs[R] @ R.detach().T).square().sum(-1).mean()
            assert math.isclose(after, before[R], rel_tol=1e-12)
    assert set(inputs) == set(decorrelation)
    assert all(not torch.equal(R.detach(), torch.eye(16)) for R in decorrelation)
    assert all(layer._forward_pre_hooks == {} for layer in layers)


def test_optimizer_is_a_torch_optimizer():
    opt = make_optimizer("adam", mlp().parameters(), lr=LR)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, TplimitsOptimizer)
    assert repr(opt).startswith("TplimitsOptimizer[adam] (")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == LR / 2


def test_adamw_applies_its_own_weight_decay_unless_told_otherwise():
    """``optimizer="adamw"`` without ``weight_decay`` decays at the rule's default (1e-5, torch.optim.AdamW's
    lr·weight_decay at its defaults); an explicit value, 0 included, wins; other rules default to 0."""
    model, opt = tplimits.instantiate("mlp", width=16, optimizer="adamw", lr=1e-3)
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-5}
    _, opt = tplimits.instantiate("mlp", width=16, optimizer="adamw", lr=1e-3, weight_decay=0.0)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}
    _, opt = tplimits.instantiate("mlp", width=16, optimizer="adam", lr=1e-3)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}
    assert tplimits.derive("mlp", optimizer="adamw").weight_decay == 1e-5
    assert tplimits.derive("mlp", optimizer="adamw", weight_decay=0.01).weight_decay == 0.01
    # the decay is applied: one step with zero gradient shrinks every weight by 1 - 1e-5
    model, opt = tplimits.instantiate("mlp", width=16, optimizer="adamw", lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - 1e-5), rtol=1e-12, atol=0)
