"""No silently wrong limit: a run that blows up raises ``Diverged`` at the step it happens, naming the
value, and no verdict is drawn from it; a checkpoint of another run, or a file that is not one, is
refused by name (see docs/limit.md, 'Divergence' and 'Checkpoints')."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import tplimits as tpl
from tplimits.cli import main
from tplimits.errors import CheckpointError, Diverged
from tplimits.limit.check import compare, finite_outputs
from tplimits.limit.limit import Trajectory
from tplimits.limit.runs import batch_schedule


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)


@pytest.mark.parametrize("activation, dtype", [("tanh", torch.float64), ("relu", torch.float64),
                                               ("identity", torch.float64), ("tanh", torch.float32)])
def test_train_raises_at_the_step_it_diverges(data, activation, dtype):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4, activation=activation)
    with pytest.raises(Diverged, match=r"diverged at step \d+: %\w+ .* is the first value that blew up") as caught:
        limit.train(X, y, steps=25, lr=1e4, particles=256, dtype=dtype, progress=False)
    error = caught.value
    assert 1 <= error.step < 25 and error.value in {ins.name for ins in limit.setup(X).program}
    assert error.trajectory.steps == error.step - 1  # the steps computed before it, all finite
    assert torch.isfinite(error.trajectory.outputs).all()


def test_outputs_on_a_large_scale_are_not_divergence(data):
    """The bound follows the targets' scale: regression onto targets of size 100 trains normally."""
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    traj = limit.train(X, 300 * y, steps=6, lr=0.5, particles=256, progress=False)
    assert traj.outputs.abs().max() > 10


def test_check_draws_no_verdict_from_a_diverged_run(data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    with pytest.raises(Diverged, match="the limit diverged at step"):
        limit.check(X, y, widths=[64, 128], seeds=2, steps=25, lr=1e4, particles=256, progress=False)
    schedule = batch_schedule(len(X), None, 3, 0)
    with pytest.raises(Diverged, match=r"the finite model of width 64 \(seed 1\) diverged at step \d"):
        finite_outputs(limit, X, y, len(X), 64, 1, 3, 1e6, "mse", schedule, torch.float64)
    sane = limit.train(X, y, steps=3, lr=0.1, particles=256, progress=False)
    broken = attrs.evolve(sane, outputs=sane.outputs.clone().index_fill_(0, torch.tensor([2]), float("nan")))
    with pytest.raises(Diverged, match="the trajectory given diverged at step 2"):
        limit.check(X, y, widths=[64, 128], seeds=2, steps=3, lr=0.1, trajectory=broken, progress=False)


def test_cli_check_exits_nonzero_naming_the_step(capsys):
    code = main(["check", "--lr", "1e4", "--steps", "12", "--loss", "mse", "--particles", "1024", "--seeds", "2",
                 "--widths", "64", "128", "--plot", "", "--quiet"])
    assert code != 0
    assert "diverged at step" in capsys.readouterr().err


def test_checkpoint_of_another_run_names_what_differs(tmp_path, data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    path = str(tmp_path / "run.pt")
    options = dict(steps=3, particles=256, dots="stein", checkpoint=path, progress=False)
    limit.train(X, y, lr=0.5, **options)
    with pytest.raises(CheckpointError, match="another run: lr differ"):
        limit.train(X, y, lr=0.25, **options)
    with pytest.raises(CheckpointError, match="another run: X differ"):
        limit.train(X + 1, y, lr=0.5, **options)
    with pytest.raises(CheckpointError, match="another run: loss, y differ"):
        limit.train(X, y.squeeze(1).gt(0).long(), lr=0.5, loss="cross_entropy", **options)
    adam = tpl.derive("mlp", optimizer="adam", depth=2, d_in=4)
    with pytest.raises(CheckpointError, match="optimizer"):
        adam.train(X, y, lr=0.5, **options)
    assert torch.equal(limit.train(X, y, lr=0.5, **options).outputs, limit.train(X, y, lr=0.5, **options).outputs)


def test_unreadable_checkpoints_are_named(tmp_path, data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt' cannot be read"):
        limit.train(X, y, steps=2, particles=256, dots="stein", checkpoint=str(corrupt), progress=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt' is not a tplimits checkpoint"):
        limit.train(X, y, steps=2, particles=256, dots="stein", checkpoint=str(foreign), progress=False)
    with pytest.raises(tpl.TplimitsError, match="checkpoint=.*directory does not exist"):
        limit.train(X, y, steps=2, particles=256, dots="stein", checkpoint=str(tmp_path / "no" / "run.pt"),
                    progress=False)


# -- gaps judged against the trajectory's own scale (docs/limit.md, "Verdict") ---------------------------------------
WIDTHS = (64, 256, 1024)


def _synthetic(scale: float, noise: float, seeds: int = 4, seed: int = 0) -> tuple[torch.Tensor, Trajectory]:
    """A limit trajectory of size ``scale`` and finite runs around it whose deviations shrink as ``width^-1/2``
    from ``noise * scale`` at the smallest width."""
    g = torch.Generator().manual_seed(seed)
    lim = scale * torch.randn(4, 5, generator=g, dtype=torch.float64)
    runs = torch.stack([torch.stack([lim + noise * scale * (w / WIDTHS[0]) ** -0.5 * torch.randn(4, 5, generator=g,
                                                                                                 dtype=torch.float64)
                                     for _ in range(seeds)]) for w in WIDTHS])
    zeros = torch.zeros_like(lim)
    traj = Trajectory(outputs=lim, outputs_se=zeros, loss=zeros[:, 0], loss_se=zeros[:, 0], test_outputs=None,
                      test_outputs_se=None, kernels={}, kernels_se={}, particles=1024, batches=4, dots="stein",
                      seconds=0.0)
    return runs, traj


def test_the_verdict_does_not_depend_on_the_units_of_the_outputs():
    runs, traj = _synthetic(1.0, 0.2)
    lim = traj.outputs
    expected_scale = max(float(lim.square().mean().sqrt()), float((lim - lim[0]).square().mean().sqrt()))
    expected = (runs.mean(1) - lim).flatten(1).square().mean(1).sqrt() / expected_scale
    for c in (1e-12, 1.0, 1e12):
        report = compare(c * runs, attrs.evolve(traj, outputs=c * lim), WIDTHS)
        assert report.passed and not report.exact, report.format()
        assert report.scale == pytest.approx(c * expected_scale, rel=1e-12)
        torch.testing.assert_close(report.relative_mean_gap, expected, rtol=1e-9, atol=0)
        assert report.slope == pytest.approx(compare(runs, traj, WIDTHS).slope, rel=1e-9)


def test_runs_equal_to_the_limit_up_to_rounding_pass():
    """Gaps of zero (or rounding) used to give a NaN or meaningless slope and FAILED; they are agreement."""
    for noise in (0.0, 1e-13):
        runs, traj = _synthetic(1e-9, noise)
        report = compare(runs, traj, WIDTHS)
        assert report.exact and report.passed and math.isfinite(report.slope), report.format()
        assert "exact agreement" in report.format()


def test_noise_as_large_as_the_outputs_cannot_pass():
    """Finite runs whose seed mean is off by the trajectory's whole scale, with standard errors as large: within
    3 standard errors and a slope of -1/2, which passed before — but nothing was resolved."""
    runs, traj = _synthetic(1e6, 16.0)
    report = compare(runs, traj, WIDTHS)
    assert report.mean_gap[-1] <= report.tolerance * report.mean_gap_se[-1] and report.slope <= report.max_slope
    assert report.relative_mean_gap[-1] > report.max_relative_gap
    assert not report.agrees and not report.passed and "FAILED" in report.format()
