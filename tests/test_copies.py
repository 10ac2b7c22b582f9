"""The copy population of a nonlinear rule's grids in the μ-limit (``copies=P′``, MATH.md §11.1, §11.4).

Exact: before the first update the copy grids see the very kets the dense grid sees, so after it the
forward grid is the dense grid's first ``P′`` columns and the transposed grid its first ``P′`` rows (each
pair of particles with the same optimizer state); normalized updates divide by the estimated norm of the
whole grid. Statistical: the limit with ``P′ = P/16`` agrees with finite-width training (the seed average
at the largest width within 3 standard errors, the gap shrinking like ``width^-1/2``) and with the dense
grid of the same seed.
"""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.conftest import particle_steps
from tplimits.limit.mu import ParticleNetwork, grid_entries


def _regression(d_in: int = 4, rows: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, 1, generator=g)


@pytest.mark.parametrize("options", [dict(optimizer="adam"), dict(optimizer="lion"),
                                     dict(optimizer="adam", weight_decay=0.1)])
def test_first_update_is_the_dense_grid_at_the_copy_pairs(options):
    X, y = _regression()
    setup = tpl.derive("mlp", depth=3, d_in=4, **options).setup(X)
    P, copies = 256, 48
    dense = ParticleNetwork(setup, P, 3, torch.float64, "cpu", "stein", 0.02, 2)
    paired = ParticleNetwork(setup, P, 3, torch.float64, "cpu", "stein", 0.02, 2, copies=copies)
    particle_steps(dense, X, y, 1, last=True)
    particle_steps(paired, X, y, 1, last=True)
    hidden = [name for name, op in dense.operators.items() if op.dense is not None]
    assert len(hidden) == 2 and all(paired.operators[n].pairs is not None for n in hidden)
    for name in hidden:
        op = dense.operators[name]
        grid = op.dense.movedim((op.out_axis, op.in_axis), (0, 1))  # [P_out, P_in]
        assert grid.abs().max() > 0
        pairs = paired.operators[name].pairs
        assert pairs.forward.shape == (1, P, copies) and pairs.transposed.shape == (1, copies, P)
        torch.testing.assert_close(pairs.forward[0], grid[:, :copies], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(pairs.transposed[0], grid[:copies, :], rtol=1e-12, atol=1e-15)
        # each grid has its own optimizer state, equal to the dense state at its pairs
        states = paired.update_states[name]
        dense_state = dense.update_states[name]["q_state"]
        for key, value in dense_state.items():
            value = value.movedim((op.out_axis, op.in_axis), (0, 1))
            torch.testing.assert_close(states["forward"]["q_state"][key][0], value[:, :copies], rtol=1e-12,
                                       atol=1e-15)
            torch.testing.assert_close(states["transposed"]["q_state"][key][0], value[:copies], rtol=1e-12,
                                       atol=1e-15)


def test_normalized_updates_divide_by_the_estimated_norm_of_the_whole_grid():
    X, y = _regression()
    setup = tpl.derive("mlp", optimizer="sgd", param="muP-normalized", depth=2, d_in=4).setup(X)
    P, copies = 512, 128
    dense = ParticleNetwork(setup, P, 5, torch.float64, "cpu", "stein", 0.02, 1)
    paired = ParticleNetwork(setup, P, 5, torch.float64, "cpu", "stein", 0.02, 1, copies=copies)
    particle_steps(dense, X, y, 1, last=True)
    particle_steps(paired, X, y, 1, last=True)
    name = next(n for n, op in dense.operators.items() if op.dense is not None)
    grid = dense.operators[name].dense
    ratio = paired.operators[name].pairs.forward[0] / grid[:, :copies]
    # one common factor: the dense norm over its estimate from the copy columns, near 1
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-10, atol=0)
    assert abs(float(ratio.mean()) - 1) < 0.1


def test_a_copy_population_resumes_exactly():
    X, y = _regression()
    setup = tpl.derive("mlp", optimizer="adam", depth=3, d_in=4).setup(X)
    a = ParticleNetwork(setup, 256, 0, torch.float64, "cpu", "stein", 0.02, 4, copies=32)
    particle_steps(a, X, y, 2, last=True)
    saved = a.state_dict()
    b = ParticleNetwork(setup, 256, 99, torch.float64, "cpu", "stein", 0.02, 4, copies=32)
    b.load_state_dict(saved)
    for out_a, out_b in zip(particle_steps(a, X, y, 2, last=True), particle_steps(b, X, y, 2, last=True), strict=True):
        assert torch.equal(out_a, out_b)


def test_copies_cost_entries_linear_in_particles():
    X, _ = _regression()
    setup = tpl.derive("mlp", optimizer="adam", depth=3, d_in=4).setup(X)
    assert grid_entries(setup, 1024, None) == 2 * 1024**2
    assert grid_entries(setup, 1024, 64) == 2 * 2 * 1024 * 64
    assert grid_entries(setup, 1024, 4096) == 2 * 1024**2  # at least the particles: the dense grid


def test_copies_agree_with_the_dense_grid_within_standard_errors():
    limit = tpl.derive("mlp", optimizer="adam", depth=3, d_in=4)
    X, y = _regression()
    options = dict(steps=4, lr=0.02, particles=2**12, batches=4, progress=False, seed=2)
    full = limit.train(X, y, copies=2**10, **options)
    cut = limit.train(X, y, copies=2**6, **options)
    se = (full.outputs_se.square() + cut.outputs_se.square()).sqrt()
    assert float(((full.outputs - cut.outputs).abs() / se).max()) < 3
    assert float((full.outputs[-1] - full.outputs[0]).abs().max()) > 0.05


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_adam_with_a_sixteenth_of_the_particles_as_copies_matches_finite_width(arch):
    """Finite models trained by a plain torch loop against the limit with ``P′ = P/16`` per system."""
    if arch == "mlp":
        limit = tpl.derive("mlp", optimizer="adam", depth=3, d_in=4, activation="tanh")
        X, y = _regression()
        widths, particles, steps, loss = [64, 256, 1024], 2**13, 4, "mse"
    else:
        config = dict(n_layers=1, n_heads=2, vocab=16, seq_len=4, batch=2)
        limit = tpl.derive("transformer", optimizer="adam", **config)
        X = tpl.architecture("transformer").example_inputs(**config)[0]
        out = limit.family(X).model(32, 0)(X)
        y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(1))
        widths, particles, steps, loss = [32, 128, 512], 2**12, 3, "cross_entropy"
    report = limit.check(X, y, widths=widths, seeds=6, steps=steps, lr=0.02, loss=loss, particles=particles,
                         copies=particles // 4 // 16, progress=False)
    assert report.passed, report.format()


@pytest.mark.slow
def test_adam_copies_at_larger_sizes_match_finite_width():  # about 8 min on 2 shared cores
    """P′ = P/16 at 2^16 particles: the seed average at width 4096 within 3 standard errors of the limit, and
    the gap shrinking like width^-1/2 from 256 to 1024. From 1024 to 4096 it flattens (measured: 0.0120 ±
    0.0020, then 0.0107 ± 0.0021): at width 4096 the finite models' fluctuations fall below the limit's own
    Monte Carlo error, which no copy count changes (benchmarks/bench_limit.py copies-accuracy)."""
    limit = tpl.derive("mlp", optimizer="adam", depth=3, d_in=4, activation="tanh")
    X, y = _regression(rows=8)
    particles = 2**16
    report = limit.check(X, y, widths=[256, 1024, 4096], seeds=8, steps=10, lr=0.02, particles=particles,
                         copies=particles // 4 // 16, progress=False)
    assert report.agrees, report.format()
    assert float(report.gap[1] / report.gap[0]) <= 4**-0.4, report.format()
