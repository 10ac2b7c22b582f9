"""Column stores (``_Columns``): a thin store keeps a transposed mirror for its sums over particles, a wide one
does not, and a restored store keeps the layout it was saved with (mirror and capacity, so its views have the
saved strides); a finished system's stores are freed when it ends. Expected values: ``Cᵀx`` formed directly by
torch, the uninterrupted run, and the garbage collector's list of live objects."""

from __future__ import annotations

import gc

import pytest
import torch

import tplimits as tpl
from tests.conftest import particle_steps
from tplimits.limit.kets import HatFamily, _Columns
from tplimits.limit.mu import ParticleNetwork


@pytest.mark.parametrize("width", [16, _Columns.THIN, _Columns.THIN + 1, 512])
def test_a_store_mirrors_only_thin_appends_and_sums_alike(width):
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, 200, width, generator=g) for _ in range(3)]
    store = _Columns(False, torch.device("cpu"))
    for block in blocks:
        store.append(block)
    assert store.mirrored == (width <= _Columns.THIN)
    C = torch.cat(blocks, dim=-1)
    x = torch.randn(3, 200, width, generator=g)
    torch.testing.assert_close(store.reduce(x), C.mT @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(store.cat(), C, rtol=0, atol=0)


def test_no_mirror_off_the_cpu_or_under_autograd():
    assert not _Columns(True, torch.device("cpu")).may_mirror
    assert not _Columns(False, torch.device("meta")).may_mirror


def test_a_resumed_run_keeps_each_stores_layout():
    """48 inputs, 4 steps: each hat basis holds more columns when saved than a thin append (up to 192; hats of
    one matrix find some kets in the span already); restored as one append of that width, a store would drop its
    mirror and sum in another order than the run it continues."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(48, 3, generator=g), torch.randn(48, 1, generator=g)
    setup = tpl.derive("mlp", optimizer="sgd", depth=3, d_in=3).setup(X)
    a = ParticleNetwork(setup, 512, 0, torch.float64, "cpu", "stein", 0.3, 7)
    particle_steps(a, X, y, 4)
    bases = [f.basis for op in a.operators.values() for f in op.families.values()]
    assert bases and all(b.mirrored and b.cat().shape[-1] > _Columns.THIN for b in bases)
    saved = a.state_dict()
    b = ParticleNetwork(setup, 512, 99, torch.float64, "cpu", "stein", 0.3, 7)
    b.load_state_dict(saved)
    assert all(f.basis.mirrored for op in b.operators.values() for f in op.families.values())
    for store_a, store_b in _stores(a, b):
        assert store_a.capacity == store_b.capacity and store_a.cat().stride() == store_b.cat().stride()
    for out_a, out_b in zip(particle_steps(a, X, y, 3), particle_steps(b, X, y, 3), strict=True):
        assert torch.equal(out_a, out_b)


def _stores(a: ParticleNetwork, b: ParticleNetwork) -> list[tuple[_Columns, _Columns]]:
    """The hat stores of two systems of one setup, paired."""
    pairs = []
    for name, op in a.operators.items():
        for key, family in op.families.items():
            other = b.operators[name].families[key]
            pairs += [(family.basis, other.basis), (family.gaussians, other.gaussians)]
    return pairs


def test_a_finished_systems_hats_are_freed_without_the_garbage_collector():
    """Hats of one matrix refer to each other; a cycle would keep a finished system's column stores (13 GB of a
    system of 2^18 particles on a GPU) under the next system's until the collector ran."""
    X, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 1)
    limit = tpl.derive("mlp", optimizer="adam", depth=3, d_in=3)
    gc.collect()
    gc.disable()
    try:
        traj = limit.train(X, y, steps=2, lr=0.02, particles=1024, batches=2, copies=64, dots="stein",
                           progress=False)
        alive = [o for o in gc.get_objects() if isinstance(o, (HatFamily, _Columns))]
    finally:
        gc.enable()
    assert traj.dots == "stein" and HatFamily.CONSISTENT
    assert not alive, f"{len(alive)} hat families and column stores outlive their systems"
