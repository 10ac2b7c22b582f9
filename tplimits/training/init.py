"""How a parameter starts, read once from a model: the one source for the finite instantiation and
the limit engines.

A parameter is initialized ``random`` (drawn again by the parametrization, Def 2.2.1 (b)), or
deterministically: ``constant`` (every entry equal: gains of 1, biases of 0), ``identity``
(``c·I``: decorrelation matrices) — both kept as the model has them (Remark 2.9.27) — ``fixed``
(a tensor with no width axis, whose size does not change with width), or ``coordinate`` (a buffer
whose coordinates are a deterministic function f(u) of their relative position u = i/m along the
width axis of size m, the same function at every width: RoPE's ``inv_freq = base^(-2i/d_head)`` is
``f(u) = base^-u``). Its limit ket is ``f(U)`` with U ~ Uniform(0, 1) drawn once per particle,
independent of everything else: the coordinates of a wide model are f on a grid that fills [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from tplimits.core.ir import ParameterInfo, Width, width_axes
from tplimits.training.parametrize import ABCD

KINDS = ("random", "constant", "identity", "fixed", "coordinate")


@attrs.frozen
class InitialValue:
    """``kind`` (one of :data:`KINDS`) and its ``value``: the constant, the factor of ``I``, the fixed tensor,
    or the :class:`CoordinateLaw`.

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


@attrs.frozen
class CoordinateLaw:
    """Coordinates ``f(u) = link(alpha + beta·u)`` of their relative position ``u = i/m`` along width axis
    ``axis``: ``family`` ``"affine"`` (link = identity) or ``"geometric"`` (link = ``sign·exp``).
    ``alpha``, ``beta`` and ``sign`` have the tensor's fixed axes (the width axis removed)."""

    family: str
    axis: int
    alpha: torch.Tensor = attrs.field(eq=False)
    beta: torch.Tensor = attrs.field(eq=False)
    sign: torch.Tensor = attrs.field(eq=False)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """The tensor whose coordinates along the width axis sit at relative positions ``u``."""
        linear = self.alpha.to(u.dtype)[..., None] + self.beta.to(u.dtype)[..., None] * u
        values = linear if self.family == "affine" else self.sign.to(u.dtype)[..., None] * linear.exp()
        return values.movedim(-1, self.axis)

    def sample(self, size: int, generator: torch.Generator, dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
        """``f(U)`` for ``size`` iid U ~ Uniform(0, 1) (one per particle)."""
        u = torch.rand(size, generator=generator, dtype=torch.float64, device=generator.device)
        return self(u).to(device=device, dtype=dtype)

    def describe(self) -> str:
        a, b, sign = (t.flatten()[0].item() for t in (self.alpha, self.beta, self.sign))
        law = f"{a:.6g} + {b:.6g}·u" if self.family == "affine" else f"{sign * math.exp(a):.6g}·{math.exp(b):.6g}^u"
        more = " (first row)" if self.alpha.numel() > 1 else ""
        return f"{self.family}: f(u) = {law}{more}, u = i/m along axis {self.axis}"


def coordinate_law(info: ParameterInfo, tensors: Sequence[torch.Tensor]) -> CoordinateLaw | None:
    """The law ``f(i/m)`` that ``tensors`` (one buffer at several widths) all follow, or None.

    The law is fitted at the widest and checked at every width, to a few hundred ulps of the buffer's
    dtype (HF computes ``inv_freq`` in float32): a size like ``arange(m)`` is affine at each width but with
    a slope that grows with width, and is no law.
    """
    axes = width_axes(info.layout)
    if len(axes) != 1 or len(tensors) < 2 or not all(t.is_floating_point() for t in tensors):
        return None
    axis = axes[0]
    widest = max(tensors, key=lambda t: t.shape[axis]).detach()
    for family in ("affine", "geometric"):
        law = _fit(family, widest, axis)
        if law is not None and all(_follows(law, t.detach(), axis) for t in tensors):
            return law
    return None


def _fit(family: str, tensor: torch.Tensor, axis: int) -> CoordinateLaw | None:
    x = tensor.movedim(axis, -1).to(torch.float64)
    sign = torch.ones(x.shape[:-1], dtype=torch.float64)
    if family == "geometric":
        sign = x[..., :1].sign().squeeze(-1)
        if not bool((x * sign[..., None] > 0).all()):
            return None
        x = (x * sign[..., None]).log()
    u = torch.arange(x.shape[-1], dtype=torch.float64) / x.shape[-1]
    du = u - u.mean()
    beta = (x * du).sum(-1) / du.square().sum()  # least squares in u
    alpha = x.mean(-1) - beta * u.mean()
    return CoordinateLaw(family, axis, alpha, beta, sign)


def _follows(law: CoordinateLaw, tensor: torch.Tensor, axis: int) -> bool:
    m = tensor.shape[axis]
    predicted = law(torch.arange(m, dtype=torch.float64) / m)
    actual = tensor.to(torch.float64)
    tolerance = 256 * torch.finfo(tensor.dtype).eps
    scale = actual.abs() if law.family == "geometric" else actual.abs().amax()
    return predicted.shape == actual.shape and bool(((predicted - actual).abs() <= tolerance * scale).all())


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
