"""Building blocks for lowering rules, shared by the built-in rules and open to plugins.

The three questions every rule answers are: does the op act coordinate by coordinate along the
width axis (then it is a :class:`~tplimits.core.program.Nonlin` of the op itself), does it reduce
over the width axis (then an :class:`~tplimits.core.program.Avg`), or does it contract the width
axis of a vector with an initial matrix (a :class:`~tplimits.core.program.MatMul`)?
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from tplimits.core.ir import Layout, Width, WidthPower, fn_name, format_layout
from tplimits.core.lower import LoweringContext, MatrixValue, OpNode, Value, is_tensor_value
from tplimits.core.lower import common_block as common_block  # re-exported for the shape and conv rules

AFFINE = ("affine", None)
"""``Nonlin.gaussian`` of a function jointly affine in its tensor arguments (views, sums, bias adds)."""
MULTILINEAR = ("multilinear", None)
"""``Nonlin.gaussian`` of a function linear in each tensor argument separately (products, contractions)."""

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# Small callables that instructions store (named, so printouts read well)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Pick:
    """``fn(*args, **kwargs)[index]``: one output of a multi-output op."""

    fn: Callable
    index: int

    @property
    def __name__(self) -> str:
        return f"{fn_name(self.fn)}[{self.index}]"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)[self.index]


def contract(equation: str, operands: list[torch.Tensor]) -> torch.Tensor:
    """``torch.einsum`` with a contiguous result, like the matmul-type ops it stands for (so that a
    later ``view`` in the model's own code works on it)."""
    return torch.einsum(equation, operands).contiguous()


def identity(node: OpNode) -> Any:
    """The node's first argument, unchanged (dropout in the program, no-op copies)."""
    return node.args[0]


def stop_gradient(ctx: LoweringContext, value: Any) -> Any:
    """``value`` with backpropagation cut (``.detach()``, a grad-disabled region's output): the identity,
    declared not differentiable. Folded constants and non-tensors need no cut."""
    if isinstance(value, MatrixValue):
        ctx.unsupported("cutting the gradient of a weight matrix (a detached weight used in a product)")
    if not isinstance(value, Value) or value.const is not None:
        return value
    return ctx.nonlin(aten.alias.default, value, layout=value.layout, hint=f"{value.name}_detached",
                      differentiable=False, gaussian=AFFINE)


def tensor_args(node: OpNode) -> list[Any]:
    return [a for a in torch.utils._pytree.tree_leaves((node.args, dict(node.kwargs))) if is_tensor_value(a)]


def rule_table(names: Sequence[str], rule: Callable) -> dict:
    """``{aten.<name>: rule}`` for every name this torch build has (op sets differ across versions)."""
    return {getattr(aten, name): rule for name in names if hasattr(aten, name)}


def normalize_dims(dims: Any, ndim: int) -> list[int]:
    """Reduction dims as a sorted list of non-negative ints (None / [] = all dims)."""
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % ndim for d in dims}) if ndim else []


# --------------------------------------------------------------------------------------------
# Coordinatewise ops
# --------------------------------------------------------------------------------------------


def check_broadcast(ctx: LoweringContext, node: OpNode, layout: Layout) -> None:
    """Every width axis of every tensor argument lines up (right-aligned) with the output's."""
    for arg in tensor_args(node):
        if isinstance(arg, MatrixValue):
            continue  # reported by the context with a precise message
        offset = len(layout) - arg.ndim
        for i, axis in enumerate(arg.layout):
            if isinstance(axis, Width) and (offset + i < 0 or layout[offset + i] != axis):
                ctx.not_representable(
                    f"broadcasting the width axis {i} of %{arg.name} {format_layout(arg.layout)} against "
                    f"{format_layout(layout)}",
                    "Two different width axes would meet in one tensor (an n×n activation).",
                )


def coordinatewise(ctx: LoweringContext, node: OpNode, fn: Callable | None = None, *,
                   broadcast: bool = False, smooth: bool = True, width_scale: str | None = None,
                   gaussian: tuple | None = None, kinks: tuple[tuple[float, float], ...] = ()) -> Value:
    """Lower ``node`` as the op itself applied coordinate by coordinate (a Nonlin).

    ``broadcast``: the op broadcasts its arguments elementwise; check their width axes line up.
    ``smooth=False``: the op has a kink or a jump (relu, abs, comparisons); ``width_scale``: it scales
    logits by a width-dependent constant argument; ``gaussian``: what it does to Gaussian arguments;
    ``kinks``: where its derivative in its first argument jumps (see :class:`~tplimits.core.ir.Nonlin`).
    """
    layout = node.layout
    if layout is None or (layout and isinstance(layout[0], tuple)):
        ctx.unsupported(f"op {node.op_name} returns several tensors; lower it with a rule that picks them")
    if broadcast:
        check_broadcast(ctx, node, layout)
    return ctx.nonlin(fn or node.target, *node.args, layout=layout, kwargs=node.kwargs, smooth=smooth,
                      width_scale=width_scale, gaussian=gaussian, kinks=kinks)


def vector_width_axis(ctx: LoweringContext, x: Value) -> int | None:
    """The width axis of ``x`` (None for scalars); matrices are refused."""
    if isinstance(x, MatrixValue):
        ctx.not_representable(f"op {ctx.node.op_name} applied to a matrix-shaped parameter")
    return x.width_axis


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------


def reduce_sum_or_mean(ctx: LoweringContext, x: Value, dims: Sequence[int], keepdim: bool, *, mean: bool,
                       out_layout: Layout | None = None) -> Value:
    """``x.sum(dims)`` or ``x.mean(dims)``; a width axis among ``dims`` becomes an Avg."""
    dims = normalize_dims(dims, x.ndim)
    w = x.width_axis
    fixed = [d for d in dims if d != w]
    y = x
    if fixed:
        layout = tuple(1 if i in fixed else a for i, a in enumerate(x.layout))
        op = aten.mean.dim if mean else aten.sum.dim_IntList
        y = ctx.nonlin(op, y, fixed, True, layout=layout, gaussian=AFFINE)
    if w is not None and w in dims:
        y = ctx.avg(y, w, keepdim=True, sum_=not mean)
    if not keepdim and dims:
        layout = out_layout if out_layout is not None else tuple(a for i, a in enumerate(x.layout) if i not in dims)
        y = ctx.nonlin(aten.squeeze.dims, y, list(dims), layout=layout, gaussian=AFFINE)
    return y


# --------------------------------------------------------------------------------------------
# Contractions: einsum with at most two operands
# --------------------------------------------------------------------------------------------


def lower_einsum(ctx: LoweringContext, equation: str, a: Any, b: Any, out_layout: Layout) -> Value:
    """Lower ``torch.einsum(equation, a, b)``.

    * no width axis contracted: coordinatewise (Nonlin of the einsum);
    * the width axis of two vectors contracted: Avg of their product, times ratio·n (a sum);
    * a matrix's width axis contracted with a vector's width axis: MatMul (Wᵀ if it is the
      matrix's first axis), batched over fixed axes the two share.
    """
    equation = equation.replace(" ", "")
    lhs, out = equation.split("->")
    la, lb = lhs.split(",")
    if "." in equation:
        ctx.unsupported(f"einsum with ellipsis {equation!r}")
    if isinstance(a, MatrixValue) and isinstance(b, MatrixValue):
        ctx.not_representable("a product of two weight matrices")
    if isinstance(b, MatrixValue):  # put the matrix first
        a, b, la, lb = b, a, lb, la
    for spec, operand in ((la, a), (lb, b)):
        ctx.record_fan_in(operand, tuple(i for i, c in enumerate(spec) if c not in out))
    if isinstance(a, MatrixValue):
        return _matmul(ctx, a, b, la, lb, out, out_layout)
    letters = letter_axes(ctx, (la, a), (lb, b))
    contracted_width = [c for c in dict.fromkeys(la + lb) if c not in out and isinstance(letters[c], Width)]
    if not contracted_width:
        return ctx.nonlin(contract, f"{la},{lb}->{out}", [a, b], layout=out_layout, gaussian=MULTILINEAR)
    if len(contracted_width) > 1:
        ctx.not_representable("a contraction over two width axes at once")
    w = contracted_width[0]
    product_layout = tuple(letters[c] for c in out + w)
    product = ctx.nonlin(contract, f"{la},{lb}->{out}{w}", [a, b], layout=product_layout, gaussian=MULTILINEAR)
    return ctx.avg(product, len(out), sum_=True)


def letter_axes(ctx: LoweringContext, *operands: tuple[str, Any]) -> dict[str, Any]:
    letters: dict[str, Any] = {}
    for spec, value in operands:
        if not is_tensor_value(value) or len(spec) != value.ndim:
            ctx.unsupported(f"einsum operand {spec!r} does not match a tensor of rank "
                            f"{getattr(value, 'ndim', '?')}")
        for c, axis in zip(spec, value.layout, strict=True):
            if isinstance(axis, Width) or c not in letters or letters[c] == 1:
                letters[c] = axis
    return letters


def _matmul(ctx: LoweringContext, m: MatrixValue, x: Any, lm: str, lx: str, out: str, out_layout: Layout) -> Value:
    if not isinstance(x, Value) or x.width_axis is None:
        ctx.not_representable("a weight matrix multiplied by something that is not a vector (it would give "
                              "an n×n activation)")
    letters = letter_axes(ctx, (lm, m), (lx, x))
    m_width = [c for c, axis in zip(lm, m.layout, strict=True) if isinstance(axis, Width)]
    xw = lx[x.width_axis]
    if xw not in m_width or xw in out:
        ctx.not_representable("a product of a weight matrix and a vector that does not sum over the vector's "
                              "width axis")
    # Fixed axes of x summed without involving the matrix: sum them first, so MatMul is a plain product.
    pre_sum = [c for c in lx if c not in out and c not in lm]
    if pre_sum:
        keep = "".join(c for c in lx if c not in pre_sum)
        x = ctx.nonlin(contract, f"{lx}->{keep}", [x], layout=tuple(letters[c] for c in keep), gaussian=AFFINE)
        lx = keep
    # Fixed axes of the matrix summed against x (kernel offsets): keep them in the MatMul, sum after.
    post_sum = [c for c in lm if c not in out and c != xw]
    mm_out = out + "".join(post_sum)
    mm_layout = tuple(letters[c] for c in mm_out)
    y = ctx.matmul(m, x, f"{lm},{lx}->{mm_out}", layout=mm_layout)
    if post_sum:
        dims = list(range(len(out), len(mm_out)))
        y = ctx.nonlin(aten.sum.dim_IntList, y, dims, False, layout=out_layout, gaussian=AFFINE)
    return y


def fresh_letters(count: int, avoid: str = "") -> str:
    return "".join([c for c in string.ascii_lowercase if c not in avoid][:count])


def scale_matrix(ctx: LoweringContext, m: MatrixValue, factor: Any, *, reciprocal: bool = False) -> MatrixValue:
    """``m * factor`` (or ``m / factor``) with a number, width constant or scalar value as factor."""
    if isinstance(factor, Value):
        if factor.kind != "scalar":
            ctx.not_representable("an elementwise product of a weight matrix with a non-scalar tensor")
        if reciprocal:
            factor = ctx.nonlin(aten.reciprocal.default, factor, layout=factor.layout)
    elif isinstance(factor, WidthPower):
        factor = WidthPower(1 / factor.coef, -factor.power) if reciprocal else factor
    elif isinstance(factor, int | float):
        factor = 1 / factor if reciprocal else factor
    else:
        ctx.not_representable("scaling a weight matrix by this kind of factor")
    return attrs.evolve(m, scales=(*m.scales, factor))
