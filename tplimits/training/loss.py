"""Losses: a named function of a batch's outputs and targets, and the error signal it induces.

The limit engines and the finite-width check use the same :class:`Loss`: the limit takes the error
signal ``χ = ∂loss/∂f`` of its deterministic outputs, the finite loop calls ``loss.backward()``. The
built-ins (``mse``, ``cross_entropy``) are a plugin (:mod:`tplimits.losses`); a plain callable
``fn(outputs, targets)`` is accepted wherever a loss is (:func:`as_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch


@attrs.frozen
class Loss:
    """A named loss ``fn(outputs, targets) -> scalar`` (mean over the batch it is given)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: str = ""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)

    def error_signal(self, outputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``χ = ∂loss(outputs[rows], targets[rows]) / ∂outputs`` (zero on every other row)."""
        with torch.enable_grad():
            f = outputs.detach().requires_grad_(True)
            (chi,) = torch.autograd.grad(self.fn(f[rows], targets[rows]), f)
        return chi


def as_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str | None = None) -> Loss:
    """A plain ``fn(outputs, targets) -> scalar`` (mean over the batch it is given) as a :class:`Loss`."""
    return fn if isinstance(fn, Loss) else Loss(name or getattr(fn, "__name__", "loss"), fn)
