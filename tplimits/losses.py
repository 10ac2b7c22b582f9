"""Built-in losses ``mse`` and ``cross_entropy``, registered through the ``tplimits_losses`` hook.

A :class:`~tplimits.training.loss.Loss` maps the model's outputs on a batch and their targets to a
scalar (see :mod:`tplimits.training.loss`).

* ``mse``: ``torch.nn.functional.mse_loss`` with mean reduction, targets reshaped to the outputs;
* ``cross_entropy``: ``torch.nn.functional.cross_entropy`` with mean reduction over every position
  (outputs ``[..., classes]`` flattened to ``[-1, classes]``, integer targets flattened to ``[-1]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tplimits.plugin import Loss, TplimitsError, hookimpl


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() != outputs.numel():
        raise TplimitsError(f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                            f"{tuple(outputs.shape)}")
    return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


IGNORED = -100  # torch's ignore_index: such a label contributes nothing


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():
        raise TplimitsError("cross_entropy takes integer class labels as targets")
    classes, counted = outputs.shape[-1], targets[targets != IGNORED]
    if not counted.numel():
        raise TplimitsError(f"cross_entropy: every label of the batch is {IGNORED} (ignored); the loss has no term")
    if counted.min() < 0 or counted.max() >= classes:
        raise TplimitsError(f"cross_entropy: labels must be in [0, {classes - 1}] for {classes} outputs (or {IGNORED} "
                            f"to ignore a row); got labels from {int(counted.min())} to {int(counted.max())}")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


MSE = Loss("mse", mse, "torch.nn.functional.mse_loss, mean reduction")
CROSS_ENTROPY = Loss("cross_entropy", cross_entropy, "torch.nn.functional.cross_entropy, mean over positions")


@hookimpl
def tplimits_losses() -> list[Loss]:
    return [MSE, CROSS_ENTROPY]
