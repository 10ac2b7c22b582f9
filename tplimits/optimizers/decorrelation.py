"""Built-in non-gradient rule ``decorrelation`` for decorrelation matrices ``R`` (``n x n``, identity at
initialisation), as in the ``decorrelated-mlp`` architecture:

    R <- s (I - eta_R C) R,      C = E_batch[z z^T],  z = R x,      eta_R = lr * lr_scale / n,
    s = sqrt(E_batch ||z||^2 / E_batch ||z'||^2),     z' = (I - eta_R C) z,

where ``x`` is the batch of the layer's inputs and ``n = R.shape[0]``. ``C`` is the uncentred second
moment of the decorrelated outputs. The rate ``c / n`` (``c = lr * lr_scale``) keeps the
infinite-width limit nontrivial: ``C / n`` acts on a vector ``y`` as ``E_batch[z <z, y>]`` with the
width-normalised inner product ``<z, y> = z . y / n``, which has a width-independent effect.

As an :class:`~tplimits.optimizers.UpdateRule` the rule is plain SGD on the signal ``C R / n`` (what
the optimizer computes from ``R`` and ``x`` in place of a gradient: the batch average of the outer
products ``z (Rᵀz)ᵀ / n``), followed by ``rescale``, the factor ``s`` that keeps ``E_batch ||R x||^2``.
Written against a :class:`~tplimits.optimizers.base.MatrixAction`, the same two functions drive the
finite optimizer and the limit engines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tplimits.plugin import MatrixAction, State, UpdateRule, hookimpl


def decorrelation_signal(R: MatrixAction, x: torch.Tensor, hyper: Mapping[str, Any]) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``C R / n`` as the batch average of ``z (Rᵀ z)ᵀ / n`` with ``z = R x``: ``(z, Rᵀ z)``."""
    z = R(x)
    return z, R.transpose(z)


def _no_state(g: torch.Tensor) -> State:
    return {}


def _identity(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    return g, state


def _identity_descend(p: torch.Tensor, state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any],
                      step: float, scratch: torch.Tensor | None) -> None:
    """:func:`_identity`'s step in place, ``p ← p − step · g`` (SGD's single pass on the signal)."""
    p.add_(g, alpha=-step)


def keep_mean_square(z_old: torch.Tensor, z_new: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    """``s = sqrt(E ||R_old x||^2 / E ||R_new x||^2)`` from the layer outputs before and after the step."""
    return torch.sqrt(z_old.square().mean() / z_new.square().mean())


DECORRELATION = UpdateRule(
    name="decorrelation",
    init_state=_no_state,
    update=_identity,
    defaults={},
    memoryless=True,
    stationary=True,
    homogeneity=1.0,
    linear=True,
    needs_activations=True,
    signal=decorrelation_signal,
    rescale=keep_mean_square,
    description="R <- s (I - (c/n) C) R with C = E[z z^T], z = R x, s keeping E||R x||^2; driven by the "
    "layer inputs x (step(activations={R: x})), lr = c.",
    descend_in_place=_identity_descend,
    descend_scratch=False,
)


@hookimpl
def tplimits_optimizers() -> list[UpdateRule]:
    return [DECORRELATION]
