"""Inputs that used to give a silent or meaningless result get a named error naming the argument
(issue cases: one width, duplicate widths, no examples, more examples than there are, every label
ignored, labels out of range, a trajectory of another run, no standard error, non-positive widths)."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.cli import main


@pytest.fixture(scope="module")
def limit():
    return tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


@pytest.mark.parametrize("widths, match", [([64], "two distinct widths"), ([64, 64, 128], "each once"),
                                           ([0, 64], "positive integers"), ([64.0, 128], "positive integers")])
def test_check_widths(limit, data, widths, match):
    with pytest.raises(tpl.TplimitsError, match=match):
        limit.check(*data, widths=widths, seeds=2, steps=1, particles=256, progress=False)


def test_check_seeds(limit, data):
    with pytest.raises(tpl.TplimitsError, match="seeds=1"):
        limit.check(*data, widths=[32, 64], seeds=1, steps=1, particles=256, progress=False)


def test_coord_check_needs_two_widths():
    with pytest.raises(tpl.TplimitsError, match=r"widths=\[128\].*two distinct"):
        tpl.coord_check("mlp", widths=(128,))


def test_a_trajectory_of_another_run_is_refused(limit, data):
    X, y = data
    traj = limit.train(X, y, steps=2, lr=0.1, particles=256, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its lr differ"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=2, lr=0.2, trajectory=traj, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its X, y differ"):
        limit.check(X + 1, -y, widths=[32, 64], seeds=2, steps=2, lr=0.1, trajectory=traj, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its steps differ"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=3, lr=0.1, trajectory=traj, progress=False)


def test_one_system_has_no_standard_error(limit, data):
    X, y = data
    traj = limit.train(X, y, steps=1, lr=0.1, particles=256, batches=1, progress=False)
    assert torch.isnan(traj.outputs_se).all() and torch.isfinite(traj.outputs).all()
    with pytest.raises(tpl.TplimitsError, match="no standard errors"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=1, lr=0.1, trajectory=traj, progress=False)


def test_cross_entropy_labels():
    limit = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3, d_out=3)
    X = torch.randn(4, 3)
    with pytest.raises(tpl.TplimitsError, match="every label of the batch is -100"):
        limit.train(X, torch.full((4,), -100), steps=1, loss="cross_entropy", particles=256, progress=False)
    with pytest.raises(tpl.TplimitsError, match=r"labels must be in \[0, 2\].*from 0 to 7"):
        limit.train(X, torch.tensor([0, 1, 2, 7]), steps=1, loss="cross_entropy", particles=256, progress=False)


@pytest.mark.parametrize("argv, match", [
    (["check", "--examples", "0"], "--examples must be in \\[1, 1797\\]"),
    (["check", "--examples", "5000"], "--examples must be in \\[1, 1797\\]"),
    (["inspect", "mlp", "--width", "0"], "--width must be a positive integer"),
    (["inspect", "mlp", "--width", "-5"], "--width must be a positive integer"),
])
def test_cli_refuses(argv, match, capsys):
    assert main(argv) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_lower_width_must_be_positive():
    with pytest.raises(tpl.TplimitsError, match="width must be a positive integer, got 0"):
        tpl.lower("mlp", width=0)
