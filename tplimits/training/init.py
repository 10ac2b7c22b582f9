"""How a parameter starts, read once from a model: the one source for the finite instantiation and
the limit engines.

A parameter is initialized ``random`` (drawn again by the parametrization, Def 2.2.1 (b)), or
deterministically: ``constant`` (every entry equal: gains of 1, biases of 0), ``identity``
(``c·I``: decorrelation matrices) — both kept as the model has them (Remark 2.9.27) — or ``fixed``
(a tensor with no width axis, whose size does not change with width).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from tplimits.core.ir import ParameterInfo, Width, width_axes
from tplimits.training.parametrize import ABCD

KINDS = ("random", "constant", "identity", "fixed")


@attrs.frozen
class InitialValue:
    """``kind`` (one of :data:`KINDS`) and its ``value``: the constant, the factor of ``I``, or the fixed tensor.

    ``dtype`` is the tensor's own dtype when it is not floating point (token-type ids, index buffers,
    masks): such a tensor keeps it in the limit engines, which run everything else in their float dtype.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    value: Any = None
    dtype: torch.dtype | None = None

    def dtype_in(self, float_dtype: torch.dtype) -> torch.dtype:
        """The dtype this tensor has in an engine that computes in ``float_dtype``."""
        return float_dtype if self.dtype is None else self.dtype

    @property
    def redrawn(self) -> bool:
        """Whether the parametrization draws this parameter anew (random, and fixed-size random tensors)."""
        return self.kind in ("random", "fixed")


def initial_value(info: ParameterInfo, tensor: torch.Tensor) -> InitialValue:
    """How ``tensor`` (parameter ``info`` at any width) is initialized."""
    tensor = tensor.detach()
    dtype = None if tensor.is_floating_point() or tensor.is_complex() else tensor.dtype
    if tensor.numel() <= 1 or torch.all(tensor == tensor.flatten()[0]):
        return InitialValue("constant", float(tensor.flatten()[0]) if tensor.numel() else 0.0, dtype)
    if (info.kind == "matrix" and tensor.ndim == 2 and tensor.shape[0] == tensor.shape[1]
            and torch.equal(tensor, tensor[0, 0] * torch.eye(tensor.shape[0], dtype=tensor.dtype))):
        return InitialValue("identity", float(tensor[0, 0]))
    if not width_axes(info.layout):
        return InitialValue("fixed", tensor.clone(), dtype)
    return InitialValue("random")


def fan_in_constant(info: ParameterInfo) -> float:
    """1/√(number of entries summed against the input) at the width's ratio, excluding n itself."""
    if not info.fan_in_axes:
        return 1.0
    fan = 1.0
    for axis in info.fan_in_axes:
        spec = info.layout[axis]
        fan *= float(spec.ratio) if isinstance(spec, Width) else spec
    return 1.0 / math.sqrt(fan)


def init_std(info: ParameterInfo, abcd: ABCD, n: int) -> float:
    """The standard deviation ``C·b_const·n^{-b}`` a randomly initialized parameter is drawn with at width n."""
    return fan_in_constant(info) * abcd.b_const * float(n) ** float(-abcd.b)


def multiplier(abcd: ABCD, n: int) -> float:
    """The abcd multiplier ``a_const·n^{-a}`` between a trained tensor and the parameter the model uses."""
    return abcd.a_const * float(n) ** float(-abcd.a)
