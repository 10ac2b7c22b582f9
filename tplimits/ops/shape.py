"""Shape ops: view / reshape / permute / slicing / splitting / concatenation / indexing / padding.

Along fixed axes these are coordinatewise. Along a width axis only *block* restructuring is
representable: a space of size r·n seen as k equal blocks of size (r/k)·n (attention heads split
out of d_model, a fused q/k/v projection split in three, heads merged back, a concatenation of
equal-width vectors). That becomes a :class:`~tplimits.core.program.Regroup`. Anything that
singles out coordinates along the width axis (select, index, a slice that is not a whole block,
padding, flips, rolls) has no Tensor Program counterpart.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from typing import Any

import attrs
import torch

from tplimits.core.lower import LoweringContext, MatrixValue, OpNode, Value
from tplimits.core.program import Layout, Width, WidthInt, concrete_shape, width_axes
from tplimits.ops.common import Pick, aten, coordinatewise, normalize_dims, vector_width_axis
from tplimits.plugins.specs import hookimpl

# --------------------------------------------------------------------------------------------
# view / reshape
# --------------------------------------------------------------------------------------------


def reshape(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    if isinstance(x, MatrixValue):
        ctx.not_representable("reshaping a weight matrix")
    blocks = reshape_blocks(ctx, x.layout, node.layout)
    if blocks == 1:
        return coordinatewise(ctx, node)
    return ctx.regroup(node.target, *node.args, layout=node.layout, blocks=blocks, kwargs=node.kwargs)


def reshape_blocks(ctx: LoweringContext, src: Layout, dst: Layout) -> int:
    """1 if a reshape from ``src`` to ``dst`` keeps the width axis whole; the number of blocks if it
    splits it into (or merges it from) equal blocks; an error otherwise."""
    n = ctx.n
    a, b = concrete_shape(src, n), concrete_shape(dst, n)
    i = j = 0
    blocks = 1
    while i < len(a) or j < len(b):
        gi, gj = [i], [j]
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        while pa != pb:
            if pa < pb:
                i += 1
                gi.append(i)
                pa *= a[i]
            else:
                j += 1
                gj.append(j)
                pb *= b[j]
        group_src = [src[k] for k in gi if k < len(src)]
        group_dst = [dst[k] for k in gj if k < len(dst)]
        blocks *= _group_blocks(ctx, group_src, group_dst)
        i, j = gi[-1] + 1, gj[-1] + 1
    return blocks


def _group_blocks(ctx: LoweringContext, src: list, dst: list) -> int:
    """Blocks of one reshape group (consecutive axes whose sizes multiply to the same total).

    The group is a legal block split (or merge) when, reading the big width axis as k blocks of the
    small one, the small width coordinate is the within-block coordinate (contiguous or
    interleaved blocks), and the fixed coordinates and block index on the big side are constant
    along the small side's width axis. Checked exactly on the index map at the trace width.
    """
    ws = [i for i, x in enumerate(src) if isinstance(x, Width)]
    wd = [i for i, x in enumerate(dst) if isinstance(x, Width)]
    if not ws and not wd:
        return 1
    if len(ws) != 1 or len(wd) != 1:
        ctx.not_representable("a reshape that moves part of a width axis into a fixed axis unevenly")
    if src == dst:
        return 1
    ratio = src[ws[0]].ratio / dst[wd[0]].ratio
    big, small = (src, dst) if ratio >= 1 else (dst, src)
    wb, wsm = (ws[0], wd[0]) if ratio >= 1 else (wd[0], ws[0])
    k = max(ratio, 1 / ratio)
    if k.denominator != 1:
        ctx.not_representable("a reshape of a width axis into blocks of unequal width")
    k = int(k)
    shape_big, shape_small = concrete_shape(tuple(big), ctx.n), concrete_shape(tuple(small), ctx.n)
    flat = torch.arange(math.prod(shape_big))
    coords_big = torch.stack(torch.unravel_index(flat, shape_big))
    coords_small = torch.stack(torch.unravel_index(flat, shape_small))
    m = shape_small[wsm]
    w_big, w_small = coords_big[wb], coords_small[wsm]
    for within, block in ((w_big % m, w_big // m), (w_big // k, w_big % k)):  # contiguous, interleaved
        if not torch.equal(within, w_small):
            continue
        # (fixed coordinates of the big side, block index) must not vary along the small width axis
        key_big = torch.stack([*(c for i, c in enumerate(coords_big) if i != wb), block])
        key_small = torch.stack([c for i, c in enumerate(coords_small) if i != wsm]) if len(shape_small) > 1 \
            else torch.zeros(1, flat.numel(), dtype=torch.long)
        order = torch.argsort(_ravel(key_small) * m + w_small)
        grouped = key_big[:, order].view(key_big.shape[0], -1, m)
        if torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
            return k
    ctx.not_representable(
        "a reshape that interleaves the coordinates of a width axis with a fixed axis",
        "Only splitting a width axis into equal blocks (or merging blocks back) is representable.",
    )
    raise AssertionError  # not reached


def _ravel(keys: torch.Tensor) -> torch.Tensor:
    """One integer per column of ``keys`` (rows are coordinates), preserving equality."""
    out = torch.zeros(keys.shape[1], dtype=torch.long)
    for row in keys:
        out = out * (int(row.max()) + 1) + row
    return out


# --------------------------------------------------------------------------------------------
# permutations and other layout ops
# --------------------------------------------------------------------------------------------


def permute(ctx: LoweringContext, node: OpNode) -> Any:
    x = node.args[0]
    if isinstance(x, MatrixValue):
        dims = normalize_order(node.arg(1, "dims"), x.ndim)
        return attrs.evolve(x, axes=tuple(x.axes[d] for d in dims))
    return coordinatewise(ctx, node)


def normalize_order(dims: Any, ndim: int) -> list[int]:
    return [d % ndim for d in dims]


def transpose(ctx: LoweringContext, node: OpNode) -> Any:
    x = node.args[0]
    if isinstance(x, MatrixValue):
        if node.target.overloadpacket in (aten.t, aten.numpy_T):
            d0, d1 = 0, 1
        else:
            d0, d1 = node.arg(1, "dim0") % x.ndim, node.arg(2, "dim1") % x.ndim
        axes = list(x.axes)
        axes[d0], axes[d1] = axes[d1], axes[d0]
        return attrs.evolve(x, axes=tuple(axes))
    return coordinatewise(ctx, node)


def fixed_axes_only(dim_arg: int, name: str):
    """A rule for ops that act along the axes named by argument ``dim_arg``: fine on fixed axes."""

    def rule(ctx: LoweringContext, node: OpNode) -> Value:
        x = node.args[0]
        w = vector_width_axis(ctx, x)
        if w is not None:
            # dims=None (roll without dims) flattens: it touches every axis.
            if w in normalize_dims(node.arg(dim_arg, name, None), x.ndim):
                ctx.not_representable(
                    f"{node.op_name} along the width axis",
                    "It singles out or reorders coordinates along the width axis.",
                )
        return coordinatewise(ctx, node)

    return rule


def tril_triu(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is not None and w >= x.ndim - 2:
        ctx.not_representable(f"{node.op_name} over the width axis")
    return coordinatewise(ctx, node)


def expand(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    vector_width_axis(ctx, x)
    return coordinatewise(ctx, node)


def repeat(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    reps = list(node.arg(1, "repeats"))
    if w is not None and reps[len(reps) - x.ndim + w] != 1:
        ctx.not_representable("repeating a tensor along its width axis")
    return coordinatewise(ctx, node)


# --------------------------------------------------------------------------------------------
# slicing, splitting, concatenation
# --------------------------------------------------------------------------------------------


def select(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is not None and node.arg(1, "dim") % x.ndim == w:
        ctx.not_representable(
            "selecting a single coordinate along the width axis",
            "A Tensor Program treats coordinates as exchangeable; average over the width axis instead.",
        )
    return coordinatewise(ctx, node)


def slice_(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    dim = node.arg(1, "dim", 0) % x.ndim
    if w is None or dim != w:
        return coordinatewise(ctx, node)
    start = node.arg(2, "start", None) or 0
    end = node.arg(3, "end", None)
    step = node.arg(4, "step", 1)
    in_ratio = x.layout[w].ratio
    out_axis = node.layout[w]
    full_end = end is None or (isinstance(end, int) and end >= sys.maxsize // 2)
    if step == 1 and start == 0 and (full_end or end == WidthInt(in_ratio)):
        return x  # the whole axis
    if step != 1 or not isinstance(out_axis, Width):
        ctx.not_representable("a slice of the width axis that is not a whole block of it")
    block = out_axis.ratio
    if not _block_aligned(start, block) or not (full_end or _block_aligned(end, block)):
        ctx.not_representable("a slice of the width axis that is not a whole block of it")
    blocks = in_ratio / block
    if blocks.denominator != 1:
        ctx.not_representable("a slice of the width axis into blocks of unequal width")
    return ctx.regroup(node.target, *node.args, layout=node.layout, blocks=int(blocks), kwargs=node.kwargs)


def _block_aligned(position: Any, block: Fraction) -> bool:
    if position == 0:
        return True
    return isinstance(position, WidthInt) and (position.ratio / block).denominator == 1


def narrow(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is None or node.arg(1, "dim") % x.ndim != w:
        return coordinatewise(ctx, node)
    start, length = node.arg(2, "start"), node.arg(3, "length")
    out_axis = node.layout[w]
    if (not isinstance(out_axis, Width) or not isinstance(length, WidthInt)
            or not _block_aligned(start, out_axis.ratio)):
        ctx.not_representable("narrowing the width axis to something that is not a whole block of it")
    blocks = x.layout[w].ratio / out_axis.ratio
    if blocks.denominator != 1:
        ctx.not_representable("narrowing the width axis into blocks of unequal width")
    return ctx.regroup(node.target, *node.args, layout=node.layout, blocks=int(blocks), kwargs=node.kwargs)


def split(ctx: LoweringContext, node: OpNode) -> tuple[Value, ...]:
    """split / split_with_sizes / chunk / unbind / tensor_split: one instruction per piece."""
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    name = node.target.overloadpacket.__name__
    default_dim = 0
    dim = node.arg(1 if name == "unbind" else 2, "dim", default_dim) % max(x.ndim, 1)
    layouts = node.layout
    pieces = []
    for i, part in enumerate(layouts):
        fn = Pick(node.target, i)
        if w is None or dim != w:
            pieces.append(ctx.nonlin(fn, *node.args, layout=part, kwargs=node.kwargs))
            continue
        if name == "unbind" or not isinstance(part[w], Width):
            ctx.not_representable(f"{node.op_name} of the width axis into pieces that are not width-sized")
        blocks = x.layout[w].ratio / part[w].ratio
        if blocks.denominator != 1 or any(p[w] != part[w] for p in layouts):
            ctx.unsupported(f"{node.op_name} of the width axis into pieces of unequal width")
        pieces.append(ctx.regroup(fn, *node.args, layout=part, blocks=int(blocks), kwargs=node.kwargs))
    return tuple(pieces)


def cat(ctx: LoweringContext, node: OpNode) -> Value:
    tensors = list(node.args[0])
    dim = node.arg(1, "dim", 0)
    layout = node.layout
    dim %= len(layout)
    if not isinstance(layout[dim], Width):
        return coordinatewise(ctx, node)
    parts = [t.layout[dim] if isinstance(t, Value) else None for t in tensors]
    if any(not isinstance(p, Width) for p in parts) or len(set(parts)) != 1:
        ctx.unsupported("concatenating pieces of unequal width along the width axis")
    return ctx.regroup(node.target, *node.args, layout=layout, blocks=len(tensors), kwargs=node.kwargs)


def stack(ctx: LoweringContext, node: OpNode) -> Value:
    for t in node.args[0]:
        vector_width_axis(ctx, t)
    return coordinatewise(ctx, node)


# --------------------------------------------------------------------------------------------
# indexing, gathering, padding, embedding
# --------------------------------------------------------------------------------------------


def index(ctx: LoweringContext, node: OpNode) -> Value:
    x, indices = node.args[0], node.args[1]
    w = vector_width_axis(ctx, x)
    if w is not None and w < len(indices) and indices[w] is not None:
        ctx.not_representable("indexing along the width axis")
    for idx in indices:
        if isinstance(idx, Value) and idx.width_axis is not None:
            ctx.not_representable("an index tensor with a width axis")
    return coordinatewise(ctx, node)


def constant_pad(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    pad = list(node.arg(1, "pad"))
    if w is not None:
        position = x.ndim - 1 - w  # pad lists (left, right) pairs from the last axis backwards
        if position < len(pad) // 2 and (pad[2 * position] != 0 or pad[2 * position + 1] != 0):
            ctx.not_representable("padding the width axis")
    return coordinatewise(ctx, node)


def embedding(ctx: LoweringContext, node: OpNode) -> Value:
    weight = node.args[0]
    if isinstance(weight, MatrixValue) or (isinstance(weight, Value) and 0 in width_axes(weight.layout)):
        ctx.not_representable("an embedding table whose number of rows grows with width")
    return coordinatewise(ctx, node)


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules: dict = {}
    for name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy", "_reshape_alias"):
        packet = getattr(aten, name, None)
        if packet is not None:
            rules[packet] = reshape
    for name in ("permute", "movedim"):
        rules[getattr(aten, name)] = permute
    for name in ("transpose", "t", "swapaxes", "numpy_T"):
        packet = getattr(aten, name, None)
        if packet is not None:
            rules[packet] = transpose
    for name in ("unsqueeze", "squeeze", "expand_as"):
        rules[getattr(aten, name)] = coordinatewise
    rules.update({
        aten.expand: expand,
        aten.repeat: repeat,
        aten.flip: fixed_axes_only(1, "dims"),
        aten.roll: fixed_axes_only(2, "dims"),
        aten.tril: tril_triu,
        aten.triu: tril_triu,
        aten.select: select,
        aten.slice: slice_,
        aten.narrow: narrow,
        aten.split: split,
        aten.split_with_sizes: split,
        aten.chunk: split,
        aten.unbind: split,
        aten.tensor_split: split,
        aten.cat: cat,
        aten.concat: cat,
        aten.stack: stack,
        aten.index_select: fixed_axes_only(1, "dim"),
        aten.gather: fixed_axes_only(1, "dim"),
        aten.index: index,
        aten.constant_pad_nd: constant_pad,
        aten.embedding: embedding,
    })
    return rules

