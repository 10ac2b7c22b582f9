"""Derivatives of a function of parameters without materializing them whole: the empirical neural
tangent kernel, a block of columns at a time, and the weak-correlation statistic of the second
derivative along the first (a forward-over-forward product, never a Hessian).

``fn`` is a function ``θ -> output`` of a dict of tensors (e.g. :meth:`LinearizedModel.function`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from tplimits.errors import check_count

Params = dict[str, torch.Tensor]


def empirical_ntk(fn: Callable[[Params], torch.Tensor], params: Params, weights: Mapping[str, float] | None = None,
                  columns: int = 16) -> torch.Tensor:
    """``K = J P Jᵀ`` over the flattened output coordinates, ``J = ∂fn/∂θ`` at ``params`` and ``P`` the
    diagonal of per-parameter ``weights`` (1 where not given; an SGD step moves ``f`` by ``-lr·K·χ`` when
    they are the optimizer's ``lr_scale·grad_scale``).

    Each block of ``columns`` columns is as many vector-Jacobian products (vmapped) followed by their
    Jacobian-vector products: memory ``columns`` times the parameters, never the Jacobian of every output.
    """
    check_count("columns", columns, 1)
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash-attention kernel has no forward-mode derivative
        return _empirical_ntk(fn, params, dict(weights or {}), columns)


def _empirical_ntk(fn: Callable[[Params], torch.Tensor], params: Params, weights: dict[str, float],
                   columns: int) -> torch.Tensor:
    out, pullback = vjp(fn, params)
    m = out.numel()
    basis = torch.eye(m, dtype=out.dtype, device=out.device).reshape(m, *out.shape)

    def column(grad: Params) -> torch.Tensor:
        for name, g in grad.items():  # in place: a second copy of every gradient would double the memory
            if weights.get(name, 1.0) != 1.0:
                g.mul_(weights[name])
        return jvp(fn, (params,), (grad,))[1].reshape(m)

    blocks = [vmap(column)(vmap(pullback)(rows)[0]) for rows in basis.split(columns)]
    kernel = torch.cat(blocks)
    return (kernel + kernel.T) / 2  # exact symmetry; the two triangles differ by rounding only


def weak_correlation(fn: Callable[[Params], torch.Tensor], params: Params, direction: Params) -> float:
    """``RMS(½ ∂²f[u, u]) / RMS(∂f[u])`` over the output coordinates, ``u`` = ``direction``: the second-order
    change of ``f`` along a step relative to its first-order change.

    With ``u`` an SGD step, ``u = -η Σ_b χ_b ∇f(x_b)``, the numerator is
    ``η²/2 Σ_{b,c} χ_b χ_c ∂²f(x_a)[∇f(x_b), ∇f(x_c)]`` and the denominator ``η Σ_b χ_b K(x_a, x_b)``:
    the second derivative contracted with first derivatives, normalized by them (seed 000's weak
    correlation), which falls like n^-1/2 where training is linear. Computed as ``jvp`` of ``jvp``.
    """
    def first(p: Params) -> torch.Tensor:
        return jvp(fn, (p,), (direction,))[1]

    linear, second = jvp(first, (params,), (direction,))
    numerator = 0.5 * float(second.detach().double().square().mean().sqrt())
    denominator = float(linear.detach().double().square().mean().sqrt())
    if denominator == 0.0:  # a step that does not move f: no second-order change relative to it either
        return 0.0 if numerator == 0.0 else float("inf")
    return numerator / denominator
