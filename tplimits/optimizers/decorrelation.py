"""Built-in non-gradient rule ``decorrelation`` for decorrelation matrices ``R`` (``n x n``, identity at
initialisation), as in the ``decorrelated-mlp`` architecture:

    R <- s (I - eta_R C) R,      C = E_batch[z z^T],  z = R x,      eta_R = lr * lr_scale / n,
    s = sqrt(E_batch ||z||^2 / E_batch ||z'||^2),     z' = (I - eta_R C) z,

where ``x`` is the batch of the layer's inputs and ``n = R.shape[0]``. ``C`` is the uncentred second
moment of the decorrelated outputs. The rate ``c / n`` (``c = lr * lr_scale``) keeps the
infinite-width limit nontrivial: ``C / n`` acts on a vector ``y`` as ``E_batch[z <z, y>]`` with the
width-normalised inner product ``<z, y> = z . y / n``, which has a width-independent effect.

As an :class:`~tplimits.optimizers.UpdateRule` the rule is plain SGD on the signal ``C R / n`` (what
the optimizer computes from ``R`` and ``x`` in place of a gradient), followed by ``finalize``,
which rescales by ``s`` so that ``E_batch ||R x||^2`` is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tplimits.optimizers.base import State, UpdateRule
from tplimits.plugins.specs import hookimpl


def _flatten(R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if R.ndim != 2:
        raise ValueError(f"a decorrelation matrix must be 2-d, got shape {tuple(R.shape)}")
    if x.shape[-1] != R.shape[1]:
        raise ValueError(f"layer inputs of shape {tuple(x.shape)} do not match R of shape {tuple(R.shape)}")
    return x.reshape(-1, R.shape[1])


def mean_sq_norm(R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E_batch ||R x||^2`` over the rows of ``x`` (leading axes flattened)."""
    z = _flatten(R, x) @ R.T
    return z.square().sum(-1).mean()


def decorrelation_signal(R: torch.Tensor, x: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    """``C R / n`` with ``C = E_batch[z z^T]``, ``z = R x`` and ``n = R.shape[0]``."""
    z = _flatten(R, x) @ R.T
    C = z.T @ z / z.shape[0]
    return C @ R / R.shape[0]


def _no_state(g: torch.Tensor) -> State:
    return {}


def _identity(state: State, g: torch.Tensor, t: int, hyper: Mapping[str, Any]) -> tuple[torch.Tensor, State]:
    return g, state


def decorrelation_finalize(
    R_new: torch.Tensor, R_old: torch.Tensor, x: torch.Tensor | None, hyper: Mapping[str, Any]
) -> torch.Tensor:
    """``s R_new`` with ``s = sqrt(E ||R_old x||^2 / E ||R_new x||^2)``."""
    return R_new * torch.sqrt(mean_sq_norm(R_old, x) / mean_sq_norm(R_new, x))


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
    finalize=decorrelation_finalize,
    description="R <- s (I - (c/n) C) R with C = E[z z^T], z = R x, s keeping E||R x||^2; driven by the "
    "layer inputs x (step(activations={R: x})), lr = c.",
)


@hookimpl
def tplimits_optimizers() -> list[UpdateRule]:
    return [DECORRELATION]
