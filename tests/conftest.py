"""Shared fixtures: float64 by default (replay is checked to 1e-10), and the relative-error helper."""

from __future__ import annotations

import pytest
import torch

from tplimits.limit.runs import default_dtype


@pytest.fixture(autouse=True)
def float64():
    with default_dtype(torch.float64):
        yield


def assert_close_tree(got, ref, rtol: float = 1e-10) -> None:
    """Every tensor leaf of ``got`` equals the one of ``ref`` to ``rtol`` relative to ref's scale."""
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    ref_leaves, ref_spec = torch.utils._pytree.tree_flatten(ref)
    assert len(got_leaves) == len(ref_leaves), (got_spec, ref_spec)
    for g, r in zip(got_leaves, ref_leaves, strict=True):
        if not isinstance(r, torch.Tensor):
            assert g == r
            continue
        assert g.shape == r.shape
        scale = r.abs().max().clamp_min(1e-300)
        err = (g - r).abs().max() / scale
        assert err <= rtol, f"relative error {err:.3e} > {rtol}"
