"""Convolutions with channels as the width axis.

A convolution whose input and output channels both grow is one weight matrix per kernel offset
applied to the shifted input (weight sharing over positions): the input is unfolded into
``[batch, channels, kh, kw, positions]`` (coordinatewise in channels), each kernel offset's matrix
multiplies its slice (a MatMul batched over offsets), and the offsets are summed. A first layer
(fixed input channels) and a depthwise convolution are coordinatewise in channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tplimits.plugin import (
    AFFINE,
    Layout,
    LoweringContext,
    MatrixValue,
    OpNode,
    Value,
    Width,
    WidthInt,
    aten,
    coordinatewise,
    hookimpl,
    lower_einsum,
    rule_table,
)


def _pair(x: Any, dims: int) -> list[int]:
    if isinstance(x, int):
        return [x] * dims
    return list(x) * dims if len(x) == 1 else list(x)


def _unfold(x: torch.Tensor, kernel: list[int], dilation: list[int], padding: list[int],
            stride: list[int]) -> torch.Tensor:
    """``[B, C, H, W] -> [B, C, kh, kw, L]``: the input patches, channel by channel."""
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.view(x.shape[0], x.shape[1], kernel[0], kernel[1], cols.shape[-1])


def _unsqueeze_height(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-2)


def convolution(ctx: LoweringContext, node: OpNode) -> Value:
    name = node.target.overloadpacket.__name__
    x, weight = node.args[0], node.args[1]
    bias = node.arg(2, "bias")
    if name in ("convolution", "_convolution"):
        stride, padding, dilation, transposed, _, groups = node.args[3:9]
        if transposed:
            return _coordinatewise_or_refuse(ctx, node, "a transposed convolution mixing growing channels",
                                             transposed=True)
    else:
        stride = node.arg(3, "stride", 1)
        padding = node.arg(4, "padding", 0)
        dilation = node.arg(5, "dilation", 1)
        groups = node.arg(6, "groups", 1)
    spatial = x.ndim - 2
    x_width = x.width_axis if isinstance(x, Value) else None
    grouped = isinstance(groups, int) and groups > 1 and x_width == 1 and isinstance(weight, MatrixValue)
    if x_width is None or (groups != 1 and not grouped):
        if groups != 1 and not (isinstance(groups, WidthInt) and x_width == 1):
            ctx.unsupported(f"{node.op_name} with {groups} groups over growing channels whose weight is not "
                            "width-sized on both channel axes: not supported yet")
        return _coordinatewise_or_refuse(ctx, node, "a convolution")  # first layer, depthwise
    if x_width != 1:
        ctx.not_representable("a convolution whose width axis is not the channel axis")
    if spatial not in (1, 2):
        ctx.unsupported(f"{node.op_name} with {spatial} spatial dimensions (1-D and 2-D are supported)")
    geometry = _geometry(ctx, list(weight.layout[2:]), spatial, stride, padding, dilation)
    if grouped:
        y = _grouped(ctx, node, x, weight, groups, geometry)
    else:
        y = _dense(ctx, x, weight, node.layout, geometry)
    if bias is not None:
        shape = [-1, *([1] * spatial)]
        bias_layout = (bias.layout[0], *([1] * spatial))
        b = ctx.nonlin(aten.reshape.default, bias, shape, layout=bias_layout, gaussian=AFFINE)
        y = ctx.nonlin(aten.add.Tensor, y, b, layout=node.layout, gaussian=AFFINE)
    return y


def _geometry(ctx: LoweringContext, kernel: list[int], spatial: int, stride: Any, padding: Any,
              dilation: Any) -> tuple[list[int], ...]:
    """(kernel, dilation, padding, stride) as 2-D lists; a 1-D convolution is one of height 1."""
    if spatial == 1:
        kernel = [1, kernel[0]]
        if isinstance(padding, str):
            padding = _same_padding(ctx, padding, kernel, [1, _pair(dilation, 1)[0]], [1, _pair(stride, 1)[0]])[1]
        return kernel, [1, _pair(dilation, 1)[0]], [0, _pair(padding, 1)[0]], [1, _pair(stride, 1)[0]]
    if isinstance(padding, str):
        padding = _same_padding(ctx, padding, kernel, _pair(dilation, 2), _pair(stride, 2))
    return kernel, _pair(dilation, 2), _pair(padding, 2), _pair(stride, 2)


def _dense(ctx: LoweringContext, x: Value, weight: MatrixValue, layout: Layout,
           geometry: tuple[list[int], ...]) -> Value:
    """A convolution mixing all of ``x``'s channels: one MatMul batched over kernel offsets (no bias)."""
    kernel, dilation, padding, stride = geometry
    spatial = x.ndim - 2
    if spatial == 1:
        x = ctx.nonlin(_unsqueeze_height, x, layout=(*x.layout[:2], 1, x.layout[2]), gaussian=AFFINE)
    positions = 1
    for size in layout[2:]:
        positions *= size
    cols_layout = (x.layout[0], x.layout[1], kernel[0], kernel[1], positions)
    cols = ctx.nonlin(_unfold, x, kernel, dilation, padding, stride, layout=cols_layout, gaussian=AFFINE)
    w_letters = "oix" if spatial == 1 else "oiyx"
    x_letters = "biyxl"
    flat_layout = (layout[0], layout[1], positions)
    if spatial == 1:
        cols = ctx.nonlin(aten.squeeze.dim, cols, 2, layout=(cols_layout[0], cols_layout[1], kernel[1], positions),
                          gaussian=AFFINE)
        x_letters = "bixl"
    y = lower_einsum(ctx, f"{w_letters},{x_letters}->bol", weight, cols, flat_layout)
    sizes = [a if isinstance(a, int) else WidthInt(a.ratio) for a in layout]
    return ctx.nonlin(aten.reshape.default, y, sizes, layout=layout, gaussian=AFFINE)


def _grouped(ctx: LoweringContext, node: OpNode, x: Value, weight: MatrixValue, groups: int,
             geometry: tuple[list[int], ...]) -> Value:
    """A fixed number of groups over growing channels: group g's output channels (a block of the weight's
    rows) convolve group g's input channels (a block of x's channels); the groups' outputs are concatenated."""
    inputs, outputs = x.layout[1].ratio / groups, node.layout[1].ratio / groups
    if weight.layout[1].ratio != inputs:
        ctx.not_representable(f"{node.op_name} whose weight does not match its {groups} groups of channels")
    pieces = []
    for g in range(groups):
        x_g = ctx.regroup(aten.narrow.default, x, 1, WidthInt(g * inputs) if g else 0, WidthInt(inputs),
                          layout=(x.layout[0], Width(inputs), *x.layout[2:]), block=inputs)
        w_g = weight.block(0, g * outputs, (g + 1) * outputs)
        pieces.append(_dense(ctx, x_g, w_g, (node.layout[0], Width(outputs), *node.layout[2:]), geometry))
    return ctx.regroup(aten.cat.default, pieces, 1, layout=node.layout, block=outputs)


def _coordinatewise_or_refuse(ctx: LoweringContext, node: OpNode, what: str, transposed: bool = False) -> Value:
    weight = node.args[1]
    if isinstance(weight, MatrixValue):
        ctx.not_representable(what + " whose weight has two width axes")
    out_channels = node.layout[1]
    if not isinstance(out_channels, Width) and isinstance(node.args[0], Value) and node.args[0].width_axis is not None:
        ctx.not_representable(what + " that sums over growing channels")
    if not transposed:  # [out, in/groups, *kernel]: each output sums its input channels over the kernel
        ctx.record_fan_in(weight, tuple(range(1, weight.ndim)))
    # linear in the weight and the bias together once the input is fixed: conv(x, w) + b
    return coordinatewise(ctx, node, gaussian=("affine", (1, 2)))


def _same_padding(ctx: LoweringContext, mode: str, kernel: list[int], dilation: list[int],
                  stride: list[int]) -> list[int]:
    if mode == "valid":
        return [0, 0]
    if any(s != 1 for s in stride) or any((d * (k - 1)) % 2 for d, k in zip(dilation, kernel, strict=True)):
        ctx.unsupported("padding='same' with an even effective kernel or a stride")
    return [d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True)]


@hookimpl
def tplimits_lowering_rules() -> dict:
    return rule_table(("conv1d", "conv2d", "convolution", "_convolution"), convolution)
