"""Built-in sign-like update rules ``signsgd`` and ``lion`` (scale invariant, Remark 2.2.6).

* ``signsgd``: ``Q_t = g_t / sqrt(g_t^2 + eps^2)`` (Eq. SignSGD), ``sign(g_t)`` when ``eps = 0``.
* ``lion`` (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
  ``c_t = beta1 m_t + (1 - beta1) g_t``, ``Q_t = sign(c_t)``, ``m_{t+1} = beta2 m_t + (1 - beta2) g_t``, ``m_0 = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tplimits.plugin import State, UpdateRule, eps_homogeneity, hookimpl


def _no_state(g: torch.Tensor) -> State:
    return {}


def signsgd_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """``g / sqrt(g^2 + eps^2)``, computed as ``g / hypot(g, eps)`` (no overflow of ``g^2``)."""
    eps = hyper["eps"]
    if eps == 0:
        return torch.sign(g), state
    return g / torch.hypot(g, torch.tensor(eps, dtype=g.dtype, device=g.device)), state


def signsgd_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                             step: float, scratch: torch.Tensor) -> None:
    """:func:`signsgd_update`'s step in place: ``sign(g)`` or ``hypot(g, eps)`` into ``scratch``."""
    eps = hyper["eps"]
    if eps == 0:
        p.add_(torch.sign(g, out=scratch), alpha=-step)
    else:
        p.addcdiv_(g, torch.hypot(g, g.new_tensor(eps), out=scratch), value=-step)


def lion_init(g: torch.Tensor) -> State:
    return {"exp_avg": torch.zeros_like(g)}


def lion_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """Lion: the sign of an interpolation between the momentum and the gradient."""
    beta1, beta2 = hyper["betas"]
    m = state["exp_avg"]
    # `(m·β).add_(g, alpha=1 − β)`, the fast path's very ops: a sign of a sum near 0 must not differ between the
    # two by rounding (an `add` with alpha may fuse its product); in place on fresh products only (differentiable)
    q = torch.sign((m * beta1).add_(g, alpha=1 - beta1))
    return q, {"exp_avg": (m * beta2).add_(g, alpha=1 - beta2)}


def lion_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                          step: float, scratch: torch.Tensor) -> None:
    """:func:`lion_update`'s step in place: the interpolation into ``scratch`` by the pure rule's ops, then the
    momentum where it lies."""
    beta1, beta2 = hyper["betas"]
    m = state["exp_avg"]
    interpolation = torch.mul(m, beta1, out=scratch).add_(g, alpha=1 - beta1)
    m.mul_(beta2).add_(g, alpha=1 - beta2)
    p.add_(interpolation.sign_(), alpha=-step)


SIGNSGD = UpdateRule(
    name="signsgd",
    init_state=_no_state,
    update=signsgd_update,
    defaults={"eps": 1e-8},
    memoryless=True,
    stationary=True,
    homogeneity=None,
    homogeneity_fn=eps_homogeneity("eps"),
    linear=False,
    description="Q_t = g_t / sqrt(g_t^2 + eps^2) (Eq. SignSGD); sign(g_t) with eps = 0.",
    descend_in_place=signsgd_descend_in_place,
)

LION = UpdateRule(
    name="lion",
    init_state=lion_init,
    update=lion_update,
    defaults={"betas": (0.9, 0.99)},
    memoryless=False,
    stationary=False,
    homogeneity=0.0,
    linear=False,
    description="Lion (Chen et al. 2023): Q_t = sign(beta1 m + (1 - beta1) g), m <- beta2 m + (1 - beta2) g.",
    descend_in_place=lion_descend_in_place,
)


@hookimpl
def tplimits_optimizers() -> list[UpdateRule]:
    return [SIGNSGD, LION]
