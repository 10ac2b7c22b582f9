"""Built-in update rules ``sgd`` and ``momentum`` (linear in the gradients).

* ``sgd``: ``Q_t = g_t`` (``torch.optim.SGD``).
* ``momentum``: heavy ball with torch's convention, ``b_0 = g_0``, ``b_t = mu b_{t-1} + (1 - dampening) g_t``;
  ``Q_t = b_t``, or ``Q_t = g_t + mu b_t`` with ``nesterov=True`` (``torch.optim.SGD(momentum=mu, ...)``).
  With ``dampening = 0`` this is ``Q_t = sum_s mu^(t-s) g_s``, the momentum of Tensor Programs IVb, Sec. 2.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tplimits.plugin import State, UpdateRule, hookimpl


def _no_state(g: torch.Tensor) -> State:
    return {}


def sgd_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """``Q_t = g_t``."""
    return g, state


def sgd_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                         step: float, scratch: torch.Tensor | None) -> None:
    """``p ← p − step · g`` in place."""
    p.add_(g, alpha=-step)


def momentum_init(g: torch.Tensor) -> State:
    return {"momentum_buffer": torch.zeros_like(g)}


def momentum_update(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    """Heavy-ball momentum (torch's convention: the buffer starts at ``g_0``)."""
    mu = hyper["momentum"]
    # torch.optim.SGD's ops (and the fast path's): `add` with alpha, on a fresh product (differentiable)
    buf = g.clone() if t == 0 else (state["momentum_buffer"] * mu).add_(g, alpha=1 - hyper["dampening"])
    q = torch.add(g, buf, alpha=mu) if hyper["nesterov"] else buf
    return q, {"momentum_buffer": buf}


def momentum_descend_in_place(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                              step: float, scratch: torch.Tensor | None) -> None:
    """:func:`momentum_update`'s step in place, the buffer updated where it lies (no scratch: ``Q`` is a sum of
    ``g`` and the buffer, added to ``p`` term by term)."""
    mu = hyper["momentum"]
    buf = state["momentum_buffer"]
    if t == 0:
        buf.copy_(g)
    else:
        buf.mul_(mu).add_(g, alpha=1 - hyper["dampening"])
    if hyper["nesterov"]:
        p.add_(g, alpha=-step)
        p.add_(buf, alpha=-step * mu)
    else:
        p.add_(buf, alpha=-step)


SGD = UpdateRule(
    name="sgd",
    init_state=_no_state,
    update=sgd_update,
    defaults={},
    memoryless=True,
    stationary=True,
    homogeneity=1.0,
    linear=True,
    description="Q_t = g_t (torch.optim.SGD).",
    descend_in_place=sgd_descend_in_place,
    descend_scratch=False,
)

MOMENTUM = UpdateRule(
    name="momentum",
    init_state=momentum_init,
    update=momentum_update,
    defaults={"momentum": 0.9, "dampening": 0.0, "nesterov": False},
    memoryless=False,
    stationary=False,
    homogeneity=1.0,
    linear=True,
    description="Heavy-ball momentum, torch.optim.SGD(momentum=mu, dampening, nesterov): "
    "b_t = mu b_{t-1} + (1 - dampening) g_t, b_0 = g_0; Q_t = b_t or g_t + mu b_t (Nesterov).",
    descend_in_place=momentum_descend_in_place,
)


@hookimpl
def tplimits_optimizers() -> list[UpdateRule]:
    return [SGD, MOMENTUM]
