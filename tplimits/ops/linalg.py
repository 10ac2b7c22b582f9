"""Products: linear, addmm, mm, bmm, matmul, einsum, baddbmm, mv, dot.

Each is rewritten as a two-operand einsum and handed to :func:`~tplimits.ops.common.lower_einsum`,
which decides between MatMul (a weight matrix times a vector), Avg of a product (two vectors
contracted over width: a readout, attention logits) and a coordinatewise Nonlin (contractions over
fixed axes only: a first layer, attention weights times values).
"""

from __future__ import annotations

from typing import Any

from tplimits.plugin import (
    AFFINE,
    MULTILINEAR,
    LoweringContext,
    MatrixValue,
    OpNode,
    Value,
    aten,
    check_broadcast,
    contract,
    fresh_letters,
    hookimpl,
    letter_axes,
    lower_einsum,
)


def _add_bias(ctx: LoweringContext, node: OpNode, y: Value, bias: Any, *, beta: Any = 1, alpha: Any = 1) -> Value:
    if alpha != 1:
        y = ctx.nonlin(aten.mul.Tensor, y, alpha, layout=y.layout, gaussian=MULTILINEAR)
    if bias is None:
        return y
    if isinstance(bias, MatrixValue):
        ctx.not_representable("a bias with two width axes")
    if beta != 1:
        bias = ctx.nonlin(aten.mul.Tensor, bias, beta, layout=bias.layout, gaussian=MULTILINEAR)
    check_broadcast(ctx, OpNode(node.name, node.target, (y, bias), {}, node.layout, node.origin), node.layout)
    return ctx.nonlin(aten.add.Tensor, y, bias, layout=node.layout, gaussian=AFFINE)


def linear(ctx: LoweringContext, node: OpNode) -> Value:
    x, w = node.args[0], node.args[1]
    bias = node.arg(2, "bias", None)
    batch = fresh_letters(x.ndim - 1, "io")
    w_spec = "oi" if w.ndim == 2 else "i"
    out = batch + ("o" if w.ndim == 2 else "")
    y = lower_einsum(ctx, f"{batch}i,{w_spec}->{out}", x, w, node.layout)
    return _add_bias(ctx, node, y, bias)


def addmm(ctx: LoweringContext, node: OpNode) -> Value:
    bias, a, b = node.args[:3]
    y = lower_einsum(ctx, "ik,kj->ij", a, b, node.layout)
    return _add_bias(ctx, node, y, bias, beta=node.kwargs.get("beta", 1), alpha=node.kwargs.get("alpha", 1))


def baddbmm(ctx: LoweringContext, node: OpNode) -> Value:
    bias, a, b = node.args[:3]
    y = lower_einsum(ctx, "bik,bkj->bij", a, b, node.layout)
    return _add_bias(ctx, node, y, bias, beta=node.kwargs.get("beta", 1), alpha=node.kwargs.get("alpha", 1))


def addmv(ctx: LoweringContext, node: OpNode) -> Value:
    bias, a, b = node.args[:3]
    y = lower_einsum(ctx, "ik,k->i", a, b, node.layout)
    return _add_bias(ctx, node, y, bias, beta=node.kwargs.get("beta", 1), alpha=node.kwargs.get("alpha", 1))


def fixed_equation(spec: str):
    def rule(ctx: LoweringContext, node: OpNode) -> Value:
        return lower_einsum(ctx, spec, node.args[0], node.args[1], node.layout)

    rule.__name__ = f"einsum_{spec.replace(',', '_').replace('->', '_to_')}"
    return rule


def matmul(ctx: LoweringContext, node: OpNode) -> Value:
    a, b = node.args[0], node.args[1]
    da, db = a.ndim, b.ndim
    if da == 1 and db == 1:
        return lower_einsum(ctx, "k,k->", a, b, node.layout)
    if da == 1:
        batch = fresh_letters(db - 2, "kj")
        return lower_einsum(ctx, f"k,{batch}kj->{batch}j", a, b, node.layout)
    if db == 1:
        batch = fresh_letters(da - 2, "ik")
        return lower_einsum(ctx, f"{batch}ik,k->{batch}i", a, b, node.layout)
    nb = max(da, db) - 2
    batch = fresh_letters(nb, "ikj")
    ba, bb = batch[nb - (da - 2):], batch[nb - (db - 2):]
    shape_a, shape_b = a.layout[:-2], b.layout[:-2]
    for i in range(1, min(da, db) - 1):
        if shape_a[-i] != shape_b[-i]:
            ctx.unsupported("matmul whose batch axes broadcast size 1 against a larger size")
    return lower_einsum(ctx, f"{ba}ik,{bb}kj->{batch}ij", a, b, node.layout)


def einsum(ctx: LoweringContext, node: OpNode) -> Value:
    equation, operands = node.args[0], node.args[1]
    if len(operands) == 1:  # a one-operand einsum is a permute / sum
        x = operands[0]
        lhs, out = equation.replace(" ", "").split("->")
        letters = letter_axes(ctx, (lhs, x))
        if x.width_axis is not None and lhs[x.width_axis] not in out:
            ctx.unsupported("a one-operand einsum that sums over the width axis")
        return ctx.nonlin(contract, equation, [x], layout=tuple(letters[c] for c in out), gaussian=AFFINE)
    if len(operands) != 2:
        ctx.unsupported(f"einsum with {len(operands)} operands (split it into pairwise products)")
    if "->" not in equation:
        ctx.unsupported("einsum without an explicit output ('->')")
    return lower_einsum(ctx, equation, operands[0], operands[1], node.layout)


@hookimpl
def tplimits_lowering_rules() -> dict:
    return {
        aten.linear: linear,
        aten.addmm: addmm,
        aten.baddbmm: baddbmm,
        aten.addmv: addmv,
        aten.mm: fixed_equation("ik,kj->ij"),
        aten.bmm: fixed_equation("bik,bkj->bij"),
        aten.mv: fixed_equation("ik,k->i"),
        aten.dot: fixed_equation("k,k->"),
        aten.vdot: fixed_equation("k,k->"),
        aten.matmul: matmul,
        aten.einsum: einsum,
    }
