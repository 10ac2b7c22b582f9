"""Built-in adaptive update rules: ``adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adamax``.

Each follows the corresponding ``torch.optim`` class step for step (same state, same formula), so a
:class:`~tplimits.optimizers.TplimitsOptimizer` with ``lr_scale = grad_scale = 1`` reproduces torch.
``adam`` has both epsilon forms: torch's ``m_hat / (sqrt(v_hat) + eps)`` (default) and, with
``eps_inside=True``, Eq. (Adam) of Tensor Programs IVb, ``m_hat / sqrt(v_hat + eps^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from tplimits.plugin import State, UpdateRule, bias_correction, eps_homogeneity, hookimpl, safe_divide


def adam_init(g: torch.Tensor) -> State:
    return {"exp_avg": torch.zeros_like(g), "exp_avg_sq": torch.zeros_like(g)}


def adam_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """Bias-corrected Adam: ``m_hat / (sqrt(v_hat) + eps)``, or ``m_hat / sqrt(v_hat + eps^2)`` with
    ``eps_inside``."""
    beta1, beta2 = hyper["betas"]
    eps = hyper["eps"]
    # In-place steps only on fresh results of ops whose backward does not read their output: the rule
    # stays pure and differentiable, with fewer parameter-sized temporaries (each costs a pass on CPU).
    m = torch.lerp(state["exp_avg"], g, 1 - beta1)
    v = (state["exp_avg_sq"] * beta2).addcmul_(g, g, value=1 - beta2)
    m_hat = m / bias_correction(beta1, t)
    if hyper["eps_inside"]:
        denom = (v / bias_correction(beta2, t)).add_(eps**2).sqrt_()
    else:
        denom = (v.sqrt() / math.sqrt(bias_correction(beta2, t))).add_(eps)
    return safe_divide(m_hat, denom), {"exp_avg": m, "exp_avg_sq": v}


def adam_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                          step: float, scratch: torch.Tensor) -> None:
    """:func:`adam_update`'s step ``p ← p − step · Q_t`` in place, the moments updated where they lie: with
    ``c = √(1 − β₂^(t+1))``, ``m̂ / (√v̂ + eps) = m · (c / (1 − β₁^(t+1))) / (√v + eps·c)`` and
    ``m̂ / √(v̂ + eps²) = m · (c / (1 − β₁^(t+1))) / √(v + eps²·c²)``; the denominator goes to ``scratch``."""
    beta1, beta2 = hyper["betas"]
    eps = hyper["eps"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    c = math.sqrt(bias_correction(beta2, t))
    scale = -step * c / bias_correction(beta1, t)
    if hyper["eps_inside"] and eps:
        p.addcmul_(m, torch.add(v, eps**2 * c**2, out=scratch).rsqrt_(), value=scale)
        return
    p.addcdiv_(m, _denominator(v, eps * c, scratch), value=scale)


def _denominator(v: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``√v + eps`` into ``out``; with ``eps = 0``, ``inf`` where ``v = 0``, so that a quotient by it is ``0`` there
    as :func:`~tplimits.optimizers.base.safe_divide` makes it."""
    denom = _sqrt(v, out)
    if eps:
        return denom.add_(eps)
    return denom.masked_fill_(denom == 0, math.inf)


def _sqrt(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``√v`` into ``out``. On CPU as ``1 / rsqrt(v)``: torch's CPU ``sqrt`` (through MKL's vector math) runs
    2–3× slower than ``rsqrt`` and a reciprocal together on the project's machine (docs/performance.md); the
    two differ by rounding."""
    if v.device.type == "cpu":
        return torch.rsqrt(v, out=out).reciprocal_()
    return torch.sqrt(v, out=out)


def rmsprop_init(g: torch.Tensor) -> State:
    return {"square_avg": torch.zeros_like(g)}


def rmsprop_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """``v = alpha v + (1 - alpha) g^2``, ``Q = g / (sqrt(v) + eps)`` (no bias correction)."""
    alpha = hyper["alpha"]
    v = torch.addcmul(state["square_avg"] * alpha, g, g, value=1 - alpha)
    return safe_divide(g, v.sqrt() + hyper["eps"]), {"square_avg": v}


def rmsprop_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                             step: float, scratch: torch.Tensor) -> None:
    """:func:`rmsprop_update`'s step in place: ``v`` updated where it lies, ``√v + eps`` into ``scratch``."""
    alpha = hyper["alpha"]
    v = state["square_avg"]
    v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    p.addcdiv_(g, _denominator(v, hyper["eps"], scratch), value=-step)


def adagrad_init(g: torch.Tensor) -> State:
    return {"sum": torch.zeros_like(g)}


def adagrad_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """``S = initial_accumulator_value + sum_s g_s^2``, ``Q = g / (sqrt(S) + eps) / (1 + t lr_decay)``."""
    previous = state["sum"] + hyper["initial_accumulator_value"] if t == 0 else state["sum"]
    total = torch.addcmul(previous, g, g)
    q = safe_divide(g, total.sqrt() + hyper["eps"]) / (1 + t * hyper["lr_decay"])
    return q, {"sum": total}


def adagrad_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                             step: float, scratch: torch.Tensor) -> None:
    """:func:`adagrad_update`'s step in place: the sum updated where it lies (``initial_accumulator_value``
    added at ``t = 0``, as the pure rule does), ``√S + eps`` into ``scratch``, ``1 / (1 + t·lr_decay)`` folded
    into the step."""
    total = state["sum"]
    if t == 0 and hyper["initial_accumulator_value"]:
        total.add_(hyper["initial_accumulator_value"])
    total.addcmul_(g, g)
    p.addcdiv_(g, _denominator(total, hyper["eps"], scratch), value=-step / (1 + t * hyper["lr_decay"]))


def adamax_init(g: torch.Tensor) -> State:
    return {"exp_avg": torch.zeros_like(g), "exp_inf": torch.zeros_like(g)}


def adamax_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """``u = max(beta2 u, |g| + eps)``, ``Q = m_hat / u``."""
    beta1, beta2 = hyper["betas"]
    m = torch.lerp(state["exp_avg"], g, 1 - beta1)
    u = torch.maximum(state["exp_inf"] * beta2, g.abs() + hyper["eps"])
    return safe_divide(m / bias_correction(beta1, t), u), {"exp_avg": m, "exp_inf": u}


def adamax_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                            step: float, scratch: torch.Tensor) -> None:
    """:func:`adamax_update`'s step in place: both states updated where they lie, ``|g| + eps`` in ``scratch``
    first, then (``eps = 0`` only) ``u`` with ``inf`` for ``0`` there, so that ``Q = 0`` where ``u = 0``."""
    beta1, beta2 = hyper["betas"]
    m, u = state["exp_avg"], state["exp_inf"]
    m.lerp_(g, 1 - beta1)
    torch.abs(g, out=scratch).add_(hyper["eps"])
    torch.maximum(u.mul_(beta2), scratch, out=u)
    denom = u
    if not hyper["eps"]:  # u > 0 wherever eps > 0 (a NaN stays NaN)
        denom = scratch.copy_(u).masked_fill_(u == 0, math.inf)
    p.addcdiv_(m, denom, value=-step / bias_correction(beta1, t))


_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "eps_inside": False}
_ADAM_DESCRIPTION = (
    "Adam, bias-corrected: m_hat / (sqrt(v_hat) + eps) as torch.optim.Adam, or m_hat / sqrt(v_hat + eps^2) "
    "(Eq. Adam of TP IVb) with eps_inside=True."
)

ADAM = UpdateRule(
    name="adam",
    init_state=adam_init,
    update=adam_update,
    defaults=_ADAM_DEFAULTS,
    memoryless=False,
    stationary=False,
    homogeneity=None,
    homogeneity_fn=eps_homogeneity("eps"),
    linear=False,
    description=_ADAM_DESCRIPTION,
    descend_in_place=adam_descend_in_place,
)

ADAMW = attrs.evolve(
    ADAM,
    name="adamw",
    option_defaults={"weight_decay": 1e-5},
    description=_ADAM_DESCRIPTION + " Decoupled weight decay lambda (Eq. 2.50), default 1e-5 = torch.optim.AdamW's "
    "lr * weight_decay at its defaults (1e-3 * 1e-2).",
)

RMSPROP = UpdateRule(
    name="rmsprop",
    init_state=rmsprop_init,
    update=rmsprop_update,
    defaults={"alpha": 0.99, "eps": 1e-8},
    memoryless=False,
    stationary=False,
    homogeneity=None,
    homogeneity_fn=eps_homogeneity("eps"),
    linear=False,
    description="RMSProp as torch.optim.RMSprop: v = alpha v + (1 - alpha) g^2, Q = g / (sqrt(v) + eps).",
    descend_in_place=rmsprop_descend_in_place,
)

ADAGRAD = UpdateRule(
    name="adagrad",
    init_state=adagrad_init,
    update=adagrad_update,
    defaults={"lr_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0},
    memoryless=False,
    stationary=False,
    homogeneity=None,
    homogeneity_fn=eps_homogeneity("eps", "initial_accumulator_value"),
    linear=False,
    description="Adagrad as torch.optim.Adagrad: S = S_0 + sum g^2, Q = g / (sqrt(S) + eps) / (1 + t lr_decay).",
    descend_in_place=adagrad_descend_in_place,
)

ADAMAX = UpdateRule(
    name="adamax",
    init_state=adamax_init,
    update=adamax_update,
    defaults={"betas": (0.9, 0.999), "eps": 1e-8},
    memoryless=False,
    stationary=False,
    homogeneity=None,
    homogeneity_fn=eps_homogeneity("eps"),
    linear=False,
    description="Adamax as torch.optim.Adamax: u = max(beta2 u, |g| + eps), Q = m_hat / u.",
    descend_in_place=adamax_descend_in_place,
)


@hookimpl
def tplimits_optimizers() -> list[UpdateRule]:
    return [ADAM, ADAMW, RMSPROP, ADAGRAD, ADAMAX]
