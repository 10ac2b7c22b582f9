"""Hats of one matrix (``HatFamily.CONSISTENT``): a new direction's Gaussians take their components along the
transpose's basis from the transpose's Gaussians, so that the matrix the hats sample and the one the transpose's
hats sample are one matrix. Expected value: the number ``e'ᵀWe`` of a
pair of directions is one, whichever family's Gaussians hold it, as for any matrix; drawn independently (the
default), each family holds its own, and a Stein dot adds the noise of every direction of the transpose's basis.
"""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.conftest import particle_steps
from tplimits.limit.kets import HatFamily
from tplimits.limit.mu import ParticleNetwork


def _shared_number_mismatch(consistent: bool, monkeypatch) -> float:
    """For a hidden matrix after 4 Stein steps: the largest difference between ``e'ᵀ(W e)`` as the forward hats
    hold it (``E_Tᵀ G_F``) and as the transpose's hats hold it (``(E_Fᵀ G_T)ᵀ``), over every pair of directions
    ``e`` of the forward basis and ``e'`` of the transpose's, relative to the largest of them."""
    monkeypatch.setattr(HatFamily, "CONSISTENT", consistent)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
    setup = tpl.derive("mlp", optimizer="sgd", depth=3, d_in=6).setup(X)
    net = ParticleNetwork(setup, 512, 0, torch.float64, "cpu", "stein", 0.1, 4)
    particle_steps(net, X, y, 4)
    forward, transposed = (net.operators["layers.1.weight"].families[d] for d in ("forward", "transposed"))
    by_forward = transposed.basis.cat().mT @ forward.gaussians.cat()  # [F, r_T, r_F]
    by_transposed = (forward.basis.cat().mT @ transposed.gaussians.cat()).mT
    return float((by_forward - by_transposed).abs().max() / by_forward.abs().max())


def test_consistent_hats_sample_one_matrix(monkeypatch):
    assert _shared_number_mismatch(True, monkeypatch) < 1e-10


def test_independent_hats_do_not(monkeypatch):
    """The check above can fail: with the default, independent draws, the two differ far above rounding."""
    assert _shared_number_mismatch(False, monkeypatch) > 0.1


@pytest.mark.parametrize("consistent", [False, True])
def test_the_outputs_law_is_kept(consistent, monkeypatch):
    """Both draws give the same limit: after 4 SGD steps of the MLP, 8 systems of 1024 particles each, the two
    means agree within their combined standard errors (the law changes in its finite-P noise only)."""
    monkeypatch.setattr(HatFamily, "CONSISTENT", consistent)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)
    limit = tpl.derive("mlp", optimizer="sgd", depth=3, d_in=6)
    traj = limit.train(X, y, steps=4, lr=0.2, particles=8 * 1024, batches=8, progress=False, seed=3)
    monkeypatch.setattr(HatFamily, "CONSISTENT", not consistent)
    other = limit.train(X, y, steps=4, lr=0.2, particles=8 * 1024, batches=8, progress=False, seed=4)
    z = (traj.outputs - other.outputs) / (traj.outputs_se.square() + other.outputs_se.square()).sqrt()
    assert float(z[1:].abs().max()) < 4.0, z
