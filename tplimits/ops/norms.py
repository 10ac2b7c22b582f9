"""Normalization layers: layer_norm, rms_norm, batch_norm, group_norm.

Statistics over fixed axes only (batch norm's per-channel statistics over batch and positions)
are coordinatewise along the width axis. Statistics over the width axis (layer norm over
d_model, RMSNorm) become Avg chains: mean = Avg(x), var = Avg((x − mean)²), exactly as the
paper writes layernorm as a Tensor Program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tplimits.ops.reductions import biased_variance
from tplimits.ops.shape import reshape_block
from tplimits.plugin import (
    AFFINE,
    MULTILINEAR,
    LoweringContext,
    MatrixValue,
    OpNode,
    Value,
    Width,
    WidthInt,
    aten,
    coordinatewise,
    hookimpl,
    reduce_sum_or_mean,
    rule_table,
    vector_width_axis,
)

NORMALIZED = ("affine", (0,))
"""``Nonlin.gaussian`` of a normalization by statistics over the width axis: in the limit the statistics are
numbers per row (the coordinate's mean and variance), so it is affine in the vector."""


def _normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """(x − mean) / √(var + eps)."""
    return (x - mean) * torch.rsqrt(var + eps)


def _rms_normalize(x: torch.Tensor, mean_square: torch.Tensor, eps: float) -> torch.Tensor:
    """x / √(mean(x²) + eps)."""
    return x * torch.rsqrt(mean_square + eps)


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _affine(ctx: LoweringContext, y: Value, weight: Value | None, bias: Value | None, layout) -> Value:
    for param, op in ((weight, aten.mul.Tensor), (bias, aten.add.Tensor)):
        if param is None:
            continue
        if isinstance(param, MatrixValue):
            ctx.not_representable("a normalization gain or bias with two width axes")
        y = ctx.nonlin(op, y, param, layout=layout, gaussian=MULTILINEAR if op is aten.mul.Tensor else AFFINE)
    return y


def layer_norm(ctx: LoweringContext, node: OpNode) -> Value:
    x, shape = node.args[0], list(node.args[1])
    weight, bias = node.arg(2, "weight"), node.arg(3, "bias")
    eps = node.arg(4, "eps", 1e-5)
    w = vector_width_axis(ctx, x)
    dims = list(range(x.ndim - len(shape), x.ndim))
    if w is None or w not in dims:
        return coordinatewise(ctx, node)
    mean = reduce_sum_or_mean(ctx, x, dims, True, mean=True)
    var = biased_variance(ctx, x, dims, mean)
    y = ctx.nonlin(_normalize, x, mean, var, eps, layout=x.layout, gaussian=NORMALIZED)
    return _affine(ctx, y, weight, bias, node.layout)


def rms_norm(ctx: LoweringContext, node: OpNode) -> Value:
    x, shape = node.args[0], list(node.args[1])
    weight = node.arg(2, "weight")
    eps = node.arg(3, "eps")
    if eps is None:
        eps = torch.finfo(torch.get_default_dtype()).eps
        ctx.notes.append(f"{ctx.where()}: rms_norm eps=None taken as the default dtype's machine epsilon {eps}")
    w = vector_width_axis(ctx, x)
    dims = list(range(x.ndim - len(shape), x.ndim))
    if w is None or w not in dims:
        return coordinatewise(ctx, node)
    sq = ctx.nonlin(_square, x, layout=x.layout, gaussian=("quadrature",))
    mean_square = reduce_sum_or_mean(ctx, sq, dims, True, mean=True)
    y = ctx.nonlin(_rms_normalize, x, mean_square, eps, layout=x.layout, gaussian=NORMALIZED)
    return _affine(ctx, y, weight, None, node.layout)


def _batch_norm_train(x, weight, bias, eps):
    """Batch normalization with the batch's own statistics (train mode); running statistics untouched."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def _batch_norm_eval(x, weight, bias, running_mean, running_var, eps):
    """Batch normalization with running statistics (eval mode)."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)


def batch_norm(ctx: LoweringContext, node: OpNode) -> Value:
    x, weight, bias, running_mean, running_var = (node.arg(i, name) for i, name in enumerate(
        ("input", "weight", "bias", "running_mean", "running_var")))
    training = node.arg(5, "training", True)
    eps = node.arg(7, "eps", 1e-5)
    w = vector_width_axis(ctx, x)
    if w is not None and w != 1:
        ctx.not_representable("batch normalization whose statistics run over the width axis",
                              "The channel axis (axis 1) must be the width axis.")
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        return ctx.nonlin(_batch_norm_train, x, weight, bias, eps, layout=node.layout)
    return ctx.nonlin(_batch_norm_eval, x, weight, bias, running_mean, running_var, eps, layout=node.layout)


def native_group_norm(ctx: LoweringContext, node: OpNode) -> tuple:
    """native_group_norm(x, weight, bias, N, C, HxW, groups, eps) -> (out, mean, rstd); the saved
    statistics are for autograd and not part of the program."""
    out = group_norm(ctx, node.args[0], node.args[1], node.args[2], node.args[6], node.args[7])
    return out, None, None


def group_norm_rule(ctx: LoweringContext, node: OpNode) -> Value:
    """group_norm(input, num_groups, weight, bias, eps): the user-facing form."""
    return group_norm(ctx, node.args[0], node.arg(2, "weight"), node.arg(3, "bias"), node.arg(1, "num_groups"),
                      node.arg(4, "eps", 1e-5))


def group_norm(ctx: LoweringContext, x: Value, weight: Value | None, bias: Value | None, groups: int | WidthInt,
               eps: float) -> Value:
    """Statistics per group of channels: over fixed axes when every group is one channel, else over a
    block of the channel (width) axis, regrouped as [batch, groups, channels/groups, ...]."""
    w = vector_width_axis(ctx, x)
    if w is not None and w != 1:
        ctx.not_representable("group normalization whose channel axis is not the width axis")
    if w is None or (isinstance(groups, WidthInt) and groups.ratio == x.layout[1].ratio):
        # no width axis, or one channel per group: statistics over fixed axes only
        return ctx.nonlin(aten.group_norm.default, x, groups, weight, bias, eps, layout=x.layout)
    channel = x.layout[1]
    if isinstance(groups, WidthInt):  # groups of a fixed size: a growing number of them, like heads
        size = channel.ratio / groups.ratio
        if size.denominator != 1:
            ctx.not_representable("group normalization whose groups hold a fraction of a channel")
        grouped_layout = (x.layout[0], Width(groups.ratio), int(size), *x.layout[2:])
    else:  # a fixed number of groups: each a block of the channel axis
        grouped_layout = (x.layout[0], groups, Width(channel.ratio / groups), *x.layout[2:])
    block = reshape_block(ctx, x.layout, grouped_layout)
    grouped = ctx.regroup(aten.reshape.default, x, [x.layout[0], groups, -1, *x.layout[2:]], layout=grouped_layout,
                          block=block)
    dims = list(range(2, len(grouped_layout)))
    mean = reduce_sum_or_mean(ctx, grouped, dims, True, mean=True)
    var = biased_variance(ctx, grouped, dims, mean)
    normed = ctx.nonlin(_normalize, grouped, mean, var, eps, layout=grouped_layout)
    y = ctx.regroup(aten.reshape.default, normed, [x.layout[0], -1, *x.layout[2:]], layout=x.layout, block=block)
    param_layout = (channel, *([1] * (x.ndim - 2)))
    shape = [-1, *([1] * (x.ndim - 2))]
    if weight is not None:
        weight = ctx.nonlin(aten.reshape.default, weight, shape, layout=param_layout)
    if bias is not None:
        bias = ctx.nonlin(aten.reshape.default, bias, shape, layout=param_layout)
    return _affine(ctx, y, weight, bias, x.layout)


def instance_norm(ctx: LoweringContext, node: OpNode) -> Value:
    """instance_norm: statistics per sample and channel over positions, coordinatewise in channels."""
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is not None and w != 1:
        ctx.not_representable("instance normalization whose channel axis is not the width axis")
    return coordinatewise(ctx, node)


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules = {aten.layer_norm: layer_norm, aten.batch_norm: batch_norm, aten.native_group_norm: native_group_norm,
             aten.group_norm: group_norm_rule, aten.instance_norm: instance_norm}
    rules.update(rule_table(("rms_norm", "_fused_rms_norm"), rms_norm))
    return rules
