"""Built-in losses ``mse`` and ``cross_entropy``, registered through the ``tplimits_losses`` hook.

A :class:`Loss` maps the model's outputs on a batch and their targets to a scalar. The limit
engine and the finite-width check both use the same function: the limit takes the error signal
``χ = ∂loss/∂f`` of its deterministic outputs, the finite loop calls ``loss.backward()``.

* ``mse``: ``torch.nn.functional.mse_loss`` with mean reduction, targets reshaped to the outputs;
* ``cross_entropy``: ``torch.nn.functional.cross_entropy`` with mean reduction over every position
  (outputs ``[..., classes]`` flattened to ``[-1, classes]``, integer targets flattened to ``[-1]``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F

from tplimits.errors import TplimitsError
from tplimits.plugins.specs import hookimpl


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


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() != outputs.numel():
        raise TplimitsError(f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                            f"{tuple(outputs.shape)}")
    return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():
        raise TplimitsError("cross_entropy takes integer class labels as targets")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


MSE = Loss("mse", mse, "torch.nn.functional.mse_loss, mean reduction")
CROSS_ENTROPY = Loss("cross_entropy", cross_entropy, "torch.nn.functional.cross_entropy, mean over positions")


@hookimpl
def tplimits_losses() -> list[Loss]:
    return [MSE, CROSS_ENTROPY]
