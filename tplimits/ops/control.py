"""Higher-order ops: regions of ordinary Python that ``torch.export`` wraps in a subgraph.

A ``@torch.no_grad()`` forward (HF rotary embeddings), a ``torch.autocast(enabled=False)`` block
and ``torch.cond`` reach the traced graph as higher-order ops whose bodies are subgraphs. Their
code is inlined into the program (``ctx.inline``), with the region's meaning applied at its
boundary:

* grad mode off: the outputs are cut from backpropagation (``stop_gradient``: an identity Nonlin
  declared not differentiable), as autograd cuts them; folded constants need no cut;
* autocast off: the body runs in the model's dtype, exactly as written. An enabled autocast region
  would compute in a lower precision that the program does not model, and is refused;
* ``torch.cond``: a predicate fixed when the model is traced (a folded constant, the same at every
  width) selects one branch. A predicate computed at run time would make the program branch on data,
  which the IR cannot express.
"""

from __future__ import annotations

import torch

from tplimits.plugin import LoweringContext, OpNode, Value, hookimpl, stop_gradient

higher_order = torch.ops.higher_order


def grad_mode_region(ctx: LoweringContext, node: OpNode) -> tuple:
    enabled, body, *operands = node.args
    outputs = ctx.inline(body, operands)
    return outputs if enabled else tuple(stop_gradient(ctx, value) for value in outputs)


def autocast_region(ctx: LoweringContext, node: OpNode) -> tuple:
    _device, dtype, enabled, _cache, body, *operands = node.args
    if enabled:
        ctx.unsupported(f"an enabled torch.autocast region (mixed precision in {dtype})",
                        "The program computes in the model's own dtype; lower the model with autocast disabled.")
    return ctx.inline(body, operands)


def cond(ctx: LoweringContext, node: OpNode) -> tuple:
    predicate, true_body, false_body, operands = node.args[:4]
    if isinstance(predicate, Value):
        if predicate.const is None:
            ctx.unsupported("torch.cond on a predicate computed at run time (from the inputs or the network)",
                            "Only a predicate fixed when the model is traced selects a branch: the program does "
                            "not branch on data.")
        predicate = bool(predicate.const)
    return ctx.inline(true_body if predicate else false_body, operands)


@hookimpl
def tplimits_lowering_rules() -> dict:
    return {
        higher_order.wrap_with_set_grad_enabled: grad_mode_region,
        higher_order.wrap_with_autocast: autocast_region,
        higher_order.cond: cond,
    }
