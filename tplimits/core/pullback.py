"""Pullbacks: the functions of the backward Nonlin instructions (:mod:`tplimits.core.backprop`), and the value
of a per-coordinate pullback formed only when something reads it.

A scalar argument ``x`` (no width axis) of a function whose output ``y`` is a vector has one pullback value per
coordinate of ``y``'s width axis, ``[W, *x.shape]``; backpropagation averages them (an Avg over axis 0). Formed
one by one, they cost one forward-mode pass of the function per entry of ``x``: ``O(x.numel()·size(y))``. Their
sum over the rows is one ordinary vector-Jacobian product of the whole cotangent, ``O(size(y))``, which is all
the Avg needs; the interpreters therefore hold the values as a :class:`PerCoordinateValue` and form them only
for a reader that wants them (a value-by-value comparison, a coordinate check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from tplimits.core.ir import fn_name
from tplimits.errors import StaleValueError


@attrs.frozen
class Pullback:
    """The cotangent of one tensor argument of a forward function.

    Called with the forward function's flattened arguments followed by the output cotangent.
    ``per_coordinate``: the argument is a scalar (no width axis) and the output a vector; the
    result then keeps one entry per coordinate along the output's width axis, moved to the
    front (``[width, *argument shape]``), to be averaged by an Avg.
    ``deferred`` (per-coordinate pullbacks only): the interpreters leave the values to be formed when
    read and take the Avg over them as one vector-Jacobian product (:class:`PerCoordinateValue`); ``False``
    forms them as the instruction runs, by forward mode, and averages them as any value
    (:func:`tplimits.core.backprop.eager_pullbacks`: the path before, to compare against).
    """

    fn: Callable
    spec: Any  # treespec of (args, kwargs)
    leaf: int
    per_coordinate: bool = False
    out_width_axis: int | None = None
    deferred: bool = True

    @property
    def __name__(self) -> str:
        return f"∂{fn_name(self.fn)}/∂arg{self.leaf}" + ("[per coordinate]" if self.per_coordinate else "")

    def _call(self, leaves: Sequence[Any], x: torch.Tensor) -> torch.Tensor:
        leaves = list(leaves)
        leaves[self.leaf] = x
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)

    def __call__(self, *values: Any) -> torch.Tensor:
        *leaves, dy = values
        if not self.per_coordinate:
            return self.vjp(leaves, dy)
        # not deferred: the path before, exactly (forward mode whatever the sizes), to compare against
        return self.per_coordinate_values(leaves, dy, "auto" if self.deferred else "forward")

    def vjp(self, leaves: Sequence[Any], dy: torch.Tensor) -> torch.Tensor:
        """The ordinary vector-Jacobian product ``dyᵀ ∂y/∂x`` (for a per-coordinate pullback: the sum of its
        values over the rows)."""
        _, vjp = torch.func.vjp(lambda t: self._call(leaves, t), leaves[self.leaf])
        (dx,) = vjp(dy)
        return dx

    def rows(self, dy: torch.Tensor) -> int:
        """The coordinates of the output's width axis: the rows of the per-coordinate values."""
        return dy.shape[self.out_width_axis]

    def per_coordinate_values(self, leaves: Sequence[Any], dy: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        """``[W, *x.shape]``: row ``w`` is ``Σ dy ∂y/∂x`` over the entries of ``y`` at coordinate ``w`` of its
        width axis. ``mode``: ``"forward"`` (one forward-mode pass per entry of ``x``), ``"reverse"`` (one
        reverse pass per row), ``"auto"`` the one with fewer passes; they agree to rounding."""
        x = leaves[self.leaf]
        if mode == "auto":
            mode = "reverse" if self.rows(dy) < x.numel() else "forward"
        if mode == "reverse":
            return self._by_rows(leaves, dy)
        # J[..., k] = ∂y/∂x_k by forward mode, contracted with dy over every axis but the output's width axis
        basis = torch.eye(x.numel(), dtype=x.dtype, device=x.device).view(x.numel(), *x.shape)

        def column(tangent: torch.Tensor) -> torch.Tensor:
            _, jy = torch.func.jvp(lambda t: self._call(leaves, t), (x,), (tangent,))
            prod = (dy * jy).movedim(self.out_width_axis, 0)
            return prod.reshape(prod.shape[0], -1).sum(-1)

        per = torch.func.vmap(column)(basis)  # [numel(x), width]
        return per.transpose(0, 1).reshape(per.shape[1], *x.shape)

    def _by_rows(self, leaves: Sequence[Any], dy: torch.Tensor) -> torch.Tensor:
        """The per-coordinate values by reverse mode: one vector-Jacobian product per row, of the cotangent
        kept at that row alone (``[W, *y.shape]`` cotangents, vmapped)."""
        _, vjp = torch.func.vjp(lambda t: self._call(leaves, t), leaves[self.leaf])
        rows = self.rows(dy)
        shape = [1] * dy.dim()
        shape[self.out_width_axis] = rows

        def row(one_hot: torch.Tensor) -> torch.Tensor:
            (dx,) = vjp(dy * one_hot.view(shape))
            return dx

        return torch.func.vmap(row)(torch.eye(rows, dtype=dy.dtype, device=dy.device))


class PerCoordinateValue:
    """The values of a per-coordinate :class:`Pullback` on its arguments, ``[W, *x.shape]``, formed when read.

    The Avg reading them takes :meth:`row_sum` (one vector-Jacobian product); :meth:`resolve` forms the values
    themselves, once, for any other reader. The arguments are the tensors the instruction ran on (the
    interpreter passes copies of the caller's: parameters, inputs); one of them changed in place since would
    give values of another state, so reading them then raises :class:`~tplimits.errors.StaleValueError`.
    """

    def __init__(self, name: str, pull: Pullback, values: Sequence[Any], differentiable: bool = True) -> None:
        self.name, self.pull = name, pull
        self.values = tuple(values)
        self.differentiable = differentiable  # False: the model cuts gradients here, so do the values
        self._formed: torch.Tensor | None = None
        try:
            self._versions = [(t, t._version) for t in self.values if torch.is_tensor(t)]
        except RuntimeError:  # an inference tensor keeps no version counter: no later change could be seen
            self._versions = []
            self.resolve()

    @property
    def rows(self) -> int:
        return self.pull.rows(self.values[-1])

    def row_sum(self, axis: int = 0, keepdim: bool = False) -> torch.Tensor:
        """The values summed along ``axis``: along the rows (0), one vector-Jacobian product of the whole
        cotangent; along another axis, of the values formed."""
        if axis != 0 or self._formed is not None:
            return self.resolve().sum(dim=axis, keepdim=keepdim)
        self._check_fresh()
        total = self.pull.vjp(self.values[:-1], self.values[-1])
        total = total if self.differentiable else total.detach()
        return total.unsqueeze(0) if keepdim else total

    def resolve(self) -> torch.Tensor:
        """The per-coordinate values (formed on the first read, then kept)."""
        if self._formed is None:
            self._check_fresh()
            formed = self.pull.per_coordinate_values(self.values[:-1], self.values[-1])
            self._formed = formed if self.differentiable else formed.detach()
        return self._formed

    def _check_fresh(self) -> None:
        changed = [i for i, (t, version) in enumerate(self._versions) if t._version != version]
        if changed:
            raise StaleValueError(
                f"%{self.name} ({self.pull.__name__}) is formed when read, from the values the program ran it on, "
                f"and {len(changed)} of them changed in place since: read it before changing the program's values, "
                "or run the program again", value=self.name)

    def __repr__(self) -> str:
        state = "formed" if self._formed is not None else "not formed"
        return f"PerCoordinateValue(%{self.name}, {self.pull.__name__}, {state})"


def materialized(value: Any) -> Any:
    """``value`` as a tensor where it is a :class:`PerCoordinateValue` (formed now), else as it is."""
    return value.resolve() if isinstance(value, PerCoordinateValue) else value


def deferrable(fn: Callable) -> bool:
    """Whether a Nonlin's ``fn`` is a per-coordinate pullback whose values are formed only when read."""
    return isinstance(fn, Pullback) and fn.per_coordinate and fn.deferred
