"""The in-place fast paths of update rules (``UpdateRule.descend_in_place``) against the pure rule they
stand in for, and the copy grids' transposed application against the plain product.

The reference is always the pure ``update`` run through :func:`apply_rule` on copies (or, for the grids,
``grid @ copies``): the fast path must agree with it to rounding, on every tile, along either axis,
with weight decay, a gradient scale, ``eps = 0`` (zero denominators) and ``eps`` inside the root.
"""

from __future__ import annotations

import attrs
import pytest
import torch

import tplimits as tpl
from tplimits import TplimitsOptimizer, list_optimizers
from tplimits.limit.kets import PairGrids
from tplimits.optimizers.base import GROUP_OPTIONS, apply_rule, apply_rule_in_place

FAST = sorted(name for name in list_optimizers() if tpl.optimizer(name).descend_in_place is not None)

CASES = [
    ("sgd", {}, {}),
    ("sgd", {}, {"weight_decay": 0.1}),
    ("adam", {}, {}),
    ("adam", {"betas": (0.8, 0.95), "eps": 1e-3}, {"weight_decay": 0.05}),
    ("adam", {"eps": 0.0}, {}),
    ("adam", {"eps_inside": True, "eps": 0.1}, {}),
    ("adam", {"eps_inside": True, "eps": 0.0}, {}),
    ("adamw", {}, {}),
    ("momentum", {}, {}),
    ("momentum", {"momentum": 0.7, "dampening": 0.2}, {"weight_decay": 0.05}),
    ("momentum", {"nesterov": True}, {}),
    ("signsgd", {}, {}),
    ("signsgd", {"eps": 0.5}, {"weight_decay": 0.05}),
    ("signsgd", {"eps": 0.0}, {}),
    ("lion", {}, {}),
    ("lion", {"betas": (0.5, 0.8)}, {"weight_decay": 0.05}),
    ("rmsprop", {}, {}),
    ("rmsprop", {"alpha": 0.5, "eps": 1e-2}, {"weight_decay": 0.05}),
    ("rmsprop", {"eps": 0.0}, {}),
    ("adagrad", {}, {}),
    ("adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-3}, {"weight_decay": 0.05}),
    ("adagrad", {"eps": 0.0}, {}),
    ("adamax", {}, {}),
    ("adamax", {"betas": (0.8, 0.95), "eps": 1e-2}, {"weight_decay": 0.05}),
    ("adamax", {"eps": 0.0}, {}),
    ("decorrelation", {}, {}),
]
"""Every fast path with its defaults, other hyperparameters with weight decay, and ``eps = 0`` (zero
denominators) where a rule has an eps."""

GRADIENT_RULES = ["sgd", "momentum", "signsgd", "lion", "adam", "adamw", "rmsprop", "adagrad", "adamax"]


def test_the_cases_cover_every_fast_path():
    assert {*GRADIENT_RULES, "decorrelation"} <= set(FAST)
    assert set(FAST) <= {name for name, _, _ in CASES}


def _gradients(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gaussian gradients with a block of exact zeros (zero moments: the ``eps = 0`` denominators)."""
    gen = torch.Generator().manual_seed(seed)
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    for g in gs:
        g[..., :3] = 0
    return gs


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("name", "hyper", "options"), CASES)
def test_fast_path_equals_the_pure_rule(name, hyper, options, axis):
    _compare_paths(tpl.optimizer(name), hyper, options, axis)


def _wrong_momentum(p, state, g, t, hyper, step, scratch):
    """Momentum's fast path with dampening applied at t = 0 too (torch applies none there)."""
    buf = state["momentum_buffer"]
    buf.mul_(hyper["momentum"]).add_(g, alpha=1 - hyper["dampening"])
    p.add_(buf, alpha=-step)


def _wrong_adam(p, state, g, t, hyper, step, scratch):
    """Adam's fast path without the bias correction of the first moment."""
    beta1, beta2 = hyper["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = torch.sqrt(v / (1 - beta2 ** (t + 1)), out=scratch).add_(hyper["eps"])
    p.addcdiv_(m, denom, value=-step)


def _wrong_lion(p, state, g, t, hyper, step, scratch):
    """Lion's fast path with the momentum updated before the sign is taken."""
    beta1, beta2 = hyper["betas"]
    m = state["exp_avg"]
    m.mul_(beta2).add_(g, alpha=1 - beta2)
    p.add_(torch.mul(m, beta1, out=scratch).add_(g, alpha=1 - beta1).sign_(), alpha=-step)


@pytest.mark.parametrize(("name", "hyper", "wrong"), [
    ("momentum", {"dampening": 0.3}, _wrong_momentum),
    ("adam", {}, _wrong_adam),
    ("lion", {}, _wrong_lion),
])
def test_a_broken_fast_path_fails_the_comparison(name, hyper, wrong):
    """The comparison can fail: a fast path with a plausible mistake is caught."""
    broken = attrs.evolve(tpl.optimizer(name), descend_in_place=wrong)
    with pytest.raises(AssertionError):
        _compare_paths(broken, hyper, {}, axis=1)


def _compare_paths(rule, hyper, options, axis):
    """``rule``'s fast path through :func:`apply_rule_in_place` (tiles of 2 rows along ``axis``) against its pure
    ``update`` through :func:`apply_rule`, 6 steps: parameters and states to 1e-13."""
    h = rule.hyper(hyper)
    group = {**GROUP_OPTIONS, **rule.option_defaults, "lr": 0.03, **options}
    shape = (3, 9, 7)  # tiles of 2 rows along `axis`, the last one short; axis 1: strided tiles
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pure, fast = p0.clone(), p0.clone()
    pure_state, fast_state = {}, {}
    for g in _gradients(shape, steps=6):
        pure, pure_state = apply_rule(rule, pure, g, pure_state, group, h)
        fast_state = apply_rule_in_place(rule, fast, lambda rows, g=g: g.movedim(axis, 0)[rows].movedim(0, axis),
                                         fast_state, group, h, axis=axis, tile=2 * p0.numel() // shape[axis])
        assert fast_state is not None
    assert not torch.equal(pure, p0)
    torch.testing.assert_close(fast, pure, rtol=1e-13, atol=1e-15)
    assert fast_state["step"] == pure_state["step"] == 6
    for key, value in pure_state["q_state"].items():
        torch.testing.assert_close(fast_state["q_state"][key], value, rtol=1e-13, atol=1e-15)
    assert torch.isfinite(fast).all()


def test_optimizer_with_a_gradient_scale_matches_the_pure_rule_over_several_tiles():
    """A parameter of 2^18 + 6 entries (two CPU tiles) and grad_scale 3: each scaled tile goes through a
    reused buffer, and SGD's single pass takes the parameter whole."""
    gen = torch.Generator().manual_seed(3)
    for name in GRADIENT_RULES:
        rule = tpl.optimizer(name)
        param = torch.nn.Parameter(torch.randn(2**9 + 3, 2**9 + 1, generator=gen, dtype=torch.float64))
        reference = param.detach().clone()
        opt = TplimitsOptimizer([param], rule, lr=0.01, grad_scale=3.0, weight_decay=0.02)
        group, state = opt.param_groups[0], {}
        for _ in range(3):
            param.grad = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            opt.step()
            reference, state = apply_rule(rule, reference, param.grad * 3.0, state, group, rule.hyper())
        torch.testing.assert_close(param.detach(), reference, rtol=1e-13, atol=1e-15)


def test_nonfinite_gradients_propagate_in_both_paths():
    """A NaN gradient gives a NaN parameter (as torch.optim.Adam), in the pure rule and its fast path alike:
    safe_divide zeroes only zero denominators."""
    rule = tpl.optimizer("adam")
    group = {**GROUP_OPTIONS, "lr": 0.1}
    g = torch.tensor([float("nan"), 1.0, 0.0], dtype=torch.float64)
    for eps in (1e-8, 0.0):
        h = rule.hyper({"eps": eps})
        pure, _ = apply_rule(rule, torch.zeros(3, dtype=torch.float64), g, {}, group, h)
        fast = torch.zeros(3, dtype=torch.float64)
        apply_rule_in_place(rule, fast, g.__getitem__, {}, group, h)
        for out in (pure, fast):
            assert out[0].isnan() and out[1] == pytest.approx(-0.1) and out[2] == 0


@pytest.mark.parametrize("forward", [True, False])
def test_copy_grids_apply_as_the_plain_product(forward):
    gen = torch.Generator().manual_seed(4)
    P_out, P_in, copies = 40, 24, 8
    pairs = PairGrids(2, P_out, P_in, copies, torch.float64, torch.device("cpu"))
    pairs.forward.normal_(generator=gen)
    pairs.transposed.normal_(generator=gen)
    x = torch.randn(2, P_in if forward else P_out, 5, generator=gen, dtype=torch.float64)
    if forward:
        want = torch.einsum("fic,fck->fik", pairs.forward, x[:, :copies]) * (P_in / copies)
    else:
        want = torch.einsum("fcj,fck->fjk", pairs.transposed, x[:, :copies]) * (P_out / copies)
    got = pairs.apply(x, forward)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_copy_grid_gradient_tiles_through_a_buffer_equal_the_fresh_product():
    gen = torch.Generator().manual_seed(5)
    pairs = PairGrids(1, 30, 20, 6, torch.float64, torch.device("cpu"))
    out_factor = torch.randn(1, 30, 4, generator=gen, dtype=torch.float64)
    in_factor = torch.randn(1, 20, 4, generator=gen, dtype=torch.float64)
    buffer = out_factor.new_empty(0)
    for which, rows in (("forward", slice(0, 11)), ("forward", slice(11, 30)), ("transposed", slice(2, 5))):
        want = pairs.gradient(which, out_factor, in_factor, rows)
        got = pairs.gradient(which, out_factor, in_factor, rows, buffer=buffer)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        full = out_factor[0] @ in_factor[0].T  # the dense gradient; the grids hold its copy columns / rows
        expected = full[rows, :6] if which == "forward" else full[:6][rows]
        torch.testing.assert_close(got[0], expected, rtol=1e-14, atol=1e-14)
