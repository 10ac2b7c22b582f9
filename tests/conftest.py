"""Shared fixtures: float64 by default (replay is checked to 1e-10), the relative-error helper, and full-batch
steps of a particle system."""

from __future__ import annotations

import pytest
import torch

from tplimits.limit.kets import HatFamily
from tplimits.limit.runs import default_dtype


@pytest.fixture(autouse=True)
def float64():
    with default_dtype(torch.float64):
        yield


@pytest.fixture
def every_direction(monkeypatch):
    """Hats keep every new direction above rounding under Stein dots too, as they do under autograd dots: the
    regime of systems with many particles per system (``HatFamily.STEIN_SHARE / P`` below every share), where
    each sampled ket lies in its basis's span and bases gain directions every step, reached at test sizes."""
    monkeypatch.setattr(HatFamily, "STEIN_SHARE", 0.0)


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


def particle_steps(net, X: torch.Tensor, y: torch.Tensor, steps: int, last: bool = False,
                   loss_name: str = "mse") -> list[torch.Tensor]:
    """``steps`` full-batch steps of a particle system (mse unless ``loss_name`` says otherwise); its outputs
    before each (and after the last with ``last``)."""
    import tplimits as tpl

    loss = tpl.loss(loss_name)
    outs = []
    for _ in range(steps):
        interp = net.forward((X,))
        out = net.outputs(interp)
        outs.append(out)
        net.backward_and_update(interp, loss.error_signal(out, y, torch.arange(len(X))))
    if last:
        outs.append(net.outputs(net.forward((X,))))
    return outs
