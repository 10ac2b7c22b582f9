"""The CLI on the user's model and data: every model form ``inspect`` takes, any registered --param and
--optimizer, and --data from scikit-learn's bundled sets or a .pt / .npz file; the PNGs it draws."""

from __future__ import annotations

import numpy
import pytest
import torch

from tplimits.cli import load_data, main

USER_MODEL = """
import torch
from torch import nn


def make(width):
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))


def inputs():
    return (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),)
"""


@pytest.mark.parametrize(("name", "rows", "features", "classes"),
                         [("digits", 1797, 64, 10), ("iris", 150, 4, 3), ("wine", 178, 13, 3),
                          ("breast_cancer", 569, 30, 2)])
def test_bundled_sets(name, rows, features, classes):
    X, y = load_data(name)
    assert X.shape == (rows, features) and int(y.max()) + 1 == classes
    assert torch.allclose(X.mean(0), torch.zeros(features), atol=1e-10)  # standardized
    X16, y16 = load_data(name, examples=16)
    assert X16.shape == (16, features) and len(y16) == 16


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_files_with_X_and_y(tmp_path, suffix):
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.arange(5) % 2
    path = tmp_path / f"data{suffix}"
    if suffix == ".pt":
        torch.save({"X": X, "y": y}, path)
    else:
        numpy.savez(path, X=X.numpy(), y=y.numpy())
    got_X, got_y = load_data(str(path))
    assert torch.equal(got_X, X) and torch.equal(got_y, y)


def test_bad_data_is_named(tmp_path, capsys):
    torch.save({"inputs": torch.zeros(2)}, tmp_path / "wrong.pt")
    (tmp_path / "junk.npz").write_text("not an archive")
    cases = [("nope", "use one of scikit-learn's bundled sets"), (str(tmp_path / "missing.pt"), "no such file"),
             (str(tmp_path / "wrong.pt"), "must hold a dict with tensors 'X' and 'y'"),
             (str(tmp_path / "junk.npz"), "cannot be read")]
    for source, match in cases:
        assert main(["diagnose", "--data", source, "--plot", "", "--quiet"]) == 2
        assert match in capsys.readouterr().err
    assert main(["diagnose", "--data", "iris", "--examples", "1000", "--plot", "", "--quiet"]) == 2
    assert "--examples must be in [1, 150]" in capsys.readouterr().err


def test_diagnose_a_user_model_on_a_bundled_set(tmp_path, capsys):
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    plot = tmp_path / "diag.png"
    code = main(["diagnose", f"{path}:make", "--inputs", f"{path}:inputs", "--data", "iris", "--examples", "12",
                 "--param", "muP", "--widths", "16", "32", "--seeds", "1", "--steps", "2", "--plot", str(plot),
                 "--quiet"])
    out = capsys.readouterr().out
    assert "muP (sgd):" in out and "kernel drift" in out and plot.stat().st_size > 0
    assert code == (1 if "  ! " in out else 0)  # the exit status says whether the verdict has a contradiction


def test_coordcheck_on_data_draws_its_png(tmp_path, capsys):
    plot = tmp_path / "coord.png"
    assert main(["coordcheck", "mlp", "--param", "NTP", "muP", "--optimizer", "adam", "--lr", "0.01", "--data",
                 "wine", "--examples", "8", "--widths", "32", "64", "--seeds", "1", "--steps", "2", "-o", "depth=2",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "muP:" in out and "NTP:" in out and plot.stat().st_size > 10_000
