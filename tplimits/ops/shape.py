"""Shape ops: view / reshape / permute / slicing / splitting / concatenation / indexing / padding.

Along fixed axes these are coordinatewise. Along a width axis only *block* restructuring is
representable: a space of size r·n seen as k equal blocks of size (r/k)·n (attention heads split
out of d_model, a fused q/k/v projection split in three, heads merged back, a concatenation of
equal-width vectors). That becomes a :class:`~tplimits.core.program.Regroup`. Anything that
singles out coordinates along the width axis (select, index, a slice that is not a whole block,
padding, flips, rolls) has no Tensor Program counterpart.
"""

from __future__ import annotations

import functools
import math
import sys
from fractions import Fraction
from typing import Any

import attrs
import torch

from tplimits.ops.common import common_block
from tplimits.plugin import (
    AFFINE,
    Layout,
    LoweringContext,
    MatrixValue,
    OpNode,
    Pick,
    Value,
    Width,
    WidthInt,
    aten,
    concrete_shape,
    coordinatewise,
    hookimpl,
    normalize_dims,
    rule_table,
    vector_width_axis,
    width_axes,
)

# --------------------------------------------------------------------------------------------
# view / reshape
# --------------------------------------------------------------------------------------------


# A view computes what reshape computes. The program's values need not be laid out as torch laid the
# model's tensors out (kets come out of matrix operators with strided particle axes), so a view is
# emitted as reshape, which copies where a view cannot.
VIEWS = (aten.view, aten._unsafe_view, aten.view_copy)


def reshape(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    if isinstance(x, MatrixValue):
        if len(width_axes(node.layout)) == 2:  # its width axes cut into fixed numbers of blocks
            ctx.unsupported("reshaping a weight matrix into blocks (view / unflatten) before its product: not "
                            "supported yet", "Split it along its width axis with chunk / split / narrow instead: "
                            "those lower to sub-matrices.")
        ctx.not_representable("reshaping a weight matrix so that its width axes merge or vanish")
    fn = aten.reshape.default if node.target.overloadpacket in VIEWS else node.target
    block = reshape_block(ctx, x.layout, node.layout)
    if block is None:
        return coordinatewise(ctx, node, fn, gaussian=AFFINE)
    return ctx.regroup(fn, *node.args, layout=node.layout, block=block, kwargs=node.kwargs)


def reshape_block(ctx: LoweringContext, src: Layout, dst: Layout) -> Fraction | None:
    """None if a reshape from ``src`` to ``dst`` keeps the width axis whole; else the width ratio of
    the common block space it regroups through (heads split out of d_model: 1/heads); an error
    if it is not a block regrouping."""
    n = ctx.n
    a, b = concrete_shape(src, n), concrete_shape(dst, n)
    i = j = 0
    block = None
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
        block = _group_block(ctx, group_src, group_dst) or block
        i, j = gi[-1] + 1, gj[-1] + 1
    return block


def _group_block(ctx: LoweringContext, src: list, dst: list) -> Fraction | None:
    """The block space of one reshape group (consecutive axes whose sizes multiply to the same total).

    Both width axes are read as whole numbers of blocks of a common space (contiguous or
    interleaved blocks). The group is a legal regrouping when the coordinate within a block is the
    same on both sides for every element and, along it, the source's fixed coordinates and block
    stay constant for fixed destination coordinates and block: the reshape relabels blocks and fixed
    coordinates, never coordinates within a block. The block space tried first is the largest
    common one; the check is exact, on the index map at two widths.
    """
    ws = [i for i, x in enumerate(src) if isinstance(x, Width)]
    wd = [i for i, x in enumerate(dst) if isinstance(x, Width)]
    if not ws and not wd:
        return None
    if len(ws) != 1 or len(wd) != 1:
        ctx.not_representable("a reshape that moves part of a width axis into a fixed axis unevenly")
    if src == dst:
        return None
    common = common_block(src[ws[0]].ratio, dst[wd[0]].ratio)
    fixed = math.prod(a for a in (*src, *dst) if not isinstance(a, Width))
    for d in (d for d in range(1, fixed + 1) if fixed % d == 0):  # largest block space first
        block = common / d
        if all(_is_regrouping(tuple(src), ws[0], tuple(dst), wd[0], block, n) for n in (ctx.n, 2 * ctx.n)):
            return block
    ctx.not_representable(
        "a reshape that interleaves the coordinates of a width axis with a fixed axis",
        "Only splitting a width axis into equal blocks (or merging blocks back) is representable.",
    )
    raise AssertionError  # not reached


@functools.lru_cache(maxsize=1024)  # the same reshape recurs in every layer of a model
def _is_regrouping(src: tuple, ws: int, dst: tuple, wd: int, block: Fraction, n: int) -> bool:
    """The check of :func:`_group_block` for one block space at width n (blocks of at least 2 coordinates,
    so that the within-block coordinate means something)."""
    if (block * n).denominator != 1 or block * n < 2:
        return False
    m = int(block * n)
    shape_src, shape_dst = concrete_shape(tuple(src), n), concrete_shape(tuple(dst), n)
    flat = torch.arange(math.prod(shape_src))
    coords_src = torch.stack(torch.unravel_index(flat, shape_src))
    coords_dst = torch.stack(torch.unravel_index(flat, shape_dst))
    for fine_src, block_src in _block_readings(coords_src[ws], m, shape_src[ws] // m):
        for fine_dst, block_dst in _block_readings(coords_dst[wd], m, shape_dst[wd] // m):
            if not torch.equal(fine_src, fine_dst):
                continue
            key_src = _ravel(torch.stack([*(c for i, c in enumerate(coords_src) if i != ws), block_src]))
            key_dst = _ravel(torch.stack([*(c for i, c in enumerate(coords_dst) if i != wd), block_dst]))
            order = torch.argsort(key_dst * m + fine_dst)
            grouped = key_src[order].view(-1, m)
            if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                return True
    return False


def _block_readings(w: torch.Tensor, m: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(coordinate within a block of size m, block index) for k contiguous and k interleaved blocks."""
    return [(w % m, w // m), (w // k, w % k)]


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
    return coordinatewise(ctx, node, gaussian=AFFINE)


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
    return coordinatewise(ctx, node, gaussian=AFFINE)


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
        return coordinatewise(ctx, node, gaussian=AFFINE)

    return rule


def tril_triu(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is not None and w >= x.ndim - 2:
        ctx.not_representable(f"{node.op_name} over the width axis")
    return coordinatewise(ctx, node, gaussian=AFFINE)


def expand(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    vector_width_axis(ctx, x)
    return coordinatewise(ctx, node, gaussian=AFFINE)


def repeat(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    reps = list(node.arg(1, "repeats"))
    if w is not None and reps[len(reps) - x.ndim + w] != 1:
        ctx.not_representable("repeating a tensor along its width axis")
    return coordinatewise(ctx, node, gaussian=AFFINE)


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
    return coordinatewise(ctx, node, gaussian=AFFINE)


def slice_(ctx: LoweringContext, node: OpNode) -> Any:
    x = node.args[0]
    dim = node.arg(1, "dim", 0) % x.ndim
    start = node.arg(2, "start", None) or 0
    end = node.arg(3, "end", None)
    step = node.arg(4, "step", 1)
    full_end = end is None or (isinstance(end, int) and end >= sys.maxsize // 2)
    if isinstance(x, MatrixValue):
        if step != 1 or not _block_aligned(start) or not (full_end or _block_aligned(end)):
            ctx.not_representable("a slice of a weight matrix that is not a whole block of its width axis")
        return _matrix_block(ctx, node, x, dim, start, node.layout[dim])
    w = vector_width_axis(ctx, x)
    if w is None or dim != w:
        return coordinatewise(ctx, node, gaussian=AFFINE)
    in_ratio = x.layout[w].ratio
    out_axis = node.layout[w]
    if step == 1 and start == 0 and (full_end or end == WidthInt(in_ratio)):
        return x  # the whole axis
    if step != 1 or not isinstance(out_axis, Width) or not _block_aligned(start):
        ctx.not_representable("a slice of the width axis that is not a whole block of it")
    block = common_block(_ratio(start), out_axis.ratio, in_ratio)
    return ctx.regroup(node.target, *node.args, layout=node.layout, block=block, kwargs=node.kwargs)


def _block_aligned(position: Any) -> bool:
    """Whether a position along a width axis is a whole number of width units (0 or r·n)."""
    return position == 0 or isinstance(position, WidthInt)


def _ratio(position: Any) -> Fraction:
    return position.ratio if isinstance(position, WidthInt) else Fraction(0)


def _matrix_block(ctx: LoweringContext, node: OpNode, m: MatrixValue, dim: int, start: Any, size: Any) -> MatrixValue:
    """The sub-matrix of ``m`` of ``size`` coordinates from ``start`` along its axis ``dim``."""
    if not isinstance(m.layout[dim], Width):
        ctx.unsupported(f"{node.op_name} of a weight matrix along a fixed axis: not supported yet")
    if not isinstance(size, Width):
        ctx.not_representable(f"{node.op_name} of a weight matrix into pieces that are not width-sized")
    return m.block(dim, _ratio(start), _ratio(start) + size.ratio)


def narrow(ctx: LoweringContext, node: OpNode) -> Any:
    x = node.args[0]
    dim = node.arg(1, "dim") % x.ndim
    start, length = node.arg(2, "start"), node.arg(3, "length")
    if isinstance(x, MatrixValue):
        if not _block_aligned(start) or not isinstance(length, WidthInt):
            ctx.not_representable("narrowing a weight matrix to something that is not a whole block of its width axis")
        return _matrix_block(ctx, node, x, dim, start, node.layout[dim])
    w = vector_width_axis(ctx, x)
    if w is None or dim != w:
        return coordinatewise(ctx, node, gaussian=AFFINE)
    out_axis = node.layout[w]
    if not isinstance(out_axis, Width) or not isinstance(length, WidthInt) or not _block_aligned(start):
        ctx.not_representable("narrowing the width axis to something that is not a whole block of it")
    block = common_block(_ratio(start), out_axis.ratio, x.layout[w].ratio)
    return ctx.regroup(node.target, *node.args, layout=node.layout, block=block, kwargs=node.kwargs)


def split(ctx: LoweringContext, node: OpNode) -> tuple[Any, ...]:
    """split / split_with_sizes / chunk / unbind / tensor_split: one instruction per piece (a weight
    matrix: one sub-matrix view per piece)."""
    x = node.args[0]
    name = node.target.overloadpacket.__name__
    dim = node.arg(1 if name == "unbind" else 2, "dim", 0) % max(x.ndim, 1)
    layouts = node.layout
    if isinstance(x, MatrixValue):
        if name == "unbind":
            ctx.not_representable("unbinding a weight matrix along a width axis into single coordinates")
        starts = _starts(layouts, dim)
        return tuple(_matrix_block(ctx, node, x, dim, start, part[dim]) for start, part in zip(starts, layouts,
                                                                                                strict=True))
    w = vector_width_axis(ctx, x)
    if w is not None and dim == w and (name == "unbind" or any(not isinstance(p[w], Width) for p in layouts)):
        ctx.not_representable(f"{node.op_name} of the width axis into pieces that are not width-sized")
    block = common_block(*(p[w].ratio for p in layouts)) if w is not None and dim == w else None
    pieces = []
    for i, part in enumerate(layouts):
        fn = Pick(node.target, i)
        if block is None:
            pieces.append(ctx.nonlin(fn, *node.args, layout=part, kwargs=node.kwargs, gaussian=AFFINE))
        else:
            pieces.append(ctx.regroup(fn, *node.args, layout=part, block=block, kwargs=node.kwargs))
    return tuple(pieces)


def _starts(layouts: Any, dim: int) -> list[Any]:
    """Where each piece of a split begins along axis ``dim`` (0 or a width position)."""
    starts, position = [], Fraction(0)
    for part in layouts:
        starts.append(WidthInt(position) if position else 0)
        position += part[dim].ratio if isinstance(part[dim], Width) else 0
    return starts


def cat(ctx: LoweringContext, node: OpNode) -> Value:
    tensors = list(node.args[0])
    dim = node.arg(1, "dim", 0)
    layout = node.layout
    dim %= len(layout)
    if not isinstance(layout[dim], Width):
        return coordinatewise(ctx, node, gaussian=AFFINE)
    parts = [t.layout[dim] if isinstance(t, Value) else None for t in tensors]
    if any(not isinstance(p, Width) for p in parts):
        ctx.not_representable("concatenating a fixed-size piece to a width axis",
                              "It gives single coordinates of the width axis a role of their own.")
    return ctx.regroup(node.target, *node.args, layout=layout, block=common_block(*(p.ratio for p in parts)),
                       kwargs=node.kwargs)


def stack(ctx: LoweringContext, node: OpNode) -> Value:
    for t in node.args[0]:
        vector_width_axis(ctx, t)
    return coordinatewise(ctx, node, gaussian=AFFINE)


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
    return coordinatewise(ctx, node, gaussian=AFFINE)


def pad(ctx: LoweringContext, node: OpNode) -> Value:
    """constant_pad_nd / pad (any mode): fine along fixed axes only."""
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    pad = list(node.arg(1, "pad"))
    if w is not None:
        position = x.ndim - 1 - w  # pad lists (left, right) pairs from the last axis backwards
        if position < len(pad) // 2 and (pad[2 * position] != 0 or pad[2 * position + 1] != 0):
            ctx.not_representable("padding the width axis")
    return coordinatewise(ctx, node, gaussian=AFFINE)


def embedding(ctx: LoweringContext, node: OpNode) -> Value:
    weight = node.args[0]
    if isinstance(weight, MatrixValue) or (isinstance(weight, Value) and 0 in width_axes(weight.layout)):
        ctx.not_representable("an embedding table whose number of rows grows with width")
    return coordinatewise(ctx, node, gaussian=AFFINE)


def _view(ctx: LoweringContext, node: OpNode) -> Value:
    """An op that only rearranges or repeats entries: coordinatewise, a linear map of its argument."""
    return coordinatewise(ctx, node, gaussian=AFFINE)


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules = rule_table(("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy", "_reshape_alias"),
                       reshape)
    rules.update(rule_table(("permute", "movedim"), permute))
    rules.update(rule_table(("transpose", "t", "swapaxes", "numpy_T"), transpose))
    rules.update(rule_table(("unsqueeze", "squeeze", "expand_as"), _view))
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
        aten.constant_pad_nd: pad,
        aten.pad: pad,
        aten.reflection_pad1d: pad,
        aten.reflection_pad2d: pad,
        aten.replication_pad1d: pad,
        aten.replication_pad2d: pad,
        aten.embedding: embedding,
    })
    return rules

