"""The exact path's buffers kept between calls (``tplimits.limit.exact.Workspace``): a kernel returned by one call
is unchanged by the next calls, and each call's kernel is its own inputs' (the arc-cosine recursion written in
``tests/test_nt_exact.py``), whatever the order of inputs and kinds."""

from __future__ import annotations

import torch

import tplimits as tpl
from tests.test_nt_exact import _inputs, _ntp_mlp, _relu_duals


def test_kernels_returned_are_not_overwritten_by_later_calls():
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=3, d_in=4, activation="relu")
    inputs = [_inputs(6, seed=s) for s in range(3)]
    expected = [dict(zip(("nngp", "ntk"), _ntp_mlp(X, 3, True, _relu_duals), strict=True)) for X in inputs]
    held = []
    for i, kind in ((0, "ntk"), (1, "nngp"), (1, "ntk"), (0, "nngp"), (2, "ntk"), (2, "nngp"), (0, "ntk")):
        K = limit.kernel(inputs[i], kind=kind, path="exact").value
        held.append((i, kind, K, K.clone()))
        assert (K - expected[i][kind]).abs().max() < 1e-10, (i, kind)
    for i, kind, K, copy in held:  # nothing a later call wrote reached a kernel already returned
        assert torch.equal(K, copy), (i, kind)
        assert (K - expected[i][kind]).abs().max() < 1e-10, (i, kind)


def test_square_root_of_the_angle_matches_torch_sqrt():
    """``x⁺·max(x, tiny)^-½`` (the arc-cosine angle's square root, faster than torch's float64 ``sqrt`` on CPU) against
    ``torch.sqrt`` of ``max(x, 0)``: within 2 ulp, exact zeros and negative rounding noise give 0, NaN stays NaN."""
    from tplimits.limit.exact import _sqrt_nonnegative

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-300, 300, (4000,),
                                                                                               generator=g),
                   torch.tensor([0.0, -0.0, -1e-17, -3.0, 1e-310, float("nan")], dtype=torch.float64)])
    expected = torch.sqrt(x.clamp_min(0))
    got = _sqrt_nonnegative(x.clone(), torch.empty_like(x))
    finite = torch.isfinite(expected) & (expected > 1e-150)
    assert ((got[finite] - expected[finite]).abs() <= 2 * torch.finfo(x.dtype).eps * expected[finite]).all()
    assert torch.equal(got[-6:-2], torch.zeros(4, dtype=x.dtype))  # zeros and negative noise: exactly 0
    assert 0 < float(got[-2]) < 1e-150 and torch.isnan(got[-1])  # a subnormal stays negligible; NaN propagates
