"""Reductions: over fixed axes they are coordinatewise; over the width axis they become Avg.

``sum`` over the width axis is ``ratio·n · Avg`` (the readout of Def 2.9.1 is a sum); ``mean`` is
Avg; ``var`` / ``std`` / ``norm`` / ``logsumexp`` are built from Avg. Max-type reductions over the
width axis (max, argmax, sort, top-k) have no Tensor Program counterpart.
"""

from __future__ import annotations

from typing import Any

import torch

from tplimits.plugin import (
    AFFINE,
    Layout,
    LoweringContext,
    OpNode,
    Pick,
    Value,
    Width,
    WidthInt,
    aten,
    coordinatewise,
    hookimpl,
    normalize_dims,
    reduce_sum_or_mean,
    rule_table,
    vector_width_axis,
)

NOT_OVER_WIDTH = ["amax", "amin", "max", "min", "argmax", "argmin", "aminmax", "prod", "cumsum", "cumprod",
                  "cummax", "cummin", "sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "all",
                  "any", "count_nonzero", "logcumsumexp"]


def _dims_of(node: OpNode, x: Value) -> list[int]:
    dims = node.arg(1, "dim", None)
    return normalize_dims(dims, x.ndim)


def sum_mean(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dims = _dims_of(node, x)
    if w is None or w not in dims:
        return coordinatewise(ctx, node, gaussian=AFFINE)
    if node.kwargs.get("dtype") is not None:
        ctx.unsupported(f"{node.op_name} with a dtype argument over the width axis")
    keepdim = bool(node.arg(2, "keepdim", False))
    mean = node.target.overloadpacket in (aten.mean,)
    return reduce_sum_or_mean(ctx, x, dims, keepdim, mean=mean, out_layout=node.layout)


def _bessel(biased_var: torch.Tensor, count: int, correction: float) -> torch.Tensor:
    """``biased_var · N / (N − correction)``: the unbiased estimate over N entries."""
    return biased_var * (count / (count - correction)) if correction else biased_var


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x)


def var_std(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dims = _dims_of(node, x)
    if w is None or w not in dims:
        return coordinatewise(ctx, node)
    correction = node.kwargs.get("correction")
    if correction is None:
        unbiased = node.arg(2, "unbiased", True) if node.target.overloadpacket in (aten.var, aten.std) else True
        correction = 1.0 if unbiased is not False else 0.0
    keepdim = bool(node.kwargs.get("keepdim", node.arg(3, "keepdim", False)))
    var = biased_variance(ctx, x, dims)
    count = _count(x.layout, dims)
    var = ctx.nonlin(_bessel, var, count, float(correction), layout=var.layout)
    if node.target.overloadpacket is aten.std:
        var = ctx.nonlin(_sqrt, var, layout=var.layout)
    if not keepdim:
        var = ctx.nonlin(aten.squeeze.dims, var, dims, layout=node.layout)
    return var


def _count(layout: Layout, dims: list[int]) -> Any:
    """The number of entries reduced over: a width-dependent integer when the width axis is among them."""
    fixed = 1
    ratio = None
    for d in dims:
        if isinstance(layout[d], Width):
            ratio = layout[d].ratio
        else:
            fixed *= layout[d]
    return WidthInt(ratio * fixed) if ratio is not None else fixed


def _centered_square(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return (x - mean) ** 2


def biased_variance(ctx: LoweringContext, x: Value, dims: list[int], mean: Value | None = None) -> Value:
    """Mean of (x − mean(x))² over ``dims`` (kept as size-1 axes); ``mean`` if already computed."""
    if mean is None:
        mean = reduce_sum_or_mean(ctx, x, dims, True, mean=True)
    sq = ctx.nonlin(_centered_square, x, mean, layout=x.layout, gaussian=("quadrature",))
    return reduce_sum_or_mean(ctx, sq, dims, True, mean=True)


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x)


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x)


def vector_norm(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dims = normalize_dims(node.arg(2, "dim", None), x.ndim)
    if w is None or w not in dims:  # over fixed axes; orders other than 2 have kinks
        return coordinatewise(ctx, node, smooth=float(node.arg(1, "ord", 2)) == 2.0)
    if float(node.arg(1, "ord", 2)) != 2.0:
        ctx.not_representable("a vector norm of order other than 2 over the width axis")
    keepdim = bool(node.arg(3, "keepdim", False))
    sq = ctx.nonlin(_square, x, layout=x.layout)
    total = reduce_sum_or_mean(ctx, sq, dims, keepdim, mean=False, out_layout=node.layout)
    return ctx.nonlin(_sqrt, total, layout=total.layout)


def logsumexp(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dims = _dims_of(node, x)
    if w is None or w not in dims:
        return coordinatewise(ctx, node)
    keepdim = bool(node.arg(2, "keepdim", False))
    e = ctx.nonlin(_exp, x, layout=x.layout)
    total = reduce_sum_or_mean(ctx, e, dims, keepdim, mean=False, out_layout=node.layout)
    return ctx.nonlin(_log, total, layout=total.layout)


def not_over_width(ctx: LoweringContext, node: OpNode) -> Any:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dim = node.arg(1, "dim", None)
    if w is not None and (dim is None or w in normalize_dims(dim, x.ndim)):
        ctx.not_representable(
            f"{node.op_name} over the width axis",
            "It depends on individual coordinates (ordering, extremes) rather than on averages; "
            "use a mean or a sum over width instead.",
        )
    return _maybe_tuple(ctx, node, smooth=node.target.overloadpacket.__name__ not in KINKED)


# Reductions over fixed axes whose result jumps or has kinks (extremes, orderings, counts).
KINKED = {"amax", "amin", "max", "min", "argmax", "argmin", "aminmax", "cummax", "cummin", "sort", "argsort", "topk",
          "kthvalue", "median", "nanmedian", "mode", "all", "any", "count_nonzero"}
MAX_POOLING = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool1d",
               "adaptive_max_pool2d"}

POOLING = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2,
           "_adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
           "max_pool2d_with_indices": 2, "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "lp_pool2d": 2}


def pooling(ctx: LoweringContext, node: OpNode) -> Any:
    """Pooling over the trailing spatial axes: coordinatewise in channels (max over positions is fine)."""
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    spatial = POOLING[node.target.overloadpacket.__name__]
    if w is not None and w >= x.ndim - spatial:
        ctx.not_representable(f"{node.op_name} over the width axis")
    return _maybe_tuple(ctx, node, smooth=node.target.overloadpacket.__name__ not in MAX_POOLING)


def _maybe_tuple(ctx: LoweringContext, node: OpNode, smooth: bool) -> Any:
    layout = node.layout
    if layout and isinstance(layout[0], tuple):  # (values, indices)
        return tuple(ctx.nonlin(Pick(node.target, i), *node.args, layout=part, kwargs=node.kwargs, smooth=smooth)
                     for i, part in enumerate(layout))
    return coordinatewise(ctx, node, smooth=smooth)


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules: dict = {aten.sum: sum_mean, aten.mean: sum_mean, aten.var: var_std, aten.std: var_std,
                   aten.linalg_vector_norm: vector_norm, aten.logsumexp: logsumexp}
    rules.update(rule_table(NOT_OVER_WIDTH, not_over_width))
    rules.update(rule_table(list(POOLING), pooling))
    return rules
