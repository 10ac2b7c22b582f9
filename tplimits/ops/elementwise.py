"""Elementwise ops: arithmetic, activations, comparisons, casts, dropout and factories.

An elementwise op acts coordinate by coordinate along the width axis once its arguments'
width axes line up, so it lowers to a Nonlin of the op itself. Multiplying a weight matrix by a
scalar (a width multiplier) is kept with the matrix and applied after its MatMul.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tplimits.plugin import (
    LoweringContext,
    MatrixValue,
    OpNode,
    Pick,
    Value,
    Width,
    WidthPower,
    aten,
    coordinatewise,
    hookimpl,
    identity,
    rule_table,
    scale_matrix,
    stop_gradient,
    tensor_args,
    vector_width_axis,
    width_axes,
)

ELEMENTWISE = [
    # arithmetic
    "add", "sub", "mul", "div", "rsub", "neg", "pow", "true_divide", "floor_divide", "remainder", "fmod",
    "addcmul", "addcdiv", "lerp", "reciprocal", "square", "sqrt", "rsqrt", "abs", "sign", "sgn",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "xlogy", "hypot", "logaddexp", "copysign",
    "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip",
    "minimum", "maximum", "fmin", "fmax", "where", "masked_fill", "nan_to_num",
    # activations
    "relu", "relu6", "gelu", "silu", "mish", "softplus", "elu", "selu", "celu", "leaky_relu", "hardtanh",
    "hardswish", "hardsigmoid", "threshold", "tanh", "sigmoid", "erf", "erfc", "erfinv", "sin", "cos", "tan",
    "atan", "atan2", "sinh", "cosh", "asinh", "softshrink", "hardshrink", "logit", "prelu",
    # comparisons and logic
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite",
    # casts and copies that produce a value
    "_to_copy", "to", "type_as", "clone", "contiguous", "zeros_like", "ones_like", "full_like", "fill",
]

# Ops whose derivative jumps (kinks) or that jump themselves (steps, comparisons): declared on their
# Nonlin as not smooth. ``where`` and ``masked_fill`` are smooth in their values; their condition comes
# from a comparison, which is declared here.
KINKED = {"abs", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip",
          "minimum", "maximum", "fmin", "fmax", "remainder", "fmod", "floor_divide", "relu", "relu6", "leaky_relu",
          "hardtanh", "hardswish", "hardsigmoid", "threshold", "softshrink", "hardshrink", "prelu",
          "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor",
          "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite"}

# What each op does to Gaussian arguments (the exact kernels of the NT limit; see ``Nonlin.gaussian``).
# Smooth activations are integrated by quadrature; relu and sign have arc-cosine closed forms.
QUADRATURE = ["tanh", "gelu", "silu", "softplus", "sigmoid", "mish", "elu", "selu", "celu", "sin", "cos", "atan",
              "asinh", "sinh", "cosh", "exp", "erfc"]
GAUSSIAN = {
    **dict.fromkeys(["add", "sub", "rsub", "neg", "clone", "contiguous"], ("affine", None)),
    **dict.fromkeys(["div", "true_divide", "type_as"], ("affine", (0,))),
    "mul": ("multilinear", None),
    "relu": ("arc-cosine", 1, 1.0, 0.0),
    "sign": ("arc-cosine", 0, 2.0, -1.0),
    "sgn": ("arc-cosine", 0, 2.0, -1.0),
    "erf": ("error function",),
    **dict.fromkeys(QUADRATURE, ("quadrature",)),
}

# Ops that return their input unchanged as far as the program is concerned.
IDENTITIES = ["alias", "lift_fresh_copy", "dropout", "feature_dropout", "alpha_dropout",
              "feature_alpha_dropout", "_assert_tensor_metadata"]

# Ops that multiply a matrix-shaped parameter by a scalar factor.
SCALINGS = {"mul": False, "div": True, "true_divide": True}

# Ops a weight matrix may pass through unchanged on its way to a product (casts, copies).
MATRIX_PASSTHROUGH = {"_to_copy", "to", "type_as", "clone", "alias", "contiguous", "lift_fresh_copy"}

FACTORIES = ["full", "ones", "zeros", "scalar_tensor", "arange", "tensor", "empty", "new_ones", "new_zeros",
             "new_full", "eye", "linspace"]


def elementwise(ctx: LoweringContext, node: OpNode) -> Any:
    name = node.target.overloadpacket.__name__.rstrip("_")
    matrices = [a for a in tensor_args(node) if isinstance(a, MatrixValue)]
    if matrices:
        return _on_matrix(ctx, node, name, matrices[0])
    return coordinatewise(ctx, node, _out_of_place(node.target), broadcast=True, smooth=name not in KINKED,
                          width_scale=_width_scale(node), gaussian=GAUSSIAN.get(name), kinks=_kinks(node, name))


def _kinks(node: OpNode, name: str) -> tuple[tuple[float, float], ...]:
    """Where the derivative of a relu-family op in its input jumps, and by how much (``Nonlin.kinks``);
    empty for every other op (and for bounds that are not plain numbers)."""
    if name == "relu":
        return ((0.0, 1.0),)
    if name == "relu6":
        return ((0.0, 1.0), (6.0, -1.0))
    if name == "abs":
        return ((0.0, 2.0),)
    if name == "leaky_relu":
        slope = node.arg(1, "negative_slope", 0.01)
        return ((0.0, 1.0 - float(slope)),) if isinstance(slope, int | float) else ()
    if name == "hardtanh":
        low, high = node.arg(1, "min_val", -1.0), node.arg(2, "max_val", 1.0)
        if isinstance(low, int | float) and isinstance(high, int | float):
            return ((float(low), 1.0), (float(high), -1.0))
    return ()


def _width_scale(node: OpNode) -> str | None:
    """``"model"`` when the model's own code multiplies scalars (logits) by a negative power of width
    (an explicit 1/√d_head)."""
    if width_axes(node.layout or ()) or not any(isinstance(a, WidthPower) and a.power < 0 for a in node.args):
        return None
    return "model"


def _on_matrix(ctx: LoweringContext, node: OpNode, name: str, m: MatrixValue) -> MatrixValue:
    if name in MATRIX_PASSTHROUGH and node.args[0] is m:
        return m
    if name in SCALINGS and node.args[0] is m and len(node.args) == 2:
        return scale_matrix(ctx, m, node.args[1], reciprocal=SCALINGS[name])
    if name == "mul" and len(node.args) == 2 and node.args[1] is m:
        return scale_matrix(ctx, m, node.args[0])
    ctx.not_representable(
        f"{node.op_name} of a weight matrix",
        "A weight matrix may only be multiplied by a vector (or scaled by a scalar) in a Tensor Program.",
    )
    raise AssertionError  # not reached


def _out_of_place(target: Any) -> Callable:
    """The functional twin of an in-place overload (``relu_`` -> ``relu``); the driver rebinds the input."""
    packet = target.overloadpacket
    if not packet.__name__.endswith("_"):
        return target
    functional = getattr(aten, packet.__name__.rstrip("_"), None)
    if functional is None:
        return target
    return getattr(functional, target._overloadname, functional.default)


def _gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · σ(b): the gated linear unit on the two halves."""
    return a * torch.sigmoid(b)


def glu(ctx: LoweringContext, node: OpNode) -> Value:
    """glu over a fixed axis is coordinatewise; over the width axis it gates one half by the other
    (two blocks of the width axis)."""
    x = node.args[0]
    dim = node.arg(1, "dim", -1) % x.ndim
    w = vector_width_axis(ctx, x)
    if w is None or dim != w:
        return coordinatewise(ctx, node)
    half = tuple(Width(a.ratio / 2) if i == w else a for i, a in enumerate(x.layout))
    a, b = (ctx.regroup(Pick(aten.chunk.default, i), x, 2, dim, layout=half, block=half[w].ratio) for i in range(2))
    return ctx.nonlin(_gate, a, b, layout=node.layout)


def identity_rule(ctx: LoweringContext, node: OpNode) -> Any:
    name = node.target.overloadpacket.__name__
    if name == "_assert_tensor_metadata":
        return None
    if "dropout" in name:
        p = node.arg(1, "p", 0.0)
        if p:
            ctx.notes.append(f"{ctx.where()}: dropout (p={p}) is off in the program")
    return identity(node)


def detach(ctx: LoweringContext, node: OpNode) -> Any:
    """The same value, with backpropagation cut where the model cuts it."""
    return stop_gradient(ctx, node.args[0])


def factory(ctx: LoweringContext, node: OpNode) -> Value:
    """A constant built in forward. Width-independent ones were folded already; what reaches here
    either has a width-dependent value (HF's ``full([], sqrt(d_head))``) or a width-sized shape."""
    layout = node.layout
    if width_axes(layout):
        name = node.target.overloadpacket.__name__
        if name not in ("full", "ones", "zeros", "new_ones", "new_zeros", "new_full", "empty"):
            ctx.not_representable(
                f"a width-sized constant built by {node.op_name}",
                "Its entries depend on the coordinate along the width axis (e.g. arange over width), unlike "
                "the iid coordinates a Tensor Program vector has.",
            )
    scale = any(isinstance(a, WidthPower) and a.power < 0 for a in node.args) and not width_axes(layout)
    return ctx.nonlin(node.target, *node.args, layout=layout, kwargs=node.kwargs,
                      width_scale="model" if scale else None)


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules = rule_table([*ELEMENTWISE, *(name + "_" for name in ELEMENTWISE)], elementwise)
    rules.update(rule_table(IDENTITIES, identity_rule))
    rules.update(rule_table(FACTORIES, factory))
    rules.update(rule_table(["detach", "detach_"], detach))
    # nn.Dropout(inplace=True) and friends
    rules[aten.dropout_] = identity_rule
    rules[aten.glu] = glu
    return rules

