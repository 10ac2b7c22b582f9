"""scaled_dot_product_attention.

With the head dimension as the width axis (fixed head count, d_head ∝ n) attention is
``softmax(scale · Σ_d q_d k_d + mask) · v``: the logits are a sum over the width axis (an Avg times
d_head), the softmax runs over fixed positions, and the product with ``v`` is coordinatewise.
sdpa's default scale 1/√d_head is width-dependent; it is recorded as an explicit power of width and
declared the op's default (``width_scale="default"``) so a parametrization can replace it (μP uses
1/d_head); so is an explicit ``scale=`` equal to it at every width (models that pass sdpa's default
themselves). Any other width-dependent scale is the model's own choice (``"model"``) and is kept.
With the head count as the width axis (d_head fixed) attention is coordinatewise in heads.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from tplimits.plugin import (
    LoweringContext,
    OpNode,
    Value,
    Width,
    WidthPower,
    aten,
    coordinatewise,
    fresh_letters,
    hookimpl,
    lower_einsum,
    vector_width_axis,
)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean masks keep where True; float masks are added (sdpa's convention)."""
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def _equal(scale: object, default: WidthPower) -> bool:
    """Whether an explicit scale is sdpa's default 1/√d_head at every width (models that pass it themselves)."""
    return (isinstance(scale, WidthPower) and scale.power == default.power
            and math.isclose(scale.coef, default.coef, rel_tol=1e-9))


def scaled_dot_product_attention(ctx: LoweringContext, node: OpNode) -> Value:
    q, k, v = node.args[:3]
    mask = node.arg(3, "attn_mask")
    dropout_p = node.arg(4, "dropout_p", 0.0)
    is_causal = node.arg(5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if node.kwargs.get("enable_gqa", False):
        ctx.unsupported("scaled_dot_product_attention with enable_gqa=True")
    axes = [vector_width_axis(ctx, t) for t in (q, k, v)]
    if dropout_p:
        ctx.notes.append(f"{ctx.where()}: attention dropout (p={dropout_p}) is off in the program")
    if all(a is None for a in axes) or (axes[0] is not None and axes[0] < q.ndim - 2
                                        and axes[0] == axes[1] == axes[2]):
        return coordinatewise(ctx, node)  # the width axis is a batch axis of attention (heads)
    if axes[0] != q.ndim - 1 or axes[1] != k.ndim - 1:
        ctx.not_representable("attention whose queries and keys do not both carry the width axis last")
    batch = fresh_letters(q.ndim - 2, "qkd")
    logits_layout = (*q.layout[:-2], q.layout[-2], k.layout[-2])
    logits = lower_einsum(ctx, f"{batch}qd,{batch}kd->{batch}qk", q, k, logits_layout)
    d_head: Width = q.layout[-1]
    default = WidthPower(float(d_head.ratio) ** -0.5, Fraction(-1, 2))
    if scale is None or _equal(scale, default):  # sdpa's own 1/√d_head: a parametrization may set this one
        scale, width_scale = default, "default"
    else:
        width_scale = "model" if isinstance(scale, WidthPower) else None
    logits = ctx.nonlin(aten.mul.Tensor, logits, scale, layout=logits_layout, width_scale=width_scale)
    if is_causal:
        tq, tk = q.layout[-2], k.layout[-2]
        causal = ctx.constant(torch.ones(tq, tk, dtype=torch.bool).tril(), hint="causal_mask")
        logits = ctx.nonlin(_apply_mask, logits, causal, layout=logits_layout)
    if mask is not None:
        logits = ctx.nonlin(_apply_mask, logits, mask, layout=logits_layout)
    probs = ctx.nonlin(_softmax_last, logits, layout=logits_layout)
    return lower_einsum(ctx, f"{batch}qk,{batch}kd->{batch}qd", probs, v, node.layout)


def softmax(ctx: LoweringContext, node: OpNode) -> Value:
    x = node.args[0]
    w = vector_width_axis(ctx, x)
    if w is not None and node.arg(1, "dim") % x.ndim == w:
        ctx.not_representable(
            f"{node.op_name} over the width axis",
            "Only softmax over fixed axes (positions, classes) is supported.",
        )
    return coordinatewise(ctx, node)


@hookimpl
def tplimits_lowering_rules() -> dict:
    return {
        aten.scaled_dot_product_attention: scaled_dot_product_attention,
        aten.softmax: softmax,
        aten._softmax: softmax,
        aten.log_softmax: softmax,
        aten._log_softmax: softmax,
    }
